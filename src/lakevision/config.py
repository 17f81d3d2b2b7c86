"""Typed configuration: the three YAML files of ``bundle/config`` and the deployment targets.

Everything that reads configuration goes through :func:`load_config`, so a bad key fails in
one place with a message that names the file and the key path.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

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
    min_samples_per_category: int = Field(20, ge=0, description="fewer training objects of a category: a warning")


class DataConfig(_Strict):
    data_processing: DataProcessing = DataProcessing()


# ---------------------------------------------------------------- training_config.yaml
Task = Literal["classification", "detection", "segmentation"]


class Architectures(_Strict):
    classification: Literal["resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "convnext_tiny"] = "resnet18"
    detection: Literal["fasterrcnn_resnet18_fpn", "fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_resnet50_fpn_v2",
                       "retinanet_resnet50_fpn"] = "fasterrcnn_resnet18_fpn"
    segmentation: Literal["maskrcnn_resnet18_fpn", "maskrcnn_resnet50_fpn", "deeplabv3_mobilenet_v3_large"] = (
        "maskrcnn_resnet18_fpn"
    )


class ModelSettings(_Strict):
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(1e-5, ge=0)
    architectures: Architectures = Architectures()
    weights: Literal["DEFAULT", "none"] = Field("none", description="DEFAULT = pretrained torchvision weights")
    # R-CNN sampling budget: torchvision's defaults (512 RoIs, 2000 proposals) suit COCO's crowded
    # images; a few objects per image need far fewer, and a CPU step is then ~4x faster.
    rois_per_image: int = Field(128, gt=0)
    rpn_proposals: int = Field(300, gt=0)


class TrainData(_Strict):
    image_size: int = Field(320, ge=32, le=2048, description="longest side after resizing, pixels")
    batch_size: int = Field(4, gt=0, description="per Ray worker")
    loader_workers: int = Field(2, ge=0, description="DataLoader processes per Ray worker")
    classification_label: Literal["largest", "first", "most_common"] = "largest"
    augment: bool = True


class Optimization(_Strict):
    max_epochs: int = Field(10, gt=0)
    max_minutes: float | None = Field(None, gt=0, description="training time budget (Lightning max_time)")
    warmup_epochs: float = Field(1.0, ge=0)
    min_lr_ratio: float = Field(0.05, ge=0, le=1, description="cosine floor as a fraction of learning_rate")
    precision: Literal["auto", "32-true", "bf16-mixed", "16-mixed"] = Field("auto", description="auto: bf16 on GPU")
    accumulate_grad_batches: int = Field(1, gt=0)
    gradient_clip_val: float | None = Field(1.0, ge=0)
    early_stopping_patience: int | None = Field(3, gt=0, description="epochs without improvement; null = off")
    limit_train_batches: float | int = Field(1.0, gt=0)
    limit_val_batches: float | int = Field(1.0, gt=0)


class DistributedSettings(_Strict):
    num_workers: int = Field(4, gt=0)
    use_gpu: bool = True
    resources_per_worker: dict[str, float] = Field(default_factory=dict)
    max_failures: int = Field(2, ge=-1, description="worker-group restarts from the last checkpoint; -1 = unlimited")
    cluster: Literal["auto", "ray_on_spark", "local"] = Field(
        "auto", description="auto: Ray-on-Spark when a classic SparkSession exists, else local Ray"
    )


class Training(_Strict):
    task: Task = "detection"
    model: ModelSettings = ModelSettings()
    data: TrainData = TrainData()
    optimization: Optimization = Optimization()
    distributed: DistributedSettings = DistributedSettings()


class TrainingConfig(_Strict):
    training: Training = Training()


# ---------------------------------------------------------------- deployment_config.yaml
class EndpointSettings(_Strict):
    instance_type: str = "Standard_DS3_v2"
    min_instances: int = Field(1, ge=0)
    max_instances: int = Field(5, gt=0)
    scale_to_zero: bool = True
    ready_timeout_minutes: float = Field(20, gt=0, description="wait for a config update to finish")

    @model_validator(mode="after")
    def _ordered(self) -> EndpointSettings:
        if self.min_instances > self.max_instances:
            raise ValueError(
                f"min_instances ({self.min_instances}) is larger than max_instances ({self.max_instances})"
            )
        return self


class DriftSettings(_Strict):
    """When the monitor calls the traffic drifted, and when it asks for a new model."""

    psi_threshold: float = Field(0.2, gt=0, description="PSI above which a feature may count as drifted")
    ks_alpha: float = Field(0.01, gt=0, lt=1, description="family-wise level of the KS tests over all features")
    embedding_alpha: float = Field(0.01, gt=0, lt=1, description="level of the embedding two-sample test")
    min_samples: int = Field(100, gt=0, description="current images needed for a drift verdict")
    max_metric_drop: float = Field(0.05, ge=0, description="tolerated metric loss vs. the baseline, in its units")
    max_reference_samples: int = Field(5000, gt=0, description="reference feature samples tested against")
    permutations: int = Field(200, gt=0, description="permutations of the embedding test")

    @model_validator(mode="after")
    def _permutations_can_reject(self) -> DriftSettings:
        # a permutation p-value is at least 1 / (permutations + 1), and it must get below alpha
        needed = math.floor(1 / self.embedding_alpha)
        if self.permutations < needed:
            raise ValueError(f"permutations ({self.permutations}) cannot give a p-value below embedding_alpha "
                             f"({self.embedding_alpha:g}); use at least {needed}")
        return self


class MonitoringSettings(_Strict):
    metrics: list[Literal["latency", "throughput", "error_rate"]] = ["latency", "throughput", "error_rate"]
    max_error_rate: float = Field(0.05, ge=0, le=1, description="an endpoint above this is unhealthy")
    max_p99_latency_ms: float | None = Field(None, gt=0, description="null: latency is reported, not judged")
    inference_table: bool = Field(True, description="log every request to an AI Gateway inference table")
    inference_table_prefix: str | None = Field(None, pattern=r"^[A-Za-z0-9_]+$",
                                               description="table <prefix>_payload; null: the endpoint name")
    window_minutes: float = Field(60, gt=0, description="traffic the monitor job looks at")
    drift: DriftSettings = DriftSettings()
    retrain_job: str = Field("cv_pipeline", description="job the monitor starts when retraining is due: a bundle "
                                                        "job key here, a job id on Databricks")


class CanarySettings(_Strict):
    traffic_percentage: int = Field(10, ge=1, le=100, description="share of requests the new version gets first")
    smoke_requests: int = Field(20, ge=1, description="requests sent through the SDK before promoting")
    max_error_rate: float = Field(0.0, ge=0, le=1, description="share of failed smoke requests that still passes")
    max_p99_latency_ms: float | None = Field(None, gt=0, description="null: no latency check")


class ServingSettings(_Strict):
    max_image_pixels: int = Field(4096 * 4096, gt=0, description="larger images are refused with HTTP 400")
    max_batch_size: int = Field(64, gt=0, description="images per request")
    score_threshold: float = Field(0.05, ge=0, le=1, description="detections below this score are dropped")
    mask_threshold: float = Field(0.5, gt=0, lt=1)
    exports: list[Literal["torchscript", "onnx"]] = ["torchscript", "onnx"]


class WorkspaceSettings(_Strict):
    """How the SDK reaches the workspace; the token itself never appears in configuration."""

    host: str | None = Field(None, description="null: DATABRICKS_HOST, or the notebook's workspace")
    secret_scope: str | None = Field(None, description="scope/key of the token when DATABRICKS_TOKEN is unset")
    secret_key: str | None = None
    retry_timeout_seconds: int = Field(10, gt=0, le=300, description="give up on an unreachable host after this")


class Deployment(_Strict):
    workspace: WorkspaceSettings = WorkspaceSettings()
    endpoint: EndpointSettings = EndpointSettings()
    monitoring: MonitoringSettings = MonitoringSettings()
    # metric -> bound; a minimum, or a maximum for metrics where lower is better (losses, errors)
    metrics_threshold: dict[str, float] = Field(default_factory=lambda: {"map_50": 0.5})
    min_improvement_over_champion: float = Field(0.0, description="in the compared metric's own units")
    compare_metric: str | None = Field(None, description="metric compared with the champion; null: the task's")
    model_name: str = Field("lakevision_model", pattern=r"^[A-Za-z0-9_.-]+$",
                            description="registered model; a three-level UC name is built from the target")
    endpoint_name: str = Field("lakevision", pattern=r"^[A-Za-z0-9_-]{1,63}$")
    canary: CanarySettings = CanarySettings()
    serving: ServingSettings = ServingSettings()


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
    profile: str | None = None


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
        node[parts[-1]] = yaml.safe_load(value)
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
        **loaded, target_name=target, target=chosen, config_dir=cdir, profile=str(prof[0]) if prof else None
    )
