"""Load a Databricks Asset Bundle the way ``databricks bundle`` does: ``databricks.yml`` and its
``include`` files, one target's overrides, and every ``${...}`` substitution resolved.

What comes out is plain dicts (the resolved resources), each with the file it came from, so the
validator and the local job runner can name the file and YAML path of anything wrong.
"""

from __future__ import annotations

import copy
import getpass
import glob
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lakevision.bundle.presets import apply_presets, current_user, target_presets
from lakevision.errors import LakevisionError

BUNDLE_FILE = "databricks.yml"
TOP_LEVEL_KEYS = {"bundle", "include", "variables", "targets", "resources", "artifacts", "workspace", "sync",
                  "permissions", "run_as", "presets", "experimental", "git", "scripts"}
TARGET_KEYS = {"default", "mode", "variables", "resources", "workspace", "artifacts", "run_as", "permissions",
               "presets", "sync", "git", "bundle", "cluster_id", "compute_id"}
VARIABLE_KEYS = {"description", "default", "type", "lookup"}
# ${a.b.c}: a reference the CLI resolves at deploy time (not the {{job.*}} references a run resolves)
_REF = re.compile(r"\$\{([A-Za-z_][\w-]*(?:\.[\w-]+|\[\d+\])*)\}")
_MAX_PASSES = 10


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a bundle, located by file and YAML path."""

    file: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}: {self.path}" if self.path else self.file
        return f"{where}: {self.message}"


class BundleError(LakevisionError):
    """A bundle that cannot be loaded or does not validate; ``problems`` lists every finding."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass
class Bundle:
    """One target of a bundle, fully resolved."""

    root: Path
    name: str
    target: str
    mode: str | None
    variables: dict[str, Any]
    resources: dict[str, dict[str, dict]]  # type -> key -> resolved definition
    sources: dict[tuple[str, str], Path]  # (type, key) -> file that defined it
    artifacts: dict[str, dict]
    workspace: dict[str, str]
    targets: list[str]
    run_as: dict = field(default_factory=dict)
    presets: dict = field(default_factory=dict)  # the presets in force (development mode's included)
    problems: list[Problem] = field(default_factory=list)  # found while loading, reported by validate

    def rel(self, path: Path) -> str:
        try:
            return str(path.relative_to(self.root))
        except ValueError:
            return str(path)

    def job(self, key: str) -> dict:
        jobs = self.resources.get("jobs", {})
        if key not in jobs:
            raise BundleError([Problem(BUNDLE_FILE, f"resources.jobs.{key}",
                                       f"no such job in target {self.target!r}; jobs: {sorted(jobs)}")])
        return jobs[key]


def local_job_id(key: str) -> int:
    """The id bundle job ``key`` has on this machine. A Databricks job id is a positive integer the
    workspace assigns at deploy; here it is derived from the key, so it is the same in every process:
    ``${resources.jobs.<key>.id}``, the runner's ``{{job.id}}`` and the local workspace's Jobs API agree."""
    return zlib.crc32(key.encode("utf-8")) + 1


