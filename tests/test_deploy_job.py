"""`lakevision deploy` and `lakevision gate` as a user runs them: real processes, a local workspace
started on demand, endpoint records that outlive it."""

from __future__ import annotations

import json
import os
import sys
import time

import mlflow
import pytest

from lakevision.data.samples import load_split
from lakevision.registry.model_registry import CHAMPION, ModelRegistry

from . import processes
from .conftest import REPO
from .models import corrupt_weights, log_trained_model

pytestmark = pytest.mark.slow  # deploy jobs as processes

FAST = ["--task", "classification", "--set", "deployment.canary.smoke_requests=4", "--json"]


def _run(root, *args, **env_vars):
    env = dict(os.environ, LAKEVISION_CONFIG_DIR=str(REPO / "bundle" / "config"))
    env.pop("DATABRICKS_TOKEN", None)
    env.update(env_vars)
    return processes.run([sys.executable, *args, "--root", str(root)], env=env, timeout=400)


def _error_line(proc) -> str:
    """A user error: exit 2 and one line on stderr, no traceback."""
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def root(ingested_runtime):
    return ingested_runtime.root


def test_deploy_job_deploys_then_refuses_a_failing_model(ingested_runtime, root):
    mlflow.set_tracking_uri(ingested_runtime.tracking_uri)
    uri, _ = log_trained_model(ingested_runtime, seed=5, best_metric=0.7)
    proc = _run(root, "-m", "lakevision.cli", "deploy", "--endpoint", "e2e", "--model-name", "job_model",
                "--set", "deployment.metrics_threshold={accuracy: 0.0}", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["status"] == "deployed" and report["best_run"]["model_uri"] == uri
    assert report["champion"]["version"] == "1" and report["deployment"]["action"] == "created"
    assert report["endpoint_state"]["state"]["ready"] == "READY"
    assert report["workspace"].startswith("http://127.0.0.1:")
    assert (root / "workspace" / "endpoints" / "e2e.json").exists()
    assert "local-" not in proc.stderr and "Bearer" not in proc.stderr  # no token in the logs

    proc = _run(root, "-m", "lakevision.cli", "deploy", "--endpoint", "e2e", "--model-name", "job_model",
                "--set", "deployment.metrics_threshold={accuracy: 1.01}", *FAST)
    assert proc.returncode == 2
    assert "gate failed" in proc.stderr and "accuracy = " in proc.stderr and "(needs >= 1.01)" in proc.stderr
    report = json.loads(proc.stdout)
    assert report["status"] == "gate_failed" and report["endpoint_state"]["routes"] == [
        {"served_entity_name": "job_model-1", "traffic_percentage": 100}]  # the endpoint came back from disk
    assert ModelRegistry(ingested_runtime, "job_model").by_alias(CHAMPION).version == "1"

    # the deployed endpoint answers `lakevision query` (a workspace started again over the root)
    image = load_split(ingested_runtime, "test").image_paths[0]
    proc = _run(root, "-m", "lakevision.cli", "query", "--endpoint", "e2e", image, "--json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    answer = json.loads(proc.stdout)
    assert answer["served_by"] == "job_model-1" and "label" in answer["prediction"]
    assert "features" not in answer["prediction"] and answer["state"]["ready"] == "READY"
    assert "host metadata" not in proc.stderr  # the SDK's warning about the local workspace stays quiet


def test_gate_command_registers_a_passing_model(ingested_runtime, root):
    mlflow.set_tracking_uri(ingested_runtime.tracking_uri)
    uri, _ = log_trained_model(ingested_runtime, seed=6)
    proc = _run(root, "-m", "lakevision.cli", "gate", "--model-uri", uri, "--model-name", "gate_job_model",
                "--set", "deployment.metrics_threshold={accuracy: 0.0}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gate passed" in proc.stdout and "registered gate_job_model version 1" in proc.stdout


def test_a_new_endpoint_failing_its_smoke_test_is_rolled_back_and_exits_2(ingested_runtime, root):
    mlflow.set_tracking_uri(ingested_runtime.tracking_uri)
    uri, _ = log_trained_model(ingested_runtime, seed=8)
    # no model answers within 1 microsecond: the smoke test fails on its p95 bound
    proc = _run(root, "-m", "lakevision.cli", "deploy", "--endpoint", "slow-ep", "--model-name", "slow_job_model",
                "--model-uri", uri, "--set", "deployment.metrics_threshold={accuracy: 0.0}",
                "--set", "deployment.canary.max_p95_latency_ms=0.001", *FAST)
    line = _error_line(proc)
    report = json.loads(proc.stdout)
    assert report["status"] == "rolled_back" and report["deployment"]["action"] == "created_then_deleted"
    (problem,) = report["deployment"]["smoke"]["problems"]
    assert line == f"lakevision deploy: error: slow_job_model was not deployed to slow-ep (rolled_back): {problem}"
    assert problem.startswith("slow_job_model-1 p95 latency ") and problem.endswith(" ms > 0.001 ms")
    assert report["endpoint_state"] is None and not (root / "workspace" / "endpoints" / "slow-ep.json").exists()
    # registered by the gate, but never champion: nothing served it
    assert ModelRegistry(ingested_runtime, "slow_job_model").by_alias(CHAMPION) is None


def test_a_model_that_cannot_load_is_a_one_line_error(ingested_runtime, root):
    mlflow.set_tracking_uri(ingested_runtime.tracking_uri)
    uri, _ = log_trained_model(ingested_runtime, seed=10)
    corrupt_weights(uri)
    line = _error_line(_run(root, "-m", "lakevision.cli", "gate", "--model-uri", uri, "--model-name", "unloadable"))
    assert line.startswith(f"lakevision gate: error: {uri}: cannot load the model: ")


def test_deploy_without_a_trained_run_or_model_uri_names_the_experiment(tmp_path):
    line = _error_line(_run(tmp_path / "empty-root", "-m", "lakevision.cli", "deploy", "--task", "segmentation"))
    assert line == ("lakevision deploy: error: experiment 'lakevision' does not exist; "
                    "run `lakevision train` first")


def test_deploy_to_an_unreachable_host_names_the_host(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        host = f"http://127.0.0.1:{s.getsockname()[1]}"
        t0 = time.monotonic()
        proc = _run(tmp_path / "root", "-m", "lakevision.cli", "deploy", "--host", host, "--model-uri", "models:/m-1",
                    DATABRICKS_TOKEN="dapi-test")
    assert _error_line(proc) == f"lakevision deploy: error: workspace {host} is unreachable: [Errno 111] Connection refused"
    assert time.monotonic() - t0 < 60  # the SDK's own retries would take 5 minutes


def test_failing_gate_exits_2_and_its_notebook_still_publishes(ingested_runtime, root, tmp_path):
    mlflow.set_tracking_uri(ingested_runtime.tracking_uri)
    uri, _ = log_trained_model(ingested_runtime, seed=9)
    strict = tmp_path / "strict.yaml"
    strict.write_text("deployment:\n  metrics_threshold:\n    accuracy: 1.01\n")
    line = _error_line(_run(root, "-m", "lakevision.cli", "gate", "--model-uri", uri, "--model-name", "strict_model",
                            "--profile", str(strict)))
    assert line.startswith(f"lakevision gate: error: gate failed for {uri} at data version ")
    assert line.endswith("(needs >= 1.01)")

    values = tmp_path / "values.json"
    proc = processes.notebook_step("gate", {"model_uri": uri, "model_name": "strict_model", "profile": str(strict),
                                            "root": str(root)}, values)
    assert proc.returncode != 0 and "GateFailedError" in proc.stderr
    # published before the step failed: a run_if task after it can read what the gate found
    assert json.loads(values.read_text()) == {"passed": False, "message": line.removeprefix("lakevision gate: error: "),
                                              "model_version": None}
    assert not mlflow.MlflowClient(ingested_runtime.tracking_uri).search_model_versions("name = 'strict_model'")
    # as cv_pipeline runs it: the failed gate is an outcome, the task green, for gate_passed to read
    outcome = tmp_path / "outcome.json"
    proc = processes.notebook_step("gate", {"model_uri": uri, "model_name": "strict_model", "profile": str(strict),
                                            "root": str(root), "continue_on_fail": "true"}, outcome)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(outcome.read_text()) == json.loads(values.read_text())
