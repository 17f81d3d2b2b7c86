"""What an endpoint serves: registered model versions loaded once and shared, and the traffic split
between its served entities."""

from __future__ import annotations

import logging
import random
import re
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

# MLflow's scoring server turns any exception raised in `predict` into this 400, stack trace and
# all; the model failed, not the request, so the workspace answers a 500 without the trace
_MODEL_FAILED = "Encountered an unexpected error while evaluating the model"
# ... and prefixes the model's own 400s with the whole request, which no answer should echo
_ECHOED_REQUEST = re.compile(r"^Failed to predict data '.*?'\. \nError: ", re.DOTALL)
_MAX_MESSAGE_CHARS = 2000


def scoring_error(exc: Exception, endpoint: str, entity: str, request_id: str):
    """A failed scoring request as the ApiError it is answered with: the model's own 400s keep
    their message; a model that failed (MLflow's wrapped exception, or an answer that cannot be
    sent) is a 500 naming the request id, whose stack trace goes to the log only; a body nested
    too deeply to parse is a 400."""
    from mlflow.exceptions import MlflowException

    from lakevision.local.workspace.api import ApiError

    where = f"serving endpoint {endpoint!r}, served entity {entity!r}"
    if isinstance(exc, RecursionError):
        return ApiError(400, "MALFORMED_REQUEST", f"{where}: the request body nests too deeply to parse")
    if isinstance(exc, MlflowException) and _MODEL_FAILED not in exc.message:
        message = _ECHOED_REQUEST.sub("", exc.message)
        error_code = exc.error_code if isinstance(exc.error_code, str) else "BAD_REQUEST"
        return ApiError(exc.get_http_status_code(), error_code, message[:_MAX_MESSAGE_CHARS])
    # MLflow keeps the model's traceback as an extra JSON field of its exception
    trace = exc.json_kwargs.get("stack_trace") if isinstance(exc, MlflowException) else None
    log.error("%s: request %s failed in the model\n%s", where, request_id, trace or "", exc_info=trace is None)
    return ApiError(500, "INTERNAL_ERROR", f"{where}: the model failed on request {request_id} "
                                           f"({type(exc).__name__}); the server log has the details")


class LoadedModel(NamedTuple):
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


def load_model(entity_name: str, entity_version: str) -> LoadedModel:
    from lakevision.packaging.pyfunc import load_pyfunc

    model, requirements = load_pyfunc(f"models:/{entity_name}/{entity_version}")
    check_installable(requirements)
    return LoadedModel(model, model.metadata.get_input_schema())


class ModelCache:
    """Models by (name, version), loaded once in the background and shared by every endpoint and
    config that serves them: a new traffic split, or a rollback from a canary to the version
    serving beside it, loads nothing. A model no config serves any more is dropped."""

    def __init__(self, load: Callable[[str, str], LoadedModel], workers: int = 2):
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


def routing_random(seed: int | None, endpoint: str, config_version: int) -> random.Random:
    """The random stream one endpoint config routes with: seeded per (workspace seed, endpoint,
    config version) so that a split is reproducible whatever other endpoints serve meanwhile."""
    return random.Random(None if seed is None else f"{seed}:{endpoint}:{config_version}")


@dataclass(frozen=True)
class Serving:
    """A loaded config; replaced as a whole, so a request sees one config from start to end."""

    config_version: int
    names: tuple[str, ...]
    weights: tuple[int, ...]
    models: Mapping[str, LoadedModel]
    rng: random.Random = field(compare=False, repr=False)

    @classmethod
    def of(cls, endpoint: str, config: Mapping[str, Any], models: Mapping[str, LoadedModel],
           seed: int | None) -> Serving:
        routes = config["traffic_config"]["routes"]
        return cls(config["config_version"], tuple(r["served_entity_name"] for r in routes),
                   tuple(r["traffic_percentage"] for r in routes), dict(models),
                   routing_random(seed, endpoint, config["config_version"]))

    def pick(self) -> str:
        return self.rng.choices(self.names, self.weights)[0]


class Endpoint:
    def __init__(self, record: dict):
        self.record = record  # what GET answers and what is persisted
        self.serving: Serving | None = None
