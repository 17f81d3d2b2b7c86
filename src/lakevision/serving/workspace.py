"""LocalWorkspace: the Model Serving part of the Databricks workspace REST API, served on
127.0.0.1 so that the real ``databricks-sdk`` ``WorkspaceClient`` drives it unchanged.

Models come from an MLflow registry (``models:/<name>/<version>``, a sqlite store by default) and
answer through MLflow's own scoring function, so parsing, schema enforcement and the 400 messages
are those of ``mlflow models serve`` and of a Databricks custom-model endpoint.

What it keeps from Databricks, because deployment code depends on it:

* the life cycle the SDK's ``*_and_wait`` methods poll: a config loads in the background
  (``config_update: IN_PROGRESS``), the old config serves every request until the new one has
  loaded and is swapped in at once, and a config that fails to load ends in ``UPDATE_FAILED``
  with the old one still serving;
* traffic split by percentage between served entities, and the ``served-model-name`` header;
* the error shape ``{"error_code", "message"}`` with Databricks' codes, which the SDK turns into
  ``NotFound``, ``InvalidParameterValue``, ``ResourceConflict``...;
* the per-entity health metrics of the last minute in Prometheus format.

One local extension: ``state.config_update_message`` says why a config failed or was dropped
(Databricks shows that in its UI); the SDK ignores it.

The MLflow tracking and registry URIs are process-wide in MLflow, so one process holds one
workspace's registry; :func:`local_workspace_process` runs a workspace in a process of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import hmac
import json
import logging
import os
import queue
import random
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lakevision.errors import LakevisionError
from lakevision.serving.endpoint_metrics import CONTENT_TYPE, RequestStats, RequestWindow, render_endpoint_metrics
from lakevision.serving.inference_log import InferenceLogger, inference_row, payload_table_name
from lakevision.tracking import local_tracking_uri

log = logging.getLogger(__name__)

TOKEN_ENV = "LAKEVISION_WORKSPACE_TOKEN"
LISTENING = "workspace listening on "
CREATOR = "local"

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


def _invalid(message: str) -> ApiError:
    return ApiError(400, "INVALID_PARAMETER_VALUE", message)


def _no_endpoint(name: str) -> ApiError:
    return ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"serving endpoint {name!r} does not exist")


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- request bodies -> validated configs --------------------------------------------------------


def _check_name(value: Any, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise _invalid(f"{what} {value!r}: use 1 to 63 letters, digits, dashes and underscores")
    return value


def _served_entity(where: str, raw: Any, legacy: bool) -> dict:
    """One ``served_entities`` item (or a legacy ``served_models`` one) as stored and answered."""
    if not isinstance(raw, dict):
        raise _invalid(f"{where} must be an object")
    name_key, version_key = ("model_name", "model_version") if legacy else ("entity_name", "entity_version")
    entity_name = raw.get(name_key)
    if not isinstance(entity_name, str) or not entity_name:
        raise _invalid(f"{where}.{name_key} is required")
    version = raw.get(version_key)
    if isinstance(version, bool) or not _VERSION_RE.fullmatch(str(version)):
        raise _invalid(f"{where}.{version_key} must be a registered model version number, got {version!r}")
    version = str(version)
    name = raw.get("name") or f"{entity_name.replace('.', '-')}-{version}"
    _check_name(name, f"{where}.name" if raw.get("name") else f"{where}: default name (give a name)")
    workload_size = raw.get("workload_size", "Small")
    if not isinstance(workload_size, str) or not workload_size:
        raise _invalid(f"{where}.workload_size must be a size such as Small, Medium or Large")
    scale_to_zero = raw.get("scale_to_zero_enabled", False)
    if not isinstance(scale_to_zero, bool):
        raise _invalid(f"{where}.scale_to_zero_enabled must be true or false")
    workload_type = raw.get("workload_type", "CPU")
    if workload_type not in _WORKLOAD_TYPES:
        raise _invalid(f"{where}.workload_type {workload_type!r}: one of {', '.join(_WORKLOAD_TYPES)}")
    entity = {"name": name, "entity_name": entity_name, "entity_version": version, "workload_size": workload_size,
              "scale_to_zero_enabled": scale_to_zero, "workload_type": workload_type}
    for key in _CONCURRENCY_FIELDS:
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise _invalid(f"{where}.{key} must be a non-negative integer, got {value!r}")
            entity[key] = value
    if all(k in entity for k in _CONCURRENCY_FIELDS) and entity[_CONCURRENCY_FIELDS[0]] > entity[_CONCURRENCY_FIELDS[1]]:
        raise _invalid(f"{where}: min_provisioned_concurrency exceeds max_provisioned_concurrency")
    return entity


def _routes(where: str, traffic: Any, names: list[str]) -> list[dict]:
    routes = traffic.get("routes") if isinstance(traffic, dict) else None
    if not routes:
        if len(names) == 1:
            return [{"served_entity_name": names[0], "served_model_name": names[0], "traffic_percentage": 100}]
        raise _invalid(f"{where}traffic_config.routes is required with {len(names)} served entities")
    if not isinstance(routes, list):
        raise _invalid(f"{where}traffic_config.routes must be a list")
    out: list[dict] = []
    for i, route in enumerate(routes):
        at = f"{where}traffic_config.routes[{i}]"
        if not isinstance(route, dict):
            raise _invalid(f"{at} must be an object")
        by_entity, by_model = route.get("served_entity_name"), route.get("served_model_name")
        if by_entity and by_model and by_entity != by_model:
            raise _invalid(f"{at}: served_entity_name {by_entity!r} and served_model_name {by_model!r} differ")
        target = by_entity or by_model
        if target not in names:
            raise _invalid(f"{at} routes to {target!r}, not a served entity of this config ({', '.join(names)})")
        if any(r["served_entity_name"] == target for r in out):
            raise _invalid(f"{at}: a second route to {target!r}")
        pct = route.get("traffic_percentage")
        if isinstance(pct, bool) or not isinstance(pct, int) or not 0 <= pct <= 100:
            raise _invalid(f"{at}.traffic_percentage must be an integer from 0 to 100, got {pct!r}")
        out.append({"served_entity_name": target, "served_model_name": target, "traffic_percentage": pct})
    total = sum(r["traffic_percentage"] for r in out)
    if total != 100:
        raise _invalid(f"{where}traffic_config.routes: the percentages add up to {total}, not 100")
    return out


def _parse_config(endpoint: str, body: Mapping[str, Any], prefix: str = "") -> dict:
    """``served_entities`` (or legacy ``served_models``) and ``traffic_config`` of a create
    (``prefix="config."``) or update_config body, validated; every error names the endpoint and field."""
    where = f"endpoint {endpoint}: {prefix}"
    entities_raw, models_raw = body.get("served_entities"), body.get("served_models")
    if entities_raw and models_raw:
        raise _invalid(f"{where}served_entities and served_models cannot both be given")
    legacy = not entities_raw
    items = models_raw if legacy else entities_raw
    field = "served_models" if legacy else "served_entities"
    if not isinstance(items, list) or not items:
        raise _invalid(f"{where}served_entities must list at least one entity")
    entities = [_served_entity(f"{where}{field}[{i}]", raw, legacy) for i, raw in enumerate(items)]
    names = [e["name"] for e in entities]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise _invalid(f"{where}{field}: served entity names must be unique, {', '.join(duplicates)} repeat")
    return {"served_entities": entities, "traffic_config": {"routes": _routes(where, body.get("traffic_config"), names)}}


def _parse_tags(endpoint: str, raw: Any) -> list[dict]:
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(t, dict) and isinstance(t.get("key"), str) for t in raw):
        raise _invalid(f"endpoint {endpoint}: tags must be a list of {{key, value}} objects")
    return [{"key": t["key"], **({"value": str(t["value"])} if t.get("value") is not None else {})} for t in raw]


# --- records as answered ----------------------------------------------------------------------


def _parse_ai_gateway(endpoint: str, raw: Any) -> dict:
    """The part of an AI Gateway config the local workspace acts on: its inference table."""
    if not isinstance(raw, dict):
        raise _invalid(f"endpoint {endpoint}: ai_gateway must be an object")
    table = raw.get("inference_table_config")
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise _invalid(f"endpoint {endpoint}: ai_gateway.inference_table_config must be an object")
    out = {"enabled": bool(table.get("enabled", False))}
    for key in ("catalog_name", "schema_name", "table_name_prefix"):
        if key in table:
            out[key] = _check_name(table[key], f"ai_gateway.inference_table_config.{key}")
    if out["enabled"] and not {"schema_name", "table_name_prefix"} <= set(out):
        raise _invalid(f"endpoint {endpoint}: an enabled inference table needs schema_name and table_name_prefix")
    return {"inference_table_config": out}


def _entity_state(deployment: str, message: str) -> dict:
    return {"deployment": deployment, "deployment_state_message": message}


def _model_uri(entity: Mapping[str, Any]) -> str:
    return f"models:/{entity['entity_name']}/{entity['entity_version']}"


def _new_config(config: dict, version: int, now: int) -> dict:
    config = copy.deepcopy(config)
    for entity in config["served_entities"]:
        entity.update(creation_timestamp=now, creator=CREATOR,
                      state=_entity_state("DEPLOYMENT_CREATING", f"loading {_model_uri(entity)}"))
    return {**config, "config_version": version, "start_time": now}


def _served_model(entity: Mapping[str, Any]) -> dict:
    """The legacy ``served_models`` view of a served entity, which Databricks still returns."""
    out = {k: v for k, v in entity.items() if k not in ("entity_name", "entity_version")}
    return {**out, "model_name": entity["entity_name"], "model_version": entity["entity_version"]}


def _detailed(record: Mapping[str, Any]) -> dict:
    """``ServingEndpointDetailed``: the record with the legacy ``served_models`` view added."""
    out = copy.deepcopy(dict(record))
    for key in ("config", "pending_config"):
        if key in out:
            out[key]["served_models"] = [_served_model(e) for e in out[key]["served_entities"]]
    return out


def _summary(record: Mapping[str, Any]) -> dict:
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


# --- models and what serves ---------------------------------------------------------------------


class _LoadedModel(NamedTuple):
    model: Any  # mlflow.pyfunc.PyFuncModel
    input_schema: Any  # mlflow.types.Schema | None


class ImageBuildError(RuntimeError):
    """A model whose serving container could not be built."""


def check_installable(requirements: list[str]) -> None:
    """Model Serving builds a container from the model's requirements.txt with pip: a pin to a
    local version (``torch==2.7.0+cu126``) is served by no package index, and the build fails."""
    from packaging.requirements import InvalidRequirement, Requirement

    for line in requirements:
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        try:
            req = Requirement(line)
        except InvalidRequirement as exc:
            raise ImageBuildError(f"requirements.txt: {line!r} is not a requirement: {exc}") from None
        for spec in req.specifier:
            if "+" in spec.version:
                raise ImageBuildError(f"building the serving image failed: requirements.txt pins {line}, a local "
                                      "version that no package index serves")


def _load_model(entity_name: str, entity_version: str) -> _LoadedModel:
    import mlflow.pyfunc

    uri = f"models:/{entity_name}/{entity_version}"
    check_installable(Path(mlflow.pyfunc.get_model_dependencies(uri)).read_text().splitlines())
    model = mlflow.pyfunc.load_model(uri)
    return _LoadedModel(model, model.metadata.get_input_schema())


class _ModelCache:
    """Models by (name, version), loaded once in the background and shared by every endpoint and
    config that serves them: a new traffic split, or a rollback from a canary to the version
    serving beside it, loads nothing. A model no config serves any more is dropped."""

    def __init__(self, load: Callable[[str, str], _LoadedModel], workers: int = 2):
        self._load = load
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="lakevision-model-load")
        self._lock = threading.Lock()
        self._futures: dict[tuple[str, str], Future] = {}

    def get(self, key: tuple[str, str]) -> Future:
        with self._lock:
            future = self._futures.get(key)
            # a failed load is tried again: the version may have been registered or fixed since
            if future is None or (future.done() and (future.cancelled() or future.exception() is not None)):
                future = self._pool.submit(self._load, *key)
                self._futures[key] = future
            return future

    def retain(self, keys: set[tuple[str, str]]) -> None:
        """Forget the models no config serves any more, so memory follows the live configs."""
        with self._lock:
            for key in [k for k in self._futures if k not in keys]:
                del self._futures[key]

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


@dataclass(frozen=True)
class _Serving:
    """A loaded config; replaced as a whole, so a request sees one config from start to end."""

    config_version: int
    names: tuple[str, ...]
    weights: tuple[int, ...]
    models: Mapping[str, _LoadedModel]

    @classmethod
    def of(cls, config: Mapping[str, Any], models: Mapping[str, _LoadedModel]) -> _Serving:
        routes = config["traffic_config"]["routes"]
        return cls(config["config_version"], tuple(r["served_entity_name"] for r in routes),
                   tuple(r["traffic_percentage"] for r in routes), dict(models))

    def pick(self, rng: random.Random) -> str:
        return rng.choices(self.names, self.weights)[0]


class _Endpoint:
    def __init__(self, record: dict):
        self.record = record  # what GET answers and what is persisted
        self.serving: _Serving | None = None


# --- the workspace ------------------------------------------------------------------------------


class LocalWorkspace:
    """Serving endpoints of a local workspace, persisted under ``<root>/workspace/endpoints``."""

    def __init__(self, root: str | os.PathLike, token: str, tracking_uri: str | None = None,
                 seed: int | None = None):
        if not token:
            raise LocalWorkspaceError("a local workspace needs a token: every API call must present it")
        import mlflow

        self.root = Path(root).resolve()
        self.tracking_uri = tracking_uri or local_tracking_uri(self.root)
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        self.url: str | None = None
        self._records_dir = self.root / "workspace" / "endpoints"
        self._records_dir.mkdir(parents=True, exist_ok=True)
        self._token = token.encode()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()  # guards _endpoints, every record and _closed
        self._endpoints: dict[str, _Endpoint] = {}
        self._closed = False
        self._models = _ModelCache(_load_model)
        self._window = RequestWindow()
        self._loggers: dict[Path, InferenceLogger] = {}
        # who sent a request, without the token itself
        self._requester = "token-sha256:" + hashlib.sha256(token.encode()).hexdigest()[:12]
        self._server: Any = None  # uvicorn.Server
        self._thread: threading.Thread | None = None
        self._app = self._build_app()
        self._restore()

    @property
    def app(self) -> FastAPI:
        return self._app

    # -- server

    def start(self, port: int = 0) -> str:
        """Serve on 127.0.0.1:``port`` (0: any free port) from a background thread; the URL once listening."""
        import uvicorn

        if self._server is not None:
            raise LocalWorkspaceError(f"the local workspace already listens on {self.url}")
        if self._closed:
            raise LocalWorkspaceError(f"a stopped workspace does not start again; open a new one on {self.root}")
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say TCP, and
        # without it every response waits ~40 ms for a delayed ACK
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError as exc:
            sock.close()
            raise LocalWorkspaceError(f"the local workspace cannot listen on 127.0.0.1:{port}: {exc}") from None
        # binding here, not in uvicorn, gives the port before serving starts, even for port 0
        server = uvicorn.Server(uvicorn.Config(self._app, log_config=None, access_log=False, lifespan="off",
                                               timeout_graceful_shutdown=5))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="lakevision-workspace",
                                  daemon=True)
        thread.start()
        while not server.started:
            if not thread.is_alive():
                raise LocalWorkspaceError(f"the local workspace server on 127.0.0.1:{port} stopped while starting")
            time.sleep(0.01)
        self._server, self._thread = server, thread
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        log.info("local workspace listening on %s (root %s)", self.url, self.root)
        return self.url

    def stop(self) -> None:
        """Stop for good: serving ends, loads still running finish unseen, no record is written after this."""
        if self._server is not None:
            self._server.should_exit = True
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._server = self._thread = None
        with self._lock:
            self._closed = True
            loggers = list(self._loggers.values())
        for logger in loggers:  # after the server: every answered request is queued by now
            logger.close()
        self._models.shutdown()

    def __enter__(self) -> LocalWorkspace:
        if self._server is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- records

    def _record_path(self, name: str) -> Path:
        return self._records_dir / f"{name}.json"

    def _save(self, record: Mapping[str, Any]) -> None:
        """Write one endpoint's record atomically: a crash leaves the old file or the new one."""
        fd, tmp = tempfile.mkstemp(dir=self._records_dir, prefix=f".{record['name']}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f, indent=1, sort_keys=True)
            os.replace(tmp, self._record_path(record["name"]))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def _restore(self) -> None:
        """Endpoints of an earlier run: configs that served reload in the background; a config
        that was still loading is dropped, since its load died with the old process."""
        for path in sorted(self._records_dir.glob("*.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                raise LocalWorkspaceError(f"endpoint record {path} cannot be read: {exc}") from None
            state = record["state"]
            pending = record.get("pending_config")
            if pending is not None and state["config_update"] == IN_PROGRESS:
                del record["pending_config"]
                state["config_update"] = UPDATE_FAILED
                state["config_update_message"] = (
                    f"config version {pending['config_version']} was interrupted by a restart")
            state["ready"] = NOT_READY
            config = record.get("config")
            if config is not None:
                for entity in config["served_entities"]:
                    entity["state"] = _entity_state("DEPLOYMENT_RECOVERING",
                                                    f"reloading {_model_uri(entity)} after a restart")
            self._endpoints[record["name"]] = _Endpoint(record)
            self._save(record)
            if config is not None:
                self._start_loading(record, "config")

    def _get(self, name: str) -> _Endpoint:
        endpoint = self._endpoints.get(name)
        if endpoint is None:
            raise _no_endpoint(name)
        return endpoint

    def _model_keys(self) -> set[tuple[str, str]]:
        return {(e["entity_name"], e["entity_version"])
                for ep in self._endpoints.values()
                for key in ("config", "pending_config") if key in ep.record
                for e in ep.record[key]["served_entities"]}

    # -- control plane

    def _create(self, body: dict) -> dict:
        name = _check_name(body.get("name"), "endpoint name")
        if not isinstance(body.get("config"), dict):
            raise _invalid(f"endpoint {name}: config with served_entities is required")
        config = _parse_config(name, body["config"], "config.")
        now = _now_ms()
        record = {
            "name": name, "id": uuid.uuid4().hex, "creator": CREATOR, "creation_timestamp": now,
            "last_updated_timestamp": now, "state": {"ready": NOT_READY, "config_update": IN_PROGRESS},
            "pending_config": _new_config(config, 1, now), "tags": _parse_tags(name, body.get("tags")),
            "permission_level": "CAN_MANAGE", "route_optimized": False, "task": None,
        }
        if isinstance(body.get("description"), str):
            record["description"] = body["description"]
        if body.get("ai_gateway") is not None:
            record["ai_gateway"] = _parse_ai_gateway(name, body["ai_gateway"])
        with self._lock:
            if name in self._endpoints:
                raise ApiError(409, "RESOURCE_ALREADY_EXISTS", f"serving endpoint {name!r} already exists")
            self._endpoints[name] = _Endpoint(record)
            self._save(record)
            self._start_loading(record, "pending_config")
            return _detailed(record)

    def _update_config(self, name: str, body: dict) -> dict:
        config = _parse_config(name, body)
        now = _now_ms()
        with self._lock:
            endpoint = self._get(name)
            record = endpoint.record
            if record["state"]["config_update"] == IN_PROGRESS:
                raise ApiError(409, "RESOURCE_CONFLICT",
                               f"serving endpoint {name!r} is already updating to config version "
                               f"{record['pending_config']['config_version']}; update it when that has finished")
            # an endpoint whose first config was interrupted by a restart has neither
            version = 1 + max((record[k]["config_version"] for k in ("config", "pending_config") if k in record),
                              default=0)
            record["pending_config"] = _new_config(config, version, now)
            record["state"] = {"ready": READY if endpoint.serving else NOT_READY, "config_update": IN_PROGRESS}
            record["last_updated_timestamp"] = now
            self._save(record)
            self._start_loading(record, "pending_config")
            return _detailed(record)

    def _put_ai_gateway(self, name: str, body: dict) -> dict:
        gateway = _parse_ai_gateway(name, body)
        with self._lock:
            record = self._get(name).record
            record["ai_gateway"] = gateway
            record["last_updated_timestamp"] = _now_ms()
            self._save(record)
        return gateway

    def wait_restored(self, timeout: float = 120) -> None:
        """Block until the endpoints restored from records have reloaded their models (or failed
        to): a job that starts a workspace judges endpoints, not a process still warming up."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                recovering = sorted(name for name, ep in self._endpoints.items() if any(
                    e["state"]["deployment"] == "DEPLOYMENT_RECOVERING"
                    for e in ep.record.get("config", {}).get("served_entities", [])))
            if not recovering:
                return
            if time.monotonic() > deadline:
                raise LocalWorkspaceError(f"endpoints {recovering} did not reload within {timeout:.0f} s")
            time.sleep(0.1)

    def flush_inference_tables(self) -> int:
        """Write every queued inference row now (they are written every second anyway)."""
        with self._lock:
            loggers = list(self._loggers.values())
        return sum(logger.flush() for logger in loggers)

    def _inference_logger(self, record: Mapping[str, Any]) -> InferenceLogger | None:
        """The logger of the endpoint's inference table; None when it has none enabled."""
        table = (record.get("ai_gateway") or {}).get("inference_table_config") or {}
        if not table.get("enabled"):
            return None
        path = self.root / "tables" / table["schema_name"] / payload_table_name(table["table_name_prefix"])
        with self._lock:
            if path not in self._loggers:
                self._loggers[path] = InferenceLogger(path)
            return self._loggers[path]

    def _delete(self, name: str) -> None:
        with self._lock:
            self._get(name)
            del self._endpoints[name]
            self._record_path(name).unlink(missing_ok=True)
            self._models.retain(self._model_keys())
        self._window.forget(name)

    def _detail(self, name: str) -> dict:
        with self._lock:
            return _detailed(self._get(name).record)

    def _list(self) -> list[dict]:
        with self._lock:
            return [_summary(ep.record) for _, ep in sorted(self._endpoints.items())]

    # -- loading configs

    def _start_loading(self, record: Mapping[str, Any], which: str) -> None:
        """Load the models of ``record[which]`` (``config`` or ``pending_config``) in the background."""
        version = record[which]["config_version"]
        threading.Thread(target=self._load_config, args=(record["name"], record["id"], which, version),
                         name=f"lakevision-deploy-{record['name']}-v{version}", daemon=True).start()

    def _still_current(self, name: str, endpoint_id: str, which: str, version: int) -> _Endpoint | None:
        """The endpoint, unless it was deleted (or recreated) or the config was replaced meanwhile."""
        endpoint = self._endpoints.get(name)
        if self._closed or endpoint is None or endpoint.record["id"] != endpoint_id:
            return None
        config = endpoint.record.get(which)
        return endpoint if config is not None and config["config_version"] == version else None

    def _load_config(self, name: str, endpoint_id: str, which: str, version: int) -> None:
        with self._lock:
            endpoint = self._still_current(name, endpoint_id, which, version)
            if endpoint is None:
                return
            entities = copy.deepcopy(endpoint.record[which]["served_entities"])
        # every load is asked for before waiting on any, so the entities of a config load side by side
        futures = {e["name"]: self._models.get((e["entity_name"], e["entity_version"])) for e in entities}
        loaded: dict[str, _LoadedModel] = {}
        errors: dict[str, str] = {}
        for entity in entities:
            try:
                loaded[entity["name"]] = futures[entity["name"]].result()
            except Exception as exc:  # whatever the model raises is the deployment's failure, shown in its state
                errors[entity["name"]] = f"loading {_model_uri(entity)} failed: {type(exc).__name__}: {exc}"
        with self._lock:
            endpoint = self._still_current(name, endpoint_id, which, version)
            if endpoint is None:
                return
            if which == "pending_config":
                self._finish_update(endpoint, loaded, errors)
            else:
                self._finish_recovery(endpoint, loaded, errors)
            endpoint.record["last_updated_timestamp"] = _now_ms()
            self._save(endpoint.record)
            self._models.retain(self._model_keys())

    @staticmethod
    def _mark_entities(config: dict, errors: Mapping[str, str]) -> None:
        for entity in config["served_entities"]:
            failed = errors.get(entity["name"])
            entity["state"] = (_entity_state("DEPLOYMENT_FAILED", failed) if failed
                               else _entity_state("DEPLOYMENT_READY", f"serving {_model_uri(entity)}"))

    def _finish_update(self, endpoint: _Endpoint, loaded: Mapping[str, _LoadedModel],
                       errors: Mapping[str, str]) -> None:
        record = endpoint.record
        pending = record["pending_config"]
        self._mark_entities(pending, errors)
        version = pending["config_version"]
        if not errors:
            config = {k: v for k, v in pending.items() if k != "start_time"}
            endpoint.serving = _Serving.of(config, loaded)
            record["config"] = config
            del record["pending_config"]
            record["state"] = {"ready": READY, "config_update": NOT_UPDATING}
            log.info("endpoint %s serves config version %d", record["name"], version)
            return
        message = f"config version {version} failed: " + "; ".join(f"{n}: {m}" for n, m in errors.items())
        if "config" in record:
            # an update: the old config keeps serving; the failed one is dropped, its reasons kept in the message
            message += f"; config version {record['config']['config_version']} keeps serving"
            del record["pending_config"]
        record["state"] = {"ready": READY if endpoint.serving else NOT_READY, "config_update": UPDATE_FAILED,
                           "config_update_message": message}
        log.warning("endpoint %s: %s", record["name"], message)

    def _finish_recovery(self, endpoint: _Endpoint, loaded: Mapping[str, _LoadedModel],
                         errors: Mapping[str, str]) -> None:
        config = endpoint.record["config"]
        self._mark_entities(config, errors)
        if not errors:
            endpoint.serving = _Serving.of(config, loaded)
            endpoint.record["state"]["ready"] = READY
        else:
            log.warning("endpoint %s cannot reload config version %d: %s", endpoint.record["name"],
                        config["config_version"], "; ".join(errors.values()))

    # -- data plane

    def _not_ready(self, name: str) -> ApiError:
        with self._lock:
            record = self._get(name).record
            state = record["state"]
            if "config" in record:
                failed = [e["state"]["deployment_state_message"] for e in record["config"]["served_entities"]
                          if e["state"]["deployment"] == "DEPLOYMENT_FAILED"]
                reason = "; ".join(failed) if failed else "its models are reloading after a restart"
            elif state["config_update"] == IN_PROGRESS:
                reason = f"config version {record['pending_config']['config_version']} is still loading"
            else:
                reason = state.get("config_update_message", "no config has loaded")
        return ApiError(503, "TEMPORARILY_UNAVAILABLE", f"serving endpoint {name!r} is not ready: {reason}",
                        headers={"Retry-After": "1"})

    async def _invoke(self, name: str, request: Request) -> Response:
        from mlflow.exceptions import MlflowException
        from mlflow.pyfunc.scoring_server import invocations

        endpoint = self._get(name)
        serving = endpoint.serving
        if serving is None:
            raise self._not_ready(name)
        entity = serving.pick(self._rng)
        started = time.perf_counter()
        model = serving.models[entity]
        data = await request.body()
        content_type = request.headers.get("content-type", "application/json")
        try:
            # the same call and the same thread hop as `mlflow models serve`
            result = await asyncio.to_thread(invocations, data, content_type, model.model, model.input_schema)
            response = Response(result.response, result.status, media_type=result.mimetype)
        except MlflowException as exc:
            response = Response(exc.serialize_as_json(), exc.get_http_status_code(), media_type="application/json")
        except Exception as exc:  # a model bug is that request's 500, counted in the metrics, not a dead server
            log.exception("endpoint %s, served entity %s: prediction failed", name, entity)
            response = ApiError(500, "INTERNAL_ERROR",
                                f"serving endpoint {name!r}, served entity {entity!r}: {type(exc).__name__}: {exc}"
                                ).response()
        took_ms = (time.perf_counter() - started) * 1000
        self._window.record(name, entity, response.status_code, took_ms)
        logger = self._inference_logger(endpoint.record)
        if logger is not None:
            served = next(e for e in endpoint.record["config"]["served_entities"] if e["name"] == entity)
            logger.log(inference_row(name, entity, served["entity_name"], served["entity_version"],
                                     response.status_code, took_ms, data, bytes(response.body), self._requester))
        response.headers["served-model-name"] = entity
        return response

    def _metrics(self, name: str) -> bytes:
        with self._lock:
            record = self._get(name).record
            entities = [e["name"] for e in record["config"]["served_entities"]] if "config" in record else []
        totals = self._window.totals(name)
        for entity in entities:  # an idle entity reports zeros rather than vanishing
            totals.setdefault(entity, RequestStats())
        return render_endpoint_metrics(name, totals)

    # -- HTTP

    async def _authorize(self, request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self._token):
            raise ApiError(401, "UNAUTHENTICATED", "a valid 'Authorization: Bearer <token>' header is required")

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="lakevision local workspace", docs_url=None, redoc_url=None, openapi_url=None)

        async def api_error(_: Request, exc: ApiError) -> Response:
            return exc.response()

        async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
            if exc.status_code == 404:  # a path this workspace does not serve, worded as Databricks does
                body = {"error_code": "ENDPOINT_NOT_FOUND",
                        "message": f"No API found for '{request.method} {request.url.path}'"}
            else:
                body = {"error_code": "BAD_REQUEST", "message": f"{request.method} {request.url.path}: {exc.detail}"}
            return JSONResponse(body, exc.status_code)

        app.add_exception_handler(ApiError, api_error)
        app.add_exception_handler(StarletteHTTPException, http_error)

        @app.get("/.well-known/databricks-config")
        async def host_metadata() -> Response:
            # the SDK asks for host metadata first; a 404 makes it go on with the configured token
            raise ApiError(404, "ENDPOINT_NOT_FOUND", "a local workspace has no host metadata")

        api = APIRouter(dependencies=[Depends(self._authorize)])

        @api.post("/api/2.0/serving-endpoints")
        async def create(request: Request) -> Response:
            return JSONResponse(await run_in_threadpool(self._create, await _json_body(request)))

        @api.get("/api/2.0/serving-endpoints")
        async def list_endpoints() -> Response:
            return JSONResponse({"endpoints": self._list()})

        @api.get("/api/2.0/serving-endpoints/{name}")
        async def get(name: str) -> Response:
            return JSONResponse(self._detail(name))

        @api.delete("/api/2.0/serving-endpoints/{name}")
        async def delete(name: str) -> Response:
            await run_in_threadpool(self._delete, name)
            return JSONResponse({})

        @api.put("/api/2.0/serving-endpoints/{name}/config")
        async def update_config(name: str, request: Request) -> Response:
            return JSONResponse(await run_in_threadpool(self._update_config, name, await _json_body(request)))

        @api.put("/api/2.0/serving-endpoints/{name}/ai-gateway")
        async def put_ai_gateway(name: str, request: Request) -> Response:
            return JSONResponse(await run_in_threadpool(self._put_ai_gateway, name, await _json_body(request)))

        @api.get("/api/2.0/serving-endpoints/{name}/metrics")
        async def metrics(name: str) -> Response:
            return Response(self._metrics(name), media_type=CONTENT_TYPE)

        @api.post("/serving-endpoints/{name}/invocations")
        async def invocations(name: str, request: Request) -> Response:
            return await self._invoke(name, request)

        app.include_router(api)
        return app


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise ApiError(400, "MALFORMED_REQUEST", f"{request.method} {request.url.path}: body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ApiError(400, "MALFORMED_REQUEST", f"{request.method} {request.url.path}: body must be a JSON object")
    return body


# --- a workspace process --------------------------------------------------------------------------


def serve_forever(root: str | os.PathLike, token: str, port: int = 0) -> None:
    """Serve in the foreground until SIGTERM or SIGINT; prints the listening line for whoever waits on it."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    workspace = LocalWorkspace(root, token)
    try:
        url = workspace.start(port)
        workspace.wait_restored()
        print(f"{LISTENING}{url}", flush=True)
        stop.wait()
    finally:
        workspace.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stderr_tail(stderr: Any, limit: int = 4000) -> str:
    stderr.seek(0)
    return stderr.read().decode(errors="replace")[-limit:]


@contextlib.contextmanager
def local_workspace_process(root: str | os.PathLike, token: str | None = None, port: int | None = None,
                            timeout_s: float = 120) -> Iterator[tuple[str, str]]:
    """Run ``lakevision workspace`` as a child process; yields ``(url, token)`` once it listens.

    The token (a random one by default) goes through the environment, never the command line,
    so it does not show in ``ps``. At exit the process gets SIGTERM, and SIGKILL after 10 s.
    """
    token = token or secrets.token_urlsafe(32)
    cmd = [sys.executable, "-m", "lakevision.cli", "workspace", "--port", str(port or 0), "--root", str(root)]
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                env={**os.environ, TOKEN_ENV: token})
        try:
            yield _wait_for_url(proc, stderr, timeout_s), token
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _wait_for_url(proc: subprocess.Popen, stderr: Any, timeout_s: float) -> str:
    lines: queue.Queue[str | None] = queue.Queue()

    def read_stdout() -> None:
        # drains stdout for the process' whole life, so it never blocks on a full pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read_stdout, name="lakevision-workspace-stdout", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=min(remaining, 1.0))
        except queue.Empty:
            continue
        if line is None:
            code = proc.wait()
            raise LocalWorkspaceError(f"the workspace process exited with code {code} before listening; "
                                      f"stderr ends with:\n{_stderr_tail(stderr)}")
        if line.startswith(LISTENING):
            return line[len(LISTENING):].strip()
    raise LocalWorkspaceError(f"the workspace process did not listen within {timeout_s:.0f} s; "
                              f"stderr ends with:\n{_stderr_tail(stderr)}")
