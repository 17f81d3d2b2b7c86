"""The Databricks notebooks in `notebooks/`, run in order as plain Python scripts (as a laptop runs
them), sharing one data root: widgets come from `LAKEVISION_WIDGET_*` variables, the config is the
bundle's with a tiny profile laid over it, and the data is a 24-image sample dataset."""

from __future__ import annotations

import getpass
import os
import re
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow import MlflowClient

from lakevision.bundle.loader import load_bundle
from lakevision.data.synthetic import DEFECT_CODES
from lakevision.packaging.pyfunc import encode_image, load_image_model

from . import processes
from .conftest import CONFIG_DIR, REPO

pytestmark = pytest.mark.slow  # the five notebooks, training included

NOTEBOOK_DIR = REPO / "notebooks"
# a checkout's notebooks use the bundle's local target, development presets included, as its jobs do
_LOCAL = load_bundle(REPO, "local", local_files=True, user=getpass.getuser()).resources  # DATABRICKS_* is cleared below
SCHEMA = _LOCAL["schemas"]["lakevision"]["name"]
EXPERIMENT = _LOCAL["experiments"]["lakevision"]["name"]
MODEL = _LOCAL["registered_models"]["detector"]["name"]
NOTEBOOKS = ["01_quickstart", "02_explore_data", "03_train", "04_evaluate", "05_deploy_and_query"]
SAMPLE_IMAGES = 24
TINY_PROFILE = {
    # 24 images: a wider val/test share keeps both splits non-empty
    "data_processing": {"splits": {"train": 0.5, "val": 0.25, "test": 0.25}},
    "training": {
        # A learning rate this small leaves the detector near its initialisation, where every class
        # scores ~0.25: the endpoint then answers with boxes after two training steps.
        "model": {"learning_rate": 1.0e-6},
        "data": {"image_size": 64, "batch_size": 2, "loader_workers": 0, "augment": False},
        "optimization": {"max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 2,
                         "early_stopping_patience": None},
        "distributed": {"num_workers": 1, "use_gpu": False, "cluster": "local"},
    },
    "deployment": {"metrics_threshold": {"map_50": 0.0}, "canary": {"smoke_requests": 2},
                   "serving": {"exports": []}},
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("notebooks") / "root"


@pytest.fixture(scope="module")
def run_notebook(root):
    profile = root.parent / "tiny.yaml"
    profile.write_text(yaml.safe_dump(TINY_PROFILE))
    # nothing from the caller's environment may pick another root, target or workspace
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LAKEVISION_", "DATABRICKS_"))}
    env.update(RUST_LOG="warn,sail_common::actor=error", LAKEVISION_CONFIG_DIR=str(CONFIG_DIR),
               LAKEVISION_WIDGET_ROOT=str(root), LAKEVISION_WIDGET_PROFILE=str(profile),
               LAKEVISION_WIDGET_SAMPLE_IMAGES=str(SAMPLE_IMAGES))

    def run(name: str) -> str:
        proc = processes.run([sys.executable, str(NOTEBOOK_DIR / f"{name}.py")], env=env, cwd=REPO, timeout=300)
        assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        return proc.stdout

    return run


@pytest.fixture(scope="module")
def mlflow_client(root):
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri, registry_uri=uri)  # not the process-wide registry another test set


def _one(pattern: str, text: str) -> re.Match:
    found = re.search(pattern, text, re.MULTILINE)
    assert found, f"{pattern!r} not in the output:\n{text[-3000:]}"
    return found


def _training_run(client: MlflowClient, out: str):
    run_id, model_uri = _one(r"^MLflow run (\w+)\nmodel (models:/\S+)$", out).groups()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["lakevision.model_uri"] == model_uri and run.data.tags["lakevision.task"] == "detection"
    return run, model_uri


def test_notebooks_are_databricks_source_files():
    assert sorted(p.stem for p in NOTEBOOK_DIR.glob("*.py")) == NOTEBOOKS
    for name in NOTEBOOKS:
        text = (NOTEBOOK_DIR / f"{name}.py").read_text()
        assert text.splitlines()[0] == "# Databricks notebook source"
        cells = text.split("\n# COMMAND ----------\n")
        assert len(cells) > 3 and cells[0].splitlines()[1] == "# MAGIC %md", name  # a markdown title first
        assert "rt.stop()" in cells[-1], name


def test_01_quickstart_ingests(run_notebook, root):
    out = run_notebook("01_quickstart")
    assert _one(r"^annotations: (.+)$", out)[1] == str(root.resolve() / "sample" / "annotations" / "instances.json")
    for table in ("images", "samples"):  # every generated image but the 5 bad ones, at the first version
        assert _one(rf"^{table}\s+(\d+)\s+(\d+)\s+(\S+)$", out).groups() == (
            "0", str(SAMPLE_IMAGES), str(root.resolve() / "tables" / SCHEMA / table))
    assert _one(r"^quarantine\s+0\s+(\d+)", out)[1] == str(len(DEFECT_CODES))
    assert _one(r"^quarantined by reason: (.+)$", out)[1] == str({code: 1 for code in sorted(DEFECT_CODES)})


