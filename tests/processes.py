"""Child processes a test owns: started in a session of their own, killed with everything they
started when the test ends, passed or not."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

GRACE_S = 10  # SIGTERM first (MLflow runs end, staging is cleaned), SIGKILL after this


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
    """Every process below ``pid`` now (children, grandchildren, ...)."""
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


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_tree(proc: subprocess.Popen, grace_s: float = GRACE_S) -> None:
    """SIGTERM to ``proc``, its process group and every descendant (Ray's daemons leave the group,
    so they are found by ancestry before anything dies), then SIGKILL to whatever is left."""
    if proc.poll() is not None and not descendants(proc.pid):
        return
    tree = {proc.pid} | descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGTERM)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and (proc.poll() is None or any(_alive(p) for p in tree - {proc.pid})):
        time.sleep(0.1)
    for pid in tree | descendants(proc.pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)


def kill_group(pid: int, grace_s: float = GRACE_S) -> None:
    """A process this test started elsewhere (in a session of its own), with its group and tree."""
    tree = {pid} | descendants(pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, sig)
        for p in tree:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(p, sig)
        deadline = time.monotonic() + grace_s
        while sig == signal.SIGTERM and time.monotonic() < deadline and any(_alive(p) for p in tree):
            time.sleep(0.1)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)  # reaped, when it is this process's child


@contextlib.contextmanager
def owned(argv: list[str], **kwargs) -> Iterator[subprocess.Popen]:
    """``Popen(argv)`` in a new session; the whole tree is killed when the block ends."""
    proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        kill_tree(proc)


def run(argv: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``subprocess.run`` whose tree is killed on timeout or failure of the test; ``timeout`` stays
    below pytest's own, so a hang fails with the process' output instead of pytest killing us."""
    kwargs.setdefault("capture_output", True)
    kwargs.setdefault("text", True)
    capture = kwargs.pop("capture_output")
    if capture:
        kwargs["stdout"] = subprocess.PIPE
        kwargs["stderr"] = subprocess.PIPE
    with owned(argv, **kwargs) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(proc)
            out, err = proc.communicate()
            raise AssertionError(f"{argv[:4]} ran past {timeout:.0f} s; stderr ends with:\n{(err or '')[-3000:]}") \
                from None
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)
