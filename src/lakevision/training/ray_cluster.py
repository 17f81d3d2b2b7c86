"""Where Ray runs: Ray-on-Spark over a classic Spark cluster, or plain local Ray.

Kept apart from the trainer so the distributed plumbing, and its workarounds, live in one place:
Ray-on-Spark needs the dashboard off and ``RAY_AUTH_MODE`` set, and can leave its agents behind
after shutdown (see ../shared/reference/platform-facts.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from lakevision.config import DistributedSettings
from lakevision.processes import alive, ancestors, command_line, descendants, start_ticks

log = logging.getLogger(__name__)

_AGENT_MARKERS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "dashboard/agent.py", "runtime_env/agent/main.py")
_LOCAL_WORKERS, _LOCAL_WORKER_CORES, _LOCAL_WORKER_MB = 2, 1, 2048
LOCAL_CLUSTER_MASTER = f"local-cluster[{_LOCAL_WORKERS},{_LOCAL_WORKER_CORES},{_LOCAL_WORKER_MB}]"


def quiet_worker_logs() -> None:
    """Ray worker setup hook: without the dashboard Ray Train's placement-group cleaner warns
    every few seconds that the state API is unavailable, burying the training progress."""
    logging.getLogger("ray.train.v2._internal.execution.controller.placement_group_cleaner").setLevel(logging.ERROR)


_RUNTIME_ENV = {"worker_process_setup_hook": f"{__name__}.quiet_worker_logs"}


def processes_matching(*markers: str, within: str | None = None) -> set[int]:
    """PIDs whose command line contains any marker and, with ``within``, also that text (a Ray
    temp dir: only the processes of that Ray session). Linux /proc; empty elsewhere."""
    pids = set()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(m in cmd for m in markers) and (within is None or within in cmd):
            pids.add(int(entry.name))
    return pids


def _temp_parent() -> str | None:
    """Where Ray's temp data goes: ``$RAY_TMPDIR``, else the system temp folder (Ray-on-Spark's
    Databricks hook picks ``/local_disk0/tmp`` when given ``None``)."""
    if "RAY_TMPDIR" in os.environ:
        return os.environ["RAY_TMPDIR"]
    return None if "DATABRICKS_RUNTIME_VERSION" in os.environ else tempfile.gettempdir()


@contextlib.contextmanager
def _private_temp_root() -> Iterator[str]:
    """A local Ray temp root of this cluster's own (sessions, sockets, logs), removed afterwards:
    nothing is left in the shared temp folder, and this cluster's processes are recognizable by
    it. Short, as Ray's socket paths must fit in 107 characters."""
    root = tempfile.mkdtemp(prefix="lvray-", dir=_temp_parent())
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _kill(pids: set[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def cluster_processes(cluster_dir: str) -> dict[int, int | None]:
    """The processes of the Ray cluster whose temp folder is ``cluster_dir``, with their start times:
    its nodes (their command lines name the folder itself, not a longer path that starts with it)
    and everything below them, agents included. Read while the nodes still run: after a shutdown
    an orphaned agent is re-parented and no longer below them."""
    names_dir = re.compile(re.escape(cluster_dir.rstrip("/")) + r"(?=$|[/\s\"'])")
    mine = {os.getpid()} | ancestors(os.getpid())  # whatever their command lines say, never these
    nodes = {pid for pid in processes_matching(cluster_dir) if names_dir.search(command_line(pid))} - mine
    return {pid: start_ticks(pid) for pid in nodes | descendants(*nodes)}


def kill_leftover_agents(processes: dict[int, int | None]) -> set[int]:
    """SIGKILL the Ray agents among ``processes`` (from :func:`cluster_processes`) that outlived their
    cluster's shutdown (they ignore SIGTERM); never a process that merely reuses one of their pids,
    nor any other cluster's. The pids killed."""
    left = {pid for pid, ticks in processes.items()
            if alive(pid) and start_ticks(pid) == ticks and any(m in command_line(pid) for m in _AGENT_MARKERS)}
    _kill(left)
    return left


def remove_cluster(cluster_dir: str, processes: dict[int, int | None], grace_s: float = 10.0) -> set[int]:
    """After a Ray-on-Spark shutdown: the cluster's temp folder removed once none of its processes
    (``processes`` from :func:`cluster_processes` before the shutdown, and any naming the folder now)
    can write into it again. Agents ignore SIGTERM and are killed at once; the others get ``grace_s``
    to finish their own shutdown (a node's launcher removes the folder 1.5 s after SIGTERM, while its
    node may still be writing logs there) and are killed after it. Returns the pids killed."""
    killed = kill_leftover_agents({**cluster_processes(cluster_dir), **processes})
    deadline = time.monotonic() + grace_s
    while True:
        mine = {**cluster_processes(cluster_dir), **processes}
        left = {pid for pid, ticks in mine.items() if pid not in killed and alive(pid) and start_ticks(pid) == ticks}
        if not left:
            break
        if time.monotonic() >= deadline:
            log.warning("Ray-on-Spark processes %s outlived the cluster's shutdown by %.0f s; killing them",
                        sorted(left), grace_s)
            _kill(left)
            killed |= left
            break
        time.sleep(0.1)
    shutil.rmtree(cluster_dir, ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):  # start_ray_node.py's lock beside the folder
        os.remove(cluster_dir + ".lock")
    return killed


def classic_spark_session():
    """The active classic (JVM) SparkSession, or None (no session, or a Spark Connect one)."""
    try:
        from pyspark.sql import SparkSession
        from pyspark.sql.utils import is_remote
    except ImportError:
        return None
    session = SparkSession.getActiveSession()
    if session is None or is_remote() or type(session).__module__.startswith("pyspark.sql.connect"):
        return None
    return session


@contextlib.contextmanager
def _classic_spark_mode() -> Iterator[None]:
    """A local job also holds a Spark Connect session (Sail), and pyspark then routes every
    builder to Connect through one environment variable; classic Spark needs it off meanwhile."""
    saved = os.environ.pop("SPARK_CONNECT_MODE_ENABLED", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["SPARK_CONNECT_MODE_ENABLED"] = saved


def start_local_spark_cluster():
    """A classic ``local-cluster`` session: separate executor JVMs, as on a real cluster."""
    from pyspark.sql import SparkSession

    from pyspark.errors import PySparkRuntimeError

    # executors must run this interpreter (the one with ray installed), not whatever python3 is first
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    # Ray-on-Spark sizes a node by the cores of the machine its Spark worker runs on; these workers
    # share one machine and own one core each, which Ray's own setting for such clusters says.
    builder = (SparkSession.builder.master(LOCAL_CLUSTER_MASTER)
               .appName("lakevision-ray-on-spark")
               .config("spark.task.cpus", "1")
               .config("spark.executorEnv.RAY_ON_SPARK_WORKER_CPU_CORES", str(_LOCAL_WORKER_CORES))
               .config("spark.ui.enabled", "false"))
    try:
        return builder.getOrCreate()
    except PySparkRuntimeError as exc:
        # Seen in the full test suite only: the forked JVM launcher dies before exec while the
        # process' gRPC pollers (Spark Connect, Ray) are busy ("epoll_wait error: Bad file
        # descriptor"); a second launch goes through.
        if "JAVA_GATEWAY_EXITED" not in str(exc):
            raise
        log.warning("the Spark JVM exited while starting; retrying once")
        time.sleep(2)
        return builder.getOrCreate()


@contextlib.contextmanager
def ray_cluster(settings: DistributedSettings, log_to_driver: bool = True) -> Iterator[Literal["ray_on_spark", "local"]]:
    """Connect Ray for the duration of the block, and shut down whatever this started."""
    import ray

    # Without an explicit mode an earlier plain ray.init() leaves a token file that makes
    # Ray-on-Spark fail with InvalidAuthToken.
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if ray.is_initialized():  # a caller's cluster: use it, leave it running
        yield "local"
        return
    spark = classic_spark_session()
    mode = settings.cluster
    if mode == "ray_on_spark" or (mode == "auto" and spark is not None):
        with _classic_spark_mode():
            yield from _ray_on_spark(settings, spark, log_to_driver)
        return
    # A laptop is not a spot instance: skip the preemption watcher actor (one less process to start).
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    with _private_temp_root() as temp_root:
        _init_local(log_to_driver, temp_root)
        try:
            yield "local"
        finally:
            ray.shutdown()


def _init_local(log_to_driver: bool, temp_root: str, attempts: int = 2) -> None:
    """Start local Ray; on a busy 2-core machine its node start-up now and then misses a deadline
    ("The current node timed out during startup", "Timed out waiting for file .../gcs_server_port"),
    and a second try goes through."""
    import ray

    for attempt in range(1, attempts + 1):
        try:
            ray.init(include_dashboard=False, log_to_driver=log_to_driver, runtime_env=_RUNTIME_ENV,
                     _temp_dir=temp_root)
            return
        except Exception as exc:  # Ray raises a bare Exception for this
            if "timed out" not in str(exc).lower() or attempt == attempts:
                raise
            log.warning("Ray start-up timed out (attempt %d); retrying", attempt)
            ray.shutdown()


def _active_cluster_temp_dir() -> str:
    """The temp folder of the Ray-on-Spark cluster just started (``ray-<port>-<id>``): its
    processes carry it on their command lines, and nothing else does."""
    from ray.util.spark import cluster_init

    return cluster_init._active_ray_cluster.temp_dir


def _setup_with_retry(setup, shutdown, kwargs: dict) -> str:
    """Ray-on-Spark's head node, started again once when its first start dies: under a loaded
    test suite the head process has failed with gRPC's "epoll_wait error: Bad file descriptor"
    and a second start went through (the same remedy as the JVM launch above)."""
    try:
        return setup(**kwargs)[0]
    except RuntimeError as exc:
        if "Start Ray head node failed" not in str(exc):
            raise
        log.warning("the Ray-on-Spark head node failed to start; retrying once")
        with contextlib.suppress(RuntimeError):  # "No active ray cluster" when nothing was left
            shutdown()
        time.sleep(2)
        return setup(**kwargs)[0]


def _ray_on_spark(settings: DistributedSettings, spark, log_to_driver: bool) -> Iterator[Literal["ray_on_spark"]]:
    import ray
    from ray.util.spark import setup_ray_cluster, shutdown_ray_cluster

    # Ray-on-Spark launches nodes with `which ray`: this interpreter's scripts must be on PATH
    # (a venv used without activating it, as `make test` does, is not).
    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    started_spark = None
    if spark is None:
        spark = started_spark = start_local_spark_cluster()
    # No num_cpus_worker_node / num_gpus_worker_node: left unset, Ray-on-Spark gives each Ray worker
    # node the whole Spark worker (all its cores for the data loaders, all its GPUs), where setting
    # them from spark.task.cpus gave a node one CPU (ray/util/spark/cluster_init.py).
    # No extra folder level here: Ray-on-Spark adds its own per-cluster ``ray-<port>-<id>`` folder,
    # and under /local_disk0/tmp one more level pushes the socket paths past 107 characters.
    kwargs: dict = {"max_worker_nodes": settings.num_workers, "num_cpus_head_node": 0,
                    "head_node_options": {"include_dashboard": False}, "ray_temp_root_dir": _temp_parent()}
    cluster_dir = None
    started: dict[int, int | None] = {}  # this cluster's processes, read before its shutdown
    try:
        address = _setup_with_retry(setup_ray_cluster, shutdown_ray_cluster, kwargs)
        cluster_dir = _active_cluster_temp_dir()
        ray.init(address=address, log_to_driver=log_to_driver, runtime_env=_RUNTIME_ENV)
        try:
            yield "ray_on_spark"
        finally:
            started = cluster_processes(cluster_dir)
            ray.shutdown()
            shutdown_ray_cluster()
    finally:
        if cluster_dir is not None:
            # only this cluster's processes, and its folder once they can no longer write into it
            remove_cluster(cluster_dir, started)
        if started_spark is not None:
            started_spark.stop()
