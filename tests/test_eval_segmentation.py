"""SegmentationMetrics: instance masks against pycocotools' COCOeval ("segm"), class maps against
scikit-learn's pixel-wise metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from pycocotools import mask as mask_utils
from sklearn.metrics import accuracy_score, f1_score, jaccard_score

from lakevision.evaluation import SegmentationMetrics
from tests.test_eval_detection import NUM_CLASSES, assert_matches_pycocotools, hard_case_data, pycocotools_eval

TOL = 1e-9
IMAGE_SIZE = (160, 192)  # small enough for cheap masks, large enough for "large" instances


@pytest.fixture(scope="module")
def instances():
    return hard_case_data(seed=3, masks=True, image_size=IMAGE_SIZE)


@pytest.fixture(scope="module")
def reference(instances):
    return pycocotools_eval(*instances, iou_type="segm")


def test_instance_stats_equal_pycocotools(instances, reference):
    gts, preds, _ = instances
    assert any(g["iscrowd"].any() for g in gts) and max(len(p["scores"]) for p in preds) > 100
    areas = np.concatenate([g["masks"].sum(axis=(1, 2)) for g in gts])
    assert (areas < 32**2).any() and ((areas > 32**2) & (areas < 96**2)).any() and (areas > 96**2).any()
    result = SegmentationMetrics(NUM_CLASSES).compute_metrics(preds, gts)
    assert_matches_pycocotools(result, reference, iou_index=None)
    assert result["map_per_class"][4] == -1 and 0 < result["map"] < 1


def test_rle_and_tensor_masks_give_the_same_stats(instances, reference):
    gts, preds, _ = instances

    def rle(masks):
        encoded = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
        return [{"size": r["size"], "counts": r["counts"].decode()} for r in encoded]  # as read from JSON

    as_rle = [{**g, "masks": rle(g["masks"])} for g in gts]
    as_torch = [{**p, "masks": torch.from_numpy(p["masks"]).bool()} for p in preds]
    result = SegmentationMetrics(NUM_CLASSES).compute_metrics(as_torch, as_rle)
    assert_matches_pycocotools(result, reference, iou_index=None)


def _instance_inputs():
    masks = np.zeros((2, 8, 8), dtype=np.uint8)
    masks[0, :4, :4] = masks[1, 4:, 4:] = 1
    gt = [{"image_id": 3, "masks": masks, "labels": [1, 2]}]
    dt = [{"image_id": 3, "masks": masks, "labels": [1, 2], "scores": [0.9, 0.5]}]
    return dt, gt


@pytest.mark.parametrize("change, message", [
    ({"image_id": 4}, r"predictions: image_id 4 has no ground-truth entry"),
    ({"masks": np.zeros((1, 8, 8))}, r"predictions: image_id 3: masks has 1 masks but labels has 2"),
    ({"masks": np.full((2, 8, 8), 2)}, r"predictions: image_id 3: masks\[0\] is not binary"),
    ({"masks": np.zeros((2, 8, 9))}, r"predictions: image_id 3: masks are \(8, 9\) but ground-truth masks are \(8, 8\)"),
    ({"masks": np.zeros((8, 8))}, r"predictions: image_id 3: masks has shape \(8, 8\), expected \(N, H, W\)"),
    ({"scores": [0.9, float("inf")]}, r"predictions: image_id 3: scores\[1\] is NaN or infinite"),
    ({"masks": [{"counts": "abc"}, {"counts": "abc"}]}, r"predictions: image_id 3: masks\[0\] is not a COCO RLE"),
])
def test_bad_instance_input_names_image_and_field(change, message):
    dt, gt = _instance_inputs()
    dt[0].update(change)
    with pytest.raises(ValueError, match=message):
        SegmentationMetrics(2).compute_metrics(dt, gt)


@pytest.fixture(scope="module")
def semantic():
    """Class maps with 4 classes, class 3 in neither prediction nor ground truth, ignored GT pixels."""
    rng = np.random.default_rng(7)
    gts, preds = [], []
    for _ in range(5):
        gt = rng.integers(0, 3, (40, 60))
        pred = np.where(rng.random(gt.shape) < 0.7, gt, rng.integers(0, 3, gt.shape))
        gt[rng.random(gt.shape) < 0.05] = 255
        gts.append({"mask": gt.astype(np.uint8)})
        preds.append({"mask": torch.from_numpy(pred)})
    return preds, gts


def test_semantic_metrics_equal_sklearn(semantic):
    preds, gts = semantic
    result = SegmentationMetrics(4).compute_metrics(preds, gts)
    true = np.concatenate([g["mask"].ravel() for g in gts]).astype(np.int64)
    pred = np.concatenate([p["mask"].numpy().ravel() for p in preds])
    keep = true != 255
    true, pred = true[keep], pred[keep]
    iou = jaccard_score(true, pred, labels=[0, 1, 2], average=None)
    dice = f1_score(true, pred, labels=[0, 1, 2], average=None)
    for k in range(3):
        assert result[f"iou_class_{k}"] == pytest.approx(iou[k], abs=TOL)
        assert result[f"dice_class_{k}"] == pytest.approx(dice[k], abs=TOL)
    assert np.isnan(result["iou_class_3"]) and np.isnan(result["dice_class_3"])  # absent: left out of means
    assert result["miou"] == pytest.approx(iou.mean(), abs=TOL)
    assert result["mean_dice"] == pytest.approx(dice.mean(), abs=TOL)
    assert result["pixel_accuracy"] == pytest.approx(accuracy_score(true, pred), abs=TOL)


@pytest.mark.parametrize("side, mask, message", [
    ("pred", np.full((4, 4), 255), r"predictions\[1\]: mask has class 255 at pixel \(0, 0\), outside \[0, 3\)$"),
    ("gt", np.pad(np.full((1, 1), 7), ((2, 1), (1, 2))),
     r"ground_truth\[1\]: mask has class 7 at pixel \(2, 1\), outside \[0, 3\) and not the ignore index 255"),
    ("pred", np.zeros((4, 5)), r"predictions\[1\]: mask has shape \(4, 5\) but the ground-truth mask has \(4, 4\)"),
    ("gt", np.zeros((2, 4, 4)), r"ground_truth\[1\]: mask has shape \(2, 4, 4\), expected \(H, W\)"),
])
def test_bad_semantic_input_names_image_and_pixel(side, mask, message):
    preds = [{"mask": np.zeros((4, 4))} for _ in range(2)]
    gts = [{"mask": np.zeros((4, 4))} for _ in range(2)]
    (preds if side == "pred" else gts)[1]["mask"] = mask
    with pytest.raises(ValueError, match=message):
        SegmentationMetrics(3).compute_metrics(preds, gts)


def test_semantic_length_mismatch():
    with pytest.raises(ValueError, match=r"predictions has 1 entries but ground_truth has 2"):
        SegmentationMetrics(3).compute_metrics([{"mask": np.zeros((2, 2))}], [{"mask": np.zeros((2, 2))}] * 2)


@pytest.mark.parametrize("max_images", [2, 10])
def test_semantic_figure_has_two_panels_per_image(semantic, max_images):
    preds, gts = semantic
    images = [np.random.default_rng(k).random((40, 60, 3)) for k in range(len(gts))]
    fig = SegmentationMetrics(4).plot_segmentation_results(images, preds, gts, class_names=list("abcd"),
                                                           max_images=max_images)
    assert isinstance(fig, Figure) and len(fig.axes) == 2 * min(max_images, len(gts))
    assert [ax.get_title() for ax in fig.axes[:2]] == ["ground truth", "prediction"]
    assert {t.get_text() for t in fig.legends[0].get_texts()} == {"a", "b", "c"}


def test_instance_figure(instances):
    gts, preds, _ = instances
    images = [np.zeros((*IMAGE_SIZE, 3), dtype=np.uint8)] * 3
    fig = SegmentationMetrics(NUM_CLASSES).plot_segmentation_results(images, preds[:3], gts[:3])
    assert isinstance(fig, Figure) and len(fig.axes) == 6
    assert all(len(ax.images) == 2 for ax in fig.axes)  # the image and its overlay