def test_02_explore_data_shows_tables_and_draws_images(run_notebook, root):
    out = run_notebook("02_explore_data")
    assert _one(r"^samples \((\S+)\) at version (\d+)$", out).groups() == (
        str(root.resolve() / "tables" / SCHEMA / "samples"), "0")
    splits = {m[0]: int(m[1]) for m in re.findall(r"^\|\s*(train|val|test)\|\s*(\d+)\|\s*\d+\|$", out, re.MULTILINE)}
    assert set(splits) == {"train", "val", "test"} and sum(splits.values()) == SAMPLE_IMAGES
    assert set(re.findall(r"^\|\s*(circle|square|triangle)\|", out, re.MULTILINE)) == {"circle", "square", "triangle"}
    assert set(re.findall(r"^\|(?:image|annotation)\s*\|(\w+)\s*\|1\s*\|$", out, re.MULTILINE)) == set(DEFECT_CODES)
    figure = _one(r"^figure: (.+)$", out)[1]
    assert figure == str(root.resolve() / "figures" / "train_samples.png")
    data = open(figure, "rb").read()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 20_000


def test_03_train_logs_a_run_with_its_reference_profile(run_notebook, mlflow_client):
    out = run_notebook("03_train")
    run, model_uri = _training_run(mlflow_client, out)
    assert "detection / fasterrcnn_resnet18_fpn on " in out and run.data.params["training.data.image_size"] == "64"
    experiment = mlflow_client.get_experiment_by_name(EXPERIMENT)
    assert len(mlflow_client.search_runs([experiment.experiment_id], "tags.`lakevision.task` = 'detection'")) == 1
    # the monitor job's yardstick: statistics and embeddings of the training images
    artifacts = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "monitoring")}
    assert artifacts == {"monitoring/reference_profile.json"}
    report = {a.path for a in mlflow_client.list_artifacts(run.info.run_id, "training")}
    assert report == {"training/report.md", "training/curves.png"}
    assert run.data.tags["training.convergence_epoch"] == "1" and run.data.tags["training.overfitting"] == "false"


def test_04_evaluate_scores_the_best_model(run_notebook, mlflow_client):
    experiment = mlflow_client.get_experiment_by_name(EXPERIMENT)
    runs = mlflow_client.search_runs([experiment.experiment_id], "tags.`lakevision.task` = 'detection'")
    best_value = max(r.data.metrics["best_val_map_50"] for r in runs)
    out = run_notebook("04_evaluate")
    chosen = next(r for r in runs if r.data.tags["lakevision.model_uri"] == _one(r"^model (\S+)$", out)[1])
    assert chosen.data.metrics["best_val_map_50"] == best_value  # the run deploy would pick
    assert _one(r"logged to MLflow run (\w+)$", out)[1] == chosen.info.run_id
    artifacts = {a.path for a in mlflow_client.list_artifacts(chosen.info.run_id, "evaluation")}
    assert "evaluation/worst_errors_explained.png" in artifacts  # box saliency of the worst images
    metrics = mlflow_client.get_run(chosen.info.run_id).data.metrics
    assert metrics["test_map_50"] == pytest.approx(float(_one(r"^map_50\s+(\S+)$", out)[1]), abs=1e-4)
    location = _one(r"^per-image predictions: (\S+) version (\d+)$", out)[1]
    assert os.path.isdir(os.path.join(location, "_delta_log"))


def test_05_deploys_then_queries_the_endpoint(run_notebook, root, mlflow_client):
    out = run_notebook("05_deploy_and_query")
    assert "gate passed for models:/" in out
    assert "deployment deployed: created, traffic steps [100], problems []" in out
    assert f"champion {MODEL} version 1 (previous: None)" in out
    assert str(mlflow_client.get_model_version_by_alias(MODEL, "champion").version) == "1"
    assert (root / "workspace" / "endpoints" / "lakevision-detector.json").is_file()
    # the query went to a restarted workspace, which served the version the deployment left
    served_by, image = _one(r"^(\S+) answered for (\S+)$", out).groups()
    assert served_by == f"{MODEL}-1" and image.startswith(str(root.resolve() / "sample" / "images"))
    # what the served model answered is what the champion answers in this process
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    champion = load_image_model(f"models:/{MODEL}@champion")
    want = champion.predict_frame(pd.DataFrame({"image": [encode_image(Path(image).read_bytes())]})).iloc[0]
    assert int(_one(r"^(\d+) objects, the first 10:$", out)[1]) == len(want["boxes"]) > 0
    first = _one(r"^0\s+(circle|square|triangle)\s+(\S+)\s+\[(.+)\]$", out)
    assert first[1] == want["categories"][0] and float(first[2]) == pytest.approx(want["scores"][0], abs=1e-3)
    assert [float(c) for c in first[3].split(",")] == pytest.approx(want["boxes"][0], abs=0.1)
