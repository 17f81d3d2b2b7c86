"""Job runs on this machine as the Jobs service keeps them, shared by the local runner
(``lakevision bundle run``) and the local workspace's Jobs API (``jobs.run_now`` and friends).

A run is a folder ``<root>/runs/<job key>/<run id>/`` holding:

* ``launch.json``, the run as the Jobs service knows it from the moment it is asked for: the job,
  its parameters, the start time, the process that runs it (pid and that process' start time, so a
  reused pid is not taken for it) and its admission, ``RUNNING``, ``QUEUED`` or ``SKIPPED``;
* ``run.json``, the runner's result, written when the run ends;
* ``launch.out``, the runner's own output, for a run the Jobs API started;
* each task's log and task values.

Admission is the Jobs service's: at most ``max_concurrent_runs`` (default 1) runs of a job are
active; a run asked for beyond that waits in the job's queue when queueing is on, and is skipped
when it is off (``max_concurrent_runs: 0`` skips every run). ``databricks bundle deploy`` turns
queueing on for every job that does not say (databricks/cli
``bundle/config/mutator/default_queueing.go``), so a bundle job queues unless it sets
``queue: {enabled: false}``. Run ids are milliseconds since the epoch, unique in the root.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lakevision.bundle.loader import local_job_id
from lakevision.local.process_tree import alive, start_ticks
from lakevision.runtime import LocalLayout

RECORD, RESULT, OUTPUT = "launch.json", "run.json", "launch.out"
RUNNING, QUEUED, SKIPPED = "RUNNING", "QUEUED", "SKIPPED"
DEFAULT_MAX_CONCURRENT_RUNS = 1  # the Jobs API's default
QUEUE_POLL_S = 0.5


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def max_concurrent_runs(job: dict) -> int:
    value = job.get("max_concurrent_runs")
    return DEFAULT_MAX_CONCURRENT_RUNS if value is None else int(value)


def queue_enabled(job: dict, override: Any = None) -> bool:
    """Whether a run asked for beyond the job's limit waits: the run-now's ``queue`` setting over
    the job's, and on (as ``bundle deploy`` sets it) where neither says."""
    for settings in (override, job.get("queue")):
        if isinstance(settings, dict) and "enabled" in settings:
            return bool(settings["enabled"])
    return True


def skipped_message(limit: int) -> str:
    # the Jobs service's words for a skipped run, as `databricks bundle run` prints them
    # (databricks/cli pull request 257, "Throw error when job run is skipped due to max_concurrent_runs")
    return f"Skipping this run because the limit of {limit} maximum concurrent runs has been reached."


def queued_message(limit: int) -> str:
    return f"Queued due to reaching the maximum of {limit} concurrent runs of this job."


def _write_json(path: Path, data: dict) -> None:
    """Atomically: a reader sees the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on ``path`` held by this block, across threads and processes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def new_run_id(root: str | os.PathLike) -> int:
    """A run id no run under ``root`` has had: the time in milliseconds, or one more than the last."""
    runs = LocalLayout(Path(root)).runs
    last_file = runs / ".last_run_id"
    with _locked(runs / ".run_ids.lock"):
        last = int(last_file.read_text()) if last_file.exists() else 0
        run_id = max(now_ms(), last + 1)
        last_file.write_text(str(run_id))
    return run_id


@dataclass
class RunFolder:
    """One run's folder, read once: its record (None for a run older than records) and result."""

    job_key: str
    run_id: int
    path: Path
    record: dict | None
    result: dict | None

    @property
    def job_id(self) -> int:
        return local_job_id(self.job_key)

    @property
    def process_alive(self) -> bool:
        record = self.record or {}
        pid = record.get("pid")
        if not pid or "end_time" in record or not alive(pid):
            return False
        return record.get("pid_start") in (None, start_ticks(pid))

    @property
    def admission(self) -> str | None:
        return (self.record or {}).get("state")

    @property
    def running(self) -> bool:
        return self.result is None and self.admission == RUNNING and self.process_alive

    @property
    def queued(self) -> bool:
        return self.result is None and self.admission == QUEUED and self.process_alive

    @property
    def active(self) -> bool:
        return self.running or self.queued

    @property
    def output_tail(self) -> str:
        """The last lines of the runner's own output (a run the Jobs API started), or ''."""
        output = (self.record or {}).get("output")
        try:
            lines = Path(output).read_text(errors="replace").splitlines() if output else []
        except OSError:
            return ""
        return "\n".join(line for line in lines[-12:] if line.strip())


def read_run(path: Path) -> RunFolder | None:
    """The run in folder ``path``, or None when it holds neither a record nor a result."""
    if not path.name.isdigit():
        return None
    record, result = _read_json(path / RECORD), _read_json(path / RESULT)
    if record is None and result is None:
        return None
    return RunFolder(path.parent.name, int(path.name), path, record, result)


