"""The local workspace driven by the real databricks-sdk over real HTTP, serving real MLflow models
from a sqlite registry: life cycle, traffic split, failed updates, metrics, restarts, the CLI process."""

from __future__ import annotations

import collections
import logging
import concurrent.futures
import os
import re
import stat
import sys
import time
from pathlib import Path

import cloudpickle
import mlflow
import mlflow.pyfunc
import pandas as pd
import pytest
import requests
from databricks.sdk.errors import (
    BadRequest,
    InvalidParameterValue,
    NotFound,
    OperationFailed,
    ResourceAlreadyExists,
    ResourceConflict,
)
from databricks.sdk.service.serving import (
    EndpointCoreConfigInput,
    EndpointTag,
    Route,
    ServedEntityInput,
    ServingEndpointDetailed,
    TrafficConfig,
)
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema

from lakevision.cli import main as cli_main
from lakevision.serving.client import LOCAL_NO_HOST_METADATA, workspace_client
from lakevision.serving.endpoint_metrics import parse_endpoint_metrics
from lakevision.local.workspace import records
from lakevision.local.workspace.api import LocalWorkspaceError
from lakevision.local.workspace.endpoints import LocalWorkspace
from lakevision.local.workspace.serving import routing_random
from lakevision.local.workspace.process import TOKEN_ENV, local_workspace_process
from lakevision.processes import command_line
from lakevision.tracking import local_tracking_uri

# MLflow's advice to log an input example: these test models need none
pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:.*An input example was not provided:UserWarning")]

TOKEN = "local-test-token"
MODEL = "lakevision.version_model"  # the dot checks the default served entity name
SIGNATURE = ModelSignature(inputs=Schema([ColSpec("string", "image")]))
V1, V2, BROKEN, SLOW, GATED, FAILING, RAISING, SLEEPY = "1", "2", "3", "4", "5", "6", "7", "8"
SEED = 7  # the workspace's routing seed
RELEASE_V4, RELEASE_V5 = "release-v4", "release-v5"  # SLOW and GATED load once these exist in the registry folder


class VersionModel(mlflow.pyfunc.PythonModel):
    """Answers which version it is, per input row. With ``release``, loading waits until that file
    exists: the test holds an update in progress for as long as it needs, and lets it go."""

    def __init__(self, version: int, release: str | None = None):
        self.version = version
        self.release = release

    def load_context(self, context):
        deadline = time.monotonic() + 120
        while self.release and not os.path.exists(self.release):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.release} never appeared")
            time.sleep(0.05)

    def predict(self, context, model_input, params=None):
        return pd.DataFrame({"version": [self.version] * len(model_input)})


class BrokenModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        raise RuntimeError("this model version cannot load")

    def predict(self, context, model_input, params=None):
        return model_input


class RaisingModel(mlflow.pyfunc.PythonModel):
    """A bug inside predict."""

    def predict(self, context, model_input, params=None):
        raise ZeroDivisionError("secret detail of a bug in the model")


class SleepyModel(mlflow.pyfunc.PythonModel):
    """Answers after a while: a request that is still in flight when the endpoint's config changes."""

    def predict(self, context, model_input, params=None):
        time.sleep(1.5)
        return pd.DataFrame({"version": [8] * len(model_input)})


class FailingModel(mlflow.pyfunc.PythonModel):
    """Loads, then answers what no server can send (an exception inside predict is MLflow's 400,
    "an unexpected error while evaluating the model"; one after it is the server's 500)."""

    def predict(self, context, model_input, params=None):
        return pd.DataFrame({"answer": [object()] * len(model_input)})


