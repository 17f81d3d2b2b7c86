"""COCO evaluation of a :class:`CocoState` with faster-coco-eval, mapped to flat metric names.

faster-coco-eval's ``COCOeval_faster`` runs pycocotools' per-image matching and accumulation in
C++ and gives the same 12 summary numbers bit for bit (tests/test_eval_detection.py checks this
against pycocotools itself). The COCO objects are built in memory from the state's columns with
one list comprehension per side: no JSON round trip and no per-annotation NumPy calls.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

from lakevision.evaluation.coco_state import Annotations, CocoState

# The order of COCOeval.stats.
STAT_KEYS = (
    "map", "map_50", "map_75", "map_small", "map_medium", "map_large",
    "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large",
)
# COCOeval's own thresholds (linspace, not arange: see pycocotools' Params).
IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)


def iou_threshold_index(iou_threshold: float) -> int:
    """Position of ``iou_threshold`` among COCO's 10 thresholds; others would change every stat."""
    hits = np.flatnonzero(np.isclose(IOU_THRESHOLDS, iou_threshold, rtol=0.0, atol=1e-9))
    if hits.size == 0:
        raise ValueError(
            f"iou_threshold must be one of COCO's thresholds 0.50, 0.55, ..., 0.95, got {iou_threshold}"
        )
    return int(hits[0])


def category_ids(state: CocoState, num_classes: int | None) -> list[int]:
    """Categories to evaluate.

    Labels are COCO category ids. When they all fall in 1..num_classes (the torchvision and
    contiguous-COCO convention) every id in that range is a category, so per-class results list
    classes that never occur; otherwise the ids that occur are the categories and there may be at
    most ``num_classes`` of them. Without ``num_classes`` the ids that occur are used.
    """
    seen = state.category_ids()
    if num_classes is None:
        return seen.tolist()
    if seen.size == 0 or seen[-1] <= num_classes:  # ids are >= 1 (validated)
        return list(range(1, num_classes + 1))
    if seen.size > num_classes:
        raise ValueError(f"labels use {seen.size} distinct category ids but num_classes is {num_classes}")
    return seen.tolist()


def _coco_annotations(batch: Annotations, region_key: str) -> list[dict]:
    regions = batch.regions.tolist() if isinstance(batch.regions, np.ndarray) else batch.regions
    # Ids start at 1: COCOeval uses annotation id 0 as its "unmatched" marker.
    columns = zip(
        range(1, len(batch) + 1), batch.image_id.tolist(), batch.category_id.tolist(),
        batch.area.tolist(), batch.iscrowd.tolist(), regions,
    )
    annotations = [
        {"id": i, "image_id": img, "category_id": cat, "area": area, "iscrowd": crowd, region_key: region}
        for i, img, cat, area, crowd, region in columns
    ]
    if batch.score is not None:
        for annotation, score in zip(annotations, batch.score.tolist()):
            annotation["score"] = score
    return annotations


def _coco(images: list[dict], categories: list[dict], annotations: list[dict]) -> COCO:
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations, "categories": categories}
    coco.createIndex()
    return coco


@contextmanager
def _gc_paused() -> Iterator[None]:
    # Building ~10^5 annotation dicts would trigger repeated full collections that find nothing.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def evaluate(state: CocoState, categories: Sequence[int]) -> COCOeval_faster:
    """Run COCOeval (evaluate, accumulate, summarize) on everything in ``state``."""
    with _gc_paused():
        return _evaluate(state, categories)


def _evaluate(state: CocoState, categories: Sequence[int]) -> COCOeval_faster:
    region_key = "bbox" if state.iou_type == "bbox" else "segmentation"
    images = [{"id": i, "height": h, "width": w} for i, (h, w) in state.image_sizes.items()]
    cats = [{"id": int(c)} for c in categories]
    coco_eval = COCOeval_faster(
        _coco(images, cats, _coco_annotations(state.all_ground_truth(), region_key)),
        _coco(images, cats, _coco_annotations(state.all_detections(), region_key)),
        iouType=state.iou_type,
        print_function=lambda *_: None,
    )
    coco_eval.evaluate()
    coco_eval.accumulate()
    coco_eval.summarize()
    return coco_eval


def _mean_valid(values: np.ndarray) -> float:
    # COCOeval's convention: -1 marks "no ground truth", and a mean over nothing is -1.
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0


def precision_all_areas(coco_eval: COCOeval_faster) -> np.ndarray:
    """Interpolated precision [IoU threshold, recall threshold, category], area all, maxDets 100."""
    return coco_eval.eval["precision"][:, :, :, 0, -1]


def summary(coco_eval: COCOeval_faster) -> dict[str, float | dict[int, float]]:
    """The 12 COCO stats plus ``map_per_class`` (AP@[.5:.95] keyed by category id, -1 without GT)."""
    precision = precision_all_areas(coco_eval)
    result: dict[str, float | dict[int, float]] = dict(zip(STAT_KEYS, map(float, coco_eval.stats[:12])))
    result["map_per_class"] = {
        int(cat): _mean_valid(precision[:, :, k]) for k, cat in enumerate(coco_eval.params.catIds)
    }
    return result


def ap_at(coco_eval: COCOeval_faster, iou_index: int) -> float:
    """AP at one IoU threshold, area all, maxDets 100: COCOeval.summarize's formula for AP50/AP75."""
    return _mean_valid(precision_all_areas(coco_eval)[iou_index])
