"""`lakevision deploy` and `lakevision gate` as a user runs them: real processes, a local workspace
started on demand, endpoint records that outlive it."""

from __future__ import annotations

import json
import os
import sys

import mlflow
import pytest

from lakevision.registry.model_registry import CHAMPION, ModelRegistry

from . import processes
from .conftest import REPO
from .models import log_trained_model

pytestmark = pytest.mark.slow  # deploy jobs as processes

FAST = ["--task", "classification", "--set", "deployment.canary.smoke_requests=4", "--json"]


def _run(root, *args):
    env = dict(os.environ, LAKEVISION_CONFIG_DIR=str(REPO / "bundle" / "config"))
    env.pop("DATABRICKS_TOKEN", None)
    return processes.run([sys.executable, *args, "--root", str(root)], env=env, timeout=400)


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


def test_gate_command_registers_a_passing_model(ingested_runtime, root):
    mlflow.set_tracking_uri(ingested_runtime.tracking_uri)
    uri, _ = log_trained_model(ingested_runtime, seed=6)
    proc = _run(root, "-m", "lakevision.cli", "gate", "--model-uri", uri, "--model-name", "gate_job_model",
                "--set", "deployment.metrics_threshold={accuracy: 0.0}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gate passed" in proc.stdout and "registered gate_job_model version 1" in proc.stdout
