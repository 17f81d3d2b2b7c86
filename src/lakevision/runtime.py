"""Where a job runs: a laptop (Sail + Delta files + sqlite MLflow) or a Databricks workspace.

The data code only sees a :class:`Runtime`: a SparkSession (Spark Connect locally, the cluster's
own session on Databricks), :class:`TableRef` objects for its Delta tables, a staging folder that
the Spark workers can read, and the MLflow URIs. Nothing else differs between the two.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from lakevision.config import LakevisionConfig

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

DEFAULT_ROOT = ".lakevision"
ROOT_ENV = "LAKEVISION_ROOT"
SAIL_MODE_ENV = "LAKEVISION_SAIL_MODE"
SailMode = Literal["in_process", "subprocess"]
# Chosen by benchmarks/ingest.py (image checking); see benchmarks/RESULTS.md.
DEFAULT_SAIL_MODE: SailMode = "in_process"


@dataclass(frozen=True)
class TableRef:
    """A Delta table: a folder locally, a Unity Catalog three-level name on Databricks."""

    name: str
    path: str | None = None
    full_name: str | None = None

    @property
    def sql(self) -> str:
        """The identifier to use in Spark SQL (``MERGE INTO``, ``SELECT``)."""
        return f"delta.`{self.path}`" if self.path else str(self.full_name)

    @property
    def location(self) -> str:
        return self.path or str(self.full_name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen | None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"Sail server exited with code {proc.returncode} before opening port {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"Sail server did not open 127.0.0.1:{port} within {timeout:.0f} s")


def _die_with_parent() -> None:
    # A SIGKILLed job must not leave its Sail server behind (Linux only; elsewhere atexit covers it).
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class SailServer:
    """A Sail Spark Connect server on a free 127.0.0.1 port, in this process or a child process."""

    def __init__(self, mode: SailMode = DEFAULT_SAIL_MODE):
        if mode not in ("in_process", "subprocess"):
            raise ValueError(f"{SAIL_MODE_ENV}: unknown Sail mode {mode!r}; use in_process or subprocess")
        self.mode = mode
        self.port: int | None = None
        self._server = None
        self._proc: subprocess.Popen | None = None

    def start(self) -> SailServer:
        if self.mode == "in_process":
            from pysail.spark import SparkConnectServer

            self._server = SparkConnectServer(ip="127.0.0.1", port=0)
            self._server.start(background=True)
            self.port = self._server.listening_address[1]
        else:
            self.port = _free_port()
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "pysail", "spark", "server", "--ip", "127.0.0.1", "--port", str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
            _wait_for_port(self.port, self._proc)
        atexit.register(self.stop)
        return self

    @property
    def url(self) -> str:
        return f"sc://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None


@dataclass
class Runtime:
    """The place a job runs; build it with :func:`get_runtime`."""

    config: LakevisionConfig
    spark: SparkSession
    kind: Literal["local", "databricks"]
    root: Path | None = None  # local only
    _sail: SailServer | None = field(default=None, repr=False)

    # ------------------------------------------------------------------ tables
    def table(self, name: str) -> TableRef:
        t = self.config.target
        if self.kind == "local":
            return TableRef(name, path=str((self.root / "tables" / t.schema_ / name).resolve()))
        return TableRef(name, full_name=f"{t.catalog}.{t.schema_}.{name}")

    def storage(self, folder: str) -> Path:
        """A folder every node can reach: under the root locally, on the UC Volume on Databricks."""
        if self.kind == "local":
            return (self.root / folder).resolve()
        t = self.config.target
        return Path(f"/Volumes/{t.catalog}/{t.schema_}/{t.volume}/{folder}")

    @property
    def staging_dir(self) -> Path:
        """Where the driver stages files for the Spark workers."""
        return self.storage("staging")

    @property
    def checkpoint_dir(self) -> Path:
        """Shared storage for Ray Train checkpoints."""
        return self.storage("checkpoints")

    @property
    def experiment_name(self) -> str:
        return self.config.target.experiment or "lakevision"

    # ------------------------------------------------------------------ MLflow
    @property
    def tracking_uri(self) -> str:
        if self.kind == "local":
            return f"sqlite:///{(self.root / 'mlflow.db').resolve()}"
        return "databricks"

    @property
    def registry_uri(self) -> str:
        return self.tracking_uri if self.kind == "local" else "databricks-uc"

    @property
    def artifact_root(self) -> str | None:
        return str((self.root / "mlruns").resolve()) if self.kind == "local" else None

    def stop(self) -> None:
        if self._sail is not None:
            self.spark.stop()
            self._sail.stop()
            self._sail = None


def local_root(root: str | os.PathLike | None = None) -> Path:
    """The local data root: ``root``, else ``$LAKEVISION_ROOT``, else ``.lakevision``."""
    return Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def get_runtime(config: LakevisionConfig, root: str | os.PathLike | None = None) -> Runtime:
    """Start (locally) or attach to (on Databricks) the Spark session for ``config``'s target."""
    from pyspark.sql import SparkSession

    if config.target.runtime == "databricks":
        spark = SparkSession.getActiveSession() or SparkSession.builder.getOrCreate()
        return Runtime(config=config, spark=spark, kind="databricks")

    root_path = local_root(root)
    root_path.mkdir(parents=True, exist_ok=True)
    mode = os.environ.get(SAIL_MODE_ENV, DEFAULT_SAIL_MODE)
    t0 = time.monotonic()
    sail = SailServer(mode).start()  # type: ignore[arg-type]
    spark = SparkSession.builder.remote(sail.url).getOrCreate()
    log.info("Sail (%s) ready at %s in %.1f s", mode, sail.url, time.monotonic() - t0)
    return Runtime(config=config, spark=spark, kind="local", root=root_path, _sail=sail)
