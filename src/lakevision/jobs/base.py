"""What every job step shares: its arguments, its runtime, and the shape of its result.

A step is the unit a bundle task runs (``jobs/<name>.py`` notebooks on Databricks, ``lakevision
<name>`` on the command line). It parses arguments, calls one library function and returns a
:class:`StepResult`: the notebook publishes its task values, the CLI prints it, and both fail the
task through :meth:`StepResult.raise_for_status` when the step failed.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from lakevision.config import load_config
from lakevision.runtime import Runtime
from lakevision.tasks import TRAINING_TASKS

log = logging.getLogger(__name__)


class StepResult(Protocol):
    def to_json(self) -> dict[str, Any]:
        """Everything the step found, for ``--json``."""

    def task_values(self) -> dict[str, Any]:
        """What downstream tasks read as ``{{tasks.<step>.values.<key>}}``."""

    def summary(self) -> list[str]:
        """Lines for a person."""

    def raise_for_status(self) -> None:
        """Raise the step's own error when it failed, so the task fails."""


@dataclass
class WrappedResult:
    """A step result over the library's own result (anything with ``to_json()``); a subclass adds
    the task values and the summary."""

    result: Any

    def to_json(self) -> dict[str, Any]:
        return self.result.to_json()

    def raise_for_status(self) -> None:
        """A step whose library call returned finished: a failure raised on the way."""


@dataclass(frozen=True)
class Step:
    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], StepResult]


def optional_int(text: str) -> int | None:
    """An int, or None for an empty string: a job parameter left at its empty default."""
    return int(text) if text.strip() else None


def positive_int(text: str) -> int:
    value = int(text)  # argparse turns the ValueError into "invalid positive_int value: 'x'"
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def percentage(text: str) -> int | None:
    """1-100, or None for an empty job parameter."""
    value = optional_int(text)
    if value is not None and not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be a percentage from 1 to 100, got {value}")
    return value


def optional_str(text: str) -> str | None:
    return text or None


def common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None,
                   help="deployment target from bundle/config/targets.yaml (default: $LAKEVISION_TARGET or local)")
    p.add_argument("--root", default=None,
                   help="local data root (tables, MLflow, staging); default $LAKEVISION_ROOT or .lakevision")
    p.add_argument("--config", default=None, help="config directory (default: $LAKEVISION_CONFIG_DIR or ./bundle/config)")
    p.add_argument("--profile", default=None,
                   help="partial config laid over the files: a name in <config>/profiles or a YAML path "
                        "(default: $LAKEVISION_PROFILE)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. training.optimization.max_epochs=3")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")


def data_version_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-version", type=optional_int, default=None, help="samples table version (default: latest)")


def task_argument(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--task", choices=TRAINING_TASKS, default=None, help=help_text)


@contextlib.contextmanager
def job_runtime(args: argparse.Namespace) -> Iterator[Runtime]:
    """The runtime of a step's arguments, stopped when the step ends."""
    from lakevision.runtime import get_runtime

    cfg = load_config(args.config, args.target, args.overrides, args.profile)
    rt = get_runtime(cfg, args.root)
    try:
        yield rt
    finally:
        rt.stop()


def end_active_mlflow_runs(status: str = "KILLED") -> None:
    """End every MLflow run this process has active (MLflow is not imported for this)."""
    mlflow = sys.modules.get("mlflow")
    while mlflow is not None and mlflow.active_run() is not None:
        mlflow.end_run(status=status)


@contextlib.contextmanager
def stop_on_sigterm(end_mlflow_runs: bool = True) -> Iterator[None]:
    """SIGTERM (the run was cancelled, or the task ran past its timeout) stops the step: its
    active MLflow run ends KILLED (unless ``end_mlflow_runs`` is false), then ``SystemExit(143)``
    unwinds the step as an error would, so each ``finally`` stops what it started (Ray, the
    workspace process, Sail) and removes its staging while the runner waits out its grace period.
    A second SIGTERM does not interrupt that. Only in the main thread, where Python runs signal
    handlers; elsewhere it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    stopping = False

    def handler(signum, frame):
        nonlocal stopping
        if stopping:
            return
        stopping = True
        try:
            if end_mlflow_runs:
                end_active_mlflow_runs("KILLED")
        except Exception:  # the store may be what hangs; unwinding still ends the run (FAILED)
            log.exception("could not end the active MLflow run as KILLED")
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
