"""The monitor step: endpoint health, metrics from the inference table, drift, retraining."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from lakevision.errors import LakevisionError
from lakevision.jobs.base import WrappedResult, Step, common_arguments, job_runtime, optional_str
from lakevision.jobs.deploy import route_line

if TYPE_CHECKING:
    from lakevision.monitoring.monitor import MonitorReport


class EndpointUnhealthyError(LakevisionError):
    """The monitor found the endpoint down or outside its bounds."""


class MonitorStepResult(WrappedResult):
    result: MonitorReport

    def task_values(self) -> dict[str, Any]:
        r = self.result
        triggered = r.triggered or {}
        return {"healthy": r.health["healthy"], "problems": r.health["problems"], "retrain": r.retrain,
                "reasons": r.reasons, "model_version": r.model_version,
                "triggered": triggered.get("run_id")}

    def summary(self) -> list[str]:
        r = self.result
        lines = [route_line(r.health["status"])] if r.health["status"] else []
        lines.append(f"window {r.window_start:%Y-%m-%d %H:%M} to {r.window_end:%H:%M} UTC"
                     + ("" if r.window_complete else " (rows may still arrive)"))
        lines += [f"  {s['served_entity_id']} ({s.get('entity_name')} v{s.get('entity_version')}): {s['requests']} "
                  f"requests, p50 {s.get('latency_p50_ms')} ms, p99 {s.get('latency_p99_ms')} ms, server error rate "
                  f"{s.get('error_rate')}, client error rate {s.get('client_error_rate')}" for s in r.stats]
        if r.feedback and r.feedback["value"] is not None:
            lines.append(f"feedback: {r.feedback['metric']} {r.feedback['value']:.4g} on {r.feedback['images']} "
                         "labelled images")
        lines.append("healthy" if r.health["healthy"] else "UNHEALTHY: " + "; ".join(r.health["problems"]))
        lines.append(f"drift: {'retrain' if r.retrain else 'no retrain'}; " + "; ".join(r.reasons))
        if r.triggered:
            lines.append(f"started {r.triggered}")
        return lines

    def raise_for_status(self) -> None:
        # an unhealthy endpoint fails the run, so the job's failure notifications reach someone
        if not self.result.health["healthy"]:
            raise EndpointUnhealthyError(f"endpoint {self.result.endpoint}: " + "; ".join(self.result.health["problems"]))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint", type=optional_str, default=None, help="serving endpoint (default: deployment.endpoint_name)")
    p.add_argument("--host", type=optional_str, default=None,
                   help="workspace URL (default: a local workspace for --target local)")
    p.add_argument("--retrain-job", type=optional_str, default=None,
                   help="job to start through the Jobs API when retraining is due: a job id or a job name "
                        "(default: deployment.monitoring.retrain_job)")
    p.add_argument("--no-retrain", action="store_true", help="report a due retraining without starting it")
    p.add_argument("--bundle", type=optional_str, default=None,
                   help="folder with databricks.yml whose jobs the local workspace runs (default: the one "
                        "above the working directory)")
    common_arguments(p)


def run(args: argparse.Namespace) -> MonitorStepResult:
    from lakevision.monitoring.monitor import run_monitoring

    with job_runtime(args) as rt:
        return MonitorStepResult(run_monitoring(rt, args.endpoint, args.host, retrain=not args.no_retrain,
                                                retrain_job=args.retrain_job, bundle_dir=args.bundle))


STEP = Step("monitor", "endpoint health, metrics from the inference table, drift, retraining", add_arguments, run)