def _read_yaml(path: Path, root: Path) -> dict:
    rel = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise BundleError([Problem(rel, "", f"cannot read: {exc}")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f"line {mark.line + 1}: " if mark is not None else ""
        raise BundleError([Problem(rel, "", f"{line}not valid YAML: {getattr(exc, 'problem', exc)}")]) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise BundleError([Problem(rel, "", f"expected a mapping at the top level, got {type(data).__name__}")])
    return data


def _merge_keyed(base: list, over: list, key: str) -> list:
    """Lists of tasks or job clusters merge by their key, as the CLI merges target overrides."""
    out = [copy.deepcopy(x) for x in base]
    index = {x.get(key): i for i, x in enumerate(out) if isinstance(x, dict)}
    for item in over:
        k = item.get(key) if isinstance(item, dict) else None
        if k in index:
            out[index[k]] = _merge(out[index[k]], item)
        else:
            out.append(copy.deepcopy(item))
    return out


_KEYED_LISTS = {"tasks": "task_key", "job_clusters": "job_cluster_key", "parameters": "name"}


def _merge(base: Any, over: Any, parent: str | None = None) -> Any:
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for k, v in over.items():
            out[k] = _merge(out[k], v, k) if k in out else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(over, list) and parent in _KEYED_LISTS:
        return _merge_keyed(base, over, _KEYED_LISTS[parent])
    return copy.deepcopy(over)


def _lookup(tree: Any, dotted: str) -> tuple[bool, Any]:
    node = tree
    for part in re.findall(r"[\w-]+|\[\d+\]", dotted):
        if part.startswith("["):
            i = int(part[1:-1])
            if not isinstance(node, list) or i >= len(node):
                return False, None
            node = node[i]
        elif isinstance(node, dict) and part in node:
            node = node[part]
        else:
            return False, None
    return True, node


class _Resolver:
    """Substitutes ``${...}`` references; what cannot be resolved becomes a :class:`Problem`."""

    def __init__(self, context: dict, resources: dict | None, deploy_time: set[str] = frozenset(),
                 local_ids: bool = False):
        self.context = context
        self.resources = resources  # None: ${resources.*} stays as written (resolved after the presets)
        self.deploy_time = deploy_time  # resource fields known only after deploy (ids, urls)
        self.local_ids = local_ids  # on this machine a job's id is local_job_id(key), any other resource's its key
        self.problems: list[tuple[str, str]] = []  # (yaml path, message)

    def value(self, ref: str) -> tuple[bool, Any]:
        head = ref.split(".", 1)[0]
        if head == "resources" and self.resources is None:
            return True, "${" + ref + "}"
        if head == "resources":
            found, v = _lookup(self.resources, ref[len("resources."):])
            if found:
                return True, v
            parts = ref.split(".")
            if len(parts) >= 4 and parts[3] in self.deploy_time and parts[2] in self.resources.get(parts[1], {}):
                if self.local_ids and parts[3] == "id":
                    return True, str(local_job_id(parts[2])) if parts[1] == "jobs" else parts[2]
                return True, "${" + ref + "}"  # left for deploy time, like the CLI does
            return False, None
        return _lookup(self.context, ref)

    def resolve(self, node: Any, path: str) -> Any:
        if isinstance(node, dict):
            return {k: self.resolve(v, f"{path}.{k}" if path else k) for k, v in node.items()}
        if isinstance(node, list):
            return [self.resolve(v, f"{path}[{i}]") for i, v in enumerate(node)]
        if not isinstance(node, str) or "${" not in node:
            return node
        whole = _REF.fullmatch(node)
        if whole:  # a whole-string reference keeps the referenced value's type (complex variables)
            found, v = self.value(whole.group(1))
            if not found:
                self.problems.append((path, f"undefined reference ${{{whole.group(1)}}}"))
                return node
            return copy.deepcopy(v)

        def sub(m: re.Match) -> str:
            found, v = self.value(m.group(1))
            if not found:
                self.problems.append((path, f"undefined reference ${{{m.group(1)}}}"))
                return m.group(0)
            if isinstance(v, (dict, list)):
                self.problems.append((path, f"${{{m.group(1)}}} is a complex value and cannot be part of a string"))
                return m.group(0)
            return str(v).lower() if isinstance(v, bool) else str(v)

        return _REF.sub(sub, node)


VARIABLE_OVERRIDES = ".databricks/bundle/{target}/variable-overrides.json"


def _variables(root: Path, target: str, declared: dict, target_values: dict, cli_values: dict,
               problems: list[Problem]) -> dict:
    """Every variable's value, in the CLI's order (``set_variables.go``): --var, then
    ``BUNDLE_VAR_<name>``, the target's value, a lookup (resolved by the workspace at deploy time),
    the variable-overrides file, the default. The CLI refuses a variable that gets no value from
    any of these in every target, whether the target uses it or not."""
    overrides_file = root / VARIABLE_OVERRIDES.format(target=target)
    file_values: dict = {}
    if overrides_file.is_file():
        try:
            file_values = json.loads(overrides_file.read_text())
        except (OSError, ValueError) as exc:
            problems.append(Problem(str(overrides_file.relative_to(root)), "", f"failed to parse variables file: {exc}"))
        if not isinstance(file_values, dict):
            problems.append(Problem(str(overrides_file.relative_to(root)), "",
                                    'variables file must be a JSON object: {"var1": "value1"}'))
            file_values = {}
    values: dict[str, Any] = {}
    for name, spec in declared.items():
        spec = spec if isinstance(spec, dict) else {"default": spec}
        unknown = set(spec) - VARIABLE_KEYS
        if unknown:
            problems.append(Problem(BUNDLE_FILE, f"variables.{name}.{sorted(unknown)[0]}",
                                    f"unknown variable field; allowed: {sorted(VARIABLE_KEYS)}"))
        env = os.environ.get(f"BUNDLE_VAR_{name}")
        if name in cli_values:
            values[name] = cli_values[name]
        elif env is not None:
            values[name] = env
        elif target_values.get(name) is not None:
            values[name] = target_values[name]
        elif "lookup" in spec:
            values[name] = "${lookup:" + name + "}"  # resolved by the workspace at deploy time
        elif file_values.get(name) is not None:
            values[name] = file_values[name]
        elif spec.get("default") is not None:
            values[name] = spec["default"]
        else:
            problems.append(Problem(BUNDLE_FILE, f"variables.{name}", _no_value(name, target)))
    for name in list(target_values) + list(cli_values):
        if name not in declared:
            problems.append(Problem(BUNDLE_FILE, f"variables.{name}", "is set but never declared under `variables`"))
    return values


def _no_value(name: str, target: str) -> str:
    return (f"no value assigned to required variable {name} for target {target!r}: give it a default, set "
            f"targets.{target}.variables.{name}, or pass --var {name}=... (or BUNDLE_VAR_{name})")


def _explain(message: str, declared: dict, target: str) -> str:
    m = re.fullmatch(r"undefined reference \$\{var\.([\w-]+)[^}]*\}", message)
    if m and m.group(1) in declared:
        return _no_value(m.group(1), target)
    return message


def _mode_problems(mode: str | None, tspec: dict, target: str, workspace: dict, presets: dict) -> list[Problem]:
    """``validate_target_mode.go``: a production target names its root path, so only one copy is
    deployed; a development copy's paths and name prefix carry the user's name."""
    where = f"targets.{target}"
    if mode not in (None, "development", "production"):
        return [Problem(BUNDLE_FILE, f"{where}.mode",
                        f"unsupported value '{mode}' specified for 'mode': must be either 'development' or 'production'")]
    user = workspace["current_user"]
    problems = []
    if mode == "production" and not (tspec.get("workspace") or {}).get("root_path") and not tspec.get("run_as"):
        problems.append(Problem(BUNDLE_FILE, f"{where}.workspace.root_path",
                                "target with 'mode: production' must set 'workspace.root_path' to make sure only "
                                "one copy is deployed"))
    if mode == "development":
        declared = {"root_path"} | set(tspec.get("workspace") or {})  # the rest derive from root_path
        for key in ("root_path", "file_path", "artifact_path", "state_path"):
            path = str(workspace.get(key) or "") if key in declared else ""
            if path and user["userName"] not in path and user["short_name"] not in path:
                problems.append(Problem(BUNDLE_FILE, f"{where}.workspace.{key}",
                                        f"{key} must start with '~/' or contain the current username to ensure "
                                        "uniqueness when using 'mode: development'"))
        prefix = str(presets.get("name_prefix") or "")
        if prefix and not any(u and u in prefix for u in (user["userName"], user["short_name"],
                                                           user["domain_friendly_name"])):
            problems.append(Problem(BUNDLE_FILE, f"{where}.presets.name_prefix",
                                    "prefix should contain the current username or ${workspace.current_user.short_name} "
                                    "to ensure uniqueness when using 'mode: development'"))
        if presets.get("trigger_pause_status") == "UNPAUSED":
            problems.append(Problem(BUNDLE_FILE, f"{where}.presets.trigger_pause_status",
                                    "target with 'mode: development' cannot set trigger pause status to UNPAUSED "
                                    "by default"))
    return problems


def _with_volume_paths(resources: dict) -> dict:
    """``resources`` plus each volume's ``volume_path`` (known once its names are), to look
    ``${resources.volumes.<key>.volume_path}`` up in; the field is not part of the definition."""
    volumes = {}
    for key, volume in (resources.get("volumes") or {}).items():
        if isinstance(volume, dict) and all(k in volume for k in ("catalog_name", "schema_name", "name")):
            volume = {**volume, "volume_path": f"/Volumes/{volume['catalog_name']}/{volume['schema_name']}/{volume['name']}"}
        volumes[key] = volume
    return {**resources, "volumes": volumes} if volumes else resources


def bundle_user() -> str:
    """The workspace user a bundle is loaded for: ``$DATABRICKS_USER``, else the login name."""
    return os.environ.get("DATABRICKS_USER") or getpass.getuser()


def load_bundle(root: str | os.PathLike = ".", target: str | None = None,
                variables: dict[str, str] | None = None, local_files: bool = False,
                user: str | None = None) -> Bundle:
    """Load ``root/databricks.yml`` for ``target`` (default: the target marked ``default: true``),
    as ``user`` would deploy it (default :func:`bundle_user`).

    ``local_files``: ``${workspace.file_path}`` is the bundle folder itself, as for a run on this
    machine, instead of the folder ``databricks bundle deploy`` syncs it to.

    Resources come out as the CLI deploys them: variables resolved, the target mode's presets
    applied (``[dev <user>] `` names, paused schedules), then ``${resources.*}`` resolved against the
    renamed resources.

    Raises :class:`BundleError` when the bundle cannot be read at all; problems that still leave a
    usable bundle (undefined references, unknown keys) are collected in ``Bundle.problems``."""
    root = Path(root).resolve()
    main = root / BUNDLE_FILE
    if not main.is_file():
        raise BundleError([Problem(str(main), "", "no bundle here: databricks.yml not found")])
    doc = _read_yaml(main, root)
    problems: list[Problem] = []
    for key in sorted(set(doc) - TOP_LEVEL_KEYS):
        problems.append(Problem(BUNDLE_FILE, key, f"unknown top-level key; allowed: {sorted(TOP_LEVEL_KEYS)}"))

    sources: dict[tuple[str, str], Path] = {}
    resources: dict[str, dict] = {}
    declared = dict(doc.get("variables") or {})
    artifacts = dict(doc.get("artifacts") or {})

    def add_resources(block: dict, path: Path) -> None:
        for rtype, items in (block or {}).items():
            for key, definition in (items or {}).items():
                if (rtype, key) in sources:
                    problems.append(Problem(str(path.relative_to(root)), f"resources.{rtype}.{key}",
                                            f"already defined in {sources[(rtype, key)].relative_to(root)}"))
                    continue
                sources[(rtype, key)] = path
                resources.setdefault(rtype, {})[key] = definition

    add_resources(doc.get("resources") or {}, main)
    for pattern in doc.get("include") or []:
        matches = sorted(glob.glob(str(root / pattern)))
        if not matches:
            problems.append(Problem(BUNDLE_FILE, "include", f"{pattern!r} matches no file"))
        for match in matches:
            path = Path(match)
            part = _read_yaml(path, root)
            rel = str(path.relative_to(root))
            for key in sorted(set(part) - TOP_LEVEL_KEYS):
                problems.append(Problem(rel, key, f"unknown top-level key; allowed: {sorted(TOP_LEVEL_KEYS)}"))
            for name, spec in (part.get("variables") or {}).items():
                if name in declared:
                    problems.append(Problem(rel, f"variables.{name}", "declared twice"))
                declared[name] = spec
            artifacts.update(part.get("artifacts") or {})
            add_resources(part.get("resources") or {}, path)

    targets = doc.get("targets") or {}
    if not targets:
        targets = {"default": {"default": True}}
    if target is None:
        defaults = [t for t, spec in targets.items() if (spec or {}).get("default")]
        target = defaults[0] if defaults else next(iter(targets))
    if target not in targets:
        raise BundleError([Problem(BUNDLE_FILE, f"targets.{target}", f"unknown target; targets: {sorted(targets)}")])
    tspec = targets[target] or {}
    for key in sorted(set(tspec) - TARGET_KEYS):
        problems.append(Problem(BUNDLE_FILE, f"targets.{target}.{key}", f"unknown target field; allowed: {sorted(TARGET_KEYS)}"))
    for rtype, items in (tspec.get("resources") or {}).items():
        for key, over in (items or {}).items():
            if key not in resources.get(rtype, {}):
                problems.append(Problem(BUNDLE_FILE, f"targets.{target}.resources.{rtype}.{key}",
                                        "overrides a resource that is not defined"))
                continue
            resources[rtype][key] = _merge(resources[rtype][key], over)
    artifacts = _merge(artifacts, tspec.get("artifacts") or {})

    var_values = _variables(root, target, declared, tspec.get("variables") or {}, variables or {}, problems)
    bundle_block = _merge(doc.get("bundle") or {}, tspec.get("bundle") or {})
    name = bundle_block.get("name")
    if not name:
        problems.append(Problem(BUNDLE_FILE, "bundle.name", "is required"))
        name = root.name
    me = current_user(user or bundle_user())
    ws = _merge(doc.get("workspace") or {}, tspec.get("workspace") or {})
    root_path = ws.get("root_path") or f"/Workspace/Users/{me['userName']}/.bundle/${{bundle.name}}/${{bundle.target}}"
    workspace = {**ws, "root_path": root_path,
                 "file_path": str(root) if local_files else ws.get("file_path") or f"{root_path}/files",
                 "artifact_path": ws.get("artifact_path") or f"{root_path}/artifacts",
                 "state_path": ws.get("state_path") or f"{root_path}/state",
                 "current_user": me}
    mode = tspec.get("mode")

    context = {"var": var_values, "bundle": {**bundle_block, "name": name, "target": target, "mode": mode},
               "workspace": workspace}
    # Variables may refer to each other and to bundle/workspace fields: resolve to a fixed point.
    for _ in range(_MAX_PASSES):
        r = _Resolver(context, {})
        resolved_ctx = r.resolve(context, "")
        if resolved_ctx == context:
            break
        context = resolved_ctx
    else:
        problems.append(Problem(BUNDLE_FILE, "variables", "references do not settle: a variable refers to itself"))
    r = _Resolver(context, None)
    r.resolve(context["var"], "variables")
    problems += [Problem(BUNDLE_FILE, p, _explain(m, declared, target)) for p, m in r.problems
                 if not _unassigned(m, declared, context["var"])]

    # As the CLI: variables first, then the mode's presets, then ${resources.*} against the result.
    presets = target_presets(mode, _merge(doc.get("presets") or {}, tspec.get("presets") or {}), me)
    problems += _mode_problems(mode, tspec, target, context["workspace"], presets)
    first = _Resolver(context, None)
    resolved = {rt: {k: first.resolve(d, f"resources.{rt}.{k}") for k, d in items.items()}
                for rt, items in resources.items()}
    raw = apply_presets(resolved, presets)
    deploy_time = {"id", "url", "full_name", "experiment_id", "storage_location"}
    r = _Resolver(context, raw, deploy_time, local_files)
    for _ in range(_MAX_PASSES):
        r = _Resolver(context, _with_volume_paths(raw), deploy_time, local_files)
        resolved = {rt: {k: r.resolve(d, f"resources.{rt}.{k}") for k, d in items.items()} for rt, items in raw.items()}
        if resolved == raw:
            break
        raw = resolved
    seen = set()
    for path, message in first.problems + r.problems:
        parts = path.split(".")
        src = sources.get((parts[1], re.sub(r"\[\d+\]$", "", parts[2]))) if len(parts) > 2 else None
        if (path, message) not in seen and not _unassigned(message, declared, context["var"]):
            seen.add((path, message))
            problems.append(Problem(str(src.relative_to(root)) if src else BUNDLE_FILE, path,
                                    _explain(message, declared, target)))
    ra = _Resolver(context, resolved, deploy_time)
    artifacts = ra.resolve(artifacts, "artifacts")
    run_as = ra.resolve(tspec.get("run_as") or {}, f"targets.{target}.run_as")
    problems += [Problem(BUNDLE_FILE, p, _explain(m, declared, target)) for p, m in ra.problems
                 if not _unassigned(m, declared, context["var"])]

    return Bundle(root=root, name=name, target=target, mode=mode, variables=context["var"], resources=resolved,
                  sources=sources, artifacts=artifacts, workspace=context["workspace"],
                  targets=list(targets), run_as=run_as, presets=presets, problems=problems)


def _unassigned(message: str, declared: dict, values: dict) -> bool:
    """A reference to a declared variable without a value: already reported once, under
    ``variables.<name>``, as the CLI reports it."""
    m = re.fullmatch(r"undefined reference \$\{var\.([\w-]+)[^}]*\}", message)
    return bool(m) and m.group(1) in declared and m.group(1) not in values
