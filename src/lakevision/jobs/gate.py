"""The gate step: register the model and alias it challenger when it passes the metric gate."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lakevision.jobs.base import Step, common_arguments, data_version_argument, job_runtime, optional_str

if TYPE_CHECKING:
    from lakevision.registry.gate import GateReport


def gate_lines(gate: dict[str, Any]) -> list[str]:
    """A gate report (its JSON form) for a person: every check, the champion comparison, the registration."""
    lines = [f"gate {'passed' if gate['passed'] else 'FAILED'}: {gate['model_uri']} ({gate['task']}) "
             f"on test data version {gate['data_version']}"]
    for c in gate["checks"]:
        op = ">=" if c["kind"] == "min" else "<="
        lines.append(f"  {'ok  ' if c['passed'] else 'FAIL'} {c['metric']:<16} {c['value']} {op} {c['bound']}")
    if gate["comparison"]:
        c = gate["comparison"]
        lines.append(f"  {'ok  ' if c['passed'] else 'FAIL'} vs champion v{gate['champion']['version']}: {c['metric']} "
                     f"{c['challenger']} vs {c['champion']} (min improvement {c['min_improvement']})")
    if gate["registered"]:
        r = gate["registered"]
        lines.append(f"registered {r['name']} version {r['version']}{'' if r['created'] else ' (already registered)'}"
                     ", alias challenger")
    return lines


@dataclass
class GateStepResult:
    report: GateReport
    continue_on_fail: bool

    def to_json(self) -> dict[str, Any]:
        return self.report.to_json()

    def task_values(self) -> dict[str, Any]:
        return {"passed": self.report.passed, "message": self.report.message(),
                "model_version": (self.report.registered or {}).get("version")}

    def summary(self) -> list[str]:
        return gate_lines(self.to_json())

    def raise_for_status(self) -> None:
        # in a job the failed gate is an outcome the condition task reads, so the task stays green
        if not self.report.passed and not self.continue_on_fail:
            from lakevision.registry.gate import GateFailedError

            raise GateFailedError(self.report.message())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-uri", required=True, help="the challenger, e.g. models:/m-... from the train job")
    p.add_argument("--model-name", type=optional_str, default=None,
                   help="registered model (default: deployment.model_name)")
    data_version_argument(p)
    p.add_argument("--continue-on-fail", action="store_true",
                   help="succeed when the gate fails; a job's condition task reads the `passed` task value")
    common_arguments(p)


def run(args: argparse.Namespace) -> GateStepResult:
    from lakevision.registry.gate import MetricGate

    with job_runtime(args) as rt:
        report = MetricGate(rt, args.model_name).run(args.model_uri, args.data_version)
    return GateStepResult(report, args.continue_on_fail)


STEP = Step("gate", "metric gate: register the model and alias it challenger if it passes", add_arguments, run)
