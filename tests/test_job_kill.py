"""A job run killed at a random point, by SIGTERM (a scheduler cancelling it) or SIGKILL (the
machine's OOM killer, a supervisor out of patience): nothing of the run survives, its MLflow run is
not left RUNNING, every Delta table it wrote still reads, and the next run completes.

The job is a mini bundle whose task runs as a job step does (the step's SIGTERM handler, an MLflow
run, a child it stops itself, a grandchild in a session of its own, Delta commits): a few seconds,
not the real cv_pipeline, which trains for minutes."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from deltalake import DeltaTable
from mlflow import MlflowClient

from lakevision.bundle.loader import load_bundle
from lakevision.local.job_runner import KILL_GRACE_S, SUCCESS, TIMED_OUT, LocalJobRunner
from lakevision.processes import with_environment

from . import processes
from .mini_bundle import mini_bundle, nb

MARK = "LVTEST_KILL_RUN"  # in the runner's environment, so in everything the run starts


def _job(tmp_path: Path, **job) -> Path:
    task = nb("work", "mlflow=kill", f"spawn={tmp_path / 'grandchild.pid'}", "delta={{job.parameters.commits}}",
              "sleep={{job.parameters.pause}}", "publish=1", **job)
    return mini_bundle(tmp_path, [task], parameters=[{"name": "commits", "default": "6"},
                                                     {"name": "pause", "default": "20"}])


def _survivors(mark: str, timeout_s: float) -> set[int]:
    deadline = time.monotonic() + timeout_s
    while (left := {p for p in with_environment(MARK, mark) if processes.alive(p)}) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _runs(data: Path) -> list:
    client = MlflowClient(f"sqlite:///{data / 'mlflow.db'}")
    exp = client.get_experiment_by_name("kill")
    return client.search_runs([exp.experiment_id]) if exp else []


def _check_tables(data: Path) -> int:
    """Rows of every Delta table under the root, each read whole at its latest version."""
    tables = [p.parent for p in (data / "tables").glob("**/_delta_log")]
    return sum(DeltaTable(str(t)).to_pyarrow_table().num_rows for t in tables)


@pytest.mark.parametrize("sig, seed", [(signal.SIGTERM, 1), (signal.SIGTERM, 2), (signal.SIGKILL, 3),
                                       (signal.SIGKILL, 4)])
def test_a_killed_run_leaves_nothing_running_and_the_next_run_completes(tmp_path, sig, seed):
    bundle, data = _job(tmp_path), tmp_path / "data"
    mark = uuid.uuid4().hex
    env = {**__import__("os").environ, MARK: mark}
    argv = [sys.executable, "-m", "lakevision.cli", "bundle", "run", "j", "--bundle", str(bundle), "--root", str(data)]
    # from before the task starts to well inside it (the runner's start-up takes ~1-2 s here)
    delay = random.Random(seed).uniform(0.5, 6.0)
    try:
        with processes.owned(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as runner:
            time.sleep(delay)
            runner.send_signal(sig)
            code = runner.wait(timeout=KILL_GRACE_S + 20)
        assert code == -sig or code == 128 + sig, f"exit {code} after {delay:.1f} s"
        # SIGKILL: the run's guard stops what the runner can no longer stop itself
        assert not _survivors(mark, KILL_GRACE_S + 5), f"processes of the run outlived it ({delay:.1f} s)"
        assert [r.info.status for r in _runs(data) if r.info.status == "RUNNING"] == []
        _check_tables(data)
    finally:
        for pid in with_environment(MARK, mark):
            processes.kill_group(pid, grace_s=0)

    again = LocalJobRunner(load_bundle(bundle, "local", local_files=True), data).run("j", {"pause": "0"})
    assert again.status == SUCCESS, again.task("work").message
    assert _runs(data)[0].info.status == "FINISHED"
    assert _check_tables(data) >= 6
    # what the tasks left running ends with the run, as on a job cluster
    assert not processes.alive(int((tmp_path / "grandchild.pid").read_text()))
    killed = [r.info.status for r in _runs(data)[1:]]
    assert set(killed) <= {"KILLED"}, killed  # a run the kill found running ended KILLED


def test_a_timed_out_task_gets_sigterm_and_ends_its_mlflow_run(tmp_path):
    """A task past its timeout is stopped as a cancelled one is: SIGTERM, time to end its MLflow run
    and stop its child, then SIGKILL for what is left (its grandchild in a session of its own)."""
    bundle, data = _job(tmp_path, timeout_seconds=8), tmp_path / "data"
    run = LocalJobRunner(load_bundle(bundle, "local", local_files=True), data).run("j", {"commits": "1"})
    grandchild = int((tmp_path / "grandchild.pid").read_text())
    try:
        assert run.task("work").status == TIMED_OUT
        assert [r.info.status for r in _runs(data)] == ["KILLED"]
        assert not processes.alive(grandchild)
        assert run.task("work").seconds < 8 + KILL_GRACE_S
    finally:
        processes.kill_group(grandchild, grace_s=0)
