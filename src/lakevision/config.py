"""Typed configuration: the three YAML files of ``bundle/config`` and the deployment targets.

Everything that reads configuration goes through :func:`load_config`, so a bad key fails in
one place with a message that names the file and the key path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

CONFIG_DIR_ENV = "LAKEVISION_CONFIG_DIR"


class ConfigError(ValueError):
    """A configuration file is missing, unreadable or invalid."""


class _Strict(BaseModel):
    # Unknown keys are errors: a typo must not silently fall back to a default.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# ---------------------------------------------------------------- data_config.yaml
class ValidationRules(_Strict):
    min_image_size: int = Field(100, gt=0, description="shorter side, pixels, after EXIF orientation")
    max_image_size: int = Field(2000, gt=0, description="longer side, pixels, after EXIF orientation")
    bbox_tolerance: float = Field(1.0, ge=0, description="pixels a box may reach past the image edge")

    @model_validator(mode="after")
    def _ordered(self) -> ValidationRules:
        if self.min_image_size > self.max_image_size:
            raise ValueError(
                f"min_image_size ({self.min_image_size}) is larger than max_image_size ({self.max_image_size})"
            )
        return self


class Splits(_Strict):
    train: float = Field(0.8, ge=0, le=1)
    val: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)
    seed: int = 17

    @model_validator(mode="after")
    def _sum_to_one(self) -> Splits:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must be 1.0, got {total:g}")
        return self


class DataProcessing(_Strict):
    batch_size: int = Field(32, gt=0)
    num_workers: int = Field(4, ge=0)
    validation: ValidationRules = ValidationRules()
    splits: Splits = Splits()
    image_check_batch_size: int = Field(4096, gt=0)
    image_check_partitions: int = Field(0, ge=0, description="Spark partitions per batch; 0 = 2 x driver cores")


class DataConfig(_Strict):
    data_processing: DataProcessing = DataProcessing()


# ---------------------------------------------------------------- training_config.yaml
class ModelSettings(_Strict):
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-5, ge=0)


class DistributedSettings(_Strict):
    num_workers: int = Field(4, gt=0)
    use_gpu: bool = True


class Training(_Strict):
    model: ModelSettings = ModelSettings()
    distributed: DistributedSettings = DistributedSettings()


class TrainingConfig(_Strict):
    training: Training = Training()


# ---------------------------------------------------------------- deployment_config.yaml
class EndpointSettings(_Strict):
    instance_type: str = "Standard_DS3_v2"
    min_instances: int = Field(1, ge=0)
    max_instances: int = Field(5, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> EndpointSettings:
        if self.min_instances > self.max_instances:
            raise ValueError(
                f"min_instances ({self.min_instances}) is larger than max_instances ({self.max_instances})"
            )
        return self


class MonitoringSettings(_Strict):
    metrics: list[Literal["latency", "throughput", "error_rate"]] = ["latency", "throughput", "error_rate"]


class Deployment(_Strict):
    endpoint: EndpointSettings = EndpointSettings()
    monitoring: MonitoringSettings = MonitoringSettings()


class DeploymentConfig(_Strict):
    deployment: Deployment = Deployment()


# ---------------------------------------------------------------- targets.yaml
class Target(_Strict):
    runtime: Literal["local", "databricks"]
    catalog: str | None = None
    schema_: str = Field("lakevision", alias="schema")
    volume: str | None = None
    experiment: str | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @model_validator(mode="after")
    def _databricks_needs_names(self) -> Target:
        if self.runtime == "databricks" and not (self.catalog and self.volume):
            raise ValueError("a databricks target needs `catalog` and `volume` (Unity Catalog names)")
        return self


class TargetsFile(_Strict):
    targets: dict[str, Target]


_DEFAULT_TARGETS = TargetsFile(targets={"local": Target(runtime="local")})

_FILES: dict[str, type[_Strict]] = {
    "data": DataConfig,
    "training": TrainingConfig,
    "deployment": DeploymentConfig,
}


class LakevisionConfig(BaseModel):
    """The resolved configuration of one job run."""

    model_config = ConfigDict(frozen=True)

    data: DataConfig
    training: TrainingConfig
    deployment: DeploymentConfig
    target_name: str
    target: Target
    config_dir: Path | None


def _format_errors(path: Path, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<top level>"
        got = f" (got {e['input']!r})" if e["type"] not in ("missing",) and "input" in e else ""
        lines.append(f"{path}: {loc}: {e['msg']}{got}")
    return "\n".join(lines)


def load_yaml_model(path: Path, model: type[_Strict]) -> Any:
    """Parse ``path`` into ``model``; every failure names the file and the key path."""
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
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_format_errors(path, exc)) from None


def default_config_dir() -> Path | None:
    """``$LAKEVISION_CONFIG_DIR``, else ``./bundle/config`` when run from a bundle checkout."""
    env = os.environ.get(CONFIG_DIR_ENV)
    if env:
        return Path(env)
    here = Path.cwd() / "bundle" / "config"
    return here if here.is_dir() else None


def load_config(config_dir: str | os.PathLike | None = None, target: str = "local") -> LakevisionConfig:
    """Load ``data_config.yaml``, ``training_config.yaml``, ``deployment_config.yaml`` and
    ``targets.yaml`` from ``config_dir``. A file that is absent keeps the documented defaults;
    a directory that is named but absent is an error."""
    cdir = Path(config_dir) if config_dir is not None else default_config_dir()
    if cdir is not None and not cdir.is_dir():
        raise ConfigError(f"{cdir}: config directory does not exist")
    loaded: dict[str, Any] = {}
    for key, model in _FILES.items():
        path = cdir / f"{key}_config.yaml" if cdir else None
        loaded[key] = load_yaml_model(path, model) if path and path.exists() else model()
    tpath = cdir / "targets.yaml" if cdir else None
    targets = load_yaml_model(tpath, TargetsFile) if tpath and tpath.exists() else _DEFAULT_TARGETS
    if target not in targets.targets:
        where = tpath or "built-in targets"
        raise ConfigError(f"{where}: targets.{target}: unknown target; known: {sorted(targets.targets)}")
    return LakevisionConfig(
        **loaded, target_name=target, target=targets.targets[target], config_dir=cdir
    )
