"""The evaluate job on real MLflow models and real Delta tables; metrics re-derived with pycocotools."""

from __future__ import annotations

import contextlib
import io
import json

import mlflow
import pytest
import torch
from sklearn.metrics import accuracy_score, log_loss
from mlflow import MlflowClient
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lakevision import delta
from lakevision.data.ingest import run_ingest
from lakevision.data.synthetic import generate_dataset
from lakevision.errors import DataError
from lakevision.evaluation.evaluate import run_evaluation
from lakevision.packaging.pyfunc import ModelLoadError
from lakevision.tracking import ExperimentTracker
from lakevision.packaging.architectures import build_model

pytestmark = pytest.mark.slow  # trained models scored


@pytest.fixture
def ingested(runtime, tmp_path):
    ds = generate_dataset(tmp_path / "d", num_images=40, seed=31, image_size=(128, 160), crowd_fraction=0.2)
    run_ingest(runtime, str(ds.annotation_file), str(ds.image_dir))
    return runtime, ds


def _log(runtime, task, arch, num_classes, seed=0):
    torch.manual_seed(seed)
    model = build_model(task, arch, num_classes, "none", 128, 64, 100)
    if task != "classification":
        model.roi_heads.score_thresh = 0.0  # an untrained detector still answers with boxes to score
    tracker = ExperimentTracker("eval-test", tracking_uri=runtime.tracking_uri)
    with tracker:
        tracker.log_parameters({"task": task, "training": {"data": {"image_size": 128}}})
        example = torch.rand(1, 3, 128, 128) if task == "classification" else None
        info = tracker.log_model(model.eval(), "model", input_example=example)
    return info.model_uri, tracker.run_id


def _test_ids(runtime) -> set[int]:
    return {int(r["image_id"]) for r in delta.read_table(runtime.spark, runtime.table("samples"))
            .filter("split = 'test'").select("image_id").collect()}


def _stored_predictions(runtime, uri) -> dict[int, dict]:
    rows = delta.read_table(runtime.spark, runtime.table("predictions")).filter(f"model_uri = '{uri}'").collect()
    return {int(r["image_id"]): json.loads(r["prediction"]) for r in rows}


def _pycocotools_bbox_stats(ds, test_ids: set[int], predictions: dict[int, dict]) -> list[float]:
    """pycocotools' 12 bbox stats from the source COCO file and the predictions table alone."""
    doc = json.loads(ds.annotation_file.read_text())
    gt = {"images": [i for i in doc["images"] if i["id"] in test_ids], "categories": doc["categories"],
          "annotations": [a for a in doc["annotations"] if a["image_id"] in test_ids]}
    dets = [{"image_id": image_id, "category_id": lab, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score}
            for image_id, p in predictions.items()
            for (x0, y0, x1, y1), lab, score in zip(p["boxes"], p["labels"], p["scores"])]
    assert dets, "the model answered with no box: nothing to compare"
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = gt
        coco.createIndex()
        ev = COCOeval(coco, coco.loadRes(dets), "bbox")
        ev.evaluate(); ev.accumulate(); ev.summarize()
    return list(ev.stats)


BBOX_STATS = ["map", "map_50", "map_75", "map_small", "map_medium", "map_large",
              "mar_1", "mar_10", "mar_100", "mar_small", "mar_medium", "mar_large"]


def test_detection_metrics_equal_pycocotools_on_the_stored_predictions(ingested):
    runtime, ds = ingested
    uri, run_id = _log(runtime, "detection", "fasterrcnn_mobilenet_v3_large_320_fpn", 4)
    result = run_evaluation(runtime, uri)
    assert result.task == "detection" and result.run_id == run_id
    test_ids = _test_ids(runtime)
    assert result.images == len(test_ids) > 0
    predictions = _stored_predictions(runtime, uri)
    assert set(predictions) == test_ids
    for name, value in zip(BBOX_STATS, _pycocotools_bbox_stats(ds, test_ids, predictions)):
        assert result.metrics[name] == pytest.approx(value, abs=1e-9), name

    client = MlflowClient(runtime.tracking_uri)
    run = client.get_run(run_id)
    assert run.data.metrics["test_map"] == pytest.approx(result.metrics["map"])
    artifacts = {a.path for a in client.list_artifacts(run_id, "evaluation")}
    assert {"evaluation/pr_curve.png", "evaluation/samples.png", "evaluation/worst_errors.png",
            "evaluation/report.md"} <= artifacts
    version = result.predictions_table["version"]
    again = run_evaluation(runtime, uri)
    assert again.predictions_table["version"] == version  # same predictions: nothing committed