# pickled by value, so the workspace subprocess can load them without importing this test module
cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("registry")
    uri = local_tracking_uri(root)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("workspace-test", artifact_location=(root / "artifacts").as_uri())
    for model in (VersionModel(1), VersionModel(2), BrokenModel(), VersionModel(4, release=str(root / RELEASE_V4)),
                  VersionModel(5, release=str(root / RELEASE_V5)), FailingModel(), RaisingModel(), SleepyModel()):
        with mlflow.start_run(experiment_id=experiment):
            mlflow.pyfunc.log_model(name="model", python_model=model, signature=SIGNATURE,
                                    registered_model_name=MODEL, pip_requirements=["mlflow"])
    return root


@pytest.fixture(scope="module")
def workspace(registry, tmp_path_factory):
    with LocalWorkspace(tmp_path_factory.mktemp("workspace"), TOKEN, tracking_uri=local_tracking_uri(registry),
                        seed=SEED) as ws:
        yield ws


@pytest.fixture(scope="module")
def w(workspace):
    return workspace_client(workspace.url, TOKEN, retry_timeout_seconds=5)


def entity(version: str) -> ServedEntityInput:
    return ServedEntityInput(entity_name=MODEL, entity_version=version, workload_size="Small",
                             scale_to_zero_enabled=True)


def config(name: str, *entities: ServedEntityInput, traffic: TrafficConfig | None = None) -> EndpointCoreConfigInput:
    return EndpointCoreConfigInput(name=name, served_entities=list(entities), traffic_config=traffic)


def name_of(version: str) -> str:
    """The default served entity name: the model name with its dots as dashes, then the version."""
    return f"lakevision-version_model-{version}"


def split(**percent_by_version: int) -> TrafficConfig:
    return TrafficConfig(routes=[Route(served_entity_name=name_of(v.lstrip("v")), traffic_percentage=p)
                                 for v, p in percent_by_version.items()])


RECORDS = [{"image": "aGVsbG8="}]


def served_version(w, name: str) -> tuple[str, int]:
    response = w.serving_endpoints.query(name, dataframe_records=RECORDS)
    return response.served_model_name, response.predictions[0]["version"]


def raw(workspace, method: str, path: str, token: str | None = TOKEN, **kwargs) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.request(method, f"{workspace.url}{path}", headers=headers, timeout=10, **kwargs)


def _without_empty(value):
    """A JSON value as the SDK's as_dict() writes it back: no nulls, no empty lists."""
    if isinstance(value, dict):
        return {k: _without_empty(v) for k, v in value.items() if v is not None and v != []}
    if isinstance(value, list):
        return [_without_empty(v) for v in value]
    return value


def test_auth_and_host_metadata(workspace):
    assert raw(workspace, "GET", "/.well-known/databricks-config", token=None).status_code == 404
    for token in (None, "wrong-token"):
        r = raw(workspace, "GET", "/api/2.0/serving-endpoints", token=token)
        assert r.status_code == 401
        assert r.json()["error_code"] == "UNAUTHENTICATED"
        r = raw(workspace, "POST", "/serving-endpoints/any/invocations", token=token, json={})
        assert r.status_code == 401
    assert raw(workspace, "GET", "/api/2.0/serving-endpoints").status_code == 200


def test_create_get_list_delete(workspace, w):
    waiter = w.serving_endpoints.create("lifecycle", config=config("lifecycle", entity(V1)),
                                        tags=[EndpointTag(key="team", value="cv")])
    assert waiter.response.state.config_update.value == "IN_PROGRESS"
    assert waiter.response.pending_config.config_version == 1
    ready = waiter.result()
    assert (ready.state.ready.value, ready.state.config_update.value) == ("READY", "NOT_UPDATING")
    assert ready.pending_config is None
    served = ready.config.served_entities[0]
    assert (served.name, served.entity_version, served.state.deployment.value) == (name_of(V1), V1, "DEPLOYMENT_READY")
    assert ready.config.traffic_config.routes[0].traffic_percentage == 100
    assert ready.tags[0].key == "team" and ready.permission_level.value == "CAN_MANAGE"

    body = raw(workspace, "GET", "/api/2.0/serving-endpoints/lifecycle").json()
    # the SDK parses every field we answer: nothing is dropped on the way through from_dict
    assert ServingEndpointDetailed.from_dict(body).as_dict() == _without_empty(body)
    assert body["config"]["served_models"][0]["model_name"] == MODEL
    assert body["config"]["traffic_config"]["routes"][0]["served_model_name"] == name_of(V1)

    assert w.serving_endpoints.get("lifecycle").config.config_version == 1
    assert "lifecycle" in [e.name for e in w.serving_endpoints.list()]
    assert served_version(w, "lifecycle") == (name_of(V1), 1)
    record = workspace.root / "workspace" / "endpoints" / "lifecycle.json"
    assert record.exists()

    w.serving_endpoints.delete("lifecycle")
    with pytest.raises(NotFound):
        w.serving_endpoints.get("lifecycle")
    assert "lifecycle" not in [e.name for e in w.serving_endpoints.list()]
    assert not record.exists()


