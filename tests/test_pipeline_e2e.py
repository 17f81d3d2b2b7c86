"""The bundle's cv_pipeline job run end to end here by `lakevision bundle run` on tiny data, through
deploy, then the monitor job on what it deployed.

A gate the model cannot pass is not run through the whole job again (a minute and a half of
training for one branch): its parts are tested where they live. The gate notebook with
`continue_on_fail` ends green and publishes `passed: false` (test_deploy_job.py), a false
outcome excludes the task that depends on "true" (test_bundle_runner.py), and cv_pipeline wires
deploy to that outcome (test_bundle.py)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from lakevision.bundle.loader import load_bundle
from lakevision.data.synthetic import generate_dataset

from .processes import run
from .conftest import REPO

pytestmark = pytest.mark.slow  # the whole cv_pipeline job

TINY = {
    "training": {"data": {"image_size": 64, "batch_size": 2, "loader_workers": 0},
                 "optimization": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 2,
                                  "early_stopping_patience": None},
                 "distributed": {"num_workers": 1, "use_gpu": False, "cluster": "local"}},
    "deployment": {"metrics_threshold": {"map_50": 0.0}, "canary": {"smoke_requests": 2},
                   "serving": {"exports": []}},
}
# the names the local target (development mode) gives the tables and the model, as the runner sees them
_LOCAL = load_bundle(REPO, "local", local_files=True)
SCHEMA = _LOCAL.resources["schemas"]["lakevision"]["name"]
MODEL = _LOCAL.resources["registered_models"]["detector"]["name"]
ENDPOINT = _LOCAL.variables["endpoint_name"]


def _run_job(root: Path, job: str, *args: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEVISION_")}
    proc = run([sys.executable, "-m", "lakevision.cli", "bundle", "run", "-t", "local", job, "--json",
                "--root", str(root), *args], cwd=REPO, env=env, timeout=420)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    return json.loads(proc.stdout)


def _run_pipeline(root: Path, data, profile: Path) -> dict:
    return _run_job(root, "cv_pipeline", "--var", f"profile={profile}", "--var", "ray_workers=1",
                    "--param", f"annotations={data.annotation_file}", "--param", f"images={data.image_dir}")


def _profile(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def _mlflow_state(root: Path) -> tuple[dict, int]:
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}", registry_uri=f"sqlite:///{root / 'mlflow.db'}")
    model = client.get_registered_model(MODEL)
    versions = client.search_model_versions(f"name='{MODEL}'")
    return {alias: str(v) for alias, v in model.aliases.items()}, len(versions)


def _serving(root: Path) -> dict:
    """What the endpoint serves: config version, versions and routes (not its loading state,
    which a workspace restart moves through)."""
    record = json.loads((root / "workspace" / "endpoints" / f"{ENDPOINT}.json").read_text())
    config = record["config"]
    return {"config_version": config["config_version"],
            "entities": [(e["entity_name"], e["entity_version"]) for e in config["served_entities"]],
            "routes": config["traffic_config"]["routes"]}


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("e2e")
    data = generate_dataset(base / "data", num_images=24, seed=5, image_size=(128, 160))
    root = base / "root"
    first = _run_pipeline(root, data, _profile(base))
    serving = _serving(root)
    aliases = _mlflow_state(root)
    monitor = _run_job(root, "monitor")
    return {"root": root, "first": first, "serving_after_first": serving,
            "mlflow_after_first": aliases, "monitor": monitor}


def _tasks(run: dict) -> dict:
    return {t["task_key"]: t for t in run["tasks"]}


def test_every_stage_succeeds_and_passes_its_values_on(pipeline_runs):
    run = pipeline_runs["first"]
    tasks = _tasks(run)
    assert run["status"] == "SUCCESS", {k: t["message"] for k, t in tasks.items()}
    assert [t["task_key"] for t in run["tasks"]] == ["ingest", "train", "evaluate", "gate", "gate_passed", "deploy"]
    assert all(t["status"] == "SUCCESS" for t in run["tasks"])
    ingest, train, evaluate, gate = (tasks[k]["values"] for k in ("ingest", "train", "evaluate", "gate"))
    assert ingest["samples_version"] == 0 and ingest["quarantined"] == 0
    assert set(ingest["table_versions"]) >= {"images", "annotations", "categories", "quarantine", "samples"}
    # train and evaluate read the table version ingest wrote, and evaluate scored train's model
    assert train["data_version"] == evaluate["data_version"] == 0
    assert train["model_uri"].startswith("models:/") and train["task"] == "detection"
    # the train task's own stages, Lightning's fit() (rank 0's clock) apart from Ray's share
    seconds = train["seconds"]
    assert list(seconds) == ["setup", "ray", "fit", "model", "exports", "reference_profile", "report"]
    assert seconds["fit"] > 0 and seconds["ray"] > 0
    assert sum(seconds.values()) < tasks["train"]["seconds"]
    assert evaluate["run_id"] == train["run_id"]
    # the value the task published is the one evaluate logged on train's run
    client = MlflowClient(tracking_uri=f"sqlite:///{pipeline_runs['root'] / 'mlflow.db'}")
    assert evaluate["metrics"]["map_50"] == client.get_run(train["run_id"]).data.metrics["test_map_50"]
    assert gate["passed"] is True and gate["model_version"] == "1"
    assert gate["message"] == f"gate passed for {train['model_uri']} at data version 0"
    assert tasks["gate_passed"]["outcome"] == "true"
    assert tasks["deploy"]["values"] == {"status": "deployed", "endpoint": ENDPOINT, "champion_version": "1"}


def test_deployed_state_is_real(pipeline_runs):
    root = pipeline_runs["root"]
    aliases, versions = pipeline_runs["mlflow_after_first"]
    assert aliases == {"champion": "1"} and versions == 1
    serving = pipeline_runs["serving_after_first"]
    assert SCHEMA.startswith("dev_") and MODEL.startswith("dev_")
    assert serving["entities"] == [(MODEL, "1")]
    assert serving["routes"][0]["traffic_percentage"] == 100
    # the table the runner's ingest wrote is a Delta table at the version it reported
    from deltalake import DeltaTable

    assert DeltaTable(str(root / "tables" / SCHEMA / "samples")).version() == 0
    logs = Path(pipeline_runs["first"]["run_dir"])
    assert {p.name for p in logs.glob("*.log")} == {f"{k}.log" for k in ("ingest", "train", "evaluate", "gate", "deploy")}


def test_monitor_job_checks_the_deployed_endpoint(pipeline_runs):
    run = pipeline_runs["monitor"]
    assert run["status"] == "SUCCESS", run["tasks"][0]["message"]
    values = run["tasks"][0]["values"]
    assert values["healthy"] is True and values["problems"] == [] and values["model_version"] == "1"
    # the hourly job judges the window that has settled (rows arrive up to an hour late), which
    # ends before the deploy's smoke requests: an empty window, no reason to retrain
    assert values["retrain"] is False and values["triggered"] is None
    assert "no successful requests logged in the window" in values["reasons"]
    # the deploy's smoke requests went through the endpoint's inference table
    from deltalake import DeltaTable

    logged = DeltaTable(str(pipeline_runs["root"] / "tables" / SCHEMA / "lakevision_detector_payload")).to_pandas()
    assert len(logged) >= 2 and set(logged["status_code"]) == {200}
