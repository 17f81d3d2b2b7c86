"""ModelServer: a Model Serving endpoint for a registered model version, through the Databricks SDK.

The same calls drive a real workspace and the local one (:mod:`lakevision.local.workspace`);
only host and token differ. Every update waits until the endpoint has finished applying it and
raises :class:`DeploymentError` with the served entity's own message when it failed.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from lakevision.errors import LakevisionError
from lakevision.serving.client import DEFAULT_RETRY_TIMEOUT_S, WorkspaceAuthError, workspace_client
from lakevision.serving.endpoint_metrics import parse_endpoint_metrics

log = logging.getLogger(__name__)

_CONCURRENCY_PER_INSTANCE = 4  # Databricks sizes CPU serving in steps of 4 concurrent requests
_WORKLOAD_KEYS = ("workload_size", "workload_type", "scale_to_zero_enabled")
_GPU_INSTANCE = re.compile(r"(^|[_-])(NC|ND|NV)\d|^(g4dn|g5|g6|p3|p4d|p5)\.|gpu", re.IGNORECASE)


class DeploymentError(LakevisionError, RuntimeError):
    """An endpoint could not be created or updated, or is not healthy."""


def workload_for(instance_type: str, max_instances: int) -> dict[str, Any]:
    """Serving compute from the instance settings: a GPU workload type for GPU instance types,
    and the workload size whose concurrency range covers ``max_instances`` replicas."""
    concurrency = max_instances * _CONCURRENCY_PER_INSTANCE
    size = "Small" if concurrency <= 4 else "Medium" if concurrency <= 16 else "Large"
    gpu = bool(_GPU_INSTANCE.search(instance_type))
    kind = {"Small": "GPU_SMALL", "Medium": "GPU_MEDIUM", "Large": "GPU_LARGE"}[size] if gpu else "CPU"
    return {"workload_size": size, "workload_type": kind}


def entity_name(model_name: str, version: str) -> str:
    """Databricks' default served entity name: the model's last name part and the version."""
    return f"{model_name.split('.')[-1]}-{version}"


@dataclass
class EndpointSnapshot:
    """An endpoint's served entities and routes, to put back on a rollback."""

    served_entities: list[dict]
    routes: list[dict]


