"""Detection and instance-segmentation predictions of the evaluate job, on the Spark workers.

The test split goes out as rows of whole model batches (the driver's ``batch_size`` images in the
driver's order), so every forward pass sees the images it would see on the driver and the
predictions are the driver's. Each partition validates its predictions and ground truth into the
metric classes' mergeable states (:class:`~lakevision.evaluation.coco_state.CocoState`) and sends
back one state plus the predictions as JSON; the driver merges the states and evaluates once, so
the metrics are the driver-only evaluation's.

The model is staged once on shared storage and loaded once per worker process
(:mod:`lakevision.packaging.batch`).
"""

from __future__ import annotations

import functools
import json
import pickle
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from lakevision.data.dataset import COCODataset
from lakevision.data.images import segmentation_to_rle
from lakevision.data.samples import SplitRecords
from lakevision.evaluation.coco_state import CocoState
from lakevision.evaluation.detection import DetectionMetrics
from lakevision.evaluation.segmentation import SegmentationMetrics
from lakevision.packaging.batch import TaskResources, cached_model, concurrent_tasks, default_partitions, stage_model
from lakevision.packaging.pyfunc import model_device

MASK_THRESHOLD = 0.5
EVAL_SCHEMA = "image_id long, prediction string, state binary"
BOX_KEYS = ("image_id", "boxes", "labels", "scores")
BOX_GT_KEYS = ("image_id", "boxes", "labels", "iscrowd", "area")


def instance_outputs(model, records: SplitRecords, label_to_cat: dict[int, int], task: str, batch: int) -> list[dict]:
    """One prediction dict per image, labels mapped back to COCO category ids; the images go
    through the model ``batch`` at a time in ``records`` order."""
    ds = COCODataset(records.image_paths, records.annotations, None, "detection", category_ids=records.category_ids)
    device = model_device(model)
    preds = []
    with torch.no_grad():
        for start in range(0, len(ds), batch):
            items = [ds[i] for i in range(start, min(start + batch, len(ds)))]
            outs = model([x.float().div(255).to(device) for x, _ in items])
            for (_, t), o in zip(items, outs):
                o = {k: v.cpu() for k, v in o.items()}
                labels = np.array([label_to_cat[int(v)] for v in o["labels"]], np.int64)
                p = {"image_id": int(t["image_id"]), "boxes": o["boxes"].numpy(), "labels": labels,
                     "scores": o["scores"].numpy()}
                if task == "segmentation":
                    p["masks"] = (o["masks"][:, 0] > MASK_THRESHOLD).numpy().astype(np.uint8)
                preds.append(p)
    return preds


def ground_truth(records: SplitRecords, with_masks: bool) -> list[dict]:
    gts = []
    for rec in records.annotations:
        anns = rec["annotations"]
        xywh = np.array([a["bbox"] for a in anns], np.float64).reshape(-1, 4)
        gt = {"image_id": int(rec["image_id"]),
              "boxes": np.column_stack([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]]) if len(anns) else np.zeros((0, 4)),
              "labels": np.array([a["category_id"] for a in anns], np.int64),
              "iscrowd": np.array([a["iscrowd"] for a in anns], np.int64),
              "area": np.array([a["area"] for a in anns], np.float64)}
        if with_masks:
            gt["masks"] = [segmentation_to_rle(a["segmentation"], rec["height"], rec["width"]) for a in anns]
        gts.append(gt)
    return gts


def prediction_body(p: dict) -> dict:
    """What the predictions table stores of an instance prediction, at full precision."""
    return {"boxes": np.asarray(p.get("boxes", np.zeros((0, 4)))).tolist(),
            "labels": np.asarray(p.get("labels", [])).tolist(), "scores": np.asarray(p.get("scores", [])).tolist()}


def prediction_from_body(image_id: int, body: dict) -> dict:
    """The prediction dict a worker's JSON stands for, with the driver's dtypes (float32 values
    survive the JSON round trip exactly)."""
    return {"image_id": int(image_id), "boxes": np.array(body["boxes"], np.float32).reshape(-1, 4),
            "labels": np.array(body["labels"], np.int64), "scores": np.array(body["scores"], np.float32)}


def load_torch_module(model_dir: str, flavor: str, device: str) -> torch.nn.Module:
    """The torch module of a staged model: a pytorch-flavor model, or the one inside the serving pyfunc."""
    import mlflow

    from lakevision.packaging.pyfunc import load_local_image_model

    if flavor == "pytorch":
        return mlflow.pytorch.load_model(model_dir, map_location=device).eval()
    return load_local_image_model(model_dir, device).model.eval()


