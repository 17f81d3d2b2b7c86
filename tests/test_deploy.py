"""ModelServer and DeploymentPipeline: the real databricks-sdk over real HTTP against the local
workspace, serving real lakevision models from the MLflow registry."""

from __future__ import annotations

import io
import socket
import time
from pathlib import Path

import mlflow
import pytest
import requests
from databricks.sdk.errors import BadRequest
from PIL import Image

from lakevision.config import load_config
from lakevision.packaging.pyfunc import IMAGE_COLUMN, encode_image
from lakevision.registry.gate import MetricGate
from lakevision.registry.model_registry import CHAMPION, PREVIOUS_CHAMPION, ModelRegistry
from lakevision.runtime import Runtime
from lakevision.serving.client import WorkspaceAuthError, WorkspaceUnreachableError
from lakevision.serving.model_server import DeploymentError, ModelServer, workload_for
from lakevision.serving.pipeline import DeploymentPipeline
from lakevision.local.workspace.endpoints import LocalWorkspace
from lakevision.local.workspace.serving import routing_random
from lakevision.data.samples import load_split

from .conftest import CONFIG_DIR
from .models import corrupt_weights, log_trained_model, log_unsendable_model

pytestmark = pytest.mark.slow  # a workspace serving models

SEED = 11  # the workspace's routing seed
TOKEN = "local-test-token"
NAME = "deploy_test_model"


@pytest.fixture(scope="module")
def workspace(ingested_runtime):
    ws = LocalWorkspace(ingested_runtime.root, TOKEN, seed=SEED)
    url = ws.start()
    yield url
    ws.stop()


@pytest.fixture(scope="module")
def images(ingested_runtime):
    return [encode_image(Path(p).read_bytes()) for p in load_split(ingested_runtime, "test").image_paths]


def _runtime(rt: Runtime, *overrides: str) -> Runtime:
    cfg = load_config(CONFIG_DIR, "local", ["deployment.canary.smoke_requests=10", *overrides])
    return Runtime(config=cfg, spark=rt.spark, kind="local", root=rt.root)


def _routes(server: ModelServer, endpoint: str) -> dict[str, int]:
    return {r["served_entity_name"]: r["traffic_percentage"] for r in server.monitor_endpoint(endpoint)["routes"]}


def test_unreachable_host_fails_fast_with_the_host_in_the_message():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: connections are refused
        t0 = time.monotonic()
        with pytest.raises(WorkspaceUnreachableError, match=f"127.0.0.1:{port} is unreachable"):
            ModelServer(f"http://127.0.0.1:{port}", TOKEN, NAME)
    assert time.monotonic() - t0 < 15


@pytest.mark.parametrize("host", ["http://example.com", "http://10.1.2.3:8080", "ftp://127.0.0.1", "http://127.0.0.1.evil.com"])
def test_a_token_never_goes_over_plain_http_to_another_machine(host):
    with pytest.raises(WorkspaceAuthError, match="https"):
        ModelServer(host, TOKEN, NAME)


def test_a_wrong_token_is_refused(workspace):
    with pytest.raises(WorkspaceAuthError, match="refused the token"):
        ModelServer(workspace, "not-the-token", NAME).exists("anything")
    assert requests.get(f"{workspace}/api/2.0/serving-endpoints", timeout=10).status_code == 401


def test_workload_follows_the_instance_settings():
    assert workload_for("Standard_DS3_v2", 1) == {"workload_size": "Small", "workload_type": "CPU"}
    assert workload_for("Standard_DS3_v2", 4) == {"workload_size": "Medium", "workload_type": "CPU"}
    assert workload_for("Standard_NC6s_v3", 5) == {"workload_size": "Large", "workload_type": "GPU_LARGE"}
    assert workload_for("g5.xlarge", 1)["workload_type"] == "GPU_SMALL"


