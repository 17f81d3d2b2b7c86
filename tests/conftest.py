"""Shared fixtures: one real Sail server for the session, a fresh table root per test, and a suite
that leaves the machine as it found it.

Everything the suite starts inherits two things set here, before any test runs: a private temp
folder (``TMPDIR``; Ray, Lightning and pytest's own tmp paths land in it) and a marker variable.
When the session ends, a process still carrying the marker is a leak, and so is anything left in
the private temp folder but pytest's own: both fail the run, after they are killed and removed.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import tempfile
import uuid
from pathlib import Path

import pytest

os.environ.setdefault("RUST_LOG", "warn,sail_common::actor=error")

SESSION_ENV = "LVTEST_SESSION"  # not LAKEVISION_*: some tests clear those from their children's env
_SESSION = uuid.uuid4().hex
os.environ[SESSION_ENV] = _SESSION
_SYSTEM_TMP = Path(tempfile.gettempdir())
_TMP = Path(tempfile.mkdtemp(prefix="lvt-", dir=_SYSTEM_TMP))  # short: Ray's socket paths must fit in 107 chars
os.environ["TMPDIR"] = str(_TMP)
tempfile.tempdir = None  # gettempdir() reads TMPDIR again
_CHILD_TMP_NUMBERS = itertools.count()
# what a training run may leave in the system temp folder; none of it may appear there during the suite
_LEAK_PATTERNS = ("lightning_checkpoints-*", "checkpoint_tmp_*", "ray", "ray-*", "lvray-*", "lakevision-*")
_SYSTEM_BEFORE = {p.name for pattern in _LEAK_PATTERNS for p in _SYSTEM_TMP.glob(pattern)}

from lakevision.config import load_config  # noqa: E402
from lakevision.local.sail import SailServer  # noqa: E402
from lakevision.runtime import Runtime  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "bundle" / "config"


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    server = SailServer().start()
    session = SparkSession.builder.remote(server.url).getOrCreate()
    yield session
    session.stop()
    server.stop()


@pytest.fixture
def config():
    return load_config(CONFIG_DIR, "local")


@pytest.fixture
def runtime(spark, config, tmp_path) -> Runtime:
    """A local runtime on the shared Sail server with its own table root."""
    return Runtime(config=config, spark=spark, kind="local", root=tmp_path / "root")


@pytest.fixture(scope="module")
def ingested_runtime(spark, tmp_path_factory):
    """A runtime over a small ingested synthetic dataset, shared by one test module."""
    from lakevision.data.ingest import run_ingest
    from lakevision.data.synthetic import generate_dataset

    base = tmp_path_factory.mktemp("ingested")
    ds = generate_dataset(base / "data", num_images=40, seed=31, image_size=(128, 160))
    rt = Runtime(config=load_config(CONFIG_DIR, "local"), spark=spark, kind="local", root=base / "root")
    run_ingest(rt, str(ds.annotation_file), str(ds.image_dir))
    return rt


@pytest.fixture
def child_tmp(tmp_path_factory) -> Path:
    """A short private temp folder for a test's child processes (give it as their ``TMPDIR``),
    removed after the test: Ray sessions, Lightning's checkpoint staging and the like."""
    path = _TMP / f"c{next(_CHILD_TMP_NUMBERS)}"  # two characters: Ray-on-Spark's socket paths are long
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(autouse=True)
def _mlflow_uris():
    """``mlflow.set_tracking_uri`` is process-wide: whatever a test sets is undone after it."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (tracking_utils._tracking_uri, registry_utils._registry_uri,
             {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")})
    yield
    tracking_utils._tracking_uri, registry_utils._registry_uri, env = saved
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def pytest_collection_modifyitems(items):
    """Everything not marked slow is the unit tier (`make test-fast`)."""
    for item in items:
        if item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.unit)


def _leaked_processes() -> list[int]:
    needle = f"{SESSION_ENV}={_SESSION}".encode()
    mine = {os.getpid()}
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid in mine:
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.append(pid)
        except OSError:
            continue
    return found


def pytest_sessionfinish(session, exitstatus):
    """Fail the run for any process or temp file the tests left behind (and clean it up)."""
    problems = []
    for pid in _leaked_processes():
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
        problems.append(f"process {pid} outlived the suite: {cmd}")
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    left = sorted(p.name for p in _TMP.iterdir() if not p.name.startswith("pytest-of-"))
    problems += [f"left in the suite's temp folder: {name}" for name in left]
    system = {p.name for pattern in _LEAK_PATTERNS for p in _SYSTEM_TMP.glob(pattern)}
    problems += [f"left in {_SYSTEM_TMP}: {name}" for name in sorted(system - _SYSTEM_BEFORE)]
    shutil.rmtree(_TMP, ignore_errors=True)
    if problems:
        print("\nthe suite did not leave the machine as it found it:\n  " + "\n  ".join(problems))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
