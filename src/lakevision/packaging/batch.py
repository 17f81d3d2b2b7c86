"""A logged model inside Spark tasks: staged once where every worker reads it, loaded once per
worker process, run with the task's share of the CPU (or its GPU) on image files read in batches
sized by bytes.

The functions a job hands to ``mapInPandas`` are instances of module-level classes, so Spark
pickles them by reference to this module and every task of a worker process sees the same
:data:`_MODELS` cache (a closure would carry a copy of it, and load the model once per task).
Under Sail the Python UDFs of every task run on threads of one process, the cache's lock makes
the first task load the model and the others wait for it; on a Databricks cluster each Python
worker process loads it once.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import stat
import tempfile
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lakevision.errors import LakevisionError

STAGED_MARKER = "_LAKEVISION_STAGED"  # written last: a staged folder without it is incomplete
MAX_CACHED_MODELS = 2  # per worker process; a third model evicts the least recently loaded
DEFAULT_MAX_FILE_BYTES = 256 * 2**20


class StagingError(LakevisionError, RuntimeError):
    """The model could not be copied where the workers read it."""


# ---------------------------------------------------------------------- driver: staging
def stage_model(model_uri: str, root: str | os.PathLike) -> Path:
    """The model's artifacts in ``root/<key of model_uri>`` (shared storage: a UC Volume on
    Databricks, the local root here), downloaded once; workers load from there and never talk
    to the tracking server. ``model_uri`` must name one immutable model (a registry version or a
    logged model), not an alias that may move."""
    import mlflow

    key = hashlib.sha1(model_uri.encode()).hexdigest()[:16]
    root = Path(root)
    dest = root / key
    if (dest / STAGED_MARKER).is_file():
        return dest
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=root))
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(tmp / "model")))
        (local / STAGED_MARKER).write_text(model_uri)
        if dest.exists():  # an earlier staging that was killed before its marker
            shutil.rmtree(dest, ignore_errors=True)
        try:
            os.replace(local, dest)
        except OSError:
            if not (dest / STAGED_MARKER).is_file():  # not another job staging the same model meanwhile
                raise
    except OSError as exc:
        raise StagingError(f"{model_uri}: cannot stage the model under {root}: {exc}") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


# ---------------------------------------------------------------------- worker: the model cache
@dataclass(frozen=True)
class LoadedModel:
    """A model loaded in this worker process; ``token`` names this one load (host, process,
    load), so the driver can count loads from the rows the model scored."""

    model: Any
    token: str


_MODELS: OrderedDict[tuple, LoadedModel] = OrderedDict()
_CACHE_LOCK = threading.Lock()
_KEY_LOCKS: dict[tuple, threading.Lock] = {}
_LOADS = {"count": 0}


def cached_model(key: tuple, loader: Callable[[], Any]) -> LoadedModel:
    """The model of ``key`` (model URI, device, ...), loaded by ``loader`` the first time this
    process asks for it; concurrent tasks (Sail's UDF threads) wait for that one load."""
    with _CACHE_LOCK:
        hit = _MODELS.get(key)
        if hit is not None:
            return hit
        key_lock = _KEY_LOCKS.setdefault(key, threading.Lock())
    with key_lock:
        with _CACHE_LOCK:
            hit = _MODELS.get(key)
        if hit is not None:
            return hit
        model = loader()
        loaded = LoadedModel(model, f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")
        with _CACHE_LOCK:
            _LOADS["count"] += 1
            _MODELS[key] = loaded
            while len(_MODELS) > MAX_CACHED_MODELS:
                _MODELS.popitem(last=False)
        return loaded


def model_loads() -> int:
    """Models this process has loaded through :func:`cached_model` since it started."""
    return _LOADS["count"]


def clear_model_cache() -> None:
    """Forget every cached model of this process (benchmarks measure cold loads)."""
    with _CACHE_LOCK:
        _MODELS.clear()


def worker_process(token: str) -> str:
    """``host:pid`` of a load token."""
    return token.rsplit(":", 1)[0]


# ---------------------------------------------------------------------- worker: CPU and GPU
@dataclass(frozen=True)
class TaskResources:
    """What one Spark task may use: ``threads`` torch CPU threads (0: decided on the worker)
    and its GPU when ``use_gpu`` (the one Spark assigned it, ``spark.task.resource.gpu.amount``)."""

    threads: int = 0
    use_gpu: bool = False
    concurrent_tasks: int = 1  # tasks of this job one machine runs at once, where Spark cannot say

    def apply(self) -> str:
        """Set this task's torch threads; returns its device (``cpu``, ``cuda:N``)."""
        import torch

        device = "cpu"
        gpus, cpus = _task_context_resources()
        if self.use_gpu and torch.cuda.is_available():
            device = f"cuda:{gpus[0]}" if gpus else "cuda"
        threads = self.threads or _auto_threads(device, cpus, self.concurrent_tasks)
        # per thread under Sail (OpenMP's setting is the calling thread's), per process on a cluster,
        # where a Python worker runs one task at a time
        torch.set_num_threads(max(1, threads))
        return device


def _task_context_resources() -> tuple[list[str], int | None]:
    """The GPU addresses and CPU count Spark gave this task; nothing outside a Spark task (Sail's
    UDF threads have no task context)."""
    try:
        from pyspark import TaskContext

        ctx = TaskContext.get()
        if ctx is None:
            return [], None
        resources = ctx.resources()
        gpus = list(resources["gpu"].addresses) if "gpu" in resources else []
        return gpus, int(ctx.cpus())
    except Exception:  # an engine without task resources
        return [], None


def _auto_threads(device: str, task_cpus: int | None, concurrent_tasks: int) -> int:
    cores = os.cpu_count() or 1
    if device.startswith("cuda"):
        import torch

        # one task per GPU: the machine's cores shared by its GPUs' tasks (decoding, pre/post-processing)
        return max(1, cores // max(1, torch.cuda.device_count()))
    if task_cpus is not None:
        return task_cpus  # spark.task.cpus: the cores the scheduler reserved for this task
    return max(1, cores // max(1, min(concurrent_tasks, cores)))


def default_partitions(spark, configured: int = 0) -> int:
    """``configured``, else the cluster's cores (``defaultParallelism``; this machine's under Sail)."""
    if configured:
        return configured
    try:
        return max(1, int(spark.sparkContext.defaultParallelism))
    except Exception:  # Spark Connect (Sail, serverless) has no SparkContext
        return os.cpu_count() or 1


def concurrent_tasks(partitions: int) -> int:
    """How many of ``partitions`` tasks run at once on this machine (local Sail)."""
    return max(1, min(partitions, os.cpu_count() or 1))


# ---------------------------------------------------------------------- worker: files in byte-sized batches
def local_path(path: str) -> str:
    """A path the worker can open: ``file:`` and ``dbfs:/Volumes`` URIs as plain paths."""
    if path.startswith("file://"):
        return path[len("file://"):]
    if path.startswith("file:"):
        return path[len("file:"):]
    if path.startswith("dbfs:/Volumes/"):
        return path[len("dbfs:"):]
    return path


def file_size(path: str | None) -> int:
    """The file's size in bytes, 0 when it cannot be read (its row will say why)."""
    if not path:
        return 0
    try:
        return os.stat(local_path(path)).st_size
    except (OSError, ValueError):
        return 0


def byte_batches(sizes: Sequence[int], max_bytes: int, max_rows: int) -> Iterator[slice]:
    """Consecutive slices of rows whose files add up to at most ``max_bytes`` (a single larger
    file is a batch of its own) and at most ``max_rows`` rows."""
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and (total + size > max_bytes or i - start >= max_rows):
            yield slice(start, i)
            start, total = i, 0
        total += max(0, int(size))
    if start < len(sizes):
        yield slice(start, len(sizes))


def read_file(path: str | None, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
    """A regular file's bytes; raises ``OSError``/``ValueError`` with a message for the row."""
    if not path:
        raise ValueError("the path is empty")
    with open(local_path(path), "rb") as f:
        info = os.fstat(f.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise ValueError("not a regular file")
        if info.st_size > max_bytes:
            raise ValueError(f"the file has {info.st_size:,} bytes, more than the limit of {max_bytes:,}")
        return f.read(max_bytes + 1)
