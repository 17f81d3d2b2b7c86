"""The configuration's schema: the three files of ``bundle/config``, the deployment targets, and
the resolved configuration of a run. Unknown keys, wrong types and out-of-range values are errors."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from lakevision.tasks import TRAINING_TASKS


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
Task = Literal[TRAINING_TASKS]


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
    box_head_size: int = Field(1024, gt=0, description="R-CNN box head width (torchvision's 1024; "
                                                        "two-layer MLP heads only)")


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
    max_error_rate: float = Field(0.05, ge=0, le=1,
                                  description="share of server errors (5xx) above which an endpoint is unhealthy")
    max_p99_latency_ms: float | None = Field(None, gt=0, description="null: latency is reported, not judged")
    inference_table: bool = Field(True, description="log every request to an AI Gateway inference table")
    inference_table_prefix: str | None = Field(None, pattern=r"^[A-Za-z0-9_]+$",
                                               description="table <prefix>_payload; null: the endpoint name")
    window_minutes: float = Field(60, gt=0, description="traffic the monitor job looks at")
    inference_delay_minutes: float = Field(60, ge=0, description="how late inference-table rows may arrive: the "
                                                                 "window ends this long before the monitor runs")
    feedback_table: str = Field("inference_feedback", pattern=r"^[A-Za-z0-9_]+$",
                                description="labels for served requests (request id -> ground truth)")
    drift: DriftSettings = DriftSettings()
    retrain_job: str | None = Field(None, description="job the monitor starts when retraining is due: a job id "
                                                      "(the monitor job passes cv_pipeline's) or its exact name")


class CanarySettings(_Strict):
    traffic_percentage: int = Field(10, ge=1, le=100, description="share of requests the new version gets first")
    smoke_requests: int = Field(20, ge=1, description="requests sent through the SDK before promoting")
    max_error_rate: float = Field(0.0, ge=0, le=1, description="share of failed smoke requests and of the new "
                                                               "version's server errors (5xx) that still passes")
    max_p95_latency_ms: float | None = Field(None, gt=0, description="the new version's p95; null: no latency check")


class ServingSettings(_Strict):
    max_image_pixels: int = Field(4096 * 4096, gt=0, description="larger images are refused with HTTP 400")
    max_batch_size: int = Field(64, gt=0, description="images per request")
    score_threshold: float = Field(0.05, ge=0, le=1, description="detections below this score are dropped")
    mask_threshold: float = Field(0.5, gt=0, lt=1)
    exports: list[Literal["torchscript", "onnx"]] = ["torchscript", "onnx"]
    feature_output: bool = Field(True, description="return each image's statistics and embedding with its "
                                                   "prediction, for drift from the inference table")


class WorkspaceSettings(_Strict):
    """How the SDK reaches the workspace; the token itself never appears in configuration."""

    host: str | None = Field(None, description="null: DATABRICKS_HOST, or the notebook's workspace")
    secret_scope: str | None = Field(None, description="scope/key of the token when DATABRICKS_TOKEN is unset")
    secret_key: str | None = None
    retry_timeout_seconds: int = Field(10, gt=0, le=300, description="give up on an unreachable host after this")


class ScoringSettings(_Strict):
    """Batch scoring (the score job) and the evaluate job's predictions on the Spark workers."""

    output_table: str = Field("scores", pattern=r"^[A-Za-z0-9_]+$", description="the score job's Delta table")
    batch_bytes: int = Field(32 * 2**20, gt=0, description="image file bytes a task reads and holds at once")
    batch_size: int = Field(8, gt=0, description="images per model call")
    partitions: int = Field(0, ge=0, description="Spark partitions per round; 0 = the cluster's cores")
    round_images: int = Field(20_000, gt=0, description="images per committed MERGE: a killed run loses at most "
                                                         "one round's work")
    threads_per_task: int = Field(0, ge=0, description="torch CPU threads per Spark task; 0 = the task's cores "
                                                       "(spark.task.cpus, or cores / concurrent tasks)")
    use_gpu: bool = Field(False, description="each task runs the model on the GPU Spark assigned it")
    max_file_bytes: int = Field(256 * 2**20, gt=0, description="a larger file is an error row, never read")
    evaluate_on_workers: bool = Field(True, description="evaluate's detection and instance-segmentation "
                                                        "predictions and metric states on the Spark workers")


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
    scoring: ScoringSettings = ScoringSettings()


class DeploymentConfig(_Strict):
    deployment: Deployment = Deployment()


# ---------------------------------------------------------------- targets.yaml
# A Unity Catalog name the jobs put in SQL and paths (catalog, schema, volume, table): letters,
# digits, underscores and hyphens, always quoted with backticks in SQL (lakevision.runtime.sql_name);
# never a dot, a space, a slash, a quote or a backtick.
UC_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,254}")


class Target(_Strict):
    runtime: Literal["local", "databricks"]
    catalog: str | None = None
    schema_: str = Field("lakevision", alias="schema")
    volume: str | None = None
    experiment: str | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("catalog", "schema_", "volume")
    @classmethod
    def _uc_name(cls, value: str | None) -> str | None:
        if value is not None and not UC_NAME.fullmatch(value):
            raise ValueError(f"{value!r} is not a Unity Catalog name: use letters, digits, underscores and hyphens")
        return value

    @model_validator(mode="after")
    def _databricks_needs_names(self) -> Target:
        if self.runtime == "databricks" and not (self.catalog and self.volume):
            raise ValueError("a databricks target needs `catalog` and `volume` (Unity Catalog names)")
        return self


class TargetsFile(_Strict):
    targets: dict[str, Target]


class LakevisionConfig(BaseModel):
    """The resolved configuration of one job run: each file's section, the target, and where
    they came from (``cfg.training.model.learning_rate`` is ``training.model.learning_rate`` of
    ``training_config.yaml``)."""

    model_config = ConfigDict(frozen=True)

    data: DataProcessing
    training: Training
    deployment: Deployment
    target_name: str
    target: Target
    config_dir: Path | None
    profile: str | None = None
