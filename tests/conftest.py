"""Shared fixtures: one real Sail server per test process, a fresh table root per test, and a suite
that leaves the machine as it found it.

Everything the suite starts inherits two things set here, before any test runs: a private temp
folder (``TMPDIR``; Ray, Lightning and pytest's own tmp paths land in it) and a marker variable.
Under pytest-xdist the controller sets both and its workers inherit them. When the session ends
(in the controller, after its workers are gone), a process still carrying the marker is a leak,
and so is anything left in the private temp folder but pytest's own: both fail the run, after
they are killed and removed, and each leftover names the test after which it first appeared.
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
_TMP_ENV = "LVTEST_TMP"
_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # set before a worker imports this file
if _WORKER is None:  # the controller, or a run without xdist: this process owns the session
    os.environ[SESSION_ENV] = uuid.uuid4().hex
    _SYSTEM_TMP = Path(tempfile.gettempdir())
    # short: Ray's socket paths must fit in 107 characters
    os.environ[_TMP_ENV] = tempfile.mkdtemp(prefix="lvt-", dir=_SYSTEM_TMP)
    os.environ["LVTEST_SYSTEM_TMP"] = str(_SYSTEM_TMP)
_SESSION = os.environ[SESSION_ENV]
_SYSTEM_TMP = Path(os.environ["LVTEST_SYSTEM_TMP"])
_TMP = Path(os.environ[_TMP_ENV])
os.environ["TMPDIR"] = str(_TMP)
# What libraries keep in the temp folder on import and never remove, one of each per machine:
# torch's compile cache (importing torchvision creates it; the suite gives it a folder of its own)
# and ONNX Runtime's telemetry session file (its native code writes $TMPDIR/.ses). Both go with
# the suite's temp folder; anything else left there is a leak.
_SESSION_CACHES = {"torchinductor", ".ses", "hypothesis"}
os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(_TMP / "torchinductor")
# hypothesis keeps caches (constants, unicode tables) even without an example database; in the
# session's folder, not in the checkout
os.environ["HYPOTHESIS_STORAGE_DIRECTORY"] = str(_TMP / "hypothesis")
tempfile.tempdir = None  # gettempdir() reads TMPDIR again
# a child temp folder's name: one letter per test process, so workers never collide, and short
_CHILD_TMP_PREFIX = "c" if _WORKER is None else chr(ord("a") + int(_WORKER.removeprefix("gw")) % 26)
_CHILD_TMP_NUMBERS = itertools.count()
# what a training run may leave in the system temp folder; none of it may appear there during the suite
_LEAK_PATTERNS = ("lightning_checkpoints-*", "checkpoint_tmp_*", "ray", "ray-*", "lvray-*", "lakevision-*")
_SYSTEM_BEFORE = {p.name for pattern in _LEAK_PATTERNS for p in _SYSTEM_TMP.glob(pattern)}
_FIRST_SEEN: dict[str, str] = {}  # leftover in the private temp folder -> the test after which it appeared

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
    path = _TMP / f"{_CHILD_TMP_PREFIX}{next(_CHILD_TMP_NUMBERS)}"  # short: Ray-on-Spark's socket paths are long
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


# The longest modules (pytest --durations, 2 cores), first: with two xdist workers taking whole
# files in collection order, a long one started last would leave the other worker idle at the end
_LONGEST_FIRST = ("test_training_ray.py", "test_pipeline_e2e.py", "test_deploy_job.py", "test_notebooks.py",
                  "test_deploy.py", "test_monitor.py", "test_explain.py", "test_workspace.py")


def pytest_collection_modifyitems(items):
    """Everything not marked slow is the unit tier (`make test-fast`); the longest modules run first."""
    for item in items:
        if item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.unit)
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-module order is kept


def _temp_leftovers() -> set[str]:
    return {p.name for p in _TMP.iterdir() if not p.name.startswith("pytest-of-")} - _SESSION_CACHES


_RUNS_TESTS = True  # false in an xdist controller: the tests run in its workers, which keep their own


def pytest_configure(config):
    global _RUNS_TESTS
    _RUNS_TESTS = _WORKER is not None or config.getoption("dist", "no") == "no"


@pytest.hookimpl(trylast=True)
def pytest_runtest_logfinish(nodeid, location):
    if _RUNS_TESTS:
        for name in _temp_leftovers() - _FIRST_SEEN.keys():
            _FIRST_SEEN[name] = nodeid


def pytest_testnodedown(node, error):
    """The controller collects what each xdist worker saw appear, and after which of its tests."""
    for name, nodeid in getattr(node, "workeroutput", {}).get("lvtest_first_seen", {}).items():
        _FIRST_SEEN.setdefault(name, nodeid)


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


@pytest.hookimpl(wrapper=True)
def pytest_sessionfinish(session, exitstatus):
    """Fail the run for any process or temp file the tests left behind (and clean it up). Runs in
    the controller after everything else, xdist's shutdown of its workers included."""
    result = yield
    if _WORKER is not None:
        session.config.workeroutput["lvtest_first_seen"] = dict(_FIRST_SEEN)
        return result
    problems = []
    for pid in _leaked_processes():
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:200]
            os.kill(pid, signal.SIGKILL)
        except OSError:
            continue  # it ended on its own meanwhile
        problems.append(f"process {pid} outlived the suite: {cmd}")
    problems += [f"left in the suite's temp folder: {name} (first seen after {_FIRST_SEEN.get(name, 'the last test')})"
                 for name in sorted(_temp_leftovers())]
    system = {p.name for pattern in _LEAK_PATTERNS for p in _SYSTEM_TMP.glob(pattern)}
    problems += [f"left in {_SYSTEM_TMP}: {name}" for name in sorted(system - _SYSTEM_BEFORE)]
    shutil.rmtree(_TMP, ignore_errors=True)
    if problems:
        print("\nthe suite did not leave the machine as it found it:\n  " + "\n  ".join(problems))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
    return result
