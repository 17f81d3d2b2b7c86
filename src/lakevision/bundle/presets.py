"""What ``mode: development`` and ``presets`` do to a bundle's resources, as the Databricks CLI does it.

Mirrors databricks/cli ``bundle/config/mutator/resourcemutator/apply_target_mode.go`` and
``apply_presets.go``: in development mode the prefix is ``[dev <short name>] ``; jobs and
experiments take it as written, Unity Catalog schemas and registered models take its normalized
form ``dev_<short name>_`` (volumes are not renamed: their schema is). Schedules and triggers that
do not state a pause status are paused, jobs default to 4 concurrent runs and every job is tagged
``dev: <short name>``. Afterwards the CLI fills the defaults of the Jobs API: schedules without a
pause status are ``UNPAUSED`` and ``max_concurrent_runs`` is 1.

The short name follows ``libs/iamutil/user.go``: the part of the user name before ``@``, lower
case, every run of characters that are not letters or digits turned into one ``_``.
"""

from __future__ import annotations

import copy
import re
import unicodedata
from typing import Any

PAUSED, UNPAUSED = "PAUSED", "UNPAUSED"
_DEV_MAX_CONCURRENT_RUNS = 4
_TRIGGERS = ("schedule", "trigger", "continuous")


def _normalize(text: str) -> str:
    """``libs/textutil.NormalizeString``: keep letters and digits, everything else becomes ``_``."""
    out = "".join(c if c.isalnum() else "_" for c in text.lower())
    return re.sub(r"_+", "_", out).strip("_")


def short_name(user_name: str) -> str:
    return _normalize(user_name.split("@", 1)[0])


def domain_friendly_name(user_name: str) -> str:
    """``GetShortUserDomainFriendlyName``: the short name with marks removed and every other
    character that is not an ASCII letter or digit replaced by ``-`` (safe in endpoint and app names)."""
    plain = unicodedata.normalize("NFKD", short_name(user_name))
    plain = "".join(c for c in plain if not unicodedata.combining(c))
    return re.sub(r"[^a-z0-9]", "-", plain.lower())


def current_user(user_name: str) -> dict[str, str]:
    """``${workspace.current_user.*}`` for ``user_name``."""
    return {"userName": user_name, "short_name": short_name(user_name),
            "domain_friendly_name": domain_friendly_name(user_name)}


def normalize_prefix(prefix: str) -> str:
    """``[dev jane] `` -> ``dev_jane_`` (``normalizePrefix`` in apply_presets.go)."""
    prefix = prefix.replace("[", "").strip(" ")
    suffix = "_" if prefix.endswith("]") else ""
    return _normalize(prefix) + suffix


def target_presets(mode: str | None, declared: dict | None, user: dict[str, str]) -> dict[str, Any]:
    """The presets in force: the bundle's own, completed by development mode's defaults."""
    presets = dict(declared or {})
    if mode == "development":
        presets.setdefault("name_prefix", f"[dev {user['short_name']}] ")
        presets["tags"] = {"dev": user["short_name"], **(presets.get("tags") or {})}
        presets.setdefault("jobs_max_concurrent_runs", _DEV_MAX_CONCURRENT_RUNS)
        presets.setdefault("trigger_pause_status", PAUSED)
    return presets


def apply_presets(resources: dict[str, dict[str, dict]], presets: dict[str, Any]) -> dict[str, dict[str, dict]]:
    """A copy of ``resources`` (resolved but for ``${resources.*}``) with ``presets`` applied and
    the Jobs API defaults filled in."""
    out = copy.deepcopy(resources)
    prefix = presets.get("name_prefix") or ""
    uc_prefix = normalize_prefix(prefix) if prefix else ""
    tags = presets.get("tags") or {}
    pause = presets.get("trigger_pause_status")
    for job in (out.get("jobs") or {}).values():
        if not isinstance(job, dict):
            continue
        job["name"] = prefix + str(job.get("name") or "Untitled")
        if tags:
            job["tags"] = {**tags, **(job.get("tags") or {})}
        if not job.get("max_concurrent_runs"):
            job["max_concurrent_runs"] = presets.get("jobs_max_concurrent_runs") or 1
        for kind in _TRIGGERS:
            if isinstance(job.get(kind), dict) and not job[kind].get("pause_status"):
                job[kind]["pause_status"] = pause or UNPAUSED
    for experiment in (out.get("experiments") or {}).values():
        if isinstance(experiment, dict) and experiment.get("name"):
            head, sep, base = str(experiment["name"]).rpartition("/")
            experiment["name"] = f"{head}{sep}{prefix}{base}"
    for kind in ("schemas", "registered_models"):
        for resource in (out.get(kind) or {}).values():
            if isinstance(resource, dict) and "name" in resource:
                resource["name"] = uc_prefix + str(resource["name"])
    return out