def job_run_folders(root: str | os.PathLike, job_key: str) -> list[RunFolder]:
    """Every run of ``job_key`` under ``root``, newest first."""
    folder = LocalLayout(Path(root)).job_runs(job_key)
    runs = [r for p in folder.glob("*") if (r := read_run(p)) is not None] if folder.is_dir() else []
    return sorted(runs, key=lambda r: r.run_id, reverse=True)


def all_run_folders(root: str | os.PathLike) -> list[RunFolder]:
    """Every run of every job under ``root``, newest first."""
    runs_dir = LocalLayout(Path(root)).runs
    keys = [p.name for p in runs_dir.iterdir() if p.is_dir()] if runs_dir.is_dir() else []
    return sorted((r for key in keys for r in job_run_folders(root, key)), key=lambda r: r.run_id, reverse=True)


def find_run(root: str | os.PathLike, run_id: int) -> RunFolder | None:
    runs_dir = LocalLayout(Path(root)).runs
    for path in runs_dir.glob(f"*/{int(run_id)}"):
        run = read_run(path)
        if run is not None:
            return run
    return None


def _job_lock(root: str | os.PathLike, job_key: str):
    return _locked(LocalLayout(Path(root)).job_runs(job_key) / ".admission.lock")


def submit(root: str | os.PathLike, job_key: str, job: dict, parameters: dict[str, str],
           start: Callable[[int], tuple[int, str | None]], queue: Any = None,
           extra: dict[str, Any] | None = None) -> dict:
    """Ask for a run of ``job_key`` and record it, admitted as the Jobs service admits it: skipped
    when ``job``'s limit of concurrent runs is reached and queueing is off, queued when it is on,
    else running. ``start(run_id)`` starts the process that runs it (never for a skipped run) and
    returns its pid and output file. ``queue``: the request's own queue setting. The record."""
    with _job_lock(root, job_key):
        runs = job_run_folders(root, job_key)
        limit = max_concurrent_runs(job)
        running = sum(r.running for r in runs)
        waiting = any(r.queued for r in runs)
        if limit <= 0 or (running >= limit and not queue_enabled(job, queue)):
            state, message = SKIPPED, skipped_message(limit)
        elif running >= limit or waiting:
            state, message = QUEUED, queued_message(limit)
        else:
            state, message = RUNNING, ""
        run_id = new_run_id(root)
        run_dir = LocalLayout(Path(root)).job_runs(job_key) / str(run_id)
        run_dir.mkdir(parents=True)
        record = {"run_id": run_id, "job_key": job_key, "job_id": local_job_id(job_key),
                  "run_name": job.get("name") or job_key, "parameters": dict(parameters), "start_time": now_ms(),
                  "state": state, "state_message": message, **(extra or {})}
        if state == SKIPPED:
            record["end_time"] = record["start_time"]
        else:
            pid, output = start(run_id)
            record.update(pid=pid, pid_start=start_ticks(pid), output=output)
        _write_json(run_dir / RECORD, record)
        return record


def wait_for_turn(root: str | os.PathLike, job_key: str, run_id: int, job: dict, parameters: dict[str, str],
                  on_wait: Callable[[str], None] | None = None) -> None:
    """Block while run ``run_id`` is queued: until no run is ahead of it in its job's queue and
    fewer than the job's limit are running; then it is marked running. A run without a record
    (started by hand with a run id) is recorded as running now, by this process."""
    told = False
    while True:
        with _job_lock(root, job_key):
            runs = job_run_folders(root, job_key)
            me = next((r for r in runs if r.run_id == run_id), None)
            path = LocalLayout(Path(root)).job_runs(job_key) / str(run_id) / RECORD
            if me is None or me.record is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                _write_json(path, {"run_id": run_id, "job_key": job_key, "job_id": local_job_id(job_key),
                                   "run_name": job.get("name") or job_key, "parameters": dict(parameters),
                                   "start_time": now_ms(), "state": RUNNING, "state_message": "",
                                   "pid": os.getpid(), "pid_start": start_ticks(os.getpid())})
                return
            if me.admission != QUEUED:
                return
            running = [r.run_id for r in runs if r.running and r.run_id != run_id]
            ahead = [r.run_id for r in runs if r.queued and r.run_id < run_id]
            if len(running) < max_concurrent_runs(job) and not ahead:
                record = {**me.record, "state": RUNNING, "state_message": "",
                          "queue_duration": now_ms() - me.record["start_time"]}
                _write_json(path, record)
                return
        if on_wait is not None and not told:
            told = True
            on_wait(f"run {run_id} is queued: {len(running)} run(s) of {job_key} active "
                    f"({', '.join(map(str, running)) or 'none'}), {len(ahead)} queued ahead of it")
        time.sleep(QUEUE_POLL_S)


def end_without_result(root: str | os.PathLike, job_key: str, run_id: int, message: str) -> None:
    """Mark a run whose runner stopped before writing its result (an exception, a signal)."""
    with _job_lock(root, job_key):
        path = LocalLayout(Path(root)).job_runs(job_key) / str(run_id) / RECORD
        record = _read_json(path)
        if record is not None and not (path.parent / RESULT).exists():
            _write_json(path, {**record, "end_time": now_ms(), "state_message": message})
