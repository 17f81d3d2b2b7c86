"""``lakevision bundle validate``: the checks of ``databricks bundle validate`` that need no workspace,
and the failures a workspace would only show at run time.

The resource schemas come from the ``databricks-bundles`` classes (unknown fields, bad enums,
bad types). On top of those, what they do not check: one task type per task, ``depends_on``
naming real tasks without a cycle, ``outcome`` only after a condition task, job clusters that
exist, files, notebooks and wheel entry points that exist, a notebook task on a notebook and a
Python file task on a plain file, ``{{tasks.X.values.Y}}`` only from notebook tasks upstream,
``{{job.parameters.Y}}`` references that can be satisfied, job clusters on a supported ML runtime
with matching CPU/GPU node types, failure emails that reach a person, and a production
``run_as`` service principal with the grants its jobs need.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from lakevision.bundle.loader import Bundle, Problem
from lakevision.local.ml_runtimes import check_cluster
from lakevision.bundle.task_context import NOTEBOOK_TASK

DYNAMIC_REF = re.compile(r"\{\{\s*([\w.-]+)\s*\}\}")
NOTEBOOK_HEADER = "# Databricks notebook source"
_PARAM_NAME = re.compile(r"^[\w.-]+$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
_APP_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$", re.IGNORECASE)
# What a run_as service principal needs on each Unity Catalog resource its jobs write (Databricks
# docs, "Manage model lifecycle in Unity Catalog"; USE CATALOG is granted on the catalog, outside
# the bundle). Setting aliases needs ownership of the registered model: see README, On Databricks.
RUN_AS_GRANTS = {"schemas": {"USE_SCHEMA", "CREATE_TABLE", "MODIFY", "SELECT", "CREATE_MODEL"},
                 "volumes": {"READ_VOLUME", "WRITE_VOLUME"}}
_RUN_REFS = {"job.id", "job.name", "job.run_id", "job.repair_count", "job.start_time.iso_date",
             "job.start_time.iso_datetime", "job.start_time.timestamp_ms", "job.trigger.type",
             "job.trigger.time.iso_datetime", "task.name", "task.run_id", "task.execution_count",
             "task.notebook_path"}


def _resource_classes() -> dict[str, type]:
    from databricks.bundles.experiments import MlflowExperiment
    from databricks.bundles.jobs import Job
    from databricks.bundles.registered_models import RegisteredModel
    from databricks.bundles.schemas import Schema
    from databricks.bundles.volumes import Volume

    return {"jobs": Job, "experiments": MlflowExperiment, "registered_models": RegisteredModel,
            "schemas": Schema, "volumes": Volume}


def task_types() -> list[str]:
    """The task type fields of a job task (``notebook_task``, ``python_wheel_task``, ...)."""
    from databricks.bundles.jobs import Task

    return sorted(f.name for f in fields(Task) if f.name.endswith("_task"))


def _find(tree: Any, token: str, path: str) -> str | None:
    """The YAML path of the first key or scalar equal to ``token`` (to place a schema error)."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            sub = f"{path}.{k}"
            if k == token:
                return sub
            hit = _find(v, token, sub)
            if hit:
                return hit
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            hit = _find(v, token, f"{path}[{i}]")
            if hit:
                return hit
    elif str(tree) == token:
        return path
    return None


def _schema_problem(exc: Exception, definition: dict, path: str) -> tuple[str, str]:
    message = str(exc)
    quoted = re.findall(r"'([^']*)'", message) or re.findall(r": (\S+)$", message)
    for token in quoted:
        hit = _find(definition, token, path)
        if hit:
            return hit, message
    return path, message


