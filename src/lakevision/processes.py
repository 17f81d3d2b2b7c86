"""Processes as Linux's /proc shows them: parents, process groups, start times and environments.

Shared by the production code that must stop only what it started (the Ray-on-Spark cleanup) and
the local runner that stops a task with everything it started (:mod:`lakevision.local.process_tree`).
Off Linux every lookup finds nothing.
"""

from __future__ import annotations

from pathlib import Path


def _stat(pid: int | str) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, pgrp, ...)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _parents() -> dict[int, int]:
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat(stat.parent.name)
        if fields is not None:
            out[int(stat.parent.name)] = int(fields[1])
    return out


def descendants(*pids: int) -> set[int]:
    """Every process below any of ``pids`` now (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for child, parent in _parents().items():
        children.setdefault(parent, []).append(child)
    found, todo = set(), list(pids)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def ancestors(pid: int) -> set[int]:
    """The parent of ``pid``, its parent, and so on up to init."""
    found = set()
    while (fields := _stat(pid)) is not None and int(fields[1]) > 0 and int(fields[1]) not in found:
        pid = int(fields[1])
        found.add(pid)
    return found


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting for its parent."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot: with the pid, it names one process even after
    the pid is reused. None when there is no such process."""
    fields = _stat(pid)
    try:
        return int(fields[19]) if fields is not None else None
    except (IndexError, ValueError):
        return None


def process_group(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[2]) if fields is not None else None


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def with_environment(name: str, value: str = "1") -> set[int]:
    """Every process whose environment has ``name=value``: a variable a process passes on to what it
    starts, so it finds them even after they left its process tree (re-parented, new sessions)."""
    needle = f"{name}={value}".encode()
    found = set()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                found.add(int(entry.name))
        except OSError:
            continue
    return found