def test_canary_routing_monitoring_and_bad_payloads(ingested_runtime, workspace, images):
    rt = ingested_runtime
    mlflow.set_tracking_uri(rt.tracking_uri)
    name = "canary_model"
    registry = ModelRegistry(rt, name)
    versions = [registry.register(log_trained_model(rt, seed=s)[0])[0].version for s in (11, 12)]
    server = ModelServer(workspace, TOKEN, name, versions[0])
    assert server.create_endpoint("canary", "Standard_DS3_v2", 0, 1) == "canary"
    server.update_endpoint("canary", versions[1], 10)
    old, new = f"{name}-{versions[0]}", f"{name}-{versions[1]}"
    assert _routes(server, "canary") == {old: 90, new: 10}

    served = [server.query("canary", [images[i % len(images)]])[1] for i in range(1000)]
    assert set(served) == {old, new}
    # the canary config (version 2 of "canary") routes with its own seeded stream: the split is fixed
    rng, routes = routing_random(SEED, "canary", 2), _routes(server, "canary")  # in the config's route order
    assert served == [rng.choices(list(routes), list(routes.values()))[0] for _ in range(1000)]
    assert 0.07 <= served.count(new) / 1000 <= 0.13
    status = server.monitor_endpoint("canary")
    assert status["state"] == {"ready": "READY", "config_update": "NOT_UPDATING"}
    per = status["metrics"]["per_entity"]
    # the metrics cover the last minute, as Databricks' do: at most what was sent, and some of it
    assert 0 < per[new]["requests"] <= served.count(new) and 0 < per[old]["requests"] <= served.count(old)
    assert status["metrics"]["error_rate"] == 0.0
    assert 0 < per[old]["latency_p50_ms"] <= per[old]["latency_p99_ms"]
    assert {e["scale_to_zero_enabled"] for e in status["served_entities"]} == {True}

    url, auth = f"{workspace}/serving-endpoints/canary/invocations", {"Authorization": f"Bearer {TOKEN}"}
    buf = io.BytesIO()
    Image.new("RGB", (300, 300)).save(buf, "PNG")  # the test models allow 200 x 200 pixels
    bad = {
        "wrong column": ({"dataframe_records": [{"picture": images[0]}]}, "image"),
        "not base64": ({"dataframe_records": [{IMAGE_COLUMN: "%%%"}]}, "not valid base64"),
        "not an image": ({"dataframe_records": [{IMAGE_COLUMN: encode_image(b"hello")}]},
                         "is not a JPEG, PNG, WEBP, BMP image"),
        "empty batch": ({"dataframe_split": {"columns": [IMAGE_COLUMN], "data": []}}, "empty batch"),
        "too many images": ({"dataframe_records": [{IMAGE_COLUMN: images[0]}] * 9}, "the limit is 8"),
        "too many pixels": ({"dataframe_records": [{IMAGE_COLUMN: encode_image(buf.getvalue())}]},
                            "300x300 = 90,000 pixels, more than the limit of 40,000"),
    }
    for what, (body, message) in bad.items():
        r = requests.post(url, json=body, headers=auth, timeout=30)
        assert r.status_code == 400, (what, r.status_code, r.text)
        assert message in r.text, (what, r.text)
    with pytest.raises(BadRequest, match="not valid base64"):
        server.query("canary", ["%%%"])
    server.delete_endpoint("canary")