def _upstream(tasks: dict[str, dict]) -> dict[str, set[str]]:
    """Every task's transitive dependencies (cycles are reported separately)."""
    memo: dict[str, set[str]] = {}

    def walk(key: str, stack: tuple[str, ...]) -> set[str]:
        if key in memo:
            return memo[key]
        out: set[str] = set()
        for dep in tasks.get(key, {}).get("depends_on") or []:
            k = dep.get("task_key")
            if k in tasks and k not in stack:
                out |= {k} | walk(k, (*stack, k))
        memo[key] = out
        return out

    return {k: walk(k, (k,)) for k in tasks}


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """One dependency cycle as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in graph.get(node, []):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt in graph and state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in graph:
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def _project_scripts(bundle: Bundle) -> dict[str, dict[str, str]]:
    """package name -> console scripts, from the pyproject.toml of each wheel artifact."""
    out: dict[str, dict[str, str]] = {}
    for spec in bundle.artifacts.values():
        if (spec or {}).get("type", "whl") != "whl":
            continue
        pyproject = bundle.root / (spec.get("path") or ".") / "pyproject.toml"
        if pyproject.is_file():
            project = tomllib.loads(pyproject.read_text()).get("project", {})
            out[project.get("name", "").replace("-", "_")] = project.get("scripts", {})
    return out


def _artifact_dirs(bundle: Bundle) -> list[Path]:
    return [(bundle.root / (spec.get("path") or ".") / "dist").resolve() for spec in bundle.artifacts.values()]


def notebook_file(base: Path, notebook_path: str) -> Path | None:
    """The file of a notebook path, which a bundle may give without its extension."""
    p = (base / notebook_path).resolve()
    for candidate in (p, *(p.with_name(p.name + ext) for ext in (".py", ".ipynb", ".sql", ".scala", ".r"))):
        if candidate.is_file():
            return candidate
    return None


def is_notebook(path: Path) -> bool:
    """A file the workspace imports as a notebook: an .ipynb, or source with the notebook header."""
    if not path.is_file():
        return False
    if path.suffix == ".ipynb":
        return True
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline().strip()
    return first in (NOTEBOOK_HEADER, "-- Databricks notebook source", "// Databricks notebook source")


def _check_files(bundle: Bundle, rel: str, path: str, task: dict, base: Path) -> list[Problem]:
    problems = []
    script = task.get("spark_python_task") or {}
    file = script.get("python_file")
    if file and script.get("source") != "GIT" and not (base / file).resolve().is_file():
        problems.append(Problem(rel, f"{path}.spark_python_task.python_file", f"file not found: {file} (relative to {rel})"))
    if file and script.get("source") != "GIT" and is_notebook((base / file).resolve()):
        # databricks/cli translate_paths.go: ErrIsNotebook
        problems.append(Problem(rel, f"{path}.spark_python_task.python_file",
                                f"file at {file} is a notebook; use a notebook_task for it"))
    nb = (task.get("notebook_task") or {}).get("notebook_path")
    if nb and (task.get("notebook_task") or {}).get("source") != "GIT":
        found = notebook_file(base, nb)
        if found is None:
            problems.append(Problem(rel, f"{path}.notebook_task.notebook_path", f"notebook not found: {nb} (relative to {rel})"))
        elif not is_notebook(found):  # ErrIsNotNotebook: a .py file deploys as a notebook only with the header
            problems.append(Problem(rel, f"{path}.notebook_task.notebook_path",
                                    f"file at {nb} is not a notebook: a Python notebook starts with "
                                    f"{NOTEBOOK_HEADER!r}"))
    for i, lib in enumerate(task.get("libraries") or []):
        for kind in ("whl", "jar", "requirements"):
            ref = lib.get(kind)
            if not ref or "://" in ref or ref.startswith(("/Workspace", "/Volumes", "dbfs:")):
                continue
            target = (base / ref).resolve()
            built = any(target.parent == d for d in _artifact_dirs(bundle)) and kind == "whl"
            if not built and not list(target.parent.glob(target.name)):
                problems.append(Problem(rel, f"{path}.libraries[{i}].{kind}",
                                        f"{ref} does not exist and no artifact of the bundle builds it"))
    return problems


def _check_job(bundle: Bundle, key: str, job: dict) -> list[Problem]:
    src = bundle.sources.get(("jobs", key), bundle.root / "databricks.yml")
    rel, base, jpath = bundle.rel(src), src.parent, f"resources.jobs.{key}"
    problems: list[Problem] = []
    tasks_list = job.get("tasks") or []
    types = task_types()
    tasks: dict[str, dict] = {}
    task_paths: dict[str, str] = {}
    for i, task in enumerate(tasks_list):
        tpath = f"{jpath}.tasks[{i}]"
        if not isinstance(task, dict):
            problems.append(Problem(rel, tpath, "a task must be a mapping"))
            continue
        tkey = task.get("task_key")
        if not tkey:
            problems.append(Problem(rel, tpath, "task_key is required"))
            continue
        if tkey in tasks:
            problems.append(Problem(rel, f"{tpath}.task_key", f"duplicate task_key {tkey!r}"))
        tasks[tkey], task_paths[tkey] = task, tpath
        present = [t for t in types if t in task]
        if len(present) != 1:
            what = "has no task type" if not present else f"has {len(present)} task types ({', '.join(present)})"
            problems.append(Problem(rel, tpath, f"task {tkey!r} {what}; exactly one of {', '.join(types)} is required"))
        problems += _check_files(bundle, rel, tpath, task, base)
    cluster_keys = {c.get("job_cluster_key") for c in job.get("job_clusters") or []}
    param_names = {p.get("name") for p in job.get("parameters") or []}
    for i, param in enumerate(job.get("parameters") or []):
        if not _PARAM_NAME.match(str(param.get("name", ""))):
            problems.append(Problem(rel, f"{jpath}.parameters[{i}].name",
                                    f"{param.get('name')!r}: job parameter names hold only letters, digits, _ - ."))
    clusters = [(f"{jpath}.job_clusters[{i}].new_cluster", c.get("new_cluster") or {})
                for i, c in enumerate(job.get("job_clusters") or [])]
    clusters += [(f"{task_paths[k]}.new_cluster", t["new_cluster"]) for k, t in tasks.items() if t.get("new_cluster")]
    for cpath, cluster in clusters:
        problems += [Problem(rel, f"{cpath}.{field}", message) for field, message in check_cluster(cluster)]
    graph: dict[str, list[str]] = {}
    for tkey, task in tasks.items():
        tpath = task_paths[tkey]
        graph[tkey] = []
        for j, dep in enumerate(task.get("depends_on") or []):
            dkey = dep.get("task_key")
            if dkey not in tasks:
                problems.append(Problem(rel, f"{tpath}.depends_on[{j}].task_key",
                                        f"task {tkey!r} depends on {dkey!r}, which is not a task of job {key!r}"))
                continue
            graph[tkey].append(dkey)
            if "outcome" in dep and "condition_task" not in tasks[dkey]:
                problems.append(Problem(rel, f"{tpath}.depends_on[{j}].outcome",
                                        f"outcome is only allowed on a condition_task dependency; {dkey!r} is not one"))
        ck = task.get("job_cluster_key")
        if ck and ck not in cluster_keys:
            problems.append(Problem(rel, f"{tpath}.job_cluster_key",
                                    f"job cluster {ck!r} is not defined in {jpath}.job_clusters"))
    cycle = find_cycle(graph)
    if cycle:
        problems.append(Problem(rel, f"{jpath}.tasks", "depends_on has a cycle: " + " -> ".join(cycle)))
    upstream = _upstream(tasks) if cycle is None else None  # with a cycle "upstream" means nothing
    scripts = _project_scripts(bundle)
    for tkey, task in tasks.items():
        tpath = task_paths[tkey]
        for ref in sorted(set(DYNAMIC_REF.findall(str(task)))):
            parts = ref.split(".")
            if parts[:2] == ["job", "parameters"] and len(parts) == 3:
                if parts[2] not in param_names:
                    problems.append(Problem(rel, tpath, f"{{{{{ref}}}}}: job {key!r} has no parameter {parts[2]!r}"))
            elif parts[0] == "tasks" and len(parts) >= 4 and parts[2] == "values":
                if upstream is None:
                    continue
                if parts[1] not in upstream.get(tkey, set()):
                    problems.append(Problem(rel, tpath, f"{{{{{ref}}}}}: task {parts[1]!r} is not upstream of "
                                                        f"{tkey!r}, so its values are not there yet"))
                elif NOTEBOOK_TASK not in tasks[parts[1]]:
                    kind = next((k for k in tasks[parts[1]] if k.endswith("_task")), "task without a type")
                    problems.append(Problem(rel, tpath, f"{{{{{ref}}}}}: task {parts[1]!r} is a {kind}, which cannot "
                                                        "set task values (dbutils.jobs.taskValues.set works only in "
                                                        "notebooks); make it a notebook_task"))
            elif ref not in _RUN_REFS:
                problems.append(Problem(rel, tpath, f"{{{{{ref}}}}}: unknown dynamic value reference"))
        wheel = task.get("python_wheel_task")
        if wheel:
            pkg = str(wheel.get("package_name", "")).replace("-", "_")
            if pkg not in scripts:
                problems.append(Problem(rel, f"{tpath}.python_wheel_task.package_name",
                                        f"no wheel artifact of the bundle is package {pkg!r}; artifacts build {sorted(scripts)}"))
            elif wheel.get("entry_point") not in scripts[pkg]:
                problems.append(Problem(rel, f"{tpath}.python_wheel_task.entry_point",
                                        f"{wheel.get('entry_point')!r} is not an entry point of {pkg} "
                                        f"(pyproject.toml [project.scripts]: {sorted(scripts[pkg])})"))
    return problems


def _check_notifications(bundle: Bundle) -> list[Problem]:
    """Failure emails go to an address. In production the deploying identity is often the
    service principal, whose user name is an application id that no mail reaches."""
    problems = []
    principal = (bundle.run_as or {}).get("service_principal_name")
    me = bundle.workspace["current_user"]["userName"]
    for key, job in (bundle.resources.get("jobs") or {}).items():
        rel = bundle.rel(bundle.sources.get(("jobs", key), bundle.root / "databricks.yml"))
        for rule, recipients in ((job.get("email_notifications") or {})).items():
            for i, to in enumerate(recipients or []):
                to = str(to)
                if "${" in to:
                    continue
                if to == principal or not _EMAIL.match(to) or _APP_ID.match(to):
                    if to == me and not _APP_ID.match(me):
                        continue  # the deploying person: the workspace knows their address, this machine does not
                    why = ("is the run_as service principal" if to == principal else
                           "is an application id (a service principal deploying?)" if _APP_ID.match(to) else
                           "is not an email address")
                    problems.append(Problem(rel, f"resources.jobs.{key}.email_notifications.{rule}[{i}]",
                                            f"{to!r} {why}: failure emails would reach nobody; set "
                                            "the notification_email variable to a person or a team list"))
    return problems


def _check_run_as_grants(bundle: Bundle) -> list[Problem]:
    """A production target that runs as a service principal grants it what its jobs do."""
    principal = (bundle.run_as or {}).get("service_principal_name")
    if bundle.mode != "production" or not principal or "${" in str(principal):
        return []
    problems = []
    for kind, needed in RUN_AS_GRANTS.items():
        for key, resource in (bundle.resources.get(kind) or {}).items():
            granted: set[str] = set()
            for grant in resource.get("grants") or []:
                if grant.get("principal") == principal:
                    granted |= set(grant.get("privileges") or [])
            missing = sorted(needed - granted)
            if missing and "ALL_PRIVILEGES" not in granted:
                rel = bundle.rel(bundle.sources.get((kind, key), bundle.root / "databricks.yml"))
                problems.append(Problem(rel, f"resources.{kind}.{key}.grants",
                                        f"the run_as service principal {principal} lacks {', '.join(missing)} on "
                                        f"{kind[:-1]} {resource.get('name')!r}; its jobs write there"))
    return problems


def validate_bundle(bundle: Bundle) -> list[Problem]:
    """Every problem of ``bundle`` (an empty list when it is valid)."""
    problems = list(bundle.problems) + _check_notifications(bundle) + _check_run_as_grants(bundle)
    classes = _resource_classes()
    for rtype, items in bundle.resources.items():
        for key, definition in items.items():
            src = bundle.rel(bundle.sources.get((rtype, key), bundle.root / "databricks.yml"))
            path = f"resources.{rtype}.{key}"
            cls = classes.get(rtype)
            if cls is None:
                problems.append(Problem(src, path, f"resource type {rtype!r} is not checked here; "
                                                   f"known: {sorted(classes)}"))
                continue
            if not isinstance(definition, dict):
                problems.append(Problem(src, path, "a resource must be a mapping"))
                continue
            try:
                cls.from_dict(definition)
            except (ValueError, TypeError, KeyError) as exc:
                where, message = _schema_problem(exc, definition, path)
                problems.append(Problem(src, where, message))
            if rtype == "jobs":
                problems += _check_job(bundle, key, definition)
    return sorted(set(problems), key=lambda p: (p.file, p.path, p.message))
