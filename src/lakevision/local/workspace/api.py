"""The REST shapes of the local workspace's Model Serving API: request bodies checked and turned
into endpoint configs, records answered as Databricks answers them, and Databricks' error shape."""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Mapping
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

from lakevision.errors import LakevisionError

CREATOR = "local"
TOKEN_ENV = "LAKEVISION_WORKSPACE_TOKEN"  # the token of a workspace process, passed out of sight of ps

# Databricks: endpoint and served entity names are letters, digits, dashes and underscores
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,63}")
_VERSION_RE = re.compile(r"[1-9][0-9]*")
_WORKLOAD_TYPES = ("CPU", "CPU_MEDIUM", "CPU_LARGE", "GPU_SMALL", "GPU_MEDIUM", "GPU_LARGE", "GPU_XLARGE",
                   "GPU_XLARGE_8", "MULTIGPU_MEDIUM")
_CONCURRENCY_FIELDS = ("min_provisioned_concurrency", "max_provisioned_concurrency")

READY, NOT_READY = "READY", "NOT_READY"
IN_PROGRESS, NOT_UPDATING, UPDATE_FAILED = "IN_PROGRESS", "NOT_UPDATING", "UPDATE_FAILED"


class LocalWorkspaceError(LakevisionError, RuntimeError):
    """The local workspace could not start or its records cannot be read."""


class ApiError(Exception):
    """An error answered as Databricks does: an HTTP status and ``{"error_code", "message"}``."""

    def __init__(self, status: int, error_code: str, message: str, headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.error_code = error_code
        self.message = message
        self.headers = dict(headers or {})

    def response(self) -> JSONResponse:
        return JSONResponse({"error_code": self.error_code, "message": self.message}, self.status,
                            headers=self.headers)


def invalid(message: str) -> ApiError:
    return ApiError(400, "INVALID_PARAMETER_VALUE", message)


def no_endpoint(name: str) -> ApiError:
    return ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"serving endpoint {name!r} does not exist")


def now_ms() -> int:
    return int(time.time() * 1000)


# --- request bodies -> validated configs --------------------------------------------------------


def check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise invalid(f"{what} {value!r}: use 1 to 63 letters, digits, dashes and underscores")
    return value


def _served_entity(where: str, raw: Any, legacy: bool) -> dict:
    """One ``served_entities`` item (or a legacy ``served_models`` one) as stored and answered."""
    if not isinstance(raw, dict):
        raise invalid(f"{where} must be an object")
    name_key, version_key = ("model_name", "model_version") if legacy else ("entity_name", "entity_version")
    entity_name = raw.get(name_key)
    if not isinstance(entity_name, str) or not entity_name:
        raise invalid(f"{where}.{name_key} is required")
    version = raw.get(version_key)
    if isinstance(version, bool) or not _VERSION_RE.fullmatch(str(version)):
        raise invalid(f"{where}.{version_key} must be a registered model version number, got {version!r}")
    version = str(version)
    name = raw.get("name") or f"{entity_name.replace('.', '-')}-{version}"
    check_name(name, f"{where}.name" if raw.get("name") else f"{where}: default name (give a name)")
    workload_size = raw.get("workload_size", "Small")
    if not isinstance(workload_size, str) or not workload_size:
        raise invalid(f"{where}.workload_size must be a size such as Small, Medium or Large")
    scale_to_zero = raw.get("scale_to_zero_enabled", False)
    if not isinstance(scale_to_zero, bool):
        raise invalid(f"{where}.scale_to_zero_enabled must be true or false")
    workload_type = raw.get("workload_type", "CPU")
    if workload_type not in _WORKLOAD_TYPES:
        raise invalid(f"{where}.workload_type {workload_type!r}: one of {', '.join(_WORKLOAD_TYPES)}")
    entity = {"name": name, "entity_name": entity_name, "entity_version": version, "workload_size": workload_size,
              "scale_to_zero_enabled": scale_to_zero, "workload_type": workload_type}
    for key in _CONCURRENCY_FIELDS:
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise invalid(f"{where}.{key} must be a non-negative integer, got {value!r}")
            entity[key] = value
    if all(k in entity for k in _CONCURRENCY_FIELDS) and entity[_CONCURRENCY_FIELDS[0]] > entity[_CONCURRENCY_FIELDS[1]]:
        raise invalid(f"{where}: min_provisioned_concurrency exceeds max_provisioned_concurrency")
    return entity


def _routes(where: str, traffic: Any, names: list[str]) -> list[dict]:
    routes = traffic.get("routes") if isinstance(traffic, dict) else None
    if not routes:
        if len(names) == 1:
            return [{"served_entity_name": names[0], "served_model_name": names[0], "traffic_percentage": 100}]
        raise invalid(f"{where}traffic_config.routes is required with {len(names)} served entities")
    if not isinstance(routes, list):
        raise invalid(f"{where}traffic_config.routes must be a list")
    out: list[dict] = []
    for i, route in enumerate(routes):
        at = f"{where}traffic_config.routes[{i}]"
        if not isinstance(route, dict):
            raise invalid(f"{at} must be an object")
        by_entity, by_model = route.get("served_entity_name"), route.get("served_model_name")
        if by_entity and by_model and by_entity != by_model:
            raise invalid(f"{at}: served_entity_name {by_entity!r} and served_model_name {by_model!r} differ")
        target = by_entity or by_model
        if target not in names:
            raise invalid(f"{at} routes to {target!r}, not a served entity of this config ({', '.join(names)})")
        if any(r["served_entity_name"] == target for r in out):
            raise invalid(f"{at}: a second route to {target!r}")
        pct = route.get("traffic_percentage")
        if isinstance(pct, bool) or not isinstance(pct, int) or not 0 <= pct <= 100:
            raise invalid(f"{at}.traffic_percentage must be an integer from 0 to 100, got {pct!r}")
        out.append({"served_entity_name": target, "served_model_name": target, "traffic_percentage": pct})
    total = sum(r["traffic_percentage"] for r in out)
    if total != 100:
        raise invalid(f"{where}traffic_config.routes: the percentages add up to {total}, not 100")
    return out


