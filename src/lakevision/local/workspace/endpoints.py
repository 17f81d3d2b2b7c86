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
workspace's registry; :func:`~lakevision.local.workspace.process.local_workspace_process` runs a
workspace in a process of its own. This module holds the endpoints' state machine and their
persistence; the REST shapes are in :mod:`.api`, the HTTP app in :mod:`.app`, and the Jobs API
(the bundle's jobs, run by the local runner) in :mod:`.jobs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import Response

from lakevision.local.workspace.api import (CREATOR, IN_PROGRESS, NOT_READY, NOT_UPDATING, READY, UPDATE_FAILED,
                                            ApiError, LocalWorkspaceError, check_name, detailed, invalid, entity_state, model_uri,
                                            new_config, no_endpoint, now_ms, parse_ai_gateway, parse_config,
                                            parse_tags, read_body, summary)
from lakevision.local.workspace.app import build_app
from lakevision.local.workspace.jobs import LocalJobs
from lakevision.local.workspace.records import RootLock, read_records, write_record
from lakevision.local.workspace.serving import Endpoint, LoadedModel, ModelCache, Serving, load_model, scoring_error
from lakevision.serving.endpoint_metrics import RequestStats, RequestWindow, render_endpoint_metrics
from lakevision.serving.inference_log import (MAX_REQUEST_BYTES, InferenceLogger, inference_row, payload_table_name,
                                             split_client_request_id)
from lakevision.runtime import LocalLayout
from lakevision.tracking import local_tracking_uri

log = logging.getLogger(__name__)


class LocalWorkspace:
    """Serving endpoints of a local workspace, persisted under ``<root>/workspace/endpoints``."""

    def __init__(self, root: str | os.PathLike, token: str, tracking_uri: str | None = None,
                 seed: int | None = None, inference_delay_s: float = 0.0,
                 bundle_dir: str | os.PathLike | None = None, target: str = "local"):
        if not token:
            raise LocalWorkspaceError("a local workspace needs a token: every API call must present it")
        import mlflow

        self.root = Path(root).resolve()
        self.tracking_uri = tracking_uri or local_tracking_uri(self.root)
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        self.url: str | None = None
        self._records_dir = LocalLayout(self.root).endpoint_records
        self._records_dir.mkdir(parents=True, exist_ok=True)
        self._token = token.encode()
        self._seed = seed  # routes each endpoint config with its own stream (routing_random)
        self._inference_delay_s = inference_delay_s  # how late inference rows land (InferenceLogger)
        self._lock = threading.Lock()  # guards _endpoints, every record and _closed
        self._endpoints: dict[str, Endpoint] = {}
        self._closed = False
        self._models = ModelCache(load_model)
        self._window = RequestWindow()
        self._loggers: dict[Path, InferenceLogger] = {}
        # who sent a request, without the token itself
        self._requester = "token-sha256:" + hashlib.sha256(token.encode()).hexdigest()[:12]
        self._server: Any = None  # uvicorn.Server
        self._thread: threading.Thread | None = None
        # the Jobs API over bundle_dir's jobs for target (none without a bundle); its runs outlive stop()
        self.jobs = LocalJobs(self.root, bundle_dir, target)
        self._app = build_app(self, self._token)
        # one workspace process owns a root's endpoint records: a second one would write over them
        self._root_lock = RootLock(self.root, LocalLayout(self.root).workspace_lock)
        try:
            self._restore()
        except BaseException:
            self._root_lock.release()
            raise

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
        self._root_lock.release()

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
        """Write one endpoint's record durably (fsync, rename, fsync the folder). Every change is
        saved before it is made in memory, so a save that fails changes nothing."""
        write_record(self._records_dir, record)

    def _restore(self) -> None:
        """Endpoints of an earlier run: configs that served reload in the background; a config
        that was still loading is dropped, since its load died with the old process. A record that
        cannot be read is moved aside with a warning (see :mod:`.records`)."""
        for record in read_records(self._records_dir):
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
                    entity["state"] = entity_state("DEPLOYMENT_RECOVERING",
                                                    f"reloading {model_uri(entity)} after a restart")
            self._save(record)
            self._endpoints[record["name"]] = Endpoint(record)
            if config is not None:
                self._start_loading(record, "config")

    def _get(self, name: str) -> Endpoint:
        endpoint = self._endpoints.get(name)
        if endpoint is None:
            raise no_endpoint(name)
        return endpoint

    def _model_keys(self) -> set[tuple[str, str]]:
        return {(e["entity_name"], e["entity_version"])
                for ep in self._endpoints.values()
                for key in ("config", "pending_config") if key in ep.record
                for e in ep.record[key]["served_entities"]}

    # -- control plane

    def create(self, body: dict) -> dict:
        name = check_name(body.get("name"), "endpoint name")
        if not isinstance(body.get("config"), dict):
            raise invalid(f"endpoint {name}: config with served_entities is required")
        config = parse_config(name, body["config"], "config.")
        now = now_ms()
        record = {
            "name": name, "id": uuid.uuid4().hex, "creator": CREATOR, "creation_timestamp": now,
            "last_updated_timestamp": now, "state": {"ready": NOT_READY, "config_update": IN_PROGRESS},
            "pending_config": new_config(config, 1, now), "tags": parse_tags(name, body.get("tags")),
            "permission_level": "CAN_MANAGE", "route_optimized": False, "task": None,
        }
        if isinstance(body.get("description"), str):
            record["description"] = body["description"]
        if body.get("ai_gateway") is not None:
            record["ai_gateway"] = parse_ai_gateway(name, body["ai_gateway"])
        with self._lock:
            if name in self._endpoints:
                raise ApiError(409, "RESOURCE_ALREADY_EXISTS", f"serving endpoint {name!r} already exists")
            self._save(record)
            self._endpoints[name] = Endpoint(record)
            self._start_loading(record, "pending_config")
            return detailed(record)

    def update_config(self, name: str, body: dict) -> dict:
        config = parse_config(name, body)
        now = now_ms()
        with self._lock:
            endpoint = self._get(name)
            record = copy.deepcopy(endpoint.record)  # changed in memory once it is saved
            if record["state"]["config_update"] == IN_PROGRESS:
                raise ApiError(409, "RESOURCE_CONFLICT",
                               f"serving endpoint {name!r} is already updating to config version "
                               f"{record['pending_config']['config_version']}; update it when that has finished")
            # an endpoint whose first config was interrupted by a restart has neither
            version = 1 + max((record[k]["config_version"] for k in ("config", "pending_config") if k in record),
                              default=0)
            record["pending_config"] = new_config(config, version, now)
            record["state"] = {"ready": READY if endpoint.serving else NOT_READY, "config_update": IN_PROGRESS}
            record["last_updated_timestamp"] = now
            self._save(record)
            endpoint.record = record
            self._start_loading(record, "pending_config")
            return detailed(record)

    def put_ai_gateway(self, name: str, body: dict) -> dict:
        gateway = parse_ai_gateway(name, body)
        with self._lock:
            endpoint = self._get(name)
            record = {**endpoint.record, "ai_gateway": gateway, "last_updated_timestamp": now_ms()}
            self._save(record)
            endpoint.record = record
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
        """Write the queued inference rows that are due now (they are written every second anyway)."""
        with self._lock:
            loggers = list(self._loggers.values())
        return sum(logger.flush() for logger in loggers)

    def _inference_table(self, record: Mapping[str, Any]) -> Path | None:
        """The folder of the endpoint's inference table; None when it has none enabled."""
        table = (record.get("ai_gateway") or {}).get("inference_table_config") or {}
        if not table.get("enabled"):
            return None
        return LocalLayout(self.root).table(table["schema_name"], payload_table_name(table["table_name_prefix"]))

    def _inference_logger(self, record: Mapping[str, Any]) -> InferenceLogger | None:
        """The logger of the endpoint's inference table; None when it has none enabled."""
        path = self._inference_table(record)
        if path is None:
            return None
        with self._lock:
            if path not in self._loggers:
                self._loggers[path] = InferenceLogger(path, delay_seconds=self._inference_delay_s)
            return self._loggers[path]

    def delete(self, name: str) -> None:
        with self._lock:
            self._get(name)
            self._record_path(name).unlink(missing_ok=True)
            del self._endpoints[name]
            self._models.retain(self._model_keys())
        self._window.forget(name)

    def detail(self, name: str) -> dict:
        with self._lock:
            return detailed(self._get(name).record)

    def list_endpoints(self) -> list[dict]:
        with self._lock:
            return [summary(ep.record) for _, ep in sorted(self._endpoints.items())]

    # -- loading configs

    def _start_loading(self, record: Mapping[str, Any], which: str) -> None:
        """Load the models of ``record[which]`` (``config`` or ``pending_config``) in the background."""
        version = record[which]["config_version"]
        threading.Thread(target=self._load_config, args=(record["name"], record["id"], which, version),
                         name=f"lakevision-deploy-{record['name']}-v{version}", daemon=True).start()

    def _still_current(self, name: str, endpoint_id: str, which: str, version: int) -> Endpoint | None:
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
        loaded: dict[str, LoadedModel] = {}
        errors: dict[str, str] = {}
        for entity in entities:
            try:
                loaded[entity["name"]] = futures[entity["name"]].result()
            except Exception as exc:  # whatever the model raises is the deployment's failure, shown in its state
                errors[entity["name"]] = f"loading {model_uri(entity)} failed: {type(exc).__name__}: {exc}"
        with self._lock:
            endpoint = self._still_current(name, endpoint_id, which, version)
            if endpoint is None:
                return
            record = copy.deepcopy(endpoint.record)  # what the endpoint becomes, once saved
            if which == "pending_config":
                serving = self._finish_update(record, endpoint.serving, loaded, errors)
            else:
                serving = self._finish_recovery(record, loaded, errors)
            record["last_updated_timestamp"] = now_ms()
            try:
                self._save(record)
            except OSError as exc:
                log.error("endpoint %s: saving its record failed: %s", name, exc)
                if which == "pending_config":
                    record, serving = self._update_unsaved(endpoint, exc), None
                # a reload after a restart is kept: the record on disk already holds its config
            endpoint.record = record
            if serving is not None:
                endpoint.serving = serving
            self._models.retain(self._model_keys())

    def _update_unsaved(self, endpoint: Endpoint, exc: OSError) -> dict:
        """The record of an endpoint whose finished update could not be saved: the update failed,
        and the old config keeps serving (as after a restart, which would find it interrupted), so
        the endpoint never stays IN_PROGRESS."""
        record = copy.deepcopy(endpoint.record)
        failed = {e["name"]: f"saving the endpoint record failed: {exc}"
                  for e in record["pending_config"]["served_entities"]}
        self._finish_update(record, endpoint.serving, {}, failed)
        record["last_updated_timestamp"] = now_ms()
        with contextlib.suppress(OSError):
            self._save(record)
        return record

    @staticmethod
    def _mark_entities(config: dict, errors: Mapping[str, str]) -> None:
        for entity in config["served_entities"]:
            failed = errors.get(entity["name"])
            entity["state"] = (entity_state("DEPLOYMENT_FAILED", failed) if failed
                               else entity_state("DEPLOYMENT_READY", f"serving {model_uri(entity)}"))

    def _finish_update(self, record: dict, serving: Serving | None, loaded: Mapping[str, LoadedModel],
                       errors: Mapping[str, str]) -> Serving | None:
        """Turn ``record``'s pending config into its config, or into a failed update; the new
        serving when it loaded (None: ``serving``, the one now, stays)."""
        pending = record["pending_config"]
        self._mark_entities(pending, errors)
        version = pending["config_version"]
        if not errors:
            config = {k: v for k, v in pending.items() if k != "start_time"}
            record["config"] = config
            del record["pending_config"]
            record["state"] = {"ready": READY, "config_update": NOT_UPDATING}
            log.info("endpoint %s serves config version %d", record["name"], version)
            return Serving.of(record["name"], config, loaded, self._seed)
        message = f"config version {version} failed: " + "; ".join(f"{n}: {m}" for n, m in errors.items())
        if "config" in record:
            # an update: the old config keeps serving; the failed one is dropped, its reasons kept in the message
            message += f"; config version {record['config']['config_version']} keeps serving"
            del record["pending_config"]
        record["state"] = {"ready": READY if serving else NOT_READY, "config_update": UPDATE_FAILED,
                           "config_update_message": message}
        log.warning("endpoint %s: %s", record["name"], message)
        return None

    def _finish_recovery(self, record: dict, loaded: Mapping[str, LoadedModel],
                         errors: Mapping[str, str]) -> Serving | None:
        """Mark ``record``'s reloaded config; its serving when every entity loaded."""
        config = record["config"]
        self._mark_entities(config, errors)
        if not errors:
            record["state"]["ready"] = READY
            return Serving.of(record["name"], config, loaded, self._seed)
        log.warning("endpoint %s cannot reload config version %d: %s", record["name"],
                    config["config_version"], "; ".join(errors.values()))
        return None

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

    async def invoke(self, name: str, request: Request, served_entity: str | None = None) -> Response:
        """One scoring request: routed by the traffic split, or to ``served_entity`` when the
        caller names one (``/served-models/{served}/invocations``)."""
        from mlflow.pyfunc.scoring_server import invocations

        endpoint = self._get(name)
        serving = endpoint.serving
        if serving is None:
            raise self._not_ready(name)
        if served_entity is None:
            entity = serving.pick()
        elif served_entity in serving.models:
            entity = served_entity
        else:
            raise ApiError(404, "RESOURCE_DOES_NOT_EXIST", f"serving endpoint {name!r} has no served model "
                                                           f"{served_entity!r} (it serves {', '.join(serving.names)})")
        started = time.perf_counter()
        model = serving.models[entity]
        try:
            data = await read_body(request, MAX_REQUEST_BYTES)
        except ApiError as exc:
            # refused before it was read, so there is no payload to log; the metrics count it
            self._window.record(name, entity, exc.status, (time.perf_counter() - started) * 1000)
            raise
        content_type = request.headers.get("content-type", "application/json")
        client_id, to_model = split_client_request_id(data)
        request_id = str(uuid.uuid4())
        try:
            # the same call and the same thread hop as `mlflow models serve`
            result = await asyncio.to_thread(invocations, to_model, content_type, model.model, model.input_schema)
            response = Response(result.response, result.status, media_type=result.mimetype)
        except Exception as exc:  # noqa: BLE001 - every failure is this request's answer, never a dead server
            response = scoring_error(exc, name, entity, request_id).response()
        took_ms = (time.perf_counter() - started) * 1000
        self._window.record(name, entity, response.status_code, took_ms)
        logger = self._inference_logger(endpoint.record)
        if logger is not None:
            logger.log(inference_row(entity, response.status_code, took_ms, data, bytes(response.body),
                                     self._requester, request_id=request_id, client_request_id=client_id))
        response.headers["served-model-name"] = entity
        return response

    def metrics(self, name: str) -> bytes:
        with self._lock:
            record = self._get(name).record
            entities = [e["name"] for e in record["config"]["served_entities"]] if "config" in record else []
            table = self._inference_table(record)
            logger = self._loggers.get(table) if table is not None else None
        totals = self._window.totals(name)
        for entity in entities:  # an idle entity reports zeros rather than vanishing
            totals.setdefault(entity, RequestStats())
        dropped = None if table is None else logger.dropped_total if logger is not None else 0
        return render_endpoint_metrics(name, totals, dropped)

    # -- HTTP
