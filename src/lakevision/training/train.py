"""The train job: gold samples at a Delta version -> Ray Train -> one MLflow run with the model.

``main``-style entry: :func:`run_training` takes a :class:`Runtime`, does one read of each split,
builds the torchvision model for the task, trains it with :class:`RayTrainer` and logs parameters,
lineage, per-epoch metrics, the best checkpoint's packaged model and the reference profile the
monitor compares traffic with to MLflow.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from lakevision.data.image_profile import ImageProfile
from lakevision.errors import DataError
from lakevision.runtime import Runtime
from lakevision.tasks import is_semantic, task_kind
from lakevision.tracking import (BEST_PREFIX, CONVERGENCE_TAG, FIT_SECONDS_METRIC, MODEL_URI_TAG, OVERFITTING_TAG,
                                 REFERENCE_PROFILE_ARTIFACT, TASK_TAG, TRAINING_RESULT_ARTIFACT, ExperimentTracker)
from lakevision.packaging.exports import log_exports
from lakevision.packaging.pyfunc import ImageModel, ServingSpec, log_image_model
from lakevision.data.images import load_rgb
from lakevision.data.samples import SplitRecords, load_split
from lakevision.packaging.architectures import build_model
from lakevision.training.module import BaseModel
from lakevision.training.ray_trainer import RayTrainer
from lakevision.training.report import training_report

log = logging.getLogger(__name__)

# training images the monitor's reference profile is drawn from: each is one forward pass of the
# model, and 300 samples give the drift tests their power (min_samples is 100)
_REFERENCE_IMAGES = 300
_EXPORT_SAMPLES = 2  # validation images each export is compared with the eager model on


@dataclass
class TrainingResult:
    """One training run: where it is in MLflow, what it learned and from which data."""

    run_id: str
    model_uri: str
    task: str
    kind: str  # a lakevision.tasks kind: semantic segmentation is a kind of its own
    architecture: str
    metrics: dict[str, float]  # the last epoch's
    best_metric: dict[str, Any]  # name, value and mode of the kind's validation metric at its best epoch
    data_version: int
    data_table: str
    checkpoint_path: str | None
    cluster: str  # where Ray ran: local or ray_on_spark
    exports: dict[str, bool]  # export format -> passed its parity check
    report: dict[str, Any]  # convergence epoch, overfitting warning
    seconds: dict[str, float]  # wall time of each stage of the run: setup, ray, fit, model, exports, ...

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_training(rt: Runtime, task: str | None = None, data_version: int | None = None,
                 log_to_driver: bool = True) -> TrainingResult:
    clock = Stopwatch()
    settings = rt.config.training
    task = task or settings.task
    settings = settings.model_copy(update={"task": task})
    train = load_split(rt, "train", data_version)
    val = load_split(rt, "val", train.version)
    if not train.image_paths or not val.image_paths:
        raise DataError(f"{train.table}@v{train.version}: the train and val splits need images "
                         f"(have {len(train.image_paths)} and {len(val.image_paths)})")
    arch = getattr(settings.model.architectures, task)
    semantic = is_semantic(arch)
    num_classes = len(train.category_ids) + (0 if task == "classification" else 1)
    m = settings.model
    model = build_model(task, arch, num_classes, m.weights, settings.data.image_size, m.rois_per_image, m.rpn_proposals,
                        m.box_head_size)
    module = BaseModel(model, settings.model.learning_rate, settings.model.weight_decay, task,
                       num_classes=num_classes, semantic=semantic,
                       warmup_epochs=settings.optimization.warmup_epochs,
                       min_lr_ratio=settings.optimization.min_lr_ratio)
    dist = settings.distributed
    use_gpu = dist.use_gpu and torch.cuda.is_available() if rt.kind == "local" else dist.use_gpu
    tracker = ExperimentTracker(rt.experiment_name, tracking_uri=rt.tracking_uri, run_name=f"{task}-{arch}",
                                registry_uri=rt.registry_uri)
    with tracker:
        tracker.log_parameters({"task": task, "architecture": arch, "num_classes": num_classes,
                                "categories": dict(zip(train.category_ids, train.category_names)),
                                "training": settings.model_dump(mode="json"),
                                "data_processing": rt.config.data.model_dump(mode="json"),
                                "use_gpu_effective": use_gpu})
        for name, split in (("train", train), ("val", val)):
            tracker.log_dataset(split.table, split.version, name, [{"image_id": a["image_id"]} for a in split.annotations])
        trainer = RayTrainer(module, num_workers=dist.num_workers, use_gpu=use_gpu,
                             resources_per_worker=dict(dist.resources_per_worker) or None, settings=settings)
        clock.lap("setup")
        result = trainer.train({"train": train, "val": val, "storage_path": str(rt.checkpoint_dir),
                                "name": f"{task}-{tracker.run_id}", "tracking_uri": tracker.tracking_uri,
                                "run_id": tracker.run_id, "log_to_driver": log_to_driver})
        state = torch.load(result["checkpoint_path"], map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
        # of that, Lightning's fit() (rank 0's clock: the epochs and their checkpoints); the rest is
        # Ray's: its start, the workers' start-up and teardown, the shutdown
        clock.lap("ray", within={"fit": sum(result["metrics_history"].get(FIT_SECONDS_METRIC, []))})
        spec = serving_spec(rt, task, arch, semantic, train)
        info = log_image_model(module.model.eval(), spec, Path(val.image_paths[0]).read_bytes())
        clock.lap("model")
        samples = [load_rgb(p) for p in val.image_paths[:_EXPORT_SAMPLES]]
        exports = log_exports(module.model, spec, samples, list(rt.config.deployment.serving.exports))
        clock.lap("exports")
        tracker.log_dict(reference_profile(ImageModel(module.model, spec), train).to_dict(),
                         REFERENCE_PROFILE_ARTIFACT)
        clock.lap("reference_profile")
        best = result["best_metric"]
        if best["value"] is not None:
            tracker.log_metrics({BEST_PREFIX + best["name"]: best["value"]})
        tracker.log_dict({**result, "model_uri": info.model_uri}, TRAINING_RESULT_ARTIFACT)
        kind = task_kind(task, semantic)
        text, figure, summary = training_report(result["metrics_history"], kind.val_metric)
        tracker.log_report(text, figure, "training")
        if summary["warning"]:
            log.warning("%s", summary["warning"])
        tracker.set_tags({MODEL_URI_TAG: info.model_uri, TASK_TAG: task,
                          CONVERGENCE_TAG: str(summary["convergence_epoch"]),
                          OVERFITTING_TAG: str(summary["overfitting"]).lower()})
        clock.lap("report")
    return TrainingResult(
        run_id=tracker.run_id, model_uri=info.model_uri, task=task, kind=kind.name, architecture=arch,
        metrics={k: v[-1] for k, v in result["metrics_history"].items() if v}, best_metric=best,
        data_version=train.version, data_table=train.table, checkpoint_path=result["checkpoint_path"],
        cluster=result["cluster"], exports={c.format: c.passed for c in exports}, report=summary,
        seconds=clock.seconds)


class Stopwatch:
    """Wall seconds per named stage, each from the end of the one before."""

    def __init__(self):
        self._last = time.monotonic()
        self.seconds: dict[str, float] = {}

    def lap(self, stage: str, within: dict[str, float] | None = None) -> None:
        """``within``: parts of this stage timed elsewhere, recorded under their own names after
        it and taken out of it."""
        now = time.monotonic()
        parts = within or {}
        self.seconds[stage] = round(now - self._last - sum(parts.values()), 1)
        self.seconds.update({k: round(v, 1) for k, v in parts.items()})
        self._last = now


def reference_profile(model: ImageModel, records: SplitRecords, max_images: int = _REFERENCE_IMAGES) -> ImageProfile:
    """Image statistics and backbone embeddings of (a seeded sample of) the training images, as
    the served model records them for each request."""
    import random

    paths = list(records.image_paths)
    if len(paths) > max_images:
        paths = random.Random(0).sample(paths, max_images)
    return model.profile([Path(p).read_bytes() for p in paths])


def serving_spec(rt: Runtime, task: str, arch: str, semantic: bool, train: SplitRecords) -> ServingSpec:
    serving = rt.config.deployment.serving
    return ServingSpec(task=task, semantic=semantic, image_size=rt.config.training.data.image_size,
                       category_ids=train.category_ids, category_names=train.category_names,
                       score_threshold=serving.score_threshold, mask_threshold=serving.mask_threshold,
                       max_image_pixels=serving.max_image_pixels, max_batch_size=serving.max_batch_size,
                       architecture=arch, feature_output=serving.feature_output,
                       rpn_proposals=rt.config.training.model.rpn_proposals,
                       box_head_size=rt.config.training.model.box_head_size)
