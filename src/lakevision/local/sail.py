"""Sail, the local stand-in for a cluster's Spark: a Spark Connect server on a free 127.0.0.1 port,
in this process or a child process (the benchmarks in benchmarks/ingest.py chose in-process)."""

from __future__ import annotations

import atexit
import ctypes
import signal
import socket
import subprocess
import sys
import time
from typing import Literal

SAIL_MODE_ENV = "LAKEVISION_SAIL_MODE"
SailMode = Literal["in_process", "subprocess"]
# Chosen by benchmarks/ingest.py (image checking); see benchmarks/RESULTS.md.
DEFAULT_SAIL_MODE: SailMode = "in_process"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, proc: subprocess.Popen | None, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"Sail server exited with code {proc.returncode} before opening port {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"Sail server did not open 127.0.0.1:{port} within {timeout:.0f} s")


def _die_with_parent() -> None:
    # A SIGKILLed job must not leave its Sail server behind (Linux only; elsewhere atexit covers it).
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class SailServer:
    """A Sail Spark Connect server on a free 127.0.0.1 port, in this process or a child process."""

    def __init__(self, mode: SailMode = DEFAULT_SAIL_MODE):
        if mode not in ("in_process", "subprocess"):
            raise ValueError(f"{SAIL_MODE_ENV}: unknown Sail mode {mode!r}; use in_process or subprocess")
        self.mode = mode
        self.port: int | None = None
        self._server = None
        self._proc: subprocess.Popen | None = None

    def start(self) -> SailServer:
        if self.mode == "in_process":
            from pysail.spark import SparkConnectServer

            self._server = SparkConnectServer(ip="127.0.0.1", port=0)
            self._server.start(background=True)
            self.port = self._server.listening_address[1]
        else:
            self.port = _free_port()
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "pysail", "spark", "server", "--ip", "127.0.0.1", "--port", str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
            _wait_for_port(self.port, self._proc)
        atexit.register(self.stop)
        return self

    @property
    def url(self) -> str:
        return f"sc://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None