class ModelServer:
    def __init__(
        self,
        workspace_url: str | None,
        token: str | None,
        model_name: str,
        model_version: str | None = None,
        *,
        retry_timeout_seconds: int = DEFAULT_RETRY_TIMEOUT_S,
        timeout_minutes: float = 20,
        client=None,
    ):
        self.client = client or workspace_client(workspace_url, token, retry_timeout_seconds)
        self.model_name = model_name
        self.model_version = None if model_version is None else str(model_version)
        self.timeout = timedelta(minutes=timeout_minutes)

    # ------------------------------------------------------------------ building configs
    def _entity(self, version: str, workload: dict[str, Any]):
        """A served entity of ``version`` with ``workload`` (size, type, scale to zero)."""
        from databricks.sdk.service.serving import ServedEntityInput

        return ServedEntityInput.from_dict({"name": entity_name(self.model_name, version),
                                            "entity_name": self.model_name, "entity_version": str(version),
                                            **workload})

    @staticmethod
    def _routes(shares: dict[str, int]):
        from databricks.sdk.service.serving import Route, TrafficConfig

        return TrafficConfig(routes=[Route(served_entity_name=n, traffic_percentage=p) for n, p in shares.items()])

    def _wait_failed(self, name: str, action: str, exc: Exception) -> DeploymentError:
        """The served entities' own messages (e.g. why a version failed to load) in the error.
        Read raw: the local workspace also says why in ``state.config_update_message``, a field
        the SDK's classes drop."""
        try:
            ep = self.client.api_client.do("GET", f"/api/2.0/serving-endpoints/{name}")
            entities = [e for key in ("pending_config", "config")
                        for e in (ep.get(key) or {}).get("served_entities", [])]
            notes = [f"{e['name']}: {e['state']['deployment_state_message']}" for e in entities
                     if (e.get("state") or {}).get("deployment_state_message")]
            if ep.get("state", {}).get("config_update_message"):
                notes.insert(0, ep["state"]["config_update_message"])
        except Exception:  # the original failure matters more than a failed follow-up GET
            notes = []
        return DeploymentError(f"endpoint {name}: {action} failed: {exc}" + (f" ({'; '.join(notes)})" if notes else ""))

    # ------------------------------------------------------------------ API reference
    def create_endpoint(self, endpoint_name: str, instance_type: str = "Standard_DS3_v2", min_instances: int = 1,
                        max_instances: int = 5, scale_to_zero: bool = True) -> str:
        """Create ``endpoint_name`` serving ``model_version`` with all traffic and wait until it is
        ready; an endpoint that exists already is updated to that version instead."""
        from databricks.sdk.service.serving import EndpointCoreConfigInput

        if self.model_version is None:
            raise DeploymentError(f"endpoint {endpoint_name}: no model version to serve (pass model_version)")
        # a workload size has no minimum replica count of its own: no minimum means scaling to zero
        workload = workload_for(instance_type, max_instances) | {
            "scale_to_zero_enabled": scale_to_zero or min_instances == 0}
        if not self.exists(endpoint_name):
            entity = self._entity(self.model_version, workload)
            config = EndpointCoreConfigInput(name=endpoint_name, served_entities=[entity],
                                             traffic_config=self._routes({entity.name: 100}))
            try:
                self.client.serving_endpoints.create_and_wait(endpoint_name, config=config, timeout=self.timeout)
            except Exception as exc:
                raise self._wait_failed(endpoint_name, f"creating it with {self.model_name} v{self.model_version}",
                                        exc) from None
            return endpoint_name
        self._apply(endpoint_name, [self._entity(self.model_version, workload)],
                    {entity_name(self.model_name, self.model_version): 100},
                    f"serving {self.model_name} v{self.model_version} at 100%")
        return endpoint_name

    def enable_inference_table(self, endpoint_name: str, catalog: str | None, schema: str, table_name_prefix: str) -> None:
        """Log every request and response of ``endpoint_name`` to the AI Gateway inference table
        ``catalog.schema.<table_name_prefix>_payload`` (locally ``<root>/tables/<schema>/...``)."""
        from databricks.sdk.service.serving import AiGatewayInferenceTableConfig

        config = AiGatewayInferenceTableConfig(catalog_name=catalog, schema_name=schema,
                                               table_name_prefix=table_name_prefix, enabled=True)
        try:
            self.client.serving_endpoints.put_ai_gateway(endpoint_name, inference_table_config=config)
        except Exception as exc:
            raise DeploymentError(f"endpoint {endpoint_name}: enabling the inference table "
                                  f"{schema}.{table_name_prefix}_payload failed: {exc}") from None

    def update_endpoint(self, endpoint_name: str, new_model_version: str, traffic_percentage: int = 100) -> None:
        """Serve ``new_model_version`` with ``traffic_percentage`` of the requests; below 100 the
        version that had most traffic keeps the rest (a canary), other versions are dropped."""
        if not 0 < traffic_percentage <= 100:
            raise DeploymentError(f"traffic_percentage must be in 1..100, got {traffic_percentage}")
        snap = self.snapshot(endpoint_name)
        name = entity_name(self.model_name, str(new_model_version))
        stable = max((r for r in snap.routes if r["served_entity_name"] != name),
                     key=lambda r: r["traffic_percentage"], default=None)
        if traffic_percentage < 100 and stable is None:
            raise DeploymentError(f"endpoint {endpoint_name}: a {traffic_percentage}% canary needs another "
                                  f"version to keep the other {100 - traffic_percentage}%")
        by_name = {e["name"]: self._input_of(e) for e in snap.served_entities}
        # the new version runs on the compute of the version it joins or replaces
        like = by_name[stable["served_entity_name"]] if stable else by_name[name]
        new = self._entity(str(new_model_version), {k: v for k, v in like.as_dict().items() if k in _WORKLOAD_KEYS})
        shares = {name: traffic_percentage}
        entities = [new]
        if traffic_percentage < 100:
            shares[stable["served_entity_name"]] = 100 - traffic_percentage
            entities.append(by_name[stable["served_entity_name"]])
        self.model_version = str(new_model_version)
        self._apply(endpoint_name, entities, shares, f"serving {self.model_name} v{new_model_version} at "
                                                    f"{traffic_percentage}%")

    def monitor_endpoint(self, endpoint_name: str) -> dict[str, Any]:
        """State, served entities, traffic routes, and per-entity latency (p50/p95/p99), throughput,
        error rate (5xx) and client error rate (4xx) over the last minute from the endpoint's
        metrics export."""
        ep = self._get(endpoint_name)
        text = self.client.serving_endpoints.export_metrics(endpoint_name).contents.read().decode()
        per_entity = parse_endpoint_metrics(text)
        total = sum(m["requests"] for m in per_entity.values())
        errors = sum(m["errors_5xx"] for m in per_entity.values())
        client_errors = sum(m["errors_4xx"] for m in per_entity.values())
        cfg = ep.config
        return {
            "name": ep.name,
            "state": {"ready": _value(ep.state.ready), "config_update": _value(ep.state.config_update)},
            "config_version": cfg.config_version if cfg else None,
            "served_entities": [
                {"name": e.name, "entity_name": e.entity_name, "entity_version": e.entity_version,
                 "deployment": _value(e.state.deployment) if e.state else None,
                 "message": e.state.deployment_state_message if e.state else None,
                 "workload_size": e.workload_size, "scale_to_zero_enabled": e.scale_to_zero_enabled}
                for e in (cfg.served_entities if cfg else None) or []],
            "routes": _routes_of(cfg),
            "metrics": {"window_s": 60, "requests": total, "error_rate": errors / total if total else 0.0,
                        "client_error_rate": client_errors / total if total else 0.0,
                        "throughput_rps": total / 60, "per_entity": per_entity},
        }

    # ------------------------------------------------------------------ additions
    def _get(self, endpoint_name: str):
        """GET the endpoint; every flow starts here, so a refused token surfaces here."""
        from databricks.sdk.errors import NotFound, PermissionDenied, Unauthenticated

        try:
            return self.client.serving_endpoints.get(endpoint_name)
        except NotFound:
            raise DeploymentError(f"endpoint {endpoint_name} does not exist") from None
        except (Unauthenticated, PermissionDenied) as exc:
            raise WorkspaceAuthError(f"workspace {self.client.config.host} refused the token: {exc}") from None

    def exists(self, endpoint_name: str) -> bool:
        try:
            self._get(endpoint_name)
            return True
        except DeploymentError:
            return False

    def snapshot(self, endpoint_name: str) -> EndpointSnapshot:
        cfg = self._get(endpoint_name).config
        if cfg is None:
            raise DeploymentError(f"endpoint {endpoint_name} has no active configuration")
        return EndpointSnapshot([e.as_dict() for e in cfg.served_entities or []], _routes_of(cfg))

    @staticmethod
    def _input_of(entity: dict):
        from databricks.sdk.service.serving import ServedEntityInput

        keep = {"name", "entity_name", "entity_version", *_WORKLOAD_KEYS}
        return ServedEntityInput.from_dict({k: v for k, v in entity.items() if k in keep})

    def restore(self, endpoint_name: str, snap: EndpointSnapshot) -> None:
        """Put a snapshot back (the rollback of a failed canary)."""
        self._apply(endpoint_name, [self._input_of(e) for e in snap.served_entities],
                    {r["served_entity_name"]: r["traffic_percentage"] for r in snap.routes}, "rollback")

    def _apply(self, endpoint_name: str, entities: list, shares: dict[str, int], action: str) -> None:
        try:
            self.client.serving_endpoints.update_config_and_wait(
                endpoint_name, served_entities=entities, traffic_config=self._routes(shares), timeout=self.timeout)
        except Exception as exc:
            raise self._wait_failed(endpoint_name, action, exc) from None

    def delete_endpoint(self, endpoint_name: str) -> None:
        self.client.serving_endpoints.delete(endpoint_name)

    def query(self, endpoint_name: str, images_b64: list[str]):
        """One request through the SDK's query call; returns (predictions, served entity name)."""
        from lakevision.packaging.wire import IMAGE_COLUMN

        resp = self.client.serving_endpoints.query(endpoint_name,
                                                   dataframe_records=[{IMAGE_COLUMN: b} for b in images_b64])
        return resp.predictions, resp.served_model_name

    def query_served_model(self, endpoint_name: str, served_entity: str, images_b64: list[str]) -> list:
        """One request to one served entity of the endpoint, whatever the traffic split says
        (``/serving-endpoints/{name}/served-models/{served}/invocations``, which the SDK has no
        method for): a canary check must reach the version it checks."""
        from lakevision.packaging.wire import IMAGE_COLUMN

        body = {"dataframe_records": [{IMAGE_COLUMN: b} for b in images_b64]}
        resp = self.client.api_client.do("POST", f"/serving-endpoints/{endpoint_name}/served-models/{served_entity}"
                                                 "/invocations", body=body)
        return resp.get("predictions")


def _routes_of(cfg) -> list[dict]:
    routes = cfg.traffic_config.routes if cfg and cfg.traffic_config else None
    return [{"served_entity_name": r.served_entity_name or r.served_model_name,
             "traffic_percentage": r.traffic_percentage} for r in routes or []]


def _value(enum_or_none) -> str | None:
    return getattr(enum_or_none, "value", enum_or_none)
