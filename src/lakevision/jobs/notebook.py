"""A job step run as a Databricks notebook task: arguments from widgets, results as task values.

Databricks pushes the job's parameters and the task's ``base_parameters`` into a notebook as
widgets, and only a notebook can publish task values (``dbutils.jobs.taskValues.set``). So each
step has a three-line notebook in the bundle's ``jobs/`` folder that calls :func:`run_notebook_step`:
the step's command-line options are read from the widgets of the same name (``--data-version``
from ``data_version``), its task values are published, and a failed step raises, which fails the
task.
"""

from __future__ import annotations

import argparse
from typing import Any

from lakevision.bundle.task_context import set_task_values, widget
from lakevision.errors import LakevisionError
from lakevision.jobs import STEPS
from lakevision.jobs.base import StepResult, stop_on_sigterm

_TRUE = {"true", "1", "yes"}
_FALSE = {"false", "0", "no", ""}
# command-line only: a notebook prints its summary, and the cluster's environment picks the target
_NOT_WIDGETS = {"json", "help"}


class WidgetError(LakevisionError):
    """A widget value the step cannot take."""


class _WidgetParser(argparse.ArgumentParser):
    """A parser that raises instead of exiting: a notebook must fail with the step's message."""

    def error(self, message: str):
        raise WidgetError(f"{self.prog}: {message}")


def widget_name(action: argparse.Action) -> str:
    """``--data-version`` -> ``data_version``: a step option's widget."""
    long = max(action.option_strings, key=len)
    return long.lstrip("-").replace("-", "_")


def widget_arguments(parser: argparse.ArgumentParser, read=widget) -> list[str]:
    """The command line the widgets of ``parser``'s options spell. An empty widget means the
    option is not given; a flag is given by ``true``; a repeated option (``--set``) takes one
    value per line."""
    argv: list[str] = []
    for action in parser._actions:
        if not action.option_strings or widget_name(action) in _NOT_WIDGETS:
            continue
        name = widget_name(action)
        value = read(name, "").strip()
        option = max(action.option_strings, key=len)
        if isinstance(action, argparse._StoreTrueAction):
            if value.lower() not in _TRUE | _FALSE:
                raise WidgetError(f"widget {name!r}: {value!r} is not true or false")
            if value.lower() in _TRUE:
                argv.append(option)
        elif isinstance(action, argparse._AppendAction):
            for line in value.splitlines():
                if line.strip():
                    argv += [option, line.strip()]
        elif value:
            argv += [option, value]
    return argv


def run_notebook_step(name: str) -> StepResult:
    """Run step ``name`` with the notebook's widgets, publish its task values, print its summary,
    and raise when it failed. The values are published first: a run_if task after a failure can
    still read what the step found."""
    step = STEPS[name]
    parser = _WidgetParser(prog=f"jobs/{name}")
    step.add_arguments(parser)
    args = parser.parse_args(widget_arguments(parser))
    with stop_on_sigterm():
        result = step.run(args)
    values: dict[str, Any] = result.task_values()
    set_task_values(**values)
    print("\n".join(result.summary()), flush=True)
    result.raise_for_status()
    return result

