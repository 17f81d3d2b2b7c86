"""The evaluate job: a logged model on the gold test split -> metrics, figures and a report in
the model's MLflow run, and per-image predictions in a Delta table for error analysis.

Instance tasks are evaluated on the original images against the original COCO ground truth (crowd
regions included): torchvision detection models resize internally and return boxes in input
coordinates, so nothing is rescaled here and the numbers are COCO's own.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from lakevision import delta
from lakevision.evaluation import ClassificationMetrics, DetectionMetrics, SegmentationMetrics
from lakevision.errors import DataError
from lakevision.figures import new_figure
from lakevision.packaging.pyfunc import ModelLoadError, load_image_model
from lakevision.runtime import Runtime
from lakevision.tasks import task_kind
from lakevision.tracking import (EVAL_DATA_VERSION_TAG, EVAL_KIND_TAG, EVAL_MODEL_URI_TAG, EVAL_TASK_TAG,
                                 EVALUATION_REPORT_ARTIFACT, TEST_PREFIX, mlflow_client)
from lakevision.data.dataset import COCODataset
from lakevision.data.samples import SplitRecords, load_split
from lakevision.evaluation.distributed import (BOX_GT_KEYS, BOX_KEYS, evaluate_on_workers, ground_truth,
                                               instance_outputs, prediction_body)
from lakevision.data.transforms import build_transform

log = logging.getLogger(__name__)

PREDICTIONS_TABLE = "predictions"
_GRID = 6  # images in each figure grid


@dataclass
class EvaluationResult:
    """A model scored on the test split at one samples version, and where the scores went."""

    task: str
    kind: str  # a lakevision.tasks kind: semantic segmentation is a kind of its own
    model_uri: str
    run_id: str  # the MLflow run the metrics, figures and report were logged into
    data_version: int
    images: int
    metrics: dict[str, float]
    predictions_table: dict[str, Any]  # location and version of the per-image predictions
    partitions: int = 0  # Spark partitions that predicted on the workers; 0: the driver did

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _load_model(model_uri: str):
    """``(torch module, model info, ImageModel or None)``: the serving pyfunc the train job logs
    also carries the spec explanations need; a plain pytorch-flavor model has none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        info = mlflow.models.get_model_info(model_uri)
        if "pytorch" in info.flavors:
            return mlflow.pytorch.load_model(model_uri, map_location="cpu").eval(), info, None
        # the serving pyfunc that training logs: evaluate the torch module inside it
        image_model = load_image_model(model_uri)
    except (MlflowException, OSError, AttributeError) as exc:
        raise ModelLoadError(f"{model_uri}: cannot load the model: {exc}") from None
    return image_model.model.eval(), info, image_model


def _training_params(rt: Runtime, run_id: str | None) -> dict[str, str]:
    return mlflow_client(rt.tracking_uri).get_run(run_id).data.params if run_id else {}


def _task_of(model: torch.nn.Module, requested: str | None, params: dict) -> tuple[str, bool]:
    from torchvision.models.detection import MaskRCNN
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.detection.retinanet import RetinaNet
    from torchvision.models.segmentation.deeplabv3 import DeepLabV3

    if isinstance(model, DeepLabV3):
        task, semantic = "segmentation", True
    elif isinstance(model, MaskRCNN):
        task, semantic = "segmentation", False
    elif isinstance(model, (GeneralizedRCNN, RetinaNet)):
        task, semantic = "detection", False
    else:
        task, semantic = "classification", False
    if requested and requested != task:
        raise DataError(f"--task {requested}: the model is a {type(model).__name__}, a {task} model")
    trained = params.get("task")
    if trained and trained != task:
        raise DataError(f"the model's training run says task {trained!r}, the model is a {task} model")
    return task, semantic


def _per_image_recall(pred: dict, gt: dict, iou: float = 0.5) -> float:
    """Share of non-crowd objects found (IoU >= 0.5, same class): ranks the worst images."""
    from torchvision.ops import box_iou

    keep = gt["iscrowd"] == 0
    gboxes, glabels = gt["boxes"][keep], gt["labels"][keep]
    if not len(gboxes):
        return 1.0
    if not len(pred["boxes"]):
        return 0.0
    ious = box_iou(torch.as_tensor(gboxes, dtype=torch.float32), torch.as_tensor(pred["boxes"], dtype=torch.float32)).numpy()
    same = glabels[:, None] == pred["labels"][None, :]
    return float(((ious >= iou) & same).any(axis=1).mean())