def parse_config(endpoint: str, body: Mapping[str, Any], prefix: str = "") -> dict:
    """``served_entities`` (or legacy ``served_models``) and ``traffic_config`` of a create
    (``prefix="config."``) or update_config body, validated; every error names the endpoint and field."""
    where = f"endpoint {endpoint}: {prefix}"
    entities_raw, models_raw = body.get("served_entities"), body.get("served_models")
    if entities_raw and models_raw:
        raise invalid(f"{where}served_entities and served_models cannot both be given")
    legacy = not entities_raw
    items = models_raw if legacy else entities_raw
    field = "served_models" if legacy else "served_entities"
    if not isinstance(items, list) or not items:
        raise invalid(f"{where}served_entities must list at least one entity")
    entities = [_served_entity(f"{where}{field}[{i}]", raw, legacy) for i, raw in enumerate(items)]
    names = [e["name"] for e in entities]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise invalid(f"{where}{field}: served entity names must be unique, {', '.join(duplicates)} repeat")
    return {"served_entities": entities, "traffic_config": {"routes": _routes(where, body.get("traffic_config"), names)}}


def parse_tags(endpoint: str, raw: Any) -> list[dict]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(t, dict) and isinstance(t.get("key"), str) for t in raw):
        raise invalid(f"endpoint {endpoint}: tags must be a list of {{key, value}} objects")
    return [{"key": t["key"], **({"value": str(t["value"])} if t.get("value") is not None else {})} for t in raw]


# --- records as answered ----------------------------------------------------------------------


def parse_ai_gateway(endpoint: str, raw: Any) -> dict:
    """The part of an AI Gateway config the local workspace acts on: its inference table."""
    if not isinstance(raw, dict):
        raise invalid(f"endpoint {endpoint}: ai_gateway must be an object")
    table = raw.get("inference_table_config")
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise invalid(f"endpoint {endpoint}: ai_gateway.inference_table_config must be an object")
    out = {"enabled": bool(table.get("enabled", False))}
    for key in ("catalog_name", "schema_name", "table_name_prefix"):
        if key in table:
            out[key] = check_name(table[key], f"ai_gateway.inference_table_config.{key}")
    if out["enabled"] and not {"schema_name", "table_name_prefix"} <= set(out):
        raise invalid(f"endpoint {endpoint}: an enabled inference table needs schema_name and table_name_prefix")
    return {"inference_table_config": out}


def entity_state(deployment: str, message: str) -> dict:
    return {"deployment": deployment, "deployment_state_message": message}


def model_uri(entity: Mapping[str, Any]) -> str:
    return f"models:/{entity['entity_name']}/{entity['entity_version']}"


def new_config(config: dict, version: int, now: int) -> dict:
    config = copy.deepcopy(config)
    for entity in config["served_entities"]:
        entity.update(creation_timestamp=now, creator=CREATOR,
                      state=entity_state("DEPLOYMENT_CREATING", f"loading {model_uri(entity)}"))
    return {**config, "config_version": version, "start_time": now}


def served_model(entity: Mapping[str, Any]) -> dict:
    """The legacy ``served_models`` view of a served entity, which Databricks still returns."""
    out = {k: v for k, v in entity.items() if k not in ("entity_name", "entity_version")}
    return {**out, "model_name": entity["entity_name"], "model_version": entity["entity_version"]}


def detailed(record: Mapping[str, Any]) -> dict:
    """``ServingEndpointDetailed``: the record with the legacy ``served_models`` view added."""
    out = copy.deepcopy(dict(record))
    for key in ("config", "pending_config"):
        if key in out:
            out[key]["served_models"] = [served_model(e) for e in out[key]["served_entities"]]
    return out


def summary(record: Mapping[str, Any]) -> dict:
    """``ServingEndpoint``, the shape of a list item: no traffic config, entities by name only."""
    keys = ("name", "id", "creator", "creation_timestamp", "last_updated_timestamp", "state", "tags", "task")
    out = {k: copy.deepcopy(record[k]) for k in keys if k in record}
    if "config" in record:
        entities = record["config"]["served_entities"]
        out["config"] = {
            "served_entities": [{k: e[k] for k in ("name", "entity_name", "entity_version")} for e in entities],
            "served_models": [{"name": e["name"], "model_name": e["entity_name"], "model_version": e["entity_version"]}
                              for e in entities],
        }
    return out



async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 when it is over ``limit`` bytes: at once on a Content-Length
    that says so, else as soon as the bytes read pass it, so an oversized body is never held."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(f"Content-Length {int(declared):,}", limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(f"more than {limit:,} bytes read", limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(what: str, limit: int) -> ApiError:
    return ApiError(413, "REQUEST_LIMIT_EXCEEDED", f"the request body is over the {limit // (1024 * 1024)} MB "
                                                   f"a serving endpoint accepts ({what})")


async def json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw or b"{}")
    except RecursionError:
        raise ApiError(400, "MALFORMED_REQUEST", f"{request.method} {request.url.path}: body nests too deeply") from None
    except ValueError as exc:
        raise ApiError(400, "MALFORMED_REQUEST", f"{request.method} {request.url.path}: body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "MALFORMED_REQUEST", f"{request.method} {request.url.path}: body must be a JSON object")
    return body
