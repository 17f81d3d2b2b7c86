"""Where a job runs: a laptop (Sail + Delta files + sqlite MLflow) or a Databricks workspace.

The data code only sees a :class:`Runtime`: a SparkSession (Spark Connect locally, the cluster's
own session on Databricks), :class:`TableRef` objects for its Delta tables, a staging folder that
the Spark workers can read, the MLflow URIs and the workspace. Nothing else differs between the
two, and this is the one module that chooses the local stand-ins (:mod:`lakevision.local`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lakevision.errors import LakevisionError
from lakevision.config import LakevisionConfig
from lakevision.config.schema import UC_NAME

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)

DEFAULT_ROOT = ".lakevision"
ROOT_ENV = "LAKEVISION_ROOT"


@dataclass(frozen=True)
class LocalLayout:
    """Where everything lives under a local data root: the one place that names these paths."""

    root: Path

    def table(self, schema: str, name: str) -> Path:
        return (self.root / "tables" / schema / name).resolve()

    @property
    def mlflow_db(self) -> Path:
        return (self.root / "mlflow.db").resolve()

    @property
    def tracking_uri(self) -> str:
        """MLflow's tracking and registry store: a sqlite file (the plain file store is retired),
        created whole on first use."""
        if not self.mlflow_db.exists():
            _create_mlflow_db(self.mlflow_db, self.artifacts)
        return f"sqlite:///{self.mlflow_db}"

    @property
    def artifacts(self) -> Path:
        return (self.root / "mlruns").resolve()

    def storage(self, folder: str) -> Path:
        """A folder the Spark workers and Ray workers share (staging, checkpoints, sample data)."""
        return (self.root / folder).resolve()

    @property
    def runs(self) -> Path:
        """The local runner's job runs, one folder per bundle job."""
        return (self.root / "runs").resolve()

    def job_runs(self, job: str) -> Path:
        """The local runner's runs of bundle job ``job``: one folder each, with logs and run.json."""
        return self.runs / job

    @property
    def endpoint_records(self) -> Path:
        """The local workspace's serving endpoints, one JSON record each."""
        return (self.root / "workspace" / "endpoints").resolve()

    @property
    def workspace_lock(self) -> Path:
        """The lock one local workspace process holds on the root while it owns the endpoint records."""
        return (self.root / "workspace" / "lock").resolve()


def _create_mlflow_db(path: Path, artifacts: Path) -> None:
    """MLflow builds a new sqlite store in dozens of migrations, each committed on its own: a job
    killed among them leaves a file that every later client fails to open ("duplicate column name:
    step"). Built aside and linked into place, the store is there whole or not at all."""
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    path.parent.mkdir(parents=True, exist_ok=True)
    aside = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}")
    try:
        SqlAlchemyStore(f"sqlite:///{aside}", artifacts.as_uri()).engine.dispose()
        # link, not rename: a store another process linked meanwhile is never replaced (it may hold runs)
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    finally:
        aside.unlink(missing_ok=True)


class IdentifierError(LakevisionError, ValueError):
    """A catalog, schema or table name that is not a SQL identifier this project writes."""


def sql_name(dotted: str) -> str:
    """``catalog.schema.table`` (or any dotted name) for Spark SQL and the table APIs: every part
    checked against :data:`~lakevision.config.schema.UC_NAME` and quoted with backticks, so no name
    can end the identifier or add to the statement."""
    parts = dotted.split(".")
    bad = next((p for p in parts if not UC_NAME.fullmatch(p)), None)
    if bad is not None:
        raise IdentifierError(f"{dotted!r}: {bad!r} is not a Unity Catalog name (letters, digits, underscores and "
                         "hyphens)")
    return ".".join(f"`{p}`" for p in parts)


@dataclass(frozen=True)
class TableRef:
    """A Delta table: a folder locally, a Unity Catalog three-level name on Databricks (checked
    when the reference is made)."""

    name: str
    path: str | None = None
    full_name: str | None = None

    def __post_init__(self) -> None:
        if self.full_name is not None:
            sql_name(self.full_name)

    @property
    def sql(self) -> str:
        """The identifier to use in Spark SQL (``MERGE INTO``, ``SELECT``) and the table APIs
        (``saveAsTable``): each part quoted with backticks."""
        if self.path:
            return "delta.`" + self.path.replace("`", "``") + "`"
        return sql_name(str(self.full_name))

    @property
    def location(self) -> str:
        return self.path or str(self.full_name)


