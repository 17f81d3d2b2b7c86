"""The monitor job on a real deployment: a champion served by the local workspace with its
inference table on, traffic from the training distribution (no retrain) and brightened traffic
(retrain, naming brightness), results in Delta tables. The retrain trigger: test_jobs_api.py."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from deltalake import DeltaTable
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from lakevision.config import load_config
from lakevision.monitoring.endpoint_stats import inference_table
from lakevision.monitoring.feedback import append_feedback
from lakevision.monitoring.monitor import DRIFT_TABLE, run_monitoring
from lakevision.monitoring.traffic import monitoring_window, request_images, response_predictions, traffic_profile
from lakevision.registry.model_registry import CHAMPION, ModelRegistry
from lakevision.serving.inference_log import MAX_PAYLOAD_BYTES, InferenceLogger, inference_row
from lakevision.packaging.pyfunc import ImageModel, ServingSpec
from lakevision.packaging.architectures import build_model
from lakevision.tracking import TEST_PREFIX, mlflow_client
from lakevision.packaging.pyfunc import encode_image
from lakevision.runtime import Runtime
from lakevision.serving.model_server import ModelServer
from lakevision.serving.pipeline import run_deployment
from lakevision.local.workspace.endpoints import LocalWorkspace
from lakevision.data.images import load_rgb
from lakevision.data.samples import load_split

from .conftest import CONFIG_DIR
from .models import log_trained_model, log_unsendable_model
from .processes import run

pytestmark = pytest.mark.slow  # a deployment and its traffic

TOKEN = "monitor-test-token"
ENDPOINT = "monitored"
# metadata that makes an image file over 1 MB (real photos carry EXIF, ICC and XMP blocks): its
# request is too big for the inference table, its pixels are the training images' own
_PADDING_CHUNKS, _PADDING_CHUNK_BYTES = 3, 400_000


def _png(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return encode_image(buf.getvalue())


def _big_png(rgb: np.ndarray) -> str:
    info = PngInfo()
    for i in range(_PADDING_CHUNKS):
        info.add_text(f"padding{i}", "x" * _PADDING_CHUNK_BYTES)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG", pnginfo=info)
    assert buf.tell() > MAX_PAYLOAD_BYTES
    return encode_image(buf.getvalue())


@pytest.fixture(scope="module")
def deployed(ingested_runtime, tmp_path_factory):
    cfg = load_config(CONFIG_DIR, "local", [
        "deployment.canary.smoke_requests=2", "deployment.metrics_threshold={accuracy: 0.0}",
        "deployment.monitoring.drift.min_samples=30", "deployment.monitoring.window_minutes=30"])
    rt = Runtime(config=cfg, spark=ingested_runtime.spark, kind="local", root=tmp_path_factory.mktemp("monitor"))
    # the ingested tables live in the shared runtime's root: point this root's tables at them
    (rt.root / "tables").symlink_to(ingested_runtime.root / "tables")
    uri, _ = log_trained_model(rt, seed=3, max_image_pixels=1024 * 1024)
    ws = LocalWorkspace(rt.root, TOKEN)
    url = ws.start()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("DATABRICKS_TOKEN", TOKEN)
            report = run_deployment(rt, model_uri=uri, endpoint=ENDPOINT, host=url)
        assert report["status"] == "deployed", report
        yield rt, ws, url, uri
    finally:
        ws.stop()


def _send(url: str, images: list[str], ids: list[str] | None = None) -> None:
    server = ModelServer(url, TOKEN, "lakevision_detector")
    for i, image in enumerate(images):
        body = {"dataframe_records": [{"image": image}]}
        if ids:
            body["client_request_id"] = ids[i]
        assert server.client.api_client.do("POST", f"/serving-endpoints/{ENDPOINT}/invocations", body=body)


def _utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _rows(rt):
    return DeltaTable(inference_table(rt, ENDPOINT).path).to_pandas()


def test_same_distribution_traffic_does_not_retrain(deployed, monkeypatch):
    rt, ws, url, uri = deployed
    monkeypatch.setenv("DATABRICKS_TOKEN", TOKEN)
    paths = load_split(rt, ["train", "val", "test"]).image_paths
    since = _utc()
    _send(url, [_big_png(load_rgb(p)) for p in paths], ids=[f"same-{i}" for i in range(len(paths))])
    ws.flush_inference_tables()
    result = run_monitoring(rt, ENDPOINT, host=url, retrain=False, since=since, now=_utc())
    assert result.health["healthy"] and result.model_version == "1"
    # every request was over 1 MB: none is in the table, and drift still sees every image
    logged = _rows(rt)
    mine = logged[logged["client_request_id"].str.startswith("same-", na=False)]
    assert len(mine) == len(paths) and mine["request"].isna().all()
    assert result.n_current == len(paths)  # exactly this test's requests: the window is theirs
    assert result.retrain is False, result.reasons
    assert result.drift["drifted_features"] == [] and result.triggered is None
    # the window ends now, and rows can come an hour late: the report says it may be incomplete
    assert result.window_complete is False and "may be incomplete" in result.reasons[0]
    (entity,) = result.stats
    assert entity["requests"] == result.n_current and entity["error_rate"] == 0.0
    assert (entity["entity_name"], entity["entity_version"]) == (rt.config.deployment.model_name, "1")
    assert entity["latency_p50_ms"] > 0


def test_brightened_traffic_triggers_retraining(deployed, monkeypatch):
    rt, ws, url, _ = deployed
    monkeypatch.setenv("DATABRICKS_TOKEN", TOKEN)
    paths = load_split(rt, ["train", "val", "test"]).image_paths
    brighter = [np.clip(load_rgb(p).astype(np.int16) + 60, 0, 255).astype(np.uint8) for p in paths]
    _send(url, [_big_png(load_rgb(p)) for p in paths[:5]])  # unshifted traffic just before, which the window leaves out
    since = _utc()
    _send(url, [_big_png(im) for im in brighter] * 3)
    ws.flush_inference_tables()
    result = run_monitoring(rt, ENDPOINT, host=url, retrain=False, since=since, now=_utc())
    assert result.n_current == 3 * len(brighter)
    assert result.retrain is True
    assert "brightness" in result.drift["drifted_features"]
    assert any(r.startswith("brightness drifted") for r in result.reasons)
    drift = DeltaTable(rt.table(DRIFT_TABLE).path).to_pandas()
    last = drift[drift["measured_at"] == drift["measured_at"].max()]
    assert bool(last.loc[last["test"] == "brightness", "drifted"].iloc[0])
    assert set(last["retrain"]) == {True} and "embedding_mmd" in set(last["test"])
    assert len(drift) > len(last)  # the first run's rows are kept


def test_a_settled_window_is_complete_and_an_empty_recent_one_is_not_called_quiet(deployed, monkeypatch):
    rt, _, url, _ = deployed
    monkeypatch.setenv("DATABRICKS_TOKEN", TOKEN)
    # the default window: 30 minutes ending an hour ago, before this test module sent anything
    settled = run_monitoring(rt, ENDPOINT, host=url, retrain=False)
    assert settled.window_complete and settled.window_end < _utc() - dt.timedelta(minutes=59)
    assert settled.n_current == 0 and settled.stats == []
    assert "no successful requests logged in the window" in settled.reasons
    recent = run_monitoring(rt, ENDPOINT, host=url, retrain=False, since=_utc(), now=_utc())
    assert not recent.window_complete
    assert "no successful requests logged in the window so far" in recent.reasons


def test_labelled_feedback_drives_the_metric_rule(deployed, monkeypatch):
    """A labelling process appends ground truth for served requests; the monitor scores the
    champion's logged predictions with it, and a fall in accuracy starts retraining."""
    rt, ws, url, uri = deployed
    monkeypatch.setenv("DATABRICKS_TOKEN", TOKEN)
    # the champion's test accuracy, which the deployment's metric gate measured and logged
    baseline = mlflow_client(rt.tracking_uri).get_run(
        ModelRegistry(rt, rt.config.deployment.model_name).by_alias(CHAMPION).run_id).data.metrics[TEST_PREFIX + "accuracy"]
    assert baseline > 0.05
    paths = load_split(rt, ["train", "val", "test"]).image_paths[:40]
    since = _utc()
    ids = [f"fb-{i}" for i in range(len(paths))]
    _send(url, [_big_png(load_rgb(p)) for p in paths], ids=ids)
    ws.flush_inference_tables()
    now = _utc()
    logged = _rows(rt).set_index("client_request_id")
    predicted = {i: json.loads(logged.loc[i, "response"])["predictions"][0]["label"] for i in ids}
    others = [c for c in load_split(rt, "train").category_ids]

    # labels that agree with every prediction: accuracy 1.0, no drop
    append_feedback(rt, [{"request_id": i, "ground_truth": [{"label": predicted[i]}], "labeled_at": now}
                         for i in ids])
    agreed = run_monitoring(rt, ENDPOINT, host=url, retrain=False, since=since, now=_utc())
    assert agreed.feedback == {"metric": "accuracy", "value": 1.0, "images": len(ids), "note": None}
    assert not any(r.startswith("accuracy") for r in agreed.reasons)

    # newer labels disagree with every prediction (keyed by the Databricks request id this time)
    relabel = [{"request_id": logged.loc[i, "databricks_request_id"],
                "ground_truth": [{"label": next(c for c in others if c != predicted[i])}],
                "labeled_at": now + dt.timedelta(seconds=1)} for i in ids]
    append_feedback(rt, relabel)
    dropped = run_monitoring(rt, ENDPOINT, host=url, retrain=False, since=since, now=_utc())
    assert dropped.feedback["value"] == 0.0 and dropped.feedback["images"] == len(ids)
    assert dropped.retrain is True
    assert f"accuracy 0 is {baseline:.4g} worse than the baseline {baseline:.4g} (tolerance 0.05)" in dropped.reasons