def _draw(ax, image: np.ndarray, gt: dict | None, pred: dict | None, names: dict[int, str], title: str) -> None:
    from matplotlib.patches import Rectangle

    ax.imshow(image)
    ax.set_axis_off()
    ax.set_title(title, fontsize=8)
    for boxes, labels, color, scores in ((gt or {}).get("boxes"), (gt or {}).get("labels"), "lime", None), \
            ((pred or {}).get("boxes"), (pred or {}).get("labels"), "red", (pred or {}).get("scores")):
        if boxes is None:
            continue
        for k, (box, lab) in enumerate(zip(boxes, labels)):
            if scores is not None and scores[k] < 0.5:
                continue
            x0, y0, x1, y1 = box
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color=color, lw=1.2))
            text = names.get(int(lab), str(lab)) + (f" {scores[k]:.2f}" if scores is not None else "")
            ax.text(x0, y0, text, color=color, fontsize=6, va="bottom")


def image_grid(records: SplitRecords, gts: list[dict], preds: list[dict | None], order: list[int], names: dict[int, str],
               title: str):
    """Up to nine images of ``records`` in ``order`` with their ground truth and, where given, predictions."""
    from lakevision.data.images import load_rgb

    picks = order[:_GRID]
    cols = 3
    fig, axes = new_figure(max(1, -(-len(picks) // cols)), cols, (10, 3.4 * max(1, -(-len(picks) // cols))))
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, i in zip(axes.flat, picks):
        _draw(ax, load_rgb(records.image_paths[i]), gts[i], preds[i], names, f"image {gts[i]['image_id']}")
    legend = "green: ground truth" + (", red: predictions >= 0.5" if any(p is not None for p in preds) else "")
    fig.suptitle(f"{title} ({legend})")
    return fig


def _misclassified_first(preds: list[dict]) -> list[int]:
    """Misclassified test images, the most confidently wrong first."""
    wrong = [(-float(np.max(p["probabilities"])), i) for i, p in enumerate(preds) if p["label"] != p["target"]]
    return [i for _, i in sorted(wrong)]


def _explained_errors(image_model, records: SplitRecords, order: list[int], count: int = 3):
    """Explanation panels for the ``count`` worst test images (None without a lakevision serving
    model, whose spec explanations need, or with nothing to explain)."""
    from lakevision.evaluation.explain import explain_array, panels_figure
    from lakevision.data.images import load_rgb

    if image_model is None or not order:
        return None
    rows = []
    for i in order[:count]:
        image = load_rgb(records.image_paths[i])
        _, panels = explain_array(image_model, image, top=1)  # the best box: one backward pass an image
        # dense panels start with the input itself; every row starts with it once
        rows.append([(f"test image {i + 1} of {len(records.image_paths)}", image),
                     *[p for p in panels if p[1] is not image]])
    return panels_figure(rows)


def _report(task: str, model_uri: str, records: SplitRecords, metrics: dict[str, float]) -> str:
    lines = [f"# Evaluation of `{model_uri}`", "",
             f"- task: {task}", f"- data: `{records.table}` version {records.version}, split test, "
             f"{len(records.image_paths)} images", f"- evaluated at {dt.datetime.now(dt.timezone.utc).isoformat()}", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())]
    return "\n".join(lines) + "\n"


def _predictions_frame(model_uri: str, records: SplitRecords, preds: list[dict], task: str) -> pd.DataFrame:
    rows = []
    for p in preds:
        body = prediction_body(p)  # full precision: the table must reproduce the metrics exactly
        if task == "classification" or "label" in p:
            body = {"label": int(p["label"]), "probabilities": np.asarray(p["probabilities"]).tolist()}
        text = json.dumps(body)
        rows.append({"model_uri": model_uri, "image_id": int(p["image_id"]), "data_version": records.version,
                     "prediction": text, "row_hash": hashlib.sha1(text.encode()).hexdigest(),
                     "evaluated_at": dt.datetime.now(dt.timezone.utc).isoformat()})
    return pd.DataFrame(rows)


def run_evaluation(rt: Runtime, model_uri: str, task: str | None = None, data_version: int | None = None,
                   batch_size: int = 8, on_workers: bool | None = None) -> EvaluationResult:
    """``on_workers`` (default ``deployment.scoring.evaluate_on_workers``): detection and instance
    segmentation predict and keep their metric states on the Spark workers, with the same
    results as on the driver (:mod:`lakevision.evaluation.distributed`)."""
    import mlflow

    mlflow.set_tracking_uri(rt.tracking_uri)
    mlflow.set_registry_uri(rt.registry_uri)
    model, info, image_model = _load_model(model_uri)
    params = _training_params(rt, info.run_id)
    task, semantic = _task_of(model, task, params)
    records = load_split(rt, "test", data_version)
    if not records.image_paths:
        raise DataError(f"{records.table}@v{records.version}: the test split has no images")
    names = dict(zip(records.category_ids, records.category_names))
    figures: dict[str, Any] = {}
    partitions = 0
    if task == "classification" or semantic:
        metrics, preds, figures = _dense_task(model, records, task, semantic, params, batch_size)
        worst = [] if semantic else _misclassified_first(preds)
    else:
        gts = ground_truth(records, with_masks=task == "segmentation")
        box_gts = [{k: g[k] for k in BOX_GT_KEYS} for g in gts]
        seg_metrics = SegmentationMetrics(len(records.category_ids) + 1)
        if rt.config.deployment.scoring.evaluate_on_workers if on_workers is None else on_workers:
            flavor = "pytorch" if "pytorch" in info.flavors else "pyfunc"
            on = evaluate_on_workers(rt, model_uri, flavor, records, task, batch_size)
            preds, det, partitions = on.predictions, on.boxes, on.partitions
            stats = det.compute(num_classes=len(records.category_ids))
            segm = seg_metrics.compute_instance_state(on.masks) if task == "segmentation" else {}
            box_preds = [{k: p[k] for k in BOX_KEYS} for p in preds]
        else:
            label_to_cat = {i + 1: c for i, c in enumerate(records.category_ids)}
            preds = instance_outputs(model, records, label_to_cat, task, batch_size)
            det = DetectionMetrics()
            box_preds = [{k: p[k] for k in BOX_KEYS} for p in preds]
            stats = det.compute_metrics(box_preds, box_gts, num_classes=len(records.category_ids))
            segm = seg_metrics.compute_metrics(
                [{k: p[k] for k in ("image_id", "masks", "labels", "scores")} for p in preds],
                [{k: g[k] for k in ("image_id", "masks", "labels", "iscrowd", "area")} for g in gts],
            ) if task == "segmentation" else {}
        metrics = {k: float(v) for k, v in stats.items() if not isinstance(v, dict)}
        metrics.update({f"ap_{names.get(c, c)}": float(v) for c, v in stats["map_per_class"].items()})
        metrics.update({f"segm_{k}": float(v) for k, v in segm.items() if not isinstance(v, dict)})
        worst = list(np.argsort([_per_image_recall(p, g) for p, g in zip(preds, gts)], kind="stable"))
        figures = {
            "evaluation/pr_curve.png": det.plot_precision_recall_curve(
                box_preds, box_gts, class_names=[names.get(i, str(i)) for i in range(1, max(records.category_ids) + 1)]),
            "evaluation/samples.png": image_grid(records, gts, preds, list(range(len(preds))), names, "sample predictions"),
            "evaluation/worst_errors.png": image_grid(records, gts, preds, worst, names,
                                                 "worst errors (lowest recall at IoU 0.5)"),
        }
    explained = _explained_errors(image_model, records, worst)
    if explained is not None:
        figures["evaluation/worst_errors_explained.png"] = explained
    report = _report(task, model_uri, records, metrics)
    with mlflow.start_run(run_id=info.run_id) if info.run_id else mlflow.start_run(run_name="evaluate"):
        mlflow.log_metrics({TEST_PREFIX + k: v for k, v in metrics.items() if np.isfinite(v)})
        for path, fig in figures.items():
            mlflow.log_figure(fig, path)
        mlflow.log_text(report, EVALUATION_REPORT_ARTIFACT)
        mlflow.set_tags({EVAL_DATA_VERSION_TAG: str(records.version), EVAL_MODEL_URI_TAG: model_uri,
                         EVAL_TASK_TAG: task, EVAL_KIND_TAG: task_kind(task, semantic).name})
        run_id = mlflow.active_run().info.run_id
    ref = rt.table(PREDICTIONS_TABLE)
    frame = _predictions_frame(model_uri, records, preds, task)
    delta.upsert(rt.spark, rt.spark.createDataFrame(frame), ref, ["model_uri", "image_id"], ["row_hash"], rt.staging_dir)
    return EvaluationResult(task=task, kind=task_kind(task, semantic).name, model_uri=model_uri, run_id=run_id,
                            data_version=records.version, images=len(records.image_paths), metrics=metrics,
                            predictions_table={"location": ref.location,
                                               "version": delta.table_version(rt.spark, ref)},
                            partitions=partitions)


def _dense_task(model, records: SplitRecords, task: str, semantic: bool, params: dict, batch: int):
    """Classification and semantic segmentation: the training transform at the training size."""
    size = int(params.get("training.data.image_size", 224))
    ds = COCODataset(records.image_paths, records.annotations, build_transform(task, size, False, semantic=semantic),
                     task, category_ids=records.category_ids, semantic=semantic)
    preds, ys, probs, masks_true, masks_pred = [], [], [], [], []
    with torch.no_grad():
        for start in range(0, len(ds), batch):
            items = [ds[i] for i in range(start, min(start + batch, len(ds)))]
            x = torch.stack([x for x, _ in items])
            out = model(x)
            if semantic:
                pred = out["out"].argmax(1)
                for (_, t), m in zip(items, pred):
                    masks_true.append({"image_id": int(t["image_id"]), "mask": t["mask"].numpy()})
                    masks_pred.append({"image_id": int(t["image_id"]), "mask": m.numpy()})
                    preds.append({"image_id": int(t["image_id"]), "label": -1, "probabilities": []})
                continue
            prob = out.double().softmax(1)  # float64: sums to 1 within what scikit-learn checks
            for (_, t), p in zip(items, prob):
                ys.append(int(t["label"]))
                probs.append(p.numpy())
                preds.append({"image_id": int(t["image_id"]), "label": int(p.argmax()), "probabilities": p.numpy(),
                              "target": int(t["label"])})
    names = records.category_names
    if semantic:
        seg = SegmentationMetrics(len(names) + 1)
        metrics = {k: float(v) for k, v in seg.compute_metrics(masks_pred, masks_true).items() if not isinstance(v, dict)}
        return metrics, preds, {}
    cm = ClassificationMetrics(len(names))
    y_pred = np.array([p["label"] for p in preds])
    metrics = cm.compute_metrics(np.array(ys), y_pred, np.stack(probs))
    return metrics, preds, {"evaluation/confusion_matrix.png": cm.plot_confusion_matrix(np.array(ys), y_pred, names)}


def comparison_figure(rt: Runtime, model_uris: dict[str, str], data_version: int, max_images: int = 4):
    """The stored test-split predictions of several models side by side on the same images (one
    row per image, one column per model), e.g. a challenger and the champion it must beat."""
    from pyspark.sql import functions as F

    from lakevision.data.images import load_rgb

    records = load_split(rt, "test", data_version)
    names = dict(zip(records.category_ids, records.category_names))
    rows = (delta.read_table(rt.spark, rt.table(PREDICTIONS_TABLE))
            .filter(F.col("model_uri").isin(list(model_uris.values())) & (F.col("data_version") == data_version))
            .select("model_uri", "image_id", "prediction").collect())
    preds = {(r["model_uri"], int(r["image_id"])): json.loads(r["prediction"]) for r in rows}
    path_of = {int(a["image_id"]): p for a, p in zip(records.annotations, records.image_paths)}
    common = sorted(set.intersection(*({i for u2, i in preds if u2 == u} for u in model_uris.values())))
    picks = [i for i in common if i in path_of][:max_images]
    if not picks:
        raise DataError(f"no test image has stored predictions of every model in {sorted(model_uris.values())} "
                        f"at data version {data_version}")
    fig, axes = new_figure(len(picks), len(model_uris), (4 * len(model_uris), 3.6 * len(picks)))
    for r, image_id in enumerate(picks):
        image = load_rgb(path_of[image_id])
        for c, (label, uri) in enumerate(model_uris.items()):
            p = preds[(uri, image_id)]
            if "label" in p:  # classification stores the class index; semantic masks are not stored (-1)
                k = p["label"]
                title = f"{label}: {records.category_names[k] if 0 <= k < len(records.category_names) else 'n/a'}"
                _draw(axes[r, c], image, None, None, names, title)
                continue
            pred = {"boxes": np.asarray(p["boxes"]).reshape(-1, 4), "labels": p["labels"], "scores": p["scores"]}
            _draw(axes[r, c], image, None, pred, names, f"{label}: image {image_id}")
    fig.suptitle("predictions on the same test images (boxes: score >= 0.5)")
    return fig