@dataclass
class Runtime:
    """The place a job runs; build it with :func:`get_runtime`."""

    config: LakevisionConfig
    spark: SparkSession
    kind: Literal["local", "databricks"]
    root: Path | None = None  # local only
    _sail: Any = field(default=None, repr=False)  # the local Sail server this runtime started

    # ------------------------------------------------------------------ tables
    @property
    def layout(self) -> LocalLayout:
        if self.root is None:
            raise RuntimeError("a Databricks runtime has no local layout")
        return LocalLayout(self.root)

    def table(self, name: str) -> TableRef:
        t = self.config.target
        if self.kind == "local":
            return TableRef(name, path=str(self.layout.table(t.schema_, name)))
        return TableRef(name, full_name=f"{t.catalog}.{t.schema_}.{name}")

    def storage(self, folder: str) -> Path:
        """A folder every node can reach: under the root locally, on the UC Volume on Databricks."""
        if self.kind == "local":
            return self.layout.storage(folder)
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
        return self.layout.tracking_uri if self.kind == "local" else "databricks"

    @property
    def registry_uri(self) -> str:
        return self.tracking_uri if self.kind == "local" else "databricks-uc"

    # ------------------------------------------------------------------ the workspace
    @contextlib.contextmanager
    def local_workspace(self, bundle_dir: str | os.PathLike | None = None,
                        target: str = "local") -> Iterator[tuple[str, str]]:
        """``(url, token)`` of a local workspace process over this root's registry and endpoint
        records, for the block: the stand-in for the workspace a Databricks job talks to. With
        ``bundle_dir`` its Jobs API serves that bundle's jobs for ``target``, run by the local runner."""
        from lakevision.local.workspace.process import local_workspace_process

        if self.kind != "local":
            raise RuntimeError("a Databricks runtime talks to its own workspace")
        with local_workspace_process(self.root, bundle_dir=bundle_dir, target=target) as (url, token):
            yield url, token

    def stop(self) -> None:
        if self._sail is not None:
            self.spark.stop()
            self._sail.stop()
            self._sail = None


def on_databricks() -> bool:
    return "DATABRICKS_RUNTIME_VERSION" in os.environ


def local_root(root: str | os.PathLike | None = None) -> Path:
    """The local data root: ``root``, else ``$LAKEVISION_ROOT``, else ``.lakevision``."""
    return Path(root or os.environ.get(ROOT_ENV) or DEFAULT_ROOT)


def get_runtime(config: LakevisionConfig, root: str | os.PathLike | None = None) -> Runtime:
    """Start (locally) or attach to (on Databricks) the Spark session for ``config``'s target."""
    from pyspark.sql import SparkSession

    if config.target.runtime == "databricks":
        spark = SparkSession.getActiveSession()
        if spark is None and not (on_databricks() or os.environ.get("SPARK_REMOTE")):
            # getOrCreate() would start a local JVM Spark and run a workspace target on it
            raise LakevisionError(f"target {config.target_name!r} runs on Databricks and there is no Spark session "
                                  "here: run it as a bundle job, set SPARK_REMOTE (Databricks Connect), "
                                  "or use --target local")
        spark = spark or SparkSession.builder.getOrCreate()
        return Runtime(config=config, spark=spark, kind="databricks")

    from lakevision.local.sail import DEFAULT_SAIL_MODE, SAIL_MODE_ENV, SailServer

    root_path = local_root(root)
    root_path.mkdir(parents=True, exist_ok=True)
    mode = os.environ.get(SAIL_MODE_ENV, DEFAULT_SAIL_MODE)
    t0 = time.monotonic()
    sail = SailServer(mode).start()  # type: ignore[arg-type]
    spark = SparkSession.builder.remote(sail.url).getOrCreate()
    log.info("Sail (%s) ready at %s in %.1f s", mode, sail.url, time.monotonic() - t0)
    return Runtime(config=config, spark=spark, kind="local", root=root_path, _sail=sail)
