"""DetectionMetrics against pycocotools' COCOeval run directly on the same data, stat for stat."""

from __future__ import annotations

import contextlib
import copy
import io
import pickle

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lakevision.evaluation import DetectionMetrics
from lakevision.evaluation.coco import STAT_KEYS
from .coco_synthetic import coco_dataset, coco_results, synthetic_detections

TOL = 1e-9
NUM_CLASSES = 5  # categories 1..5: 4 occurs only in predictions, 5 nowhere


def hard_case_data(seed: int = 0, masks: bool = False, image_size: tuple[int, int] = (480, 640)):
    """Crowd regions, every area range, images with > 100 detections, images without predictions,
    a class predicted but absent from ground truth, and tied scores."""
    main = synthetic_detections(150, crowd_fraction=0.1, masks=masks, image_size=image_size, seed=seed)
    crowded = synthetic_detections(3, gt_per_image=20, dets_per_image=160, masks=masks, image_size=image_size,
                                   seed=seed + 1)
    gts, preds = main.ground_truth, main.predictions
    for offset, (gt, dt) in enumerate(zip(crowded.ground_truth, crowded.predictions)):
        gt["image_id"] = dt["image_id"] = 1000 + offset
        gts.append(gt)
        preds.append(dt)
    for dt in preds:
        dt["scores"] = np.round(dt["scores"], 2)  # ties, broken the way pycocotools breaks them
    rng = np.random.default_rng(seed)
    for dt in preds[:40]:
        dt["labels"] = np.where(rng.random(len(dt["labels"])) < 0.2, 4, dt["labels"])
    height, width = image_size
    for dt in preds[40:45]:
        dt.update(boxes=np.zeros((0, 4)), labels=np.zeros(0, dtype=np.int64), scores=np.zeros(0))
        if masks:
            dt["masks"] = np.zeros((0, height, width), dtype=np.uint8)
    del preds[45:50]  # images without any prediction entry
    return gts, preds, image_size


