"""The local workspace's state on disk: one JSON record per serving endpoint under
``<root>/workspace/endpoints/``, and the lock that lets one workspace process at a time own them.

* **One owner.** Two workspaces on one root would each keep their endpoints in memory and write
  over each other's records. :class:`RootLock` takes an exclusive ``flock`` on
  ``<root>/workspace/lock`` for the workspace's life (the kernel drops it when the process dies,
  however it dies) and writes the holder's pid into it, so a second one fails naming both.
* **Durable writes.** A record is written to a temp file, fsynced, renamed over the old one, and
  the folder is fsynced: after a crash or a power cut the record is the old one or the new one.
* **A bad record costs one endpoint, not the workspace.** A truncated or foreign file is moved
  aside (``<name>.json.corrupt-<UTC time>``) with a warning; the other endpoints load.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lakevision.local.workspace.api import IN_PROGRESS, NOT_UPDATING, UPDATE_FAILED, LocalWorkspaceError

log = logging.getLogger(__name__)

_CONFIG_UPDATES = (IN_PROGRESS, NOT_UPDATING, UPDATE_FAILED)


class RootLock:
    """An exclusive lock on workspace root ``root`` (the file ``path``), held until :meth:`release`
    or the process ends; LocalWorkspaceError naming the root and the holder's pid when another holds it."""

    def __init__(self, root: Path, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes (PEP 446)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown (it is starting)"
            os.close(fd)
            raise LocalWorkspaceError(
                f"the local workspace root {root} is in use by another workspace (process {holder}; lock "
                f"{path}): one workspace process owns a root's endpoints; stop it, or use --root for another "
                "root") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing the last descriptor releases the flock


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems cannot sync a directory; the rename is done either way
        log.debug("fsync of %s: %s", folder, exc)
    finally:
        os.close(fd)


def write_record(folder: Path, record: Mapping[str, Any]) -> None:
    """Write one endpoint's record durably: a crash leaves the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{record['name']}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / f"{record['name']}.json")
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(folder)


def _check_config(config: Any, key: str) -> None:
    if not isinstance(config, dict) or not isinstance(config.get("config_version"), int):
        raise ValueError(f"{key} is not a config with a config_version")
    entities = config.get("served_entities")
    if not isinstance(entities, list) or not all(
            isinstance(e, dict) and all(isinstance(e.get(k), str) for k in ("name", "entity_name", "entity_version"))
            for e in entities):
        raise ValueError(f"{key}.served_entities is not a list of served entities")
    routes = (config.get("traffic_config") or {}).get("routes")
    if not isinstance(routes, list):
        raise ValueError(f"{key}.traffic_config.routes is not a list")


def check_record(record: Any, name: str) -> dict:
    """``record`` if it is an endpoint record of endpoint ``name``, else ValueError saying what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"not a JSON object but {type(record).__name__}")
    if record.get("name") != name:
        raise ValueError(f"its name is {record.get('name')!r}, not {name!r}")
    if not isinstance(record.get("id"), str):
        raise ValueError("no endpoint id")
    state = record.get("state")
    if not isinstance(state, dict) or state.get("config_update") not in _CONFIG_UPDATES:
        raise ValueError("no state.config_update")
    for key in ("config", "pending_config"):
        if key in record:
            _check_config(record[key], key)
    return record


def _move_aside(path: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while target.exists():
        n += 1
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    os.replace(path, target)
    return target


def read_records(folder: Path) -> list[dict]:
    """Every endpoint record in ``folder``, by name. A file that does not parse as a record is moved
    aside with a warning, and temp files a crash left mid-write are removed (the caller holds the
    root's lock: nobody else is writing)."""
    for tmp in folder.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
    records = []
    for path in sorted(folder.glob("*.json")):
        try:
            records.append(check_record(json.loads(path.read_bytes()), path.stem))
        except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
            aside = _move_aside(path)
            log.warning("endpoint record %s cannot be read (%s): moved aside to %s; endpoint %r is gone until it "
                        "is created again", path, exc, aside.name, path.stem)
    return records