@dataclass(frozen=True)
class EvaluatePartition:
    """The ``mapInPandas`` function: rows of model batches in, one row per image's prediction and
    one row with the partition's metric states out."""

    model_uri: str
    model_dir: str
    flavor: str
    task: str
    category_ids: tuple[int, ...]
    resources: TaskResources

    def __call__(self, batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        device = self.resources.apply()
        model = cached_model(("torch_module", self.model_uri, device),
                             functools.partial(load_torch_module, self.model_dir, self.flavor, device)).model
        label_to_cat = {i + 1: c for i, c in enumerate(self.category_ids)}
        masks = self.task == "segmentation"
        boxes = DetectionMetrics()
        segm = CocoState("segm") if masks else None
        ids: list[int | None] = []
        bodies: list[str | None] = []
        for frame in batches:
            for text in frame["batch"]:
                group = json.loads(text)
                records = SplitRecords(group["paths"], group["annotations"], list(self.category_ids), [], "", 0)
                preds = instance_outputs(model, records, label_to_cat, self.task, len(records.image_paths))
                gts = ground_truth(records, with_masks=masks)
                boxes.update([{k: p[k] for k in BOX_KEYS} for p in preds], [{k: g[k] for k in BOX_GT_KEYS} for g in gts])
                if segm is not None:
                    segm.merge(SegmentationMetrics.instance_state(
                        [{k: p[k] for k in ("image_id", "masks", "labels", "scores")} for p in preds],
                        [{k: g[k] for k in ("image_id", "masks", "labels", "iscrowd", "area")} for g in gts]))
                ids += [p["image_id"] for p in preds]
                bodies += [json.dumps(prediction_body(p)) for p in preds]
        state = pickle.dumps({"bbox": boxes.state_dict(), "segm": segm.state_dict() if segm is not None else None})
        yield pd.DataFrame({"image_id": pd.array(ids + [None], dtype="Int64"), "prediction": bodies + [None],
                            "state": [None] * len(ids) + [state]})


@dataclass
class WorkerEvaluation:
    """The predictions in ``records`` order and the merged metric states."""

    predictions: list[dict]
    boxes: DetectionMetrics
    masks: CocoState | None
    partitions: int


def evaluate_on_workers(rt, model_uri: str, flavor: str, records: SplitRecords, task: str, batch: int,
                        partitions: int = 0) -> WorkerEvaluation:
    """Predict ``records`` (an instance task) on the Spark workers in the driver's batches and
    merge the partitions' metric states."""
    settings = rt.config.deployment.scoring
    model_dir = stage_model(model_uri, rt.storage("models"))
    n = len(records.image_paths)
    groups = [json.dumps({"paths": records.image_paths[s:s + batch], "annotations": records.annotations[s:s + batch]})
              for s in range(0, n, batch)]
    parts = max(1, min(len(groups), default_partitions(rt.spark, partitions or settings.partitions)))
    evaluator = EvaluatePartition(model_uri, str(model_dir), flavor, task, tuple(records.category_ids),
                                  TaskResources(settings.threads_per_task, settings.use_gpu, concurrent_tasks(parts)))
    out = (rt.spark.createDataFrame(pd.DataFrame({"batch": groups})).repartition(parts)
           .mapInPandas(evaluator, EVAL_SCHEMA).toPandas())
    boxes, masks = DetectionMetrics(), CocoState("segm") if task == "segmentation" else None
    for blob in out["state"].dropna():
        state = pickle.loads(blob)  # written by EvaluatePartition in this job, never read from elsewhere
        boxes.merge(DetectionMetrics.from_state_dict(state["bbox"]))
        if masks is not None:
            masks.merge(CocoState.from_state_dict(state["segm"]))
    rows = out[out["prediction"].notna()]
    by_id = {int(i): prediction_from_body(i, json.loads(b)) for i, b in zip(rows["image_id"], rows["prediction"])}
    order = [int(a["image_id"]) for a in records.annotations]
    missing = [i for i in order if i not in by_id]
    if missing or len(by_id) != len(order):
        raise RuntimeError(f"the workers returned {len(by_id)} predictions for {len(order)} test images "
                           f"(missing e.g. image {missing[:3]})")
    return WorkerEvaluation([by_id[i] for i in order], boxes, masks, parts)