def test_pipeline_creates_canaries_promotes_refuses_and_rolls_back(ingested_runtime, workspace):
    rt = _runtime(ingested_runtime, "deployment.min_improvement_over_champion=-1")
    mlflow.set_tracking_uri(rt.tracking_uri)
    registry = ModelRegistry(rt, NAME)
    first, _ = log_trained_model(rt, seed=1, best_metric=0.5)
    pipeline = DeploymentPipeline(workspace, TOKEN, NAME, "lakevision", runtime=rt, task="classification")
    report = pipeline.run_pipeline({"accuracy": 0.0}, "pipeline-ep")
    assert report["best_run"]["model_uri"] == first and report["status"] == "deployed"
    assert report["deployment"]["action"] == "created" and report["deployment"]["smoke"]["healthy"]
    assert report["champion"] == {"version": "1", "previous": None}
    assert report["endpoint_state"]["routes"] == [{"served_entity_name": f"{NAME}-1", "traffic_percentage": 100}]

    second, _ = log_trained_model(rt, seed=2, best_metric=0.9)
    report = pipeline.run_pipeline({"accuracy": 0.0}, "pipeline-ep")
    assert report["best_run"]["model_uri"] == second  # the better validation metric wins
    dep = report["deployment"]
    assert dep["action"] == "canary_promoted" and dep["steps"] == [10, 100]
    # each served model was asked directly: the new one gets its 10 requests at a 10% split too
    assert {e: (c["answered"], c["server_errors"]) for e, c in dep["smoke"]["per_entity"].items()} == {
        f"{NAME}-2": (10, 0), f"{NAME}-1": (10, 0)}
    assert report["champion"] == {"version": "2", "previous": "1"}
    assert registry.by_alias(PREVIOUS_CHAMPION).version == "1"
    server = pipeline.server
    assert _routes(server, "pipeline-ep") == {f"{NAME}-2": 100}

    # a gate failure changes nothing: no version, same endpoint config
    before = server.monitor_endpoint("pipeline-ep")
    log_trained_model(rt, seed=3, best_metric=0.95)
    report = pipeline.run_pipeline({"accuracy": 1.01}, "pipeline-ep")
    assert report["status"] == "gate_failed" and "accuracy" in " ".join(report["gate"]["failures"])
    after = server.monitor_endpoint("pipeline-ep")
    assert after["config_version"] == before["config_version"] and after["routes"] == before["routes"]
    assert len(mlflow.MlflowClient(rt.tracking_uri).search_model_versions(f"name = '{NAME}'")) == 2

    # a version that registers but cannot load: UPDATE_FAILED, rolled back, v2 still serving
    broken, _ = log_trained_model(rt, seed=4)
    version = MetricGate(rt, NAME, thresholds={"accuracy": 0.0}).run(broken).registered["version"]
    corrupt_weights(broken)
    result = pipeline.deploy("pipeline-ep", version)
    assert result["status"] == "rolled_back" and not result["smoke"]["healthy"]
    assert "UPDATE_FAILED" in " ".join(result["smoke"]["problems"])
    state = server.monitor_endpoint("pipeline-ep")
    assert _routes(server, "pipeline-ep") == {f"{NAME}-2": 100}
    assert state["state"]["ready"] == "READY" and state["state"]["config_update"] == "NOT_UPDATING"
    preds, served_by = server.query("pipeline-ep", pipeline.smoke_images()[:1])
    assert served_by == f"{NAME}-2" and preds
    assert registry.by_alias(CHAMPION).version == "2"
    with pytest.raises(DeploymentError, match="does not exist"):
        server.monitor_endpoint("no-such-endpoint")


def test_new_endpoint_failing_its_smoke_test_is_deleted(ingested_runtime, workspace):
    rt = _runtime(ingested_runtime)
    mlflow.set_tracking_uri(rt.tracking_uri)
    broken, _ = log_trained_model(rt, seed=21)
    version = ModelRegistry(rt, "broken_model").register(broken)[0].version
    corrupt_weights(broken)
    pipeline = DeploymentPipeline(workspace, TOKEN, "broken_model", "lakevision", runtime=rt, task="classification")
    result = pipeline.deploy("never-healthy", version)
    assert result["status"] == "rolled_back" and result["action"] == "created_then_deleted"
    (problem,) = result["smoke"]["problems"]
    assert problem.startswith(f"endpoint never-healthy: creating it with broken_model v{version} failed: ")
    assert problem.endswith(f"loading models:/broken_model/{version} failed: ModelLoadError: model.pt cannot be read "
                            "as a weights-only tensor file (UnpicklingError))")
    # a new endpoint has nothing to go back to: it is gone, record and all
    assert not pipeline.server.exists("never-healthy")
    assert not (rt.root / "workspace" / "endpoints" / "never-healthy.json").exists()


