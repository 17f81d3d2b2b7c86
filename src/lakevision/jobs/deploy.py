"""The deploy step: best run -> gate -> register -> canary on the serving endpoint -> promote or roll back."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from lakevision.jobs.base import Step, common_arguments, job_runtime, optional_str, percentage
from lakevision.tasks import TRAINING_TASKS
from lakevision.jobs.gate import gate_lines


def route_line(state: dict[str, Any]) -> str:
    """An endpoint's state and traffic split on one line."""
    routes = ", ".join(f"{r['served_entity_name']} {r['traffic_percentage']}%" for r in state["routes"])
    return f"endpoint {state['name']}: {state['state']['ready']}, {state['state']['config_update']}; {routes}"


@dataclass
class DeployStepResult:
    report: dict[str, Any]  # DeploymentPipeline.run_pipeline's report (the API reference fixes it as a dict)

    def to_json(self) -> dict[str, Any]:
        return self.report

    def task_values(self) -> dict[str, Any]:
        r = self.report
        return {"status": r["status"], "endpoint": r["endpoint"],
                "champion_version": (r.get("champion") or {}).get("version")}

    def summary(self) -> list[str]:
        r = self.report
        lines = []
        if "best_run" in r:
            lines.append(f"best run {r['best_run']['run_id']}: {r['best_run']['metric']} = {r['best_run']['value']}")
        lines += gate_lines(r["gate"])
        dep = r.get("deployment") or {}
        if dep:
            lines.append(f"deployment: {dep['status']} ({dep['action']}), traffic steps {dep.get('steps')}")
            lines += [f"  problem: {p}" for p in (dep.get("smoke") or {}).get("problems", [])]
        if r.get("champion"):
            lines.append(f"champion: version {r['champion']['version']} (previous: {r['champion']['previous']})")
        if r.get("endpoint_state"):
            lines.append(route_line(r["endpoint_state"]))
        return lines

    def raise_for_status(self) -> None:
        from lakevision.registry.gate import GateFailedError
        from lakevision.serving.model_server import DeploymentError

        r = self.report
        if r["status"] == "gate_failed":
            raise GateFailedError(r["gate"]["message"])
        if r["status"] != "deployed":
            problems = (r.get("deployment") or {}).get("smoke", {}).get("problems", [])
            raise DeploymentError(f"{r['model_name']} was not deployed to {r['endpoint']} ({r['status']}): "
                                  + "; ".join(problems))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-name", type=optional_str, default=None, help="registered model (default: deployment.model_name)")
    p.add_argument("--endpoint", type=optional_str, default=None,
                   help="serving endpoint (default: deployment.endpoint_name)")
    p.add_argument("--traffic", type=percentage, default=None, metavar="P",
                   help="canary share of the new version, 1-100 (default: deployment.canary.traffic_percentage)")
    p.add_argument("--model-uri", type=optional_str, default=None,
                   help="deploy this model instead of the experiment's best run")
    p.add_argument("--task", choices=TRAINING_TASKS, default=None, help="task of the best run to pick (default: training.task)")
    p.add_argument("--host", type=optional_str, default=None,
                   help="workspace URL (default: a local workspace for --target local, deployment.workspace.host "
                        "or $DATABRICKS_HOST otherwise)")
    common_arguments(p)


def run(args: argparse.Namespace) -> DeployStepResult:
    from lakevision.serving.pipeline import run_deployment

    with job_runtime(args) as rt:
        return DeployStepResult(run_deployment(rt, args.model_name, args.endpoint, args.traffic, args.model_uri,
                                               args.task, args.host))


STEP = Step("deploy", "best run -> gate -> register -> canary -> promote or roll back", add_arguments, run)