def test_invalid_configs_are_400_naming_the_field(w):
    def create(name="invalid", entities=(entity(V1),), traffic=None):
        return w.serving_endpoints.create(name, config=config(name, *entities, traffic=traffic))

    cases = [
        (dict(name="bad name!"), "endpoint name"),
        (dict(entities=()), "served_entities"),
        (dict(entities=(entity(V1), entity(V2))), "traffic_config.routes is required"),
        (dict(entities=(entity(V1), entity(V1)), traffic=split(v1=100)), "unique"),
        (dict(entities=(entity(V1), entity(V2)), traffic=split(v1=80, v2=10)), "add up to 90"),
        (dict(traffic=split(v2=100)), "routes[0] routes to"),
        (dict(entities=(ServedEntityInput(entity_name=MODEL, entity_version="latest"),)), "entity_version"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(InvalidParameterValue, match="endpoint") as err:
            create(**kwargs)
        assert fragment in str(err.value), (kwargs, str(err.value))


def test_unknown_endpoint_is_404(w):
    with pytest.raises(NotFound, match="nowhere"):
        w.serving_endpoints.get("nowhere")
    with pytest.raises(NotFound):
        w.serving_endpoints.query("nowhere", dataframe_records=RECORDS)
    with pytest.raises(NotFound):
        w.serving_endpoints.update_config("nowhere", served_entities=[entity(V1)])
    with pytest.raises(NotFound):
        w.serving_endpoints.export_metrics("nowhere")
    with pytest.raises(NotFound):
        w.serving_endpoints.delete("nowhere")


def test_traffic_split_90_10(w):
    w.serving_endpoints.create_and_wait("split", config=config("split", entity(V1)))
    with pytest.raises(ResourceAlreadyExists):
        w.serving_endpoints.create("split", config=config("split", entity(V1)))
    updated = w.serving_endpoints.update_config_and_wait("split", served_entities=[entity(V1), entity(V2)],
                                                         traffic_config=split(v1=90, v2=10))
    assert updated.config.config_version == 2
    assert {r.served_entity_name: r.traffic_percentage for r in updated.config.traffic_config.routes} == {
        name_of(V1): 90, name_of(V2): 10}
    answers = collections.Counter(served_version(w, "split") for _ in range(1000))
    assert set(answers) <= {(name_of(V1), 1), (name_of(V2), 2)}  # each entity answers with its own model
    # the seeded workspace routes config version 2 of "split" with its own stream: the count is fixed
    rng = routing_random(SEED, "split", 2)
    expected = sum(rng.choices([name_of(V1), name_of(V2)], [90, 10])[0] == name_of(V2) for _ in range(1000))
    assert answers[(name_of(V2), 2)] == expected and 70 <= expected <= 130


def test_update_in_progress_failed_update_and_rollback(workspace, w, registry):
    w.serving_endpoints.create_and_wait("rollout", config=config("rollout", entity(V1)))

    # v4 loads only when released: until then the endpoint stays READY on v1 and refuses a second update
    waiter = w.serving_endpoints.update_config("rollout", served_entities=[entity(SLOW)])
    assert (waiter.response.state.ready.value, waiter.response.state.config_update.value) == ("READY", "IN_PROGRESS")
    with pytest.raises(ResourceConflict, match="already updating"):
        w.serving_endpoints.update_config("rollout", served_entities=[entity(V2)])
    assert served_version(w, "rollout") == (name_of(V1), 1)
    assert w.serving_endpoints.get("rollout").state.config_update.value == "IN_PROGRESS"
    (registry / RELEASE_V4).touch()
    assert waiter.result().config.config_version == 2
    assert served_version(w, "rollout") == (name_of(SLOW), 4)

    with pytest.raises(OperationFailed, match="UPDATE_FAILED"):
        w.serving_endpoints.update_config_and_wait("rollout", served_entities=[entity(BROKEN)])
    body = raw(workspace, "GET", "/api/2.0/serving-endpoints/rollout").json()
    assert body["state"]["ready"] == "READY" and body["state"]["config_update"] == "UPDATE_FAILED"
    assert "cannot load" in body["state"]["config_update_message"]
    assert "pending_config" not in body
    assert body["config"]["config_version"] == 2
    assert body["config"]["served_entities"][0]["entity_version"] == SLOW
    assert served_version(w, "rollout") == (name_of(SLOW), 4)

    rolled_back = w.serving_endpoints.update_config_and_wait("rollout", served_entities=[entity(V1)])
    assert (rolled_back.state.ready.value, rolled_back.state.config_update.value) == ("READY", "NOT_UPDATING")
    assert rolled_back.config.config_version == 3
    assert served_version(w, "rollout") == (name_of(V1), 1)
    assert "config_update_message" not in raw(workspace, "GET", "/api/2.0/serving-endpoints/rollout").json()["state"]


def test_failed_create_is_503_until_a_good_config(workspace, w):
    with pytest.raises(OperationFailed):
        w.serving_endpoints.create_and_wait("broken", config=config("broken", entity(BROKEN)))
    failed = w.serving_endpoints.get("broken")
    assert (failed.state.ready.value, failed.state.config_update.value) == ("NOT_READY", "UPDATE_FAILED")
    assert failed.config is None
    state = failed.pending_config.served_entities[0].state
    assert state.deployment.value == "DEPLOYMENT_FAILED"
    assert "RuntimeError: this model version cannot load" in state.deployment_state_message
    r = raw(workspace, "POST", "/serving-endpoints/broken/invocations", json={"dataframe_records": RECORDS})
    assert r.status_code == 503 and r.json()["error_code"] == "TEMPORARILY_UNAVAILABLE"
    assert "cannot load" in r.json()["message"]

    fixed = w.serving_endpoints.update_config_and_wait("broken", served_entities=[entity(V2)])
    assert fixed.state.ready.value == "READY"
    assert served_version(w, "broken") == (name_of(V2), 2)


def test_bad_payload_is_the_scoring_servers_400(workspace, w):
    w.serving_endpoints.create_and_wait("payload", config=config("payload", entity(V1)))
    with pytest.raises(BadRequest, match="image"):
        w.serving_endpoints.query("payload", dataframe_records=[{"picture": "x"}])
    r = raw(workspace, "POST", "/serving-endpoints/payload/invocations", json={"dataframe_records": [{"picture": 1}]})
    assert r.status_code == 400 and "image" in r.json()["message"]
    assert r.headers["served-model-name"] == name_of(V1)
    r = raw(workspace, "POST", "/serving-endpoints/payload/invocations", data=b"{not json")
    assert r.status_code == 400 and r.json()["error_code"] == "BAD_REQUEST"


def test_metrics_count_what_was_sent(workspace, w):
    w.serving_endpoints.create_and_wait("metered", config=config("metered", entity(V1), entity(V2),
                                                                 traffic=split(v1=50, v2=50)))
    sent = collections.Counter()
    bad = collections.Counter()
    for _ in range(40):
        sent[served_version(w, "metered")[0]] += 1
    for _ in range(6):
        r = raw(workspace, "POST", "/serving-endpoints/metered/invocations", json={"dataframe_records": [{"x": 1}]})
        assert r.status_code == 400
        bad[r.headers["served-model-name"]] += 1

    text = w.serving_endpoints.export_metrics("metered").contents.read().decode()
    assert 'request_latency_ms_bucket{endpoint_name="metered"' in text
    metrics = parse_endpoint_metrics(text)
    assert set(metrics) == {name_of(V1), name_of(V2)}
    for name, m in metrics.items():
        assert m["requests"] == sent[name] + bad[name]
        assert (m["errors_4xx"], m["errors_5xx"]) == (bad[name], 0)
        assert m["throughput_rps"] == pytest.approx(m["requests"] / 60)
        # bad requests are the caller's: the error rate counts server errors only
        assert m["error_rate"] == 0.0 and m["client_error_rate"] == pytest.approx(bad[name] / m["requests"])
        assert 0 < m["latency_p50_ms"] <= m["latency_p95_ms"] <= m["latency_p99_ms"] < 10_000
    r = raw(workspace, "GET", "/api/2.0/serving-endpoints/metered/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")


def test_a_served_model_is_queried_directly_whatever_the_split(workspace, w):
    w.serving_endpoints.create_and_wait("direct", config=config("direct", entity(V1), entity(V2),
                                                                traffic=split(v1=99, v2=1)))
    body = {"dataframe_records": RECORDS}
    answers = [w.api_client.do("POST", f"/serving-endpoints/direct/served-models/{name_of(V2)}/invocations",
                               body=body)["predictions"] for _ in range(10)]
    assert answers == [[{"version": 2}]] * 10
    r = raw(workspace, "POST", "/serving-endpoints/direct/served-models/nope/invocations", json=body)
    assert r.status_code == 404 and "has no served model 'nope'" in r.json()["message"]
    assert parse_endpoint_metrics(w.serving_endpoints.export_metrics("direct").contents.read().decode()
                                  )[name_of(V2)]["requests"] == 10
    w.serving_endpoints.delete("direct")


def test_a_model_that_raises_is_a_500_with_a_request_id_and_no_trace(workspace, w):
    w.serving_endpoints.create_and_wait("raising", config=config("raising", entity(RAISING)))
    r = raw(workspace, "POST", "/serving-endpoints/raising/invocations", json={"dataframe_records": RECORDS})
    assert r.status_code == 500, r.text
    body = r.json()
    assert body["error_code"] == "INTERNAL_ERROR" and set(body) == {"error_code", "message"}
    assert re.search(r"the model failed on request [0-9a-f-]{36} \(MlflowException\)", body["message"])
    assert "Traceback" not in r.text and "secret detail" not in r.text
    w.serving_endpoints.delete("raising")


def test_a_bad_request_does_not_echo_the_request_or_a_trace(workspace, w):
    w.serving_endpoints.create_and_wait("echo", config=config("echo", entity(V1)))
    marker = "a-private-value-" * 20
    r = raw(workspace, "POST", "/serving-endpoints/echo/invocations",
            json={"dataframe_records": [{"no_such_column": marker}]})
    assert r.status_code == 400 and marker not in r.text and "stack_trace" not in r.text, r.text[:500]
    w.serving_endpoints.delete("echo")


def test_deeply_nested_json_is_a_400_everywhere(workspace, w):
    w.serving_endpoints.create_and_wait("nested", config=config("nested", entity(V1)))
    deep = b"[" * 100_000 + b"]" * 100_000
    for method, path in [("POST", "/api/2.0/serving-endpoints"), ("PUT", "/api/2.0/serving-endpoints/nested/config"),
                         ("POST", "/serving-endpoints/nested/invocations")]:
        r = raw(workspace, method, path, data=b'{"a": ' + deep + b"}")
        assert r.status_code == 400, (path, r.status_code, r.text[:300])
        assert r.headers["content-type"].startswith("application/json") and r.json()["error_code"]
    w.serving_endpoints.delete("nested")


def test_a_request_in_flight_finishes_on_the_version_that_took_it(workspace, w):
    w.serving_endpoints.create_and_wait("swap", config=config("swap", entity(SLEEPY)))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(raw, workspace, "POST", "/serving-endpoints/swap/invocations",
                              json={"dataframe_records": RECORDS})
        time.sleep(0.3)  # the request is inside the model now
        w.serving_endpoints.update_config_and_wait("swap", served_entities=[entity(V1)])  # a promote or rollback
        answer = pending.result(timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.headers["served-model-name"] == name_of(SLEEPY) and answer.json()["predictions"] == [{"version": 8}]
    assert served_version(w, "swap") == (name_of(V1), 1)
    w.serving_endpoints.delete("swap")


def test_a_model_bug_is_a_server_error(workspace, w):
    w.serving_endpoints.create_and_wait("buggy", config=config("buggy", entity(FAILING)))
    for _ in range(3):
        r = raw(workspace, "POST", "/serving-endpoints/buggy/invocations", json={"dataframe_records": RECORDS})
        assert r.status_code == 500 and "TypeError" in r.json()["message"], r.text
    m = parse_endpoint_metrics(w.serving_endpoints.export_metrics("buggy").contents.read().decode())[name_of(FAILING)]
    assert (m["errors_5xx"], m["errors_4xx"], m["error_rate"]) == (3, 0, 1.0)
    w.serving_endpoints.delete("buggy")


def test_parse_endpoint_metrics_interpolates_like_prometheus():
    text = """# TYPE request_count counter
request_count_total{served_entity_name="a"} 20
request_4xx_count_total{served_entity_name="a"} 1
# TYPE request_latency_ms histogram
request_latency_ms_bucket{served_entity_name="a",le="1"} 0
request_latency_ms_bucket{served_entity_name="a",le="2"} 10
request_latency_ms_bucket{served_entity_name="a",le="4"} 20
request_latency_ms_bucket{served_entity_name="a",le="+Inf"} 20
request_latency_ms_count{served_entity_name="a"} 20
request_latency_ms_sum{served_entity_name="a"} 50
request_count_total{served_entity_name="idle"} 0
cpu_usage_percentage 12
"""
    metrics = parse_endpoint_metrics(text)
    assert metrics["a"] == {"requests": 20, "errors_4xx": 1, "errors_5xx": 0, "error_rate": 0.0,
                            "client_error_rate": 0.05, "throughput_rps": 20 / 60, "latency_p50_ms": 2.0,
                            "latency_p95_ms": pytest.approx(3.8), "latency_p99_ms": pytest.approx(3.96)}
    assert metrics["idle"]["latency_p50_ms"] is None and metrics["idle"]["error_rate"] == 0.0


def wait_ready(w, name: str, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while (endpoint := w.serving_endpoints.get(name)).state.ready.value != "READY":
        assert time.monotonic() < deadline, f"{name} not READY: {endpoint.state}"
        time.sleep(0.05)
    return endpoint


@pytest.fixture
def gated(registry):
    """GATED stays loading for the test; released afterwards, so no load thread waits at exit."""
    yield GATED
    (registry / RELEASE_V5).touch()


def test_endpoints_survive_a_restart(registry, tmp_path, gated):
    uri = local_tracking_uri(registry)
    with LocalWorkspace(tmp_path, TOKEN, tracking_uri=uri) as first:
        w = workspace_client(first.url, TOKEN, retry_timeout_seconds=5)
        before = w.serving_endpoints.create_and_wait("kept", config=config("kept", entity(V1), entity(V2),
                                                                           traffic=split(v1=90, v2=10)))
        w.serving_endpoints.create_and_wait("interrupted", config=config("interrupted", entity(V1)))
        # both still loading v5, which is never released, when the workspace stops
        w.serving_endpoints.update_config("interrupted", served_entities=[entity(gated)])
        w.serving_endpoints.create("never-served", config=config("never-served", entity(gated)))

    with LocalWorkspace(tmp_path, TOKEN, tracking_uri=uri) as second:
        w = workspace_client(second.url, TOKEN, retry_timeout_seconds=5)
        after = wait_ready(w, "kept")
        assert after.state.config_update.value == "NOT_UPDATING"
        assert after.config.as_dict()["traffic_config"] == before.config.as_dict()["traffic_config"]
        assert [e.name for e in after.config.served_entities] == [name_of(V1), name_of(V2)]
        assert after.config.config_version == before.config.config_version
        assert served_version(w, "kept")[0] in (name_of(V1), name_of(V2))

        interrupted = wait_ready(w, "interrupted")
        assert interrupted.state.config_update.value == "UPDATE_FAILED" and interrupted.pending_config is None
        assert "interrupted by a restart" in raw(second, "GET", "/api/2.0/serving-endpoints/interrupted"
                                                 ).json()["state"]["config_update_message"]
        assert served_version(w, "interrupted") == (name_of(V1), 1)

        never = w.serving_endpoints.get("never-served")
        assert (never.state.ready.value, never.state.config_update.value) == ("NOT_READY", "UPDATE_FAILED")
        assert never.config is None and never.pending_config is None
        assert w.serving_endpoints.update_config_and_wait("never-served", served_entities=[entity(V2)]
                                                          ).config.config_version == 1
        assert served_version(w, "never-served") == (name_of(V2), 2)


def test_cli_workspace_process(registry):
    with local_workspace_process(registry) as (url, token):
        w = workspace_client(url, token, retry_timeout_seconds=5)
        w.serving_endpoints.create_and_wait("process", config=config("process", entity(V2)))
        assert served_version(w, "process") == (name_of(V2), 2)
        assert requests.get(f"{url}/api/2.0/serving-endpoints", timeout=5).status_code == 401
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{url}/api/2.0/serving-endpoints", timeout=5)
    assert (registry / "workspace" / "endpoints" / "process.json").exists()


def test_cli_workspace_needs_a_token(monkeypatch, capsys):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert cli_main(["workspace", "--port", "0"]) == 2
    assert TOKEN_ENV in capsys.readouterr().err


def test_the_sdk_does_not_warn_about_the_local_workspaces_missing_host_metadata(workspace, caplog):
    with caplog.at_level(logging.DEBUG):
        workspace_client(workspace.url, TOKEN, retry_timeout_seconds=5).serving_endpoints.list()
    about_metadata = [r for r in caplog.records if LOCAL_NO_HOST_METADATA in r.getMessage()]
    assert [r.levelno for r in about_metadata if r.levelno >= logging.WARNING] == []
    assert any(r.name == "lakevision.serving.client" for r in about_metadata)  # kept, as debug detail


def test_a_root_has_one_workspace_at_a_time(registry, tmp_path):
    """A second workspace on a root would keep its own endpoints in memory and write over the
    first one's records: it is refused, naming the root and the process that holds it."""
    uri = local_tracking_uri(registry)
    root = tmp_path.resolve()
    first = LocalWorkspace(root, TOKEN, tracking_uri=uri)
    try:
        with pytest.raises(LocalWorkspaceError, match=rf"root {re.escape(str(root))} is in use by another "
                                                      rf"workspace \(process {os.getpid()};"):
            LocalWorkspace(root, TOKEN, tracking_uri=uri)
    finally:
        first.stop()
    LocalWorkspace(root, TOKEN, tracking_uri=uri).stop()  # free again once the first has stopped
    with local_workspace_process(root):
        holder = int((root / "workspace" / "lock").read_text())
        assert "workspace" in command_line(holder)
        with pytest.raises(LocalWorkspaceError, match=rf"in use by another workspace \(process {holder};"):
            LocalWorkspace(root, TOKEN, tracking_uri=uri)


def test_a_bad_record_is_moved_aside_and_the_rest_load(registry, tmp_path, caplog, monkeypatch):
    uri = local_tracking_uri(registry)
    synced = []
    real_fsync = records.os.fsync
    monkeypatch.setattr(records.os, "fsync", lambda fd: synced.append(os.fstat(fd).st_mode) or real_fsync(fd))
    with LocalWorkspace(tmp_path, TOKEN, tracking_uri=uri) as ws:
        # a version that does not exist: its record says UPDATE_FAILED, with nothing to reload
        w = workspace_client(ws.url, TOKEN, retry_timeout_seconds=5)
        with pytest.raises(OperationFailed):
            w.serving_endpoints.create_and_wait("good", config=config("good", entity("99")))
    # each record write synced the file and then its folder
    assert synced and any(stat.S_ISDIR(m) for m in synced) and any(stat.S_ISREG(m) for m in synced)
    folder = tmp_path / "workspace" / "endpoints"
    (folder / "truncated.json").write_text('{"name": "truncated", "id": "1", "state": {"ready": "REA')
    (folder / "foreign.json").write_text('["not", "an", "endpoint"]')
    (folder / "misnamed.json").write_text((folder / "good.json").read_text())  # says it is "good"
    (folder / ".good.x1y2.tmp").write_text('{"name": "go')  # a write a crash interrupted
    with caplog.at_level(logging.WARNING), LocalWorkspace(tmp_path, TOKEN, tracking_uri=uri) as ws:
        assert [e["name"] for e in ws.list_endpoints()] == ["good"]
        assert ws.detail("good")["state"]["config_update"] == "UPDATE_FAILED"
    for name in ("truncated", "foreign", "misnamed"):
        assert not (folder / f"{name}.json").exists()
        (aside,) = folder.glob(f"{name}.json.corrupt-*")
        assert any(f"{name}.json cannot be read" in r.getMessage() and aside.name in r.getMessage()
                   for r in caplog.records)
    assert sorted(p.name for p in folder.iterdir() if ".corrupt-" not in p.name) == ["good.json"]


def test_a_change_that_cannot_be_saved_changes_nothing(workspace, w, monkeypatch):
    """Every change is saved before it is made: a full disk fails the call and leaves the endpoint
    as it was, never IN_PROGRESS with no load running, so the next update goes through."""
    w.serving_endpoints.create_and_wait("durable", config=config("durable", entity(V1)))
    save = workspace._save

    def disk_full(record):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(workspace, "_save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        workspace.update_config("durable", {"served_entities": [{"entity_name": MODEL, "entity_version": V2}]})
    now = workspace.detail("durable")
    assert now["state"] == {"ready": "READY", "config_update": "NOT_UPDATING"} and "pending_config" not in now

    # the update's record is saved, but not the end of its load: the update fails, v1 keeps serving
    monkeypatch.setattr(workspace, "_save", lambda r: save(r) if r["state"]["config_update"] == "IN_PROGRESS"
                        else disk_full(r))
    with pytest.raises(OperationFailed, match="UPDATE_FAILED"):
        w.serving_endpoints.update_config_and_wait("durable", served_entities=[entity(V2)])
    failed = workspace.detail("durable")
    assert failed["state"]["config_update"] == "UPDATE_FAILED" and "No space left" in failed["state"][
        "config_update_message"]
    assert served_version(w, "durable") == (name_of(V1), 1)

    monkeypatch.setattr(workspace, "_save", save)
    assert w.serving_endpoints.update_config_and_wait("durable", served_entities=[entity(V2)]
                                                      ).config.config_version == 2
    assert served_version(w, "durable") == (name_of(V2), 2)
    w.serving_endpoints.delete("durable")