def test_already_serving_changes_nothing(ingested_runtime, workspace):
    rt = _runtime(ingested_runtime)
    mlflow.set_tracking_uri(rt.tracking_uri)
    uri, _ = log_trained_model(rt, seed=22)
    version = ModelRegistry(rt, "steady_model").register(uri)[0].version
    pipeline = DeploymentPipeline(workspace, TOKEN, "steady_model", "lakevision", runtime=rt, task="classification")
    assert pipeline.deploy("steady", version)["action"] == "created"
    before = pipeline.server.monitor_endpoint("steady")
    again = pipeline.deploy("steady", version)
    assert again == {"status": "deployed", "action": "already_serving", "version": version, "steps": []}
    after = pipeline.server.monitor_endpoint("steady")
    assert after["config_version"] == before["config_version"] and after["routes"] == before["routes"]
    pipeline.server.delete_endpoint("steady")


def test_smoke_bounds_on_errors_and_p95_latency(ingested_runtime, workspace, images):
    rt = _runtime(ingested_runtime, "deployment.canary.smoke_requests=4", "deployment.canary.max_p95_latency_ms=0.001")
    mlflow.set_tracking_uri(rt.tracking_uri)
    uri, _ = log_trained_model(rt, seed=23)
    version = ModelRegistry(rt, "bounded_model").register(uri)[0].version
    pipeline = DeploymentPipeline(workspace, TOKEN, "bounded_model", "lakevision", runtime=rt, task="classification")
    entity = f"bounded_model-{version}"
    server = pipeline.server
    server.model_version = version
    server.create_endpoint("bounded", "Standard_DS3_v2", 0, 1)
    try:
        # no model answers in 1 microsecond: the p95 bound alone fails the smoke test
        slow = pipeline.smoke_test("bounded", entity, images)
        assert slow["per_entity"][entity] | {"client_p50_ms": None, "client_p95_ms": None} == {
            "requests": 4, "answered": 4, "server_errors": 0, "client_errors": 0,
            "client_p50_ms": None, "client_p95_ms": None}
        p95 = slow["endpoint_metrics"]["latency_p95_ms"]
        assert slow["problems"] == [f"{entity} p95 latency {p95:.1f} ms > 0.001 ms"] and not slow["healthy"]
        # bad requests (4xx) are no server failure; they fail the check only as "nothing answered"
        refused = pipeline.smoke_test("bounded", entity, ["%%%"])
        assert refused["per_entity"][entity]["client_errors"] == 4
        assert refused["problems"][0] == f"{entity} answered none of its 4 smoke requests (4 refused as bad requests)"
        assert refused["failures"][0].endswith("row 0: `image` is not valid base64")
        assert not any("failed" in p or "server error" in p for p in refused["problems"])
    finally:
        server.delete_endpoint("bounded")


def test_a_canary_with_server_errors_is_rolled_back(ingested_runtime, workspace):
    rt = _runtime(ingested_runtime, "deployment.canary.smoke_requests=5")
    mlflow.set_tracking_uri(rt.tracking_uri)
    registry = ModelRegistry(rt, "canary_5xx")
    good = registry.register(log_trained_model(rt, seed=24)[0])[0].version
    bad = registry.register(log_unsendable_model())[0].version
    pipeline = DeploymentPipeline(workspace, TOKEN, "canary_5xx", "lakevision", runtime=rt, task="classification")
    assert pipeline.deploy("five-hundreds", good)["action"] == "created"
    try:
        result = pipeline.deploy("five-hundreds", bad)
        assert result["status"] == "rolled_back" and result["action"] == "canary_rolled_back"
        new = f"canary_5xx-{bad}"
        assert result["smoke"]["per_entity"][new]["server_errors"] == 5
        assert result["smoke"]["per_entity"][f"canary_5xx-{good}"]["answered"] == 5
        assert result["smoke"]["problems"] == [
            f"{new}: 5/5 smoke requests failed (max error rate 0)",
            f"{new} answered none of its 5 smoke requests (0 refused as bad requests)",
            f"{new} server error rate 1.000 in the endpoint's metrics"]
        assert _routes(pipeline.server, "five-hundreds") == {f"canary_5xx-{good}": 100}
    finally:
        pipeline.server.delete_endpoint("five-hundreds")
