"""Random detection results with known COCO equivalents, for tests, benchmarks and demos.

``synthetic_detections`` makes per-image ground truth and predictions in the dict form the metric
classes take (xyxy boxes, optional elliptic instance masks): boxes of every COCO area range, crowd
regions, jittered true positives with mostly right labels, and false positives. ``coco_dataset``
and ``coco_results`` write the same data as a COCO dataset and a COCO results list with plain
per-instance loops, independent of the metric classes' vectorized conversion, so they can feed
pycocotools as a reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pycocotools import mask as mask_utils


@dataclass
class SyntheticDetections:
    ground_truth: list[dict]  # image_id, boxes (xyxy), labels, iscrowd[, masks]
    predictions: list[dict]  # image_id, boxes (xyxy), labels, scores[, masks]
    image_size: tuple[int, int]  # (height, width)


def _random_boxes(rng: np.random.Generator, n: int, height: int, width: int) -> np.ndarray:
    # Log-uniform areas from a few pixels to most of the image cover all three COCO area ranges.
    area = np.exp(rng.uniform(np.log(16), np.log((0.9 * min(height, width)) ** 2), n))
    aspect = np.exp(rng.uniform(np.log(0.5), np.log(2), n))
    w = np.minimum(np.sqrt(area * aspect), width - 1)
    h = np.minimum(np.sqrt(area / aspect), height - 1)
    x = rng.uniform(0, width - w)
    y = rng.uniform(0, height - h)
    return np.stack([x, y, x + w, y + h], axis=1)


def _ellipses(boxes: np.ndarray, height: int, width: int) -> np.ndarray:
    """(N, H, W) uint8 masks of the ellipses inscribed in xyxy ``boxes``."""
    cy = (np.arange(height) + 0.5)[None, :, None]
    cx = (np.arange(width) + 0.5)[None, None, :]
    x1, y1, x2, y2 = (boxes[:, i, None, None] for i in range(4))
    rx = np.maximum((x2 - x1) / 2, 0.5)
    ry = np.maximum((y2 - y1) / 2, 0.5)
    return ((((cx - (x1 + x2) / 2) / rx) ** 2 + ((cy - (y1 + y2) / 2) / ry) ** 2) <= 1).astype(np.uint8)


def _split(image_of: np.ndarray, num_images: int, columns: dict[str, np.ndarray]) -> list[dict[str, np.ndarray]]:
    order = np.argsort(image_of, kind="stable")
    cuts = np.cumsum(np.bincount(image_of, minlength=num_images))[:-1]
    per_column = {name: np.split(values[order], cuts) for name, values in columns.items()}
    return [{name: parts[i] for name, parts in per_column.items()} for i in range(num_images)]


def synthetic_detections(num_images: int, gt_per_image: float = 5.0, dets_per_image: float = 7.0,
                         num_classes: int = 3, crowd_fraction: float = 0.05, recall: float = 0.75,
                         image_size: tuple[int, int] = (480, 640), masks: bool = False,
                         seed: int = 0) -> SyntheticDetections:
    """``num_images`` images (ids 1..num_images) with on average ``gt_per_image`` ground-truth
    instances (categories 1..num_classes) and ``dets_per_image`` detections."""
    rng = np.random.default_rng(seed)
    height, width = image_size
    gt_image = np.repeat(np.arange(num_images), rng.poisson(gt_per_image, num_images))
    gt_boxes = _random_boxes(rng, len(gt_image), height, width)
    gt_labels = rng.integers(1, num_classes + 1, len(gt_image))
    iscrowd = (rng.random(len(gt_image)) < crowd_fraction).astype(np.int64)

    # True positives: jittered copies of a fraction of the ground truth, mostly with its label.
    found = rng.random(len(gt_image)) < recall
    centre = (gt_boxes[found, :2] + gt_boxes[found, 2:]) / 2
    size = (gt_boxes[found, 2:] - gt_boxes[found, :2]) * np.exp(rng.normal(0, 0.15, (found.sum(), 2)))
    centre = centre + rng.normal(0, 0.08, centre.shape) * size
    tp_boxes = np.concatenate([centre - size / 2, centre + size / 2], axis=1)
    tp_labels = np.where(rng.random(found.sum()) < 0.9, gt_labels[found], rng.integers(1, num_classes + 1, found.sum()))
    fp_rate = max(dets_per_image - recall * gt_per_image, 0.0)
    fp_image = np.repeat(np.arange(num_images), rng.poisson(fp_rate, num_images))
    dt_image = np.concatenate([gt_image[found], fp_image])
    dt_boxes = np.concatenate([tp_boxes, _random_boxes(rng, len(fp_image), height, width)])
    dt_labels = np.concatenate([tp_labels, rng.integers(1, num_classes + 1, len(fp_image))])
    dt_scores = np.concatenate([rng.beta(5, 2, found.sum()), rng.beta(2, 5, len(fp_image))])

    ground_truth = _split(gt_image, num_images, {"boxes": gt_boxes, "labels": gt_labels, "iscrowd": iscrowd})
    predictions = _split(dt_image, num_images, {"boxes": dt_boxes, "labels": dt_labels, "scores": dt_scores})
    for image_id, (gt, dt) in enumerate(zip(ground_truth, predictions), start=1):
        gt["image_id"] = dt["image_id"] = image_id
        if masks:
            gt["masks"] = _ellipses(gt["boxes"], height, width)
            dt["masks"] = _ellipses(dt["boxes"], height, width)
    return SyntheticDetections(ground_truth, predictions, image_size)


def _rle(mask: np.ndarray) -> dict:
    return mask_utils.encode(np.asfortranarray(mask, dtype=np.uint8))


def coco_dataset(ground_truth: Sequence[dict], categories: Sequence[int], image_size: tuple[int, int]) -> dict:
    """A COCO dataset dict of per-image ground truth with xyxy boxes (and masks, area if present)."""
    annotations = []
    for gt in ground_truth:
        crowd = gt.get("iscrowd", np.zeros(len(gt["labels"]), dtype=int))
        for k, (box, label) in enumerate(zip(gt["boxes"].tolist(), gt["labels"].tolist())):
            x1, y1, x2, y2 = box
            annotation = {"id": len(annotations) + 1, "image_id": gt["image_id"], "category_id": label,
                          "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1),
                          "iscrowd": int(crowd[k])}
            if "masks" in gt:
                annotation["segmentation"] = _rle(gt["masks"][k])
                annotation["area"] = float(mask_utils.area(annotation["segmentation"]))
            if "area" in gt:
                annotation["area"] = float(gt["area"][k])
            annotations.append(annotation)
    height, width = image_size
    return {
        "images": [{"id": gt["image_id"], "height": height, "width": width} for gt in ground_truth],
        "annotations": annotations,
        "categories": [{"id": c} for c in categories],
    }


def coco_results(predictions: Sequence[dict]) -> list[dict]:
    """A COCO results list (xywh boxes, RLE masks if present) of per-image predictions."""
    results = []
    for dt in predictions:
        for k, (box, label, score) in enumerate(zip(dt["boxes"].tolist(), dt["labels"].tolist(),
                                                    dt["scores"].tolist())):
            x1, y1, x2, y2 = box
            result = {"image_id": dt["image_id"], "category_id": label, "score": score}
            if "masks" in dt:
                result["segmentation"] = _rle(dt["masks"][k])
            else:
                result["bbox"] = [x1, y1, x2 - x1, y2 - y1]
            results.append(result)
    return results
