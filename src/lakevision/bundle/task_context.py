"""What a job task knows about its run: its widget parameters and the task values it passes on.

On Databricks these are ``dbutils.widgets`` and ``dbutils.jobs.taskValues``. Task values exist
only in notebook tasks: elsewhere ``dbutils.jobs.taskValues.set`` does nothing, and downstream
references to them never resolve. Under the local job runner (:mod:`lakevision.local.job_runner`) a
task is a child process: widgets arrive as ``LAKEVISION_WIDGET_<NAME>`` environment variables,
a notebook task's values go to the JSON file named by ``LAKEVISION_TASK_VALUES``, and any other
task type (``LAKEVISION_TASK_TYPE``) that sets a value fails, as a green run here must mean a
working run there. Outside any job both are no-ops, so a notebook runs the same way by hand.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from lakevision.errors import LakevisionError

log = logging.getLogger(__name__)

TASK_VALUES_ENV = "LAKEVISION_TASK_VALUES"
TASK_TYPE_ENV = "LAKEVISION_TASK_TYPE"
NOTEBOOK_TASK = "notebook_task"
WIDGET_ENV_PREFIX = "LAKEVISION_WIDGET_"
# Databricks refuses a task value whose JSON is larger than this.
MAX_TASK_VALUE_BYTES = 48 * 1024


class TaskValueError(LakevisionError, ValueError):
    """A task value that Databricks would refuse."""


def _dbutils():
    """The notebook's or job's ``dbutils``; None off Databricks."""
    if "DATABRICKS_RUNTIME_VERSION" not in os.environ:
        return None
    try:
        from databricks.sdk.runtime import dbutils
    except ImportError:
        return None
    return dbutils


def widget_env(name: str) -> str:
    return WIDGET_ENV_PREFIX + name.upper()


def widget(name: str, default: str = "") -> str:
    """A notebook parameter: the job's ``base_parameters`` (or the notebook's widget) by ``name``."""
    dbutils = _dbutils()
    if dbutils is not None:
        dbutils.widgets.text(name, default)
        return dbutils.widgets.get(name)
    return os.environ.get(widget_env(name), default)


def _encode(key: str, value: Any) -> str:
    try:
        text = json.dumps(value)
    except TypeError as exc:
        raise TaskValueError(f"task value {key!r}: not JSON-serializable: {exc}") from None
    if len(text.encode()) > MAX_TASK_VALUE_BYTES:
        raise TaskValueError(f"task value {key!r}: {len(text.encode())} bytes of JSON, over Databricks' "
                             f"limit of {MAX_TASK_VALUE_BYTES}")
    return text


def set_task_values(**values: Any) -> None:
    """Publish values for downstream tasks (``{{tasks.<this task>.values.<key>}}``)."""
    encoded = {k: _encode(k, v) for k, v in values.items()}
    task_type = os.environ.get(TASK_TYPE_ENV)
    if task_type and task_type != NOTEBOOK_TASK:
        raise TaskValueError(f"task values {sorted(values)}: this task is a {task_type}, and Databricks keeps task "
                             f"values only from a {NOTEBOOK_TASK} (dbutils.jobs.taskValues.set does nothing "
                             "elsewhere, so downstream references would never resolve)")
    dbutils = _dbutils()
    if dbutils is not None:
        for k, v in values.items():
            dbutils.jobs.taskValues.set(key=k, value=v)
        return
    path = os.environ.get(TASK_VALUES_ENV)
    if not path:
        log.debug("not in a job run; task values %s not published", sorted(values))
        return
    target = Path(path)
    current = json.loads(target.read_text()) if target.exists() else {}
    current.update({k: json.loads(v) for k, v in encoded.items()})
    # write-then-rename: the runner never reads a half-written file
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(current))
    os.replace(tmp, target)


BUNDLE_FILE = "databricks.yml"
# `databricks bundle deploy` syncs the bundle to <root_path>/files; every target of this bundle
# keeps the CLI's default layout .../.bundle/<bundle name>/<target>
_DEPLOYED_FOLDER = re.compile(r"/\.bundle/[^/]+/(?P<target>[^/]+)/files$")


def find_bundle_root(start: str | os.PathLike | None = None) -> Path | None:
    """The folder holding ``databricks.yml`` at or above ``start`` (default: the working directory,
    which for a workspace notebook is the notebook's own folder)."""
    here = Path(start or Path.cwd()).resolve()
    return next((d for d in (here, *here.parents) if (d / BUNDLE_FILE).is_file()), None)


def deployed_target(bundle_root: str | os.PathLike) -> str | None:
    """The target a deployed copy of the bundle belongs to, read from its workspace path."""
    m = _DEPLOYED_FOLDER.search(Path(bundle_root).as_posix())
    return m.group("target") if m else None
