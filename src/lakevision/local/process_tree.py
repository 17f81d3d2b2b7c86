"""A process and everything it started: a task's Spark, Ray and workspace children start sessions
of their own, so killing the task's process group misses them. The tree is found through /proc
(:mod:`lakevision.processes`) and, for what left it, through a variable every task of a run
carries in its environment (:func:`run_mark`)."""

from __future__ import annotations

import contextlib
import os
import signal
import time

from lakevision.processes import alive, descendants, process_group, start_ticks, with_environment

__all__ = ["RUN_MARK_PREFIX", "alive", "descendants", "kill_tree", "run_mark", "start_ticks"]

# RUN_MARK_PREFIX + <run marker> = 1 in the environment of every task process of one local job run
# (and so of everything they start); a run started through the Jobs API starts without them
RUN_MARK_PREFIX = "LAKEVISION_RUN_MARK_"


def run_mark(marker: str) -> str:
    """The environment variable that marks the processes of the run with ``marker``."""
    return RUN_MARK_PREFIX + marker


def _kill(pids, sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _killpg(groups, sig: int) -> None:
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)


def kill_tree(pid: int | None, grace_s: float = 0.0, marker: str | None = None) -> None:
    """Stop ``pid`` with its process group and every descendant, and with ``marker`` every process
    carrying :func:`run_mark` (``pid`` None: those only).

    With ``grace_s``, SIGTERM goes to ``pid``'s process group (for a marker, to the groups its
    marked processes lead), and the groups get up to ``grace_s`` to exit: a task ends its MLflow
    run, stops the workspace, Sail and Ray it started and removes its staging. Then SIGKILL goes to
    whatever is left, until nothing is. The tree is read before anything dies, as orphans are
    re-parented and could no longer be found below ``pid``."""
    roots = [pid] if pid is not None else []

    def found() -> set[int]:
        now = descendants(*roots) | ({pid} if pid is not None else set())
        if marker is not None:
            now |= with_environment(run_mark(marker))
        return now

    # pid -> start time: a pid reused meanwhile by another process is not that process
    tree = {p: start_ticks(p) for p in found()}

    def left() -> set[int]:
        now = found() | {p for p, ticks in tree.items() if start_ticks(p) == ticks}
        return {p for p in now if p != os.getpid() and alive(p)}

    groups = {pid} if pid is not None else {p for p in tree if process_group(p) == p}
    if grace_s > 0 and groups:
        _killpg(groups, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(process_group(p) in groups for p in left()):
            time.sleep(0.1)
    for _ in range(100):  # a process forking while it is killed can add one more; give up after ~5 s
        victims = left()
        _killpg(groups, signal.SIGKILL)
        if not victims:
            return
        _kill(victims, signal.SIGKILL)
        time.sleep(0.05)