def test_evaluation_on_the_workers_equals_the_driver_evaluation(ingested):
    """Predictions and metric states from Spark partitions, merged on the driver, give the
    driver-only evaluation's metrics and the very same stored predictions."""
    runtime, _ = ingested
    uri, _ = _log(runtime, "detection", "fasterrcnn_mobilenet_v3_large_320_fpn", 4)
    # one torch thread, as each of the two worker tasks gets on 2 cores: a different thread count
    # may move a box by one float32 ulp (never a metric by 1e-9, but the stored text would differ)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        driver = run_evaluation(runtime, uri, batch_size=2, on_workers=False)
    finally:
        torch.set_num_threads(threads)
    workers = run_evaluation(runtime, uri, batch_size=2, on_workers=True)
    assert (driver.partitions, workers.partitions) == (0, 2)  # 2 batches of the test split, one per partition
    assert driver.metrics["map_50"] > 0 and set(workers.metrics) == set(driver.metrics)
    for name, value in driver.metrics.items():
        assert workers.metrics[name] == pytest.approx(value, abs=1e-9, nan_ok=True), name
    # the workers' predictions are the driver's to the last bit: the predictions table did not change
    assert workers.predictions_table["version"] == driver.predictions_table["version"]


def test_classification_evaluation_logs_confusion_matrix(ingested):
    runtime, ds = ingested
    uri, run_id = _log(runtime, "classification", "resnet18", 3)
    result = run_evaluation(runtime, uri, task="classification")
    # the expected values from the source COCO file (the largest object's class) and the stored predictions
    doc = json.loads(ds.annotation_file.read_text())
    label_of = {c["id"]: i for i, c in enumerate(sorted(doc["categories"], key=lambda c: c["id"]))}
    largest = {}
    for a in doc["annotations"]:
        if not a.get("iscrowd") and a["area"] > largest.get(a["image_id"], (0, None))[0]:
            largest[a["image_id"]] = (a["area"], label_of[a["category_id"]])
    predictions = _stored_predictions(runtime, uri)
    ids = sorted(i for i in _test_ids(runtime) if i in largest)
    assert sorted(predictions) == ids
    truth = [largest[i][1] for i in ids]
    assert result.metrics["accuracy"] == pytest.approx(accuracy_score(truth, [predictions[i]["label"] for i in ids]),
                                                       abs=1e-12)
    assert result.metrics["log_loss"] == pytest.approx(
        log_loss(truth, [predictions[i]["probabilities"] for i in ids], labels=list(range(3))), abs=1e-9)
    assert "f1_macro" in result.metrics
    client = MlflowClient(runtime.tracking_uri)
    assert "evaluation/confusion_matrix.png" in {a.path for a in client.list_artifacts(run_id, "evaluation")}


def test_bad_model_uri_and_task_mismatch(ingested):
    runtime, _ = ingested
    mlflow.set_tracking_uri(runtime.tracking_uri)
    with pytest.raises(ModelLoadError, match="models:/nope@champion: cannot load the model"):
        run_evaluation(runtime, "models:/nope@champion")
    uri, _ = _log(runtime, "classification", "resnet18", 3)
    with pytest.raises(DataError, match="--task detection: the model is a ResNet, a classification model"):
        run_evaluation(runtime, uri, task="detection")


def test_instance_segmentation_reports_box_and_mask_stats(ingested):
    runtime, ds = ingested
    uri, _ = _log(runtime, "segmentation", "maskrcnn_resnet18_fpn", 4)
    result = run_evaluation(runtime, uri, task="segmentation")
    metrics = result.metrics
    assert {"map", "map_50", "segm_map", "segm_map_50"} <= set(metrics)
    # the box stats of a Mask R-CNN are pycocotools' on the stored boxes
    stats = _pycocotools_bbox_stats(ds, _test_ids(runtime), _stored_predictions(runtime, uri))
    for name, value in zip(BBOX_STATS, stats):
        assert metrics[name] == pytest.approx(value, abs=1e-9), name
