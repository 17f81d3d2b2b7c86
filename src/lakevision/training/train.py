"""The train job: gold samples at a Delta version -> Ray Train -> one MLflow run with the model.

``main``-style entry: :func:`run_training` takes a :class:`Runtime`, does one read of each split,
builds the torchvision model for the task, trains it with :class:`RayTrainer` and logs parameters,
lineage, per-epoch metrics and the best checkpoint's model to MLflow.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from lakevision.data.image_profile import ImageProfile, embed_images
from lakevision.errors import DataError, LakevisionError
from lakevision.runtime import Runtime
from lakevision.tracking import ExperimentTracker
from lakevision.packaging.exports import log_exports
from lakevision.packaging.pyfunc import ServingSpec, log_image_model
from lakevision.training.dataset import SplitRecords, load_rgb, load_split
from lakevision.training.models import build_model, is_semantic
from lakevision.training.module import BaseModel
from lakevision.training.ray_trainer import BEST_METRIC, RayTrainer
from lakevision.training.report import training_report

log = logging.getLogger(__name__)

MODEL_URI_TAG = "lakevision.model_uri"
# the training images' statistics and embeddings, which the monitor job compares traffic with
REFERENCE_PROFILE_ARTIFACT = "monitoring/reference_profile.json"
_REFERENCE_IMAGES = 500
TASK_TAG = "lakevision.task"


class NoRunError(LakevisionError, LookupError):
    """No finished training run to pick."""


def best_training_run(rt: Runtime, task: str, experiment_name: str | None = None) -> dict[str, Any]:
    """The finished training run of ``task`` with the best headline validation metric (the
    ``best_<metric>`` this job logs): its run id, model URI, metric name and value."""
    from mlflow import MlflowClient

    experiment_name = experiment_name or rt.experiment_name
    client = MlflowClient(rt.tracking_uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        raise NoRunError(f"experiment {experiment_name!r} does not exist; run `lakevision train` first")
    arch = getattr(rt.config.training.training.model.architectures, task)
    metric = f"best_{BEST_METRIC['semantic' if is_semantic(arch) else task][0]}"
    runs = client.search_runs([exp.experiment_id],
                              filter_string=f"attributes.status = 'FINISHED' and tags.`{TASK_TAG}` = '{task}'",
                              order_by=[f"metrics.{metric} DESC"], max_results=1)
    if not runs or MODEL_URI_TAG not in runs[0].data.tags:
        raise NoRunError(f"experiment {experiment_name!r} has no finished {task} training run with a model")
    run = runs[0]
    return {"run_id": run.info.run_id, "model_uri": run.data.tags[MODEL_URI_TAG], "metric": metric,
            "value": run.data.metrics.get(metric)}
_EXPORT_SAMPLES = 2  # validation images each export is compared with the eager model on


def run_training(rt: Runtime, task: str | None = None, data_version: int | None = None,
                 log_to_driver: bool = True) -> dict[str, Any]:
    settings = rt.config.training.training
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
    model = build_model(task, arch, num_classes, m.weights, settings.data.image_size, m.rois_per_image, m.rpn_proposals)
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
                                "data_processing": rt.config.data.data_processing.model_dump(mode="json"),
                                "use_gpu_effective": use_gpu})
        for name, split in (("train", train), ("val", val)):
            tracker.log_dataset(split.table, split.version, name, [{"image_id": a["image_id"]} for a in split.annotations])
        trainer = RayTrainer(module, num_workers=dist.num_workers, use_gpu=use_gpu,
                             resources_per_worker=dict(dist.resources_per_worker) or None, settings=settings)
        result = trainer.train({"train": train, "val": val, "storage_path": str(rt.checkpoint_dir),
                                "name": f"{task}-{tracker.run_id}", "tracking_uri": tracker.tracking_uri,
                                "run_id": tracker.run_id, "log_to_driver": log_to_driver})
        state = torch.load(result["checkpoint_path"], map_location="cpu", weights_only=False)["state_dict"]
        module.load_state_dict(state)
        info, exports = _log_packaged_model(rt, module.model.eval(), task, arch, semantic, train, val)
        tracker.log_dict(reference_profile(module.model, train, settings.data.image_size).to_dict(),
                         REFERENCE_PROFILE_ARTIFACT)
        best = result["best_metric"]
        if best["value"] is not None:
            tracker.log_metrics({f"best_{best['name']}": best["value"]})
        tracker.log_dict({**result, "model_uri": info.model_uri}, "training_result.json")
        metric, _ = BEST_METRIC["semantic" if semantic else task]
        text, figure, summary = training_report(result["metrics_history"], metric)
        tracker.log_report(text, figure, "training")
        if summary["warning"]:
            log.warning("%s", summary["warning"])
        tracker.set_tags({MODEL_URI_TAG: info.model_uri, TASK_TAG: task,
                          "training.convergence_epoch": str(summary["convergence_epoch"]),
                          "training.overfitting": str(summary["overfitting"]).lower()})
    final = {k: v[-1] for k, v in result["metrics_history"].items() if v}
    return {
        "run_id": tracker.run_id,
        "model_uri": info.model_uri,
        "task": task,
        "architecture": arch,
        "metrics": final,
        "best_metric": best,
        "primary_metric": metric,
        "data_version": train.version,
        "data_table": train.table,
        "checkpoint_path": result["checkpoint_path"],
        "cluster": result["cluster"],
        "exports": {c.format: c.passed for c in exports},
        "report": summary,
    }


def reference_profile(model: torch.nn.Module, records: SplitRecords, image_size: int,
                      max_images: int = _REFERENCE_IMAGES) -> ImageProfile:
    """Image statistics and backbone embeddings of (a seeded sample of) the training images."""
    import random

    paths = list(records.image_paths)
    if len(paths) > max_images:
        paths = random.Random(0).sample(paths, max_images)
    images = [load_rgb(p) for p in paths]
    return ImageProfile.from_images(images, embeddings=embed_images(model, images, image_size))


def _log_packaged_model(rt: Runtime, model: torch.nn.Module, task: str, arch: str, semantic: bool,
                        train: SplitRecords, val: SplitRecords):
    """The serving pyfunc (with a real validation image as its input example) and the checked
    TorchScript/ONNX exports, into the active run."""
    serving = rt.config.deployment.deployment.serving
    spec = ServingSpec(task=task, semantic=semantic, image_size=rt.config.training.training.data.image_size,
                       category_ids=train.category_ids, category_names=train.category_names,
                       score_threshold=serving.score_threshold, mask_threshold=serving.mask_threshold,
                       max_image_pixels=serving.max_image_pixels, max_batch_size=serving.max_batch_size,
                       architecture=arch)
    info = log_image_model(model, spec, Path(val.image_paths[0]).read_bytes())
    samples = [load_rgb(p) for p in val.image_paths[:_EXPORT_SAMPLES]]
    return info, log_exports(model, spec, samples, list(serving.exports))