def pycocotools_eval(gts, preds, image_size, iou_type="bbox") -> COCOeval:
    dataset = coco_dataset(gts, range(1, NUM_CLASSES + 1), image_size)
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        coco_eval = COCOeval(gt, gt.loadRes(coco_results(preds)), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def _mean_valid(values: np.ndarray) -> float:
    return float(np.mean(values[values > -1])) if (values > -1).any() else -1.0


def assert_matches_pycocotools(result: dict, reference: COCOeval, iou_index: int | None = 0) -> None:
    for key, expected in zip(STAT_KEYS, reference.stats):
        assert result[key] == pytest.approx(expected, abs=TOL), key
    precision = reference.eval["precision"][:, :, :, 0, -1]
    expected_per_class = {c: _mean_valid(precision[:, :, k]) for k, c in enumerate(reference.params.catIds)}
    assert result["map_per_class"].keys() == expected_per_class.keys()
    for cat, expected in expected_per_class.items():
        assert result["map_per_class"][cat] == pytest.approx(expected, abs=TOL), cat
    if iou_index is not None:
        assert result["map_iou"] == pytest.approx(_mean_valid(precision[iou_index]), abs=TOL)


@pytest.fixture(scope="module")
def data():
    return hard_case_data()


@pytest.fixture(scope="module")
def reference(data):
    return pycocotools_eval(*data)


def test_data_covers_the_hard_cases(data, reference):
    gts, preds, _ = data
    areas = np.concatenate([np.prod(g["boxes"][:, 2:] - g["boxes"][:, :2], axis=1) for g in gts])
    assert (areas < 32**2).any() and ((areas > 32**2) & (areas < 96**2)).any() and (areas > 96**2).any()
    assert any(g["iscrowd"].any() for g in gts)
    assert max(len(p["scores"]) for p in preds) > 100
    assert len(preds) < len(gts) and any(len(p["scores"]) == 0 for p in preds)
    per_class = reference.eval["precision"][:, :, :, 0, -1]
    assert (per_class[:, :, 3] == -1).all() and (per_class[:, :, 4] == -1).all()  # classes 4, 5: no GT


def test_bbox_stats_equal_pycocotools(data, reference):
    gts, preds, _ = data
    result = DetectionMetrics().compute_metrics(preds, gts, num_classes=NUM_CLASSES)
    assert_matches_pycocotools(result, reference)
    assert result["map_per_class"][4] == -1 and result["map_per_class"][5] == -1
    assert 0 < result["map"] < 1


def test_torch_tensors_and_lists_give_the_same_stats(data, reference):
    gts, preds, _ = data
    as_torch = [{k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in p.items()} for p in preds]
    as_lists = [{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in g.items()} for g in gts]
    result = DetectionMetrics().compute_metrics(as_torch, as_lists, num_classes=NUM_CLASSES)
    assert_matches_pycocotools(result, reference)


def test_coco_results_list_as_predictions(data, reference):
    gts, preds, _ = data
    result = DetectionMetrics().compute_metrics(coco_results(preds), gts, num_classes=NUM_CLASSES)
    assert_matches_pycocotools(result, reference)


def test_explicit_area_decides_the_area_range(data):
    gts, preds, image_size = data
    gts = copy.deepcopy(gts)
    for gt in gts:
        gt["area"] = np.full(len(gt["labels"]), 50.0 ** 2)  # everything "medium"
    result = DetectionMetrics().compute_metrics(preds, gts, num_classes=NUM_CLASSES)
    assert_matches_pycocotools(result, pycocotools_eval(gts, preds, image_size))
    assert result["map_small"] == -1 and result["map_large"] == -1


@pytest.mark.parametrize("box_format", ["xywh", "cxcywh"])
def test_box_formats(data, reference, box_format):
    gts, preds, _ = data

    def convert(records):
        out = []
        for r in records:
            xy, wh = r["boxes"][:, :2], r["boxes"][:, 2:] - r["boxes"][:, :2]
            out.append({**r, "boxes": np.concatenate([xy if box_format == "xywh" else xy + wh / 2, wh], axis=1)})
        return out

    result = DetectionMetrics().compute_metrics(convert(preds), convert(gts), NUM_CLASSES, box_format=box_format)
    assert_matches_pycocotools(result, reference)


def test_map_iou_at_another_threshold(data, reference):
    gts, preds, _ = data
    result = DetectionMetrics(iou_threshold=0.75).compute_metrics(preds, gts, num_classes=NUM_CLASSES)
    assert_matches_pycocotools(result, reference, iou_index=5)
    assert result["map_iou"] == pytest.approx(result["map_75"], abs=TOL)


def test_iou_threshold_must_be_a_coco_threshold():
    with pytest.raises(ValueError, match=r"iou_threshold must be one of COCO's thresholds.*0\.6"):
        DetectionMetrics(iou_threshold=0.6 + 1e-3)


def test_merged_halves_equal_the_whole(data, reference):
    gts, preds, _ = data
    ids_a = {g["image_id"] for g in gts[::2]}
    workers = []
    for ids in (ids_a, {g["image_id"] for g in gts} - ids_a):
        worker = DetectionMetrics()
        # Two batches per worker, as a data loader would deliver them.
        half_gts = [g for g in gts if g["image_id"] in ids]
        for batch in (half_gts[:20], half_gts[20:]):
            batch_ids = {g["image_id"] for g in batch}
            worker.update([p for p in preds if p["image_id"] in batch_ids], batch)
        workers.append(pickle.loads(pickle.dumps(worker.state_dict())))  # as sent between processes
    merged = DetectionMetrics.from_state_dict(workers[0])
    merged.merge(DetectionMetrics.from_state_dict(workers[1]))
    assert_matches_pycocotools(merged.compute(num_classes=NUM_CLASSES), reference)


def test_merge_rejects_overlapping_images(data):
    gts, preds, _ = data
    a, b = DetectionMetrics(), DetectionMetrics()
    a.update(preds[:10], gts[:10])
    b.update([], gts[9:12])
    with pytest.raises(ValueError, match=rf"image_id {gts[9]['image_id']} is already in this evaluation state"):
        a.merge(b)
    with pytest.raises(ValueError, match=rf"image_id {gts[0]['image_id']} is already"):
        a.update([], gts[:1])


def test_no_predictions_at_all_gives_zero_ap(data):
    gts, _, _ = data
    result = DetectionMetrics().compute_metrics([], gts, num_classes=3)
    assert all(result[k] == 0 for k in STAT_KEYS)
    assert result["map_per_class"] == {1: 0.0, 2: 0.0, 3: 0.0}


def test_zero_area_boxes_follow_coco(data):
    """A zero-area box is valid and overlaps nothing, as in pycocotools."""
    gts, preds, image_size = data
    gts, preds = copy.deepcopy(gts[:10]), copy.deepcopy(preds[:10])
    gts[0]["boxes"][0, 2] = gts[0]["boxes"][0, 0]
    preds[0]["boxes"][0, 3] = preds[0]["boxes"][0, 1]
    result = DetectionMetrics().compute_metrics(preds, gts, num_classes=NUM_CLASSES)
    assert_matches_pycocotools(result, pycocotools_eval(gts, preds, image_size))


def _good():
    gt = [{"image_id": 7, "boxes": [[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 30.0]], "labels": [1, 2]}]
    dt = [{"image_id": 7, "boxes": [[1.0, 1.0, 9.0, 9.0], [4.0, 4.0, 22.0, 31.0]], "labels": [1, 2],
           "scores": [0.9, 0.8]}]
    return dt, gt


def _with(side: str, **changes):
    dt, gt = _good()
    (dt if side == "dt" else gt)[0].update(changes)
    return dt, gt


@pytest.mark.parametrize("inputs, message", [
    (([{"image_id": 8, "boxes": [], "labels": [], "scores": []}], _good()[1]),
     r"predictions: image_id 8 has no ground-truth entry"),
    (_with("dt", scores=[0.9, float("nan")]), r"predictions: image_id 7: scores\[1\] is NaN or infinite"),
    (_with("dt", boxes=[[1.0, 1.0, 9.0, 9.0], [4.0, float("inf"), 22.0, 31.0]]),
     r"predictions: image_id 7: boxes\[1\] is NaN or infinite"),
    (_with("gt", boxes=[[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 4.0, 30.0]]),
     r"ground_truth: image_id 7: boxes\[1\] has negative width or height \(x2 < x1"),
    (_with("dt", boxes=[[1.0, 1.0, 9.0], [4.0, 4.0, 22.0]]),
     r"predictions: image_id 7: boxes has shape \(2, 3\), expected \(N, 4\)"),
    (_with("dt", scores=[0.9]), r"predictions: image_id 7: scores has shape \(1,\), expected \(2\)"),
    (_with("gt", labels=[[1, 2]]), r"ground_truth: image_id 7: labels has shape \(1, 2\), expected \(2\)"),
    (_with("gt", labels=[1, 0]), r"ground_truth: image_id 7: labels\[1\] is below 1"),
    (_with("gt", labels=[1, 2.5]), r"ground_truth: image_id 7: labels\[1\] is not an integer"),
    (_with("gt", iscrowd=[0, 2]), r"ground_truth: image_id 7: iscrowd\[1\] is above 1"),
    (([{"image_id": 7, "boxes": [], "labels": []}], _good()[1]),
     r"predictions: image_id 7: missing field 'scores'"),
    ((_good()[0], _good()[1] * 2), r"ground_truth: image_id 7 appears more than once"),
    (([{"image_id": 7, "category_id": 1, "bbox": [0, 0, 1], "score": 0.5}], _good()[1]),
     r"predictions: image_id 7: result \[0\] needs 'bbox' \(4 numbers\), numeric"),
    (([{"image_id": 7, "category_id": 1, "bbox": [0, 0, 1, float("nan")], "score": 0.5}], _good()[1]),
     r"predictions: image_id 7: bbox\[0\] is NaN or infinite"),
])
def test_bad_input_names_image_and_field(inputs, message):
    with pytest.raises(ValueError, match=message):
        DetectionMetrics().compute_metrics(*inputs, num_classes=3)


def test_unknown_box_format():
    with pytest.raises(ValueError, match=r"box_format must be one of \('xyxy', 'xywh', 'cxcywh'\), got 'yxyx'"):
        DetectionMetrics().compute_metrics(*_good(), num_classes=3, box_format="yxyx")


def test_too_many_categories_for_num_classes():
    dt, gt = _good()
    gt[0]["labels"] = dt[0]["labels"] = [17, 90]
    with pytest.raises(ValueError, match=r"labels use 2 distinct category ids but num_classes is 1"):
        DetectionMetrics().compute_metrics(dt, gt, num_classes=1)


def test_precision_recall_figure_has_one_line_per_class_with_ground_truth(data):
    gts, preds, _ = data
    fig = DetectionMetrics().plot_precision_recall_curve(preds, gts, class_names=["a", "b", "c", "d"])
    assert isinstance(fig, Figure) and len(fig.axes) == 1
    lines = fig.axes[0].lines
    assert [line.get_label().split(" ")[0] for line in lines] == ["a", "b", "c"]  # "d" has no ground truth
    assert all(len(line.get_xdata()) == 101 for line in lines)
