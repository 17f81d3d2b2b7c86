"""The local workspace's HTTP app: the serving endpoints API and the Jobs API subset of the
Databricks REST API, as FastAPI routes over a :class:`~lakevision.local.workspace.endpoints.LocalWorkspace`."""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from lakevision.local.workspace.api import ApiError, json_body
from lakevision.serving.client import LOCAL_NO_HOST_METADATA
from lakevision.serving.endpoint_metrics import CONTENT_TYPE

if TYPE_CHECKING:
    from lakevision.local.workspace.endpoints import LocalWorkspace


def _authorizer(token: bytes):
    """A route dependency that refuses a request without ``Authorization: Bearer <token>``."""

    async def authorize(request: Request) -> None:
        scheme, _, sent = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), token):
            raise ApiError(401, "UNAUTHENTICATED", "a valid 'Authorization: Bearer <token>' header is required")

    return authorize


def build_app(ws: LocalWorkspace, token: bytes) -> FastAPI:
    """The HTTP face of ``ws``: the serving endpoints API the SDK calls, behind a bearer token."""
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
        raise ApiError(404, "ENDPOINT_NOT_FOUND", LOCAL_NO_HOST_METADATA)

    api = APIRouter(dependencies=[Depends(_authorizer(token))])

    @api.post("/api/2.0/serving-endpoints")
    async def create(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(ws.create, await json_body(request)))

    @api.get("/api/2.0/serving-endpoints")
    async def list_endpoints() -> Response:
        return JSONResponse({"endpoints": ws.list_endpoints()})

    @api.get("/api/2.0/serving-endpoints/{name}")
    async def get(name: str) -> Response:
        return JSONResponse(ws.detail(name))

    @api.delete("/api/2.0/serving-endpoints/{name}")
    async def delete(name: str) -> Response:
        await run_in_threadpool(ws.delete, name)
        return JSONResponse({})

    @api.put("/api/2.0/serving-endpoints/{name}/config")
    async def update_config(name: str, request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(ws.update_config, name, await json_body(request)))

    @api.put("/api/2.0/serving-endpoints/{name}/ai-gateway")
    async def put_ai_gateway(name: str, request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(ws.put_ai_gateway, name, await json_body(request)))

    @api.get("/api/2.0/serving-endpoints/{name}/metrics")
    async def metrics(name: str) -> Response:
        return Response(ws.metrics(name), media_type=CONTENT_TYPE)

    @api.post("/serving-endpoints/{name}/invocations")
    async def invocations(name: str, request: Request) -> Response:
        return await ws.invoke(name, request)

    @api.post("/serving-endpoints/{name}/served-models/{served}/invocations")
    async def served_model_invocations(name: str, served: str, request: Request) -> Response:
        return await ws.invoke(name, request, served)

    _add_jobs_routes(api, ws)
    app.include_router(api)
    return app


def _add_jobs_routes(api: APIRouter, ws: LocalWorkspace) -> None:
    """``/api/2.2/jobs/...``, the version the installed databricks-sdk calls."""

    @api.get("/api/2.2/jobs/list")
    async def list_jobs(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(ws.jobs.list_jobs, dict(request.query_params)))

    @api.post("/api/2.2/jobs/run-now")
    async def run_now(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(ws.jobs.run_now, await json_body(request)))

    @api.get("/api/2.2/jobs/runs/get")
    async def get_run(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(ws.jobs.get_run, dict(request.query_params)))

    @api.get("/api/2.2/jobs/runs/list")
    async def list_runs(request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(ws.jobs.list_runs, dict(request.query_params)))
