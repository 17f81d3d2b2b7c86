"""The monitor job on a real deployment: a champion served by the local workspace with its
inference table on, traffic from the training distribution (no retrain) and brightened traffic
(retrain, naming brightness), results in Delta tables. The retrain trigger: test_jobs_api.py."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import sys

import numpy as np
import pytest
from deltalake import DeltaTable
from PIL import Image

from lakevision.config import load_config
from lakevision.monitoring.monitor import DRIFT_TABLE, request_images, run_monitoring
from lakevision.packaging.pyfunc import encode_image
from lakevision.runtime import Runtime
from lakevision.serving.model_server import ModelServer
from lakevision.serving.pipeline import run_deployment
from lakevision.local.workspace.endpoints import LocalWorkspace
from lakevision.data.images import load_rgb
from lakevision.data.samples import load_split

from .conftest import CONFIG_DIR
from .models import log_trained_model
from .processes import run

pytestmark = pytest.mark.slow  # a deployment and its traffic

TOKEN = "monitor-test-token"
ENDPOINT = "monitored"


def _jpeg(rgb: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    return encode_image(buf.getvalue())


@pytest.fixture(scope="module")
def deployed(ingested_runtime, tmp_path_factory):
    cfg = load_config(CONFIG_DIR, "local", [
        "deployment.canary.smoke_requests=2", "deployment.metrics_threshold={accuracy: 0.0}",
        "deployment.monitoring.drift.min_samples=30", "deployment.monitoring.window_minutes=30"])
    rt = Runtime(config=cfg, spark=ingested_runtime.spark, kind="local", root=tmp_path_factory.mktemp("monitor"))
    # the ingested tables live in the shared runtime's root: point this root's tables at them
    (rt.root / "tables").symlink_to(ingested_runtime.root / "tables")
    uri, _ = log_trained_model(rt, seed=3)
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


def _send(url: str, images: list[str]) -> None:
    server = ModelServer(url, TOKEN, "lakevision_detector")
    for image in images:
        server.query(ENDPOINT, [image])


def _utc() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def test_same_distribution_traffic_does_not_retrain(deployed, monkeypatch):
    rt, ws, url, uri = deployed
    monkeypatch.setenv("DATABRICKS_TOKEN", TOKEN)
    paths = load_split(rt, ["train", "val", "test"]).image_paths
    since = _utc()
    _send(url, [_jpeg(load_rgb(p)) for p in paths])
    ws.flush_inference_tables()
    result = run_monitoring(rt, ENDPOINT, host=url, retrain=False, since=since, now=_utc())
    assert result.health["healthy"] and result.model_version == "1"
    assert result.n_current == len(paths)  # exactly this test's requests: the window is theirs
    assert result.retrain is False, result.reasons
    assert result.drift["drifted_features"] == [] and result.triggered is None
    (entity,) = result.stats
    assert entity["requests"] == result.n_current and entity["error_rate"] == 0.0
    assert entity["latency_p50_ms"] > 0


def test_brightened_traffic_triggers_retraining(deployed, monkeypatch):
    rt, ws, url, _ = deployed
    monkeypatch.setenv("DATABRICKS_TOKEN", TOKEN)
    paths = load_split(rt, ["train", "val", "test"]).image_paths
    brighter = [np.clip(load_rgb(p).astype(np.int16) + 60, 0, 255).astype(np.uint8) for p in paths]
    _send(url, [_jpeg(load_rgb(p)) for p in paths])  # unshifted traffic just before, which the window leaves out
    since = _utc()
    _send(url, [_jpeg(im) for im in brighter] * 3)
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


def test_request_images_reads_every_input_format():
    assert request_images(json.dumps({"dataframe_records": [{"image": "a"}, {"image": "b"}]})) == ["a", "b"]
    assert request_images(json.dumps({"dataframe_split": {"columns": ["x", "image"], "data": [[1, "c"]]}})) == ["c"]
    assert request_images(json.dumps({"inputs": {"image": ["d"]}})) == ["d"]


def test_unhealthy_endpoint_fails_the_monitor_job(deployed):
    """The job's alerting purpose: failed requests above the bound make `lakevision monitor` exit 2,
    so the run fails and its failure emails go out. Last in this module: these failures stay in
    the endpoint's one-minute metrics window."""
    rt, ws, url, _ = deployed
    server = ModelServer(url, TOKEN, "lakevision_detector")
    good, bad = 5, 5
    for image in [_jpeg(np.zeros((32, 32, 3), np.uint8))] * good:
        server.query(ENDPOINT, [image])
    for _ in range(bad):
        with pytest.raises(Exception, match="base64|decode|image"):
            server.query(ENDPOINT, ["not an image"])
    # the window also holds what the module's earlier tests sent in the last minute: the bound is
    # half the rate now, which only rises as older (successful) requests leave the window
    bound = round(server.monitor_endpoint(ENDPOINT)["metrics"]["error_rate"] / 2, 3)
    assert bound > 0
    env = dict(os.environ, LAKEVISION_CONFIG_DIR=str(CONFIG_DIR), DATABRICKS_TOKEN=TOKEN)
    proc = run([sys.executable, "-m", "lakevision.cli", "monitor", "--root", str(rt.root), "--endpoint", ENDPOINT,
                "--host", url, "--no-retrain", "--json", "--set", f"deployment.monitoring.max_error_rate={bound}"],
               env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    ((entity, m),) = json.loads(proc.stdout)["health"]["status"]["metrics"]["per_entity"].items()
    assert entity == f"{rt.config.deployment.model_name}-1"
    assert m["errors_4xx"] == bad and m["errors_5xx"] == 0 and m["requests"] >= good + bad
    assert m["error_rate"] == pytest.approx(bad / m["requests"])
    assert proc.stderr.strip().splitlines()[-1] == (
        f"lakevision monitor: error: endpoint {ENDPOINT}: {entity}: error rate {bad / m['requests']:.3f} > {bound:g}")
