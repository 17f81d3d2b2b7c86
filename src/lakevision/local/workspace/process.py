"""The local workspace as a process: ``lakevision workspace`` in the foreground, or a child process
a job starts for its length and stops at the end."""

from __future__ import annotations

import contextlib
import os
import queue
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

from lakevision.local.workspace.api import TOKEN_ENV, LocalWorkspaceError
from lakevision.local.workspace.endpoints import LocalWorkspace

__all__ = ["LISTENING", "TOKEN_ENV", "local_workspace_process", "serve_forever"]

LISTENING = "workspace listening on "


def serve_forever(root: str | os.PathLike, token: str, port: int = 0, bundle_dir: str | os.PathLike | None = None,
                  target: str = "local") -> None:
    """Serve in the foreground until SIGTERM or SIGINT; prints the listening line for whoever waits on it.
    The job runs it started go on after it stops, as Databricks runs do."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    workspace = LocalWorkspace(root, token, bundle_dir=bundle_dir, target=target)
    try:
        url = workspace.start(port)
        workspace.wait_restored()
        print(f"{LISTENING}{url}", flush=True)
        stop.wait()
    finally:
        workspace.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stderr_tail(stderr: Any, limit: int = 4000) -> str:
    stderr.seek(0)
    return stderr.read().decode(errors="replace")[-limit:]


@contextlib.contextmanager
def local_workspace_process(root: str | os.PathLike, token: str | None = None, port: int | None = None,
                            timeout_s: float = 120, bundle_dir: str | os.PathLike | None = None,
                            target: str = "local") -> Iterator[tuple[str, str]]:
    """Run ``lakevision workspace`` as a child process; yields ``(url, token)`` once it listens.
    With ``bundle_dir`` its Jobs API serves that bundle's jobs for ``target``.

    The token (a random one by default) goes through the environment, never the command line,
    so it does not show in ``ps``. At exit the process gets SIGTERM, and SIGKILL after 10 s; job
    runs it started go on.
    """
    token = token or secrets.token_urlsafe(32)
    cmd = [sys.executable, "-m", "lakevision.cli", "workspace", "--port", str(port or 0), "--root", str(root)]
    if bundle_dir is not None:
        cmd += ["--bundle", str(bundle_dir), "--target", target]
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                env={**os.environ, TOKEN_ENV: token})
        try:
            yield _wait_for_url(proc, stderr, timeout_s), token
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _wait_for_url(proc: subprocess.Popen, stderr: Any, timeout_s: float) -> str:
    lines: queue.Queue[str | None] = queue.Queue()

    def read_stdout() -> None:
        # drains stdout for the process' whole life, so it never blocks on a full pipe
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read_stdout, name="lakevision-workspace-stdout", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            line = lines.get(timeout=min(remaining, 1.0))
        except queue.Empty:
            continue
        if line is None:
            code = proc.wait()
            raise LocalWorkspaceError(f"the workspace process exited with code {code} before listening; "
                                      f"stderr ends with:\n{_stderr_tail(stderr)}")
        if line.startswith(LISTENING):
            return line[len(LISTENING):].strip()
    raise LocalWorkspaceError(f"the workspace process did not listen within {timeout_s:.0f} s; "
                              f"stderr ends with:\n{_stderr_tail(stderr)}")
