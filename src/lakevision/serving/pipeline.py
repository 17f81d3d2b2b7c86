"""DeploymentPipeline: best run -> metric gate -> registry -> canary -> smoke test -> promote or roll back.

Every step talks to the real services: MLflow for runs and the registry, Spark/Delta for the
test images, and the serving endpoint through the Databricks SDK (a workspace or the local one).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from lakevision.registry.gate import MetricGate
from lakevision.registry.model_registry import ModelRegistry, registered_name
from lakevision.runtime import Runtime
from lakevision.serving.inference_log import inference_table_prefix
from lakevision.serving.model_server import DeploymentError, ModelServer, entity_name
from lakevision.tasks import configured_kind
from lakevision.tracking import best_training_run, mlflow_client

log = logging.getLogger(__name__)

_SMOKE_IMAGES = 8


class DeploymentPipeline:
    def __init__(self, workspace_url: str | None, token: str | None, model_name: str, experiment_name: str,
                 *, runtime: Runtime, task: str | None = None, server: ModelServer | None = None):
        self.rt = runtime
        self.settings = runtime.config.deployment
        self.model_name = registered_name(runtime, model_name)
        self.experiment_name = experiment_name
        self.task = task or runtime.config.training.task
        self.server = server or ModelServer(
            workspace_url, token, self.model_name,
            retry_timeout_seconds=self.settings.workspace.retry_timeout_seconds,
            timeout_minutes=self.settings.endpoint.ready_timeout_minutes)

    # ------------------------------------------------------------------ steps
    def best_run(self) -> dict[str, Any]:
        """The finished training run of ``task`` with the best headline validation metric."""
        task, kind = configured_kind(self.rt.config.training, self.task)
        return best_training_run(mlflow_client(self.rt.tracking_uri), self.experiment_name, task, kind)

    def _log_requests(self, endpoint: str) -> None:
        """Turn on the endpoint's inference table (idempotent, so every deploy asserts it)."""
        if self.settings.monitoring.inference_table:
            target = self.rt.config.target
            self.server.enable_inference_table(endpoint, target.catalog, target.schema_,
                                               inference_table_prefix(self.settings, endpoint))

    def smoke_images(self) -> list[str]:
        """Test-split images of the gold table, base64 as a caller sends them."""
        from pathlib import Path

        from lakevision.packaging.wire import encode_image
        from lakevision.data.samples import load_split

        paths = load_split(self.rt, "test").image_paths[:_SMOKE_IMAGES]
        if not paths:
            raise DeploymentError("the gold test split has no images to smoke-test the endpoint with")
        return [encode_image(Path(p).read_bytes()) for p in paths]

    def smoke_test(self, endpoint: str, new_entity: str, images: list[str]) -> dict[str, Any]:
        """``smoke_requests`` test images sent straight to each served entity of the endpoint
        (the traffic split would send most of them past a 10% canary), then the new version
        judged: server errors (5xx, or no answer) and its 5xx rate and p95 latency in the
        endpoint's own metrics bound it. Bad-request answers (4xx) are reported, and fail it
        only when the new version answered none of its requests."""
        from databricks.sdk.errors import (BadRequest, NotFound, PermissionDenied, ResourceConflict,
                                           TooManyRequests, Unauthenticated)

        c = self.settings.canary
        client_errors = (BadRequest, NotFound, ResourceConflict, TooManyRequests, Unauthenticated, PermissionDenied)
        served = [e["name"] for e in self.server.snapshot(endpoint).served_entities]
        per_entity: dict[str, dict[str, Any]] = {}
        failures: list[str] = []
        for entity in sorted(served, key=lambda n: n != new_entity):  # the new version first
            counts = {"requests": 0, "answered": 0, "server_errors": 0, "client_errors": 0}
            latencies = []
            for i in range(c.smoke_requests):
                counts["requests"] += 1
                t0 = time.perf_counter()
                try:
                    preds = self.server.query_served_model(endpoint, entity, [images[i % len(images)]])
                    latencies.append((time.perf_counter() - t0) * 1000)
                    if not preds:
                        raise DeploymentError("empty predictions")
                    counts["answered"] += 1
                except client_errors as exc:
                    counts["client_errors"] += 1
                    failures.append(f"{entity}: {type(exc).__name__}: {exc}"[:300])
                except Exception as exc:  # a 5xx, a dropped connection, an empty answer
                    counts["server_errors"] += 1
                    failures.append(f"{entity}: {type(exc).__name__}: {exc}"[:300])
            per_entity[entity] = {**counts, "client_p50_ms": _percentile(latencies, 50),
                                  "client_p95_ms": _percentile(latencies, 95)}
        status = self.server.monitor_endpoint(endpoint)
        mine = status["metrics"]["per_entity"].get(new_entity, {})
        problems = []
        for entity, counts in per_entity.items():
            if counts["server_errors"] / counts["requests"] > c.max_error_rate:
                problems.append(f"{entity}: {counts['server_errors']}/{counts['requests']} smoke requests failed "
                                f"(max error rate {c.max_error_rate:g})")
        new = per_entity[new_entity]
        if new["answered"] == 0:
            problems.append(f"{new_entity} answered none of its {new['requests']} smoke requests "
                            f"({new['client_errors']} refused as bad requests)")
        if (mine.get("error_rate") or 0.0) > c.max_error_rate:
            problems.append(f"{new_entity} server error rate {mine['error_rate']:.3f} in the endpoint's metrics")
        p95 = mine.get("latency_p95_ms")
        if c.max_p95_latency_ms is not None and p95 is not None and p95 > c.max_p95_latency_ms:
            problems.append(f"{new_entity} p95 latency {p95:.1f} ms > {c.max_p95_latency_ms:g} ms")
        return {"requests": sum(v["requests"] for v in per_entity.values()), "per_entity": per_entity,
                "endpoint_metrics": mine, "healthy": not problems, "problems": problems, "failures": failures[:5]}

    # ------------------------------------------------------------------ the pipeline
    def run_pipeline(self, metrics_threshold: dict[str, float], endpoint_name: str | None = None, *,
                     model_uri: str | None = None, traffic_percentage: int | None = None) -> dict[str, Any]:
        """Gate the best run's model (or ``model_uri``), register it, deploy it as a canary,
        smoke-test it and promote it to all traffic, or roll back. The report says which."""
        endpoint = endpoint_name or self.settings.endpoint_name
        report: dict[str, Any] = {"model_name": self.model_name, "endpoint": endpoint, "status": None}
        if model_uri is None:
            report["best_run"] = self.best_run()
            model_uri = report["best_run"]["model_uri"]
        gate = MetricGate(self.rt, self.model_name, thresholds=metrics_threshold).run(model_uri)
        report["gate"] = gate.to_json()
        if not gate.passed:
            report["status"] = "gate_failed"
        else:
            version = gate.registered["version"]
            report["deployment"] = self.deploy(endpoint, version, traffic_percentage)
            report["status"] = report["deployment"]["status"]
            if report["status"] == "deployed":
                old = ModelRegistry(self.rt, self.model_name).promote(version)
                report["champion"] = {"version": version, "previous": old.version if old else None}
        report["endpoint_state"] = self.server.monitor_endpoint(endpoint) if self.server.exists(endpoint) else None
        return report

    def deploy(self, endpoint: str, version: str, traffic_percentage: int | None = None) -> dict[str, Any]:
        """Canary ``version`` on ``endpoint`` (or create the endpoint), smoke-test, then promote
        to 100% or restore the previous configuration."""
        share = traffic_percentage or self.settings.canary.traffic_percentage
        new = entity_name(self.model_name, version)
        ep = self.settings.endpoint
        images = self.smoke_images()
        self.server.model_version = version
        if not self.server.exists(endpoint):
            try:
                self.server.create_endpoint(endpoint, ep.instance_type, ep.min_instances, ep.max_instances,
                                            ep.scale_to_zero)
                self._log_requests(endpoint)
                smoke = self.smoke_test(endpoint, new, images)
            except DeploymentError as exc:
                smoke = {"healthy": False, "problems": [str(exc)]}
            if not smoke["healthy"]:
                # a new endpoint has no earlier configuration to go back to
                self.server.delete_endpoint(endpoint)
                return {"status": "rolled_back", "action": "created_then_deleted", "version": version, "smoke": smoke}
            return {"status": "deployed", "action": "created", "version": version, "steps": [100], "smoke": smoke}
        self._log_requests(endpoint)
        before = self.server.snapshot(endpoint)
        if [r["served_entity_name"] for r in before.routes if r["traffic_percentage"] == 100] == [new]:
            return {"status": "deployed", "action": "already_serving", "version": version, "steps": []}
        steps = []
        try:
            self.server.update_endpoint(endpoint, version, share)
            steps.append(share)
            smoke = self.smoke_test(endpoint, new, images)
        except DeploymentError as exc:
            smoke = {"healthy": False, "problems": [str(exc)]}
        if not smoke["healthy"]:
            self.server.restore(endpoint, before)
            return {"status": "rolled_back", "action": "canary_rolled_back", "version": version, "steps": steps,
                    "smoke": smoke, "restored": before.routes}
        if share < 100:
            self.server.update_endpoint(endpoint, version, 100)
            steps.append(100)
        return {"status": "deployed", "action": "canary_promoted", "version": version, "steps": steps, "smoke": smoke}


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    import numpy as np

    return float(np.percentile(values, q))


def run_deployment(rt: Runtime, model_name: str | None = None, endpoint: str | None = None,
                   traffic_percentage: int | None = None, model_uri: str | None = None, task: str | None = None,
                   host: str | None = None) -> dict[str, Any]:
    """The deploy job: :meth:`DeploymentPipeline.run_pipeline` with the configured thresholds.

    Locally, with no ``host``, a local workspace process on the root's registry serves for the
    length of the job; on Databricks the host and token come from the config, the environment
    or a secret scope (never from arguments that end up in logs)."""
    from lakevision.serving.client import workspace_connection

    d = rt.config.deployment
    name = model_name or d.model_name
    with workspace_connection(rt, host) as (url, token):
        pipeline = DeploymentPipeline(url, token, name, rt.experiment_name, runtime=rt, task=task)
        report = pipeline.run_pipeline(dict(d.metrics_threshold), endpoint, model_uri=model_uri,
                                       traffic_percentage=traffic_percentage)
    report["workspace"] = url
    return report
