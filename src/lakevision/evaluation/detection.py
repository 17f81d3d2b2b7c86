"""COCO box detection metrics, identical to pycocotools' COCOeval (iouType "bbox"), computed in C++.

Input semantics follow COCO exactly, including the cases other evaluators reject or "fix":

* ground truth may mark crowd regions (``iscrowd``): a detection inside one is neither a true nor
  a false positive; ``area`` (default: box area) decides the small/medium/large range;
* zero-area boxes (x1 == x2 or y1 == y2) are valid, as in COCO: they simply overlap nothing;
* an image with no predictions (empty arrays, or no entry at all) contributes only misses;
* at most 100 detections per image count, the highest scored (``maxDets``).

``map_iou`` is AP at ``iou_threshold``, which must be one of COCO's ten thresholds 0.50:0.05:0.95
(``ValueError`` otherwise): adding a threshold would change every averaged stat.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
from matplotlib.figure import Figure

from lakevision.figures import new_figure
from lakevision.evaluation._records import (
    AREA,
    ISCROWD,
    LABELS,
    SCORES,
    Columns,
    Field,
    image_id_of,
    stack_records,
)
from lakevision.evaluation.boxes import check_box_format, to_xywh
from lakevision.evaluation.coco import (
    ap_at,
    category_ids,
    evaluate,
    iou_threshold_index,
    precision_all_areas,
    summary,
)
from lakevision.evaluation.coco_state import Annotations, CocoState

BOXES = Field("boxes", (4,))
PREDICTION_FIELDS = (BOXES, LABELS, SCORES)
GROUND_TRUTH_FIELDS = (BOXES, LABELS, ISCROWD, AREA)
# A COCO results file: one entry per detection, boxes always xywh.
RESULT_FIELDS = (Field("bbox", (4,)), Field("category_id", integer=True, minimum=1), Field("score"))


def _checked_xywh(columns: Columns, name: str, box_format: str) -> np.ndarray:
    boxes = to_xywh(columns.values[name], box_format)
    columns.fail_first((boxes[:, 2:] < 0).any(axis=1), name, "has negative width or height (x2 < x1 or y2 < y1)")
    return boxes


def _is_result(entry: Mapping) -> bool:
    return (all(k in entry for k in ("bbox", "category_id", "score")) and np.shape(entry["bbox"]) == (4,)
            and np.ndim(entry["category_id"]) == 0 and np.ndim(entry["score"]) == 0)


def _result_columns(results: Sequence[Mapping]) -> Columns:
    row_image = [image_id_of(r, "predictions", i) for i, r in enumerate(results)]
    n = len(results)
    try:
        values = {
            "bbox": np.array([r["bbox"] for r in results], dtype=np.float64),
            "category_id": np.array([r["category_id"] for r in results], dtype=np.float64),
            "score": np.array([r["score"] for r in results], dtype=np.float64),
        }
        well_formed = [v.shape for v in values.values()] == [(n, 4), (n,), (n,)]
    except (KeyError, TypeError, ValueError):
        well_formed = False
    if not well_formed:
        # Only on failure: look for the entry at fault to name it.
        bad = next((i for i, r in enumerate(results) if not _is_result(r)), None)
        where = "a result" if bad is None else f"image_id {row_image[bad]}: result [{bad}]"
        raise ValueError(f"predictions: {where} needs 'bbox' (4 numbers), numeric 'category_id' and 'score'")
    return Columns(
        side="predictions",
        image_ids=list(dict.fromkeys(row_image)),
        row_image=np.asarray(row_image, dtype=np.int64),
        row_index=np.arange(n),
        values=values,
        provided={},
    )


def _detections(predictions: Sequence[Mapping], box_format: str) -> tuple[list[int], Annotations]:
    """Prediction image ids and detections; a COCO results list is recognised by ``category_id``."""
    if predictions and isinstance(predictions[0], Mapping) and "category_id" in predictions[0]:
        columns = _result_columns(predictions).validated(RESULT_FIELDS)
        boxes_name, labels_name, scores_name, box_format = "bbox", "category_id", "score", "xywh"
    else:
        columns = stack_records(predictions, "predictions", PREDICTION_FIELDS).validated(PREDICTION_FIELDS)
        boxes_name, labels_name, scores_name = "boxes", "labels", "scores"
    boxes = _checked_xywh(columns, boxes_name, box_format)
    return columns.image_ids, Annotations(
        image_id=columns.row_image,
        category_id=columns.values[labels_name],
        area=boxes[:, 2] * boxes[:, 3],  # what pycocotools' loadRes assigns to a box result
        iscrowd=np.zeros(len(boxes), dtype=np.int64),
        regions=boxes,
        score=columns.values[scores_name],
    )


def _ground_truth(ground_truth: Sequence[Mapping], box_format: str) -> tuple[list[int], Annotations]:
    columns = stack_records(ground_truth, "ground_truth", GROUND_TRUTH_FIELDS).validated(GROUND_TRUTH_FIELDS)
    boxes = _checked_xywh(columns, "boxes", box_format)
    return columns.image_ids, Annotations(
        image_id=columns.row_image,
        category_id=columns.values["labels"],
        area=np.where(columns.provided["area"], columns.values["area"], boxes[:, 2] * boxes[:, 3]),
        iscrowd=columns.values["iscrowd"],
        regions=boxes,
    )


class DetectionMetrics:
    """COCO bbox metrics over per-image dicts, accumulable per worker and mergeable.

    Predictions: ``image_id``, ``boxes`` (N, 4), ``labels`` (N,), ``scores`` (N,), or a COCO
    results list (``image_id``, ``category_id``, ``bbox`` xywh, ``score`` per detection). Ground
    truth: ``image_id``, ``boxes``, ``labels``, optional ``iscrowd`` and ``area``. Values may be
    tensors, arrays or lists; labels are COCO category ids (positive integers).
    """

    def __init__(self, iou_threshold: float = 0.5) -> None:
        self.iou_threshold = iou_threshold
        self._iou_index = iou_threshold_index(iou_threshold)
        self._state = CocoState("bbox")

    def update(self, predictions: Sequence[Mapping], ground_truth: Sequence[Mapping],
               box_format: str = "xyxy") -> None:
        """Validate and keep one batch; every image of the batch has exactly one ground-truth entry."""
        check_box_format(box_format)
        gt_ids, gt = _ground_truth(ground_truth, box_format)
        dt_ids, dt = _detections(predictions, box_format)
        known = set(gt_ids)
        unknown = next((i for i in dt_ids if i not in known), None)
        if unknown is not None:
            raise ValueError(f"predictions: image_id {unknown} has no ground-truth entry")
        # Boxes need no image size; (0, 0) keeps the state's image registry uniform with masks.
        self._state.merge(CocoState("bbox", dict.fromkeys(gt_ids, (0, 0)), [gt], [dt]))

    def merge(self, other: DetectionMetrics) -> None:
        """Take over the images accumulated by ``other`` (another worker's); image ids must not overlap."""
        self._state.merge(other._state)

    def state_dict(self) -> dict[str, Any]:
        """Picklable accumulated inputs (NumPy arrays and plain containers)."""
        return {"iou_threshold": self.iou_threshold, "coco": self._state.state_dict()}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> DetectionMetrics:
        metrics = cls(state["iou_threshold"])
        metrics._state = CocoState.from_state_dict(state["coco"])
        return metrics

    def compute(self, num_classes: Optional[int] = None) -> dict[str, Any]:
        """COCO stats of everything accumulated; see :func:`coco.category_ids` for ``num_classes``."""
        coco_eval = evaluate(self._state, category_ids(self._state, num_classes))
        return {**summary(coco_eval), "map_iou": ap_at(coco_eval, self._iou_index)}

    def compute_metrics(self, predictions: Sequence[Mapping], ground_truth: Sequence[Mapping],
                        num_classes: int, box_format: str = "xyxy") -> dict[str, Any]:
        """The 12 COCO stats (``map`` ... ``mar_large``), ``map_iou`` and ``map_per_class``."""
        metrics = DetectionMetrics(self.iou_threshold)
        metrics.update(predictions, ground_truth, box_format)
        return metrics.compute(num_classes)

    def plot_precision_recall_curve(self, predictions: Sequence[Mapping], ground_truth: Sequence[Mapping],
                                    class_names: Optional[list[str]] = None,
                                    box_format: str = "xyxy") -> Figure:
        """One interpolated PR curve per class with ground truth, at ``iou_threshold``.

        ``class_names[i]`` names category id ``i + 1``.
        """
        metrics = DetectionMetrics(self.iou_threshold)
        metrics.update(predictions, ground_truth, box_format)
        coco_eval = evaluate(metrics._state, category_ids(metrics._state, None))
        precision = precision_all_areas(coco_eval)[self._iou_index]
        fig, axes = new_figure(1, 1, (7, 5))
        ax = axes[0, 0]
        for k, cat in enumerate(coco_eval.params.catIds):
            if (precision[:, k] <= -1).all():
                continue  # no ground truth: COCO leaves the class undefined
            if class_names is not None and cat > len(class_names):
                raise ValueError(f"class_names has {len(class_names)} names but category id {cat} occurs")
            name = class_names[cat - 1] if class_names is not None else f"class {cat}"
            ap = float(np.mean(precision[:, k]))
            ax.plot(coco_eval.params.recThrs, precision[:, k], label=f"{name} (AP {ap:.3f})")
        ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02),
               title=f"Precision-recall at IoU {self.iou_threshold:.2f}")
        if ax.lines:
            ax.legend(loc="lower left")
        return fig
