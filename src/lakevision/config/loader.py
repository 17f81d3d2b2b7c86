"""Loading the configuration: the files of ``bundle/config``, a profile laid over them, the
bundle's environment, ``--set`` overrides; every failure names the file and the key path."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from lakevision.config.schema import (DataConfig, DeploymentConfig, LakevisionConfig, Target, TargetsFile,
                                      TrainingConfig, _Strict)
from lakevision.errors import LakevisionError

CONFIG_DIR_ENV = "LAKEVISION_CONFIG_DIR"
TARGET_ENV = "LAKEVISION_TARGET"
PROFILE_ENV = "LAKEVISION_PROFILE"
# A bundle's job cluster sets these from its variables, so the bundle stays the one place that
# names the catalog, schema, volume and experiment of a Databricks target.
TARGET_FIELD_ENVS = {"catalog": "LAKEVISION_CATALOG", "schema": "LAKEVISION_SCHEMA",
                     "volume": "LAKEVISION_VOLUME", "experiment": "LAKEVISION_EXPERIMENT"}
# ... and the registered model and the serving endpoint (over deployment_config.yaml, under --set)
DEPLOYMENT_FIELD_ENVS = {"model_name": "LAKEVISION_MODEL_NAME", "endpoint_name": "LAKEVISION_ENDPOINT"}


class ConfigError(LakevisionError, ValueError):
    """A configuration file is missing, unreadable or invalid."""


_DEFAULT_TARGETS = TargetsFile(targets={"local": Target(runtime="local")})

_FILES: dict[str, type[_Strict]] = {
    "data": DataConfig,
    "training": TrainingConfig,
    "deployment": DeploymentConfig,
}



def _format_errors(path: Path, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<top level>"
        got = f" (got {e['input']!r})" if e["type"] not in ("missing",) and "input" in e else ""
        lines.append(f"{path}: {loc}: {e['msg']}{got}")
    return "\n".join(lines)


def load_yaml_model(path: Path | None, model: type[_Strict], overrides: list[str] = (),
                    profile: tuple[Path, dict] | None = None) -> Any:
    """Parse ``path`` (None: defaults) into ``model``, with a profile's mapping merged over it and
    then ``overrides``; every failure names the file and key path."""
    raw: Any = {}
    if path is not None:
        try:
            raw = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: <top level>: expected a mapping, got {type(raw).__name__}")
    if profile is not None:
        raw = _merge(raw, profile[1])
    raw = _apply_overrides(raw, list(overrides), path)
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        where = path or Path("<defaults>")
        if profile is not None:
            where = Path(f"{where} + {profile[0]}")
        raise ConfigError(_format_errors(where, exc)) from None


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _load_profile(profile: str, cdir: Path | None, sections: dict[str, str]) -> tuple[Path, dict]:
    """A profile is a partial config (``training:``, ``deployment:``, ``data_processing:`` keys) laid
    over the three files: ``profiles/<name>.yaml`` of the config directory, or a YAML file path."""
    if profile.endswith((".yaml", ".yml")) or os.sep in profile:
        path = Path(profile)
    else:
        path = (cdir or Path(".")) / "profiles" / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in (cdir / "profiles").glob("*.yaml")) if cdir else []
        raise ConfigError(f"{path}: profile {profile!r} not found; known profiles: {known}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: <top level>: expected a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - set(sections.values()))
    if unknown:
        raise ConfigError(f"{path}: {unknown[0]}: unknown section; expected one of {sorted(sections.values())}")
    return path, raw


def default_config_dir() -> Path | None:
    """``$LAKEVISION_CONFIG_DIR``, else ``./bundle/config`` when run from a bundle checkout."""
    env = os.environ.get(CONFIG_DIR_ENV)
    if env:
        return Path(env)
    here = Path.cwd() / "bundle" / "config"
    return here if here.is_dir() else None


def _apply_overrides(raw: dict, overrides: list[str], path: Path | None) -> dict:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY.PATH=VALUE")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{path or '<defaults>'}: override {key}: {part} is not a mapping")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
            where = f" at column {mark.column + 1}" if mark is not None else ""
            raise ConfigError(f"override {key}: {value!r} is not a YAML value: {problem}{where}") from None
    return raw


def load_config(
    config_dir: str | os.PathLike | None = None,
    target: str | None = None,
    overrides: list[str] | None = None,
    profile: str | None = None,
) -> LakevisionConfig:
    """Load ``data_config.yaml``, ``training_config.yaml``, ``deployment_config.yaml`` and
    ``targets.yaml`` from ``config_dir``. A file that is absent keeps the documented defaults;
    a directory that is named but absent is an error.

    ``target`` defaults to ``$LAKEVISION_TARGET``, else ``local``; ``profile`` (default
    ``$LAKEVISION_PROFILE``) names a partial config laid over the files, e.g. ``cpu`` for a laptop.
    ``overrides`` are ``section.key.path=value`` strings (value in YAML), e.g.
    ``training.optimization.max_epochs=3``; the section names the file they apply to and they win
    over the profile. A Databricks target's catalog, schema, volume and experiment can be set by
    ``$LAKEVISION_CATALOG``, ``$LAKEVISION_SCHEMA``, ``$LAKEVISION_VOLUME``, ``$LAKEVISION_EXPERIMENT``, and
    ``deployment.model_name`` / ``endpoint_name`` by ``$LAKEVISION_MODEL_NAME`` / ``$LAKEVISION_ENDPOINT``
    (a bundle's job clusters set all of these from its resources)."""
    target = target or os.environ.get(TARGET_ENV) or "local"
    profile = profile if profile is not None else os.environ.get(PROFILE_ENV) or None
    cdir = Path(config_dir) if config_dir is not None else default_config_dir()
    if cdir is not None and not cdir.is_dir():
        raise ConfigError(f"{cdir}: config directory does not exist")
    sections = {"data": "data_processing", "training": "training", "deployment": "deployment"}
    unknown = [o for o in overrides or [] if o.split(".", 1)[0] not in sections.values()]
    if unknown:
        raise ConfigError(f"override {unknown[0]!r}: must start with one of {sorted(sections.values())}")
    prof = _load_profile(profile, cdir, sections) if profile else None
    named = [f"deployment.{field}={json.dumps(os.environ[env])}" for field, env in DEPLOYMENT_FIELD_ENVS.items()
             if os.environ.get(env)]
    loaded: dict[str, Any] = {}
    for key, model in _FILES.items():
        path = cdir / f"{key}_config.yaml" if cdir else None
        mine = [o for o in named + list(overrides or []) if o.split(".", 1)[0] == sections[key]]
        part = (prof[0], {sections[key]: prof[1][sections[key]]}) if prof and sections[key] in prof[1] else None
        loaded[key] = load_yaml_model(path if path and path.exists() else None, model, mine, part)
    tpath = cdir / "targets.yaml" if cdir else None
    targets = load_yaml_model(tpath, TargetsFile) if tpath and tpath.exists() else _DEFAULT_TARGETS
    if target not in targets.targets:
        where = tpath or "built-in targets"
        raise ConfigError(f"{where}: targets.{target}: unknown target; known: {sorted(targets.targets)}")
    chosen = targets.targets[target]
    from_env = {field: os.environ[env] for field, env in TARGET_FIELD_ENVS.items() if os.environ.get(env)}
    if from_env:
        try:
            chosen = Target.model_validate({**chosen.model_dump(by_alias=True), **from_env})
        except ValidationError as exc:
            raise ConfigError(_format_errors(Path(f"targets.{target} + ${'/$'.join(TARGET_FIELD_ENVS.values())}"),
                                             exc)) from None
    return LakevisionConfig(
        data=loaded["data"].data_processing, training=loaded["training"].training,
        deployment=loaded["deployment"].deployment, target_name=target, target=chosen, config_dir=cdir,
        profile=str(prof[0]) if prof else None,
    )
