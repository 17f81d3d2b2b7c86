"""A process and everything it started, found through /proc: a task's Spark, Ray and workspace
children start sessions of their own, so killing the task's process group misses them."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def _parents() -> dict[int, int]:
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        out[int(stat.parent.name)] = int(fields[1])
    return out


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` now (children, grandchildren, ...); empty off Linux."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for its parent."""
    try:
        os.kill(pid, 0)
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (ProcessLookupError, PermissionError, OSError, IndexError):
        return False


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot: with the pid, it names one process even after
    the pid is reused. None when there is no such process."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _signal(pids: set[int], group: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(group, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_tree(pid: int, grace_s: float = 0.0) -> None:
    """``pid``'s process group and every descendant: SIGTERM and up to ``grace_s`` to exit
    (MLflow runs end, staging is cleaned), then SIGKILL. The tree is read before anything dies,
    as orphans are re-parented and could no longer be found."""
    tree = {pid} | descendants(pid)
    if grace_s > 0:
        _signal(tree, pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(alive(p) for p in tree):
            time.sleep(0.1)
    _signal(tree | descendants(pid), pid, signal.SIGKILL)
