"""Segmentation metrics: semantic (class maps) and instance (COCO "segm", identical to pycocotools).

The mode follows the input. Dicts with ``mask`` (an H x W map of classes 0..num_classes-1; ground
truth may mark ignored pixels with 255) give per-class IoU and Dice from one confusion matrix over
all pixels. Dicts with ``masks`` (N x H x W binary or COCO RLE dicts) give the 12 COCO mask stats,
evaluated like :mod:`detection` (shared code in :mod:`coco`); there ``labels`` are COCO category
ids and the ground-truth ``area`` defaults to the mask's pixel count, as in COCO files.

A class absent from both prediction and ground truth has no IoU or Dice (NaN) and is left out of
the means.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from lakevision.evaluation._arrays import to_numpy
from lakevision.figures import new_figure
from lakevision.evaluation._records import AREA, ISCROWD, LABELS, SCORES, Columns, Field, stack_records
from lakevision.evaluation.coco import category_ids, evaluate, summary
from lakevision.evaluation.coco_state import Annotations, CocoState
from lakevision.evaluation.masks import decode_masks, encode_masks, mask_areas

IGNORE_INDEX = 255
PREDICTION_FIELDS = (LABELS, SCORES)
GROUND_TRUTH_FIELDS = (LABELS, ISCROWD, AREA)


def _instances(records: Sequence[Mapping], side: str,
               fields: tuple[Field, ...]) -> tuple[Columns, list[dict], dict[int, tuple[int, int]]]:
    """Validated columns, one RLE per row and the (H, W) of each image whose masks give it."""
    columns = stack_records(records, side, fields).validated(fields)
    rles: list[dict] = []
    sizes: dict[int, tuple[int, int]] = {}
    for record, image_id in zip(records, columns.image_ids):
        if "masks" not in record:
            raise ValueError(f"{side}: image_id {image_id}: missing field 'masks'")
        encoded, size = encode_masks(record["masks"], side, image_id)
        count = len(to_numpy(record["labels"]))
        if len(encoded) != count:
            raise ValueError(f"{side}: image_id {image_id}: masks has {len(encoded)} masks but labels has {count}")
        rles.extend(encoded)
        if size is not None:
            sizes[image_id] = size
    return columns, rles, sizes


def _instance_state(predictions: Sequence[Mapping], ground_truth: Sequence[Mapping]) -> CocoState:
    gt, gt_rles, gt_sizes = _instances(ground_truth, "ground_truth", GROUND_TRUTH_FIELDS)
    dt, dt_rles, dt_sizes = _instances(predictions, "predictions", PREDICTION_FIELDS)
    known = set(gt.image_ids)
    for image_id in dt.image_ids:
        if image_id not in known:
            raise ValueError(f"predictions: image_id {image_id} has no ground-truth entry")
        if image_id in dt_sizes and image_id in gt_sizes and dt_sizes[image_id] != gt_sizes[image_id]:
            raise ValueError(f"predictions: image_id {image_id}: masks are {dt_sizes[image_id]} "
                             f"but ground-truth masks are {gt_sizes[image_id]}")
    ground = Annotations(
        image_id=gt.row_image,
        category_id=gt.values["labels"],
        area=np.where(gt.provided["area"], gt.values["area"], mask_areas(gt_rles)),
        iscrowd=gt.values["iscrowd"],
        regions=gt_rles,
    )
    detections = Annotations(
        image_id=dt.row_image,
        category_id=dt.values["labels"],
        area=mask_areas(dt_rles),  # as pycocotools' loadRes
        iscrowd=np.zeros(len(dt_rles), dtype=np.int64),
        regions=dt_rles,
        score=dt.values["scores"],
    )
    # An image with no masks on either side has no known size and needs none.
    sizes = {i: gt_sizes.get(i, dt_sizes.get(i, (0, 0))) for i in gt.image_ids}
    return CocoState("segm", sizes, [ground], [detections])


def _class_map(record: Mapping, side: str, position: int, num_classes: int, ignore: bool) -> np.ndarray:
    if "mask" not in record:
        raise ValueError(f"{side}[{position}]: missing field 'mask'")
    mask = to_numpy(record["mask"])
    if mask.ndim != 2:
        raise ValueError(f"{side}[{position}]: mask has shape {mask.shape}, expected (H, W)")
    mask = mask.astype(np.int64)
    bad = ((mask < 0) | (mask >= num_classes)) & ~(ignore & (mask == IGNORE_INDEX))
    if bad.any():
        row, col = np.unravel_index(int(np.argmax(bad)), mask.shape)
        allowed = f"outside [0, {num_classes})" + (f" and not the ignore index {IGNORE_INDEX}" if ignore else "")
        raise ValueError(f"{side}[{position}]: mask has class {mask[row, col]} at pixel ({row}, {col}), {allowed}")
    return mask


class SegmentationMetrics:
    """Semantic (``mask``) or instance (``masks``) segmentation metrics; see the module docstring."""

    def __init__(self, num_classes: int) -> None:
        self.num_classes = num_classes

    def compute_metrics(self, predictions: Sequence[Mapping], ground_truth: Sequence[Mapping]) -> dict[str, Any]:
        if ground_truth and isinstance(ground_truth[0], Mapping) and "masks" in ground_truth[0]:
            return self._instance_metrics(predictions, ground_truth)
        return self._semantic_metrics(predictions, ground_truth)

    def _instance_metrics(self, predictions: Sequence[Mapping], ground_truth: Sequence[Mapping]) -> dict[str, Any]:
        return self.compute_instance_state(self.instance_state(predictions, ground_truth))

    @staticmethod
    def instance_state(predictions: Sequence[Mapping], ground_truth: Sequence[Mapping]) -> CocoState:
        """The validated masks of a batch of images: states of disjoint image sets merge
        (:meth:`CocoState.merge`), so workers can each keep theirs and the driver evaluate once."""
        return _instance_state(predictions, ground_truth)

    def compute_instance_state(self, state: CocoState) -> dict[str, Any]:
        """The 12 COCO mask stats of a (merged) instance state."""
        return summary(evaluate(state, category_ids(state, self.num_classes)))

    def confusion_matrix(self, predictions: Sequence[Mapping], ground_truth: Sequence[Mapping]) -> np.ndarray:
        """Pixel counts [ground-truth class, predicted class] over all images, ignored pixels left out."""
        if len(predictions) != len(ground_truth):
            raise ValueError(f"predictions has {len(predictions)} entries but ground_truth has {len(ground_truth)}")
        n = self.num_classes
        confusion = np.zeros(n * n, dtype=np.int64)
        for i, (pred, gt) in enumerate(zip(predictions, ground_truth)):
            pred_map = _class_map(pred, "predictions", i, n, ignore=False)
            gt_map = _class_map(gt, "ground_truth", i, n, ignore=True)
            if pred_map.shape != gt_map.shape:
                raise ValueError(f"predictions[{i}]: mask has shape {pred_map.shape} "
                                 f"but the ground-truth mask has {gt_map.shape}")
            valid = gt_map != IGNORE_INDEX
            confusion += np.bincount(n * gt_map[valid] + pred_map[valid], minlength=n * n)
        return confusion.reshape(n, n)

    def _semantic_metrics(self, predictions: Sequence[Mapping], ground_truth: Sequence[Mapping]) -> dict[str, float]:
        confusion = self.confusion_matrix(predictions, ground_truth).astype(np.float64)
        tp = np.diag(confusion)
        errors = confusion.sum(axis=0) + confusion.sum(axis=1) - 2 * tp  # false positives + false negatives
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = tp / (tp + errors)
            dice = 2 * tp / (2 * tp + errors)
            pixel_accuracy = tp.sum() / confusion.sum()
        present = ~np.isnan(iou)
        result = {
            "miou": float(iou[present].mean()) if present.any() else float("nan"),
            "mean_dice": float(dice[present].mean()) if present.any() else float("nan"),
            "pixel_accuracy": float(pixel_accuracy),
        }
        result.update({f"iou_class_{k}": float(v) for k, v in enumerate(iou)})
        result.update({f"dice_class_{k}": float(v) for k, v in enumerate(dice)})
        return result

    def plot_segmentation_results(self, images: list[np.ndarray], predictions: list[dict], ground_truth: list[dict],
                                  class_names: Optional[list[str]] = None, max_images: int = 4) -> Figure:
        """Rows of (image + ground truth, image + prediction) overlays, colored by class.

        ``class_names`` are indexed by class for semantic maps and by category id - 1 for instances.
        """
        rows = min(max_images, len(images))
        if rows < 1:
            raise ValueError("nothing to plot: images is empty or max_images < 1")
        fig, axes = new_figure(rows, 2, (8, 4 * rows))
        shown: set[int] = set()
        for r in range(rows):
            image = _displayable(images[r])
            for ax, record, title in ((axes[r, 0], ground_truth[r], "ground truth"),
                                      (axes[r, 1], predictions[r], "prediction")):
                label_map = _label_map(record, image.shape[:2])
                shown.update(np.unique(label_map.compressed()).tolist())
                ax.imshow(image, cmap="gray" if image.ndim == 2 else None)
                ax.imshow(label_map % 20, cmap="tab20", vmin=0, vmax=19, alpha=0.5, interpolation="nearest")
                ax.set_title(title)
                ax.axis("off")
        if class_names is not None and shown:
            offset = 0 if "mask" in ground_truth[0] else 1
            handles = [Patch(color=colormaps["tab20"](k % 20), label=class_names[k - offset]) for k in sorted(shown)]
            fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 5))
        return fig


def _displayable(image: Any) -> np.ndarray:
    arr = to_numpy(image)
    if arr.ndim == 3 and arr.shape[0] in (1, 3) and arr.shape[-1] not in (1, 3):
        arr = arr.transpose(1, 2, 0)  # CHW tensors
    arr = arr.squeeze(-1) if arr.ndim == 3 and arr.shape[-1] == 1 else arr
    return arr if arr.dtype == np.uint8 else np.clip(arr.astype(np.float64), 0, 1)


def _label_map(record: Mapping, shape: tuple[int, int]) -> np.ma.MaskedArray:
    """Class per pixel, masked where nothing is drawn (ignored pixels, no instance)."""
    if "mask" in record:
        classes = to_numpy(record["mask"]).astype(np.int64)
        return np.ma.masked_equal(classes, IGNORE_INDEX)
    classes = np.full(shape, -1, dtype=np.int64)
    for mask, label in zip(decode_masks(record["masks"]), to_numpy(record["labels"]).tolist()):
        classes[mask.astype(bool)] = int(label)
    return np.ma.masked_less(classes, 0)
