"""Endpoint health: is the serving endpoint up, and are its errors and latency within bounds?

The monitor job runs this on a schedule and fails when the answer is no, so the job's failure
notification is the alert.
"""

from __future__ import annotations

from typing import Any

from lakevision.runtime import Runtime
from lakevision.serving.client import workspace_connection
from lakevision.serving.model_server import ModelServer


def judge(status: dict[str, Any], max_error_rate: float, max_p99_latency_ms: float | None) -> list[str]:
    """What is wrong with an endpoint, from :meth:`ModelServer.monitor_endpoint`'s report. Its
    error rate counts server errors (5xx) only: bad requests (4xx) are the callers' mistakes,
    reported beside it, and no reason to page anyone about the endpoint."""
    problems = []
    state = status["state"]
    if state["ready"] != "READY":
        problems.append(f"endpoint {status['name']} is {state['ready']}")
    if state["config_update"] == "UPDATE_FAILED":
        problems.append(f"the last config update of {status['name']} failed")
    for entity, m in status["metrics"]["per_entity"].items():
        if m.get("requests") and (m.get("error_rate") or 0.0) > max_error_rate:
            problems.append(f"{entity}: server error rate {m['error_rate']:.3f} > {max_error_rate:g}")
        p99 = m.get("latency_p99_ms")
        if max_p99_latency_ms is not None and p99 is not None and p99 > max_p99_latency_ms:
            problems.append(f"{entity}: p99 latency {p99:.1f} ms > {max_p99_latency_ms:g} ms")
    return problems


def endpoint_health(rt: Runtime, endpoint: str | None = None, host: str | None = None) -> dict[str, Any]:
    """State, served versions and last-minute metrics of ``endpoint`` with a healthy/unhealthy verdict."""
    d = rt.config.deployment
    name = endpoint or d.endpoint_name
    with workspace_connection(rt, host) as (url, token):
        server = ModelServer(url, token, d.model_name, retry_timeout_seconds=d.workspace.retry_timeout_seconds)
        if not server.exists(name):
            return {"endpoint": name, "healthy": False, "problems": [f"endpoint {name} does not exist"], "status": None}
        status = server.monitor_endpoint(name)
    problems = judge(status, d.monitoring.max_error_rate, d.monitoring.max_p99_latency_ms)
    return {"endpoint": name, "healthy": not problems, "problems": problems, "status": status}
