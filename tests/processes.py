"""Child processes a test owns: started in a session of their own, killed with everything they
started when the test ends, passed or not."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

from lakevision.local.process_tree import alive, descendants, kill_tree

__all__ = ["alive", "command_line", "descendants", "kill_group", "kill_proc", "notebook_step", "owned", "run"]

GRACE_S = 10  # SIGTERM first (MLflow runs end, staging is cleaned), SIGKILL after this


def command_line(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kill_proc(proc: subprocess.Popen, grace_s: float = GRACE_S) -> None:
    """``proc``, its process group and every descendant (Ray's daemons leave the group)."""
    if proc.poll() is not None and not descendants(proc.pid):
        return
    kill_tree(proc.pid, grace_s)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)


def kill_group(pid: int, grace_s: float = GRACE_S) -> None:
    """A process this test started elsewhere (in a session of its own), with its group and tree."""
    kill_tree(pid, grace_s)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)  # reaped, when it is this process's child


@contextlib.contextmanager
def owned(argv: list[str], **kwargs) -> Iterator[subprocess.Popen]:
    """``Popen(argv)`` in a new session; the whole tree is killed when the block ends."""
    proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
    try:
        yield proc
    finally:
        kill_proc(proc)


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
            kill_proc(proc)
            out, err = proc.communicate()
            raise AssertionError(f"{argv[:4]} ran past {timeout:.0f} s; stderr ends with:\n{(err or '')[-3000:]}") \
                from None
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)


def notebook_step(name: str, widgets: dict[str, str], values: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """The job notebook jobs/<name>.py as a notebook task runs it: widgets in, task values out."""
    import sys

    from lakevision.local.job_runner import _NOTEBOOK_LAUNCHER

    from .conftest import REPO

    env = dict(os.environ, LAKEVISION_CONFIG_DIR=str(REPO / "bundle" / "config"), LAKEVISION_TASK_TYPE="notebook_task",
               LAKEVISION_TASK_VALUES=str(values), **{f"LAKEVISION_WIDGET_{k.upper()}": v for k, v in widgets.items()})
    return run([sys.executable, "-c", _NOTEBOOK_LAUNCHER, str(REPO / "jobs" / f"{name}.py")], env=env, timeout=timeout)