def test_unhealthy_endpoint_fails_the_monitor_job(deployed):
    """The job's alerting purpose: server errors above the bound make `lakevision monitor` exit 2,
    so the run fails and its failure emails go out; bad requests alone do not. Last in this
    module: it puts a version that fails every request on the endpoint."""
    rt, ws, url, _ = deployed
    mlflow.set_tracking_uri(rt.tracking_uri)
    registry = ModelRegistry(rt, rt.config.deployment.model_name)
    broken = registry.register(log_unsendable_model())[0].version
    server = ModelServer(url, TOKEN, rt.config.deployment.model_name)
    server.update_endpoint(ENDPOINT, broken, 50)
    good_entity, bad_entity = f"{server.model_name}-1", f"{server.model_name}-{broken}"
    image = _big_png(np.zeros((32, 32, 3), np.uint8))
    for _ in range(3):
        with pytest.raises(Exception, match="TypeError"):
            server.query_served_model(ENDPOINT, bad_entity, [image])
        with pytest.raises(Exception, match="base64|decode|image"):
            server.query_served_model(ENDPOINT, good_entity, ["not an image"])  # a caller's mistake: 4xx
        assert server.query_served_model(ENDPOINT, good_entity, [image])
    env = dict(os.environ, LAKEVISION_CONFIG_DIR=str(CONFIG_DIR), DATABRICKS_TOKEN=TOKEN)
    proc = run([sys.executable, "-m", "lakevision.cli", "monitor", "--root", str(rt.root), "--endpoint", ENDPOINT,
                "--host", url, "--no-retrain", "--json", "--set", "deployment.monitoring.max_error_rate=0.5"],
               env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    per_entity = json.loads(proc.stdout)["health"]["status"]["metrics"]["per_entity"]
    assert (per_entity[bad_entity]["errors_5xx"], per_entity[bad_entity]["error_rate"]) == (3, 1.0)
    good = per_entity[good_entity]
    assert good["errors_4xx"] >= 3 and good["errors_5xx"] == 0 and good["error_rate"] == 0.0
    assert good["client_error_rate"] > 0
    # one problem: the 5xx entity; the 4xx ones are reported, not judged
    assert proc.stderr.strip().splitlines()[-1] == (
        f"lakevision monitor: error: endpoint {ENDPOINT}: {bad_entity}: server error rate 1.000 > 0.5")


def test_request_images_and_predictions_read_every_input_format():
    assert request_images(json.dumps({"dataframe_records": [{"image": "a"}, {"image": "b"}]})) == ["a", "b"]
    assert request_images(json.dumps({"dataframe_split": {"columns": ["x", "image"], "data": [[1, "c"]]}})) == ["c"]
    assert request_images(json.dumps({"inputs": {"image": ["d"]}})) == ["d"]
    assert response_predictions(json.dumps({"predictions": [{"label": 1}, 3]})) == [{"label": 1}]
    assert response_predictions(None) == [] and response_predictions("not json") == []


def test_traffic_without_feature_records_falls_back_to_the_logged_requests(tmp_path, spark, config):
    """A model logged before feature records existed: the monitor decodes small logged requests;
    a request too big to log leaves its image unprofiled, and is counted as such."""
    torch.manual_seed(0)
    served = ImageModel(build_model("classification", "resnet18", 3), ServingSpec("classification", False, 64, [1, 2, 3],
                                                                                  ["a", "b", "c"], feature_output=False))
    rt = Runtime(config=config, spark=spark, kind="local", root=tmp_path)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 50, 3), dtype=np.uint8) for _ in range(4)]
    logger = InferenceLogger(inference_table(rt, ENDPOINT).path, flush_seconds=60)
    for im in images:
        body = json.dumps({"dataframe_records": [{"image": _png(im)}]}).encode()
        answer = json.dumps({"predictions": served.predict_frame(pd.DataFrame({"image": [_png(im)]}))
                             .to_dict(orient="records")}).encode()
        logger.log(inference_row("m-1", 200, 5.0, body, answer, "r"))
    logger.log(inference_row("m-1", 200, 5.0, b"x" * (MAX_PAYLOAD_BYTES + 1), b'{"predictions": [{"label": 1}]}', "r"))
    logger.close()
    window = monitoring_window(60, 0)
    traffic = traffic_profile(rt, ENDPOINT, window, served)
    assert (traffic.from_records, traffic.from_payloads, traffic.unprofiled) == (0, 4, 1)
    expected = served.profile(images)
    assert np.allclose(np.sort(traffic.profile.samples["brightness"]), np.sort(expected.samples["brightness"]))
    assert np.allclose(np.sort(traffic.profile.embeddings, axis=0), np.sort(expected.embeddings, axis=0), atol=1e-4)


def test_the_window_ends_where_rows_have_settled():
    clock = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.timezone.utc)
    settled = monitoring_window(30, 60, clock=clock)
    assert (settled.start, settled.end, settled.complete) == (clock - dt.timedelta(minutes=90),
                                                             clock - dt.timedelta(minutes=60), True)
    assert settled.note() is None and settled.minutes == 30
    recent = monitoring_window(30, 60, now=clock - dt.timedelta(minutes=10), clock=clock)
    assert not recent.complete and "may be incomplete" in recent.note()
    assert monitoring_window(30, 0, now=clock, clock=clock).complete
