"""`lakevision demo` on a small bundle of its own: the job runs, the report is printed whatever
the stages left (a missing best value, a failed task), and a failed run fails the command."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import yaml

from . import processes
from .conftest import CONFIG_DIR

TRAIN = textwrap.dedent("""\
    # Databricks notebook source
    from lakevision.bundle.task_context import set_task_values
    # a run whose validation never produced its metric: no best value
    set_task_values(run_id="r1", model_uri="models:/m-1", best_metric="val_map_50", best_value=None, data_version=0,
                    seconds={"setup": 0.1, "ray": 0.2, "fit": 0.5})
    """)
EVALUATE = "# Databricks notebook source\nraise RuntimeError('lakevision evaluate: error: the test split is empty')\n"


def _demo_bundle(path):
    (path / "src").mkdir(parents=True)
    (path / "src" / "train.py").write_text(TRAIN)
    (path / "src" / "evaluate.py").write_text(EVALUATE)
    cluster = {"job_cluster_key": "c"}
    (path / "databricks.yml").write_text(yaml.safe_dump({
        "bundle": {"name": "demo_test"},
        "targets": {"local": {"default": True}},
        "resources": {"jobs": {"cv_pipeline": {
            "name": "cv", "parameters": [{"name": "annotations", "default": ""}, {"name": "images", "default": ""}],
            "job_clusters": [{"job_cluster_key": "c", "new_cluster": {
                "spark_version": "17.3.x-cpu-ml-scala2.13", "node_type_id": "m5d.xlarge", "num_workers": 1}}],
            "tasks": [{"task_key": "train", **cluster, "notebook_task": {"notebook_path": "src/train.py"}},
                      {"task_key": "evaluate", **cluster, "depends_on": [{"task_key": "train"}],
                       "notebook_task": {"notebook_path": "src/evaluate.py"}}]}}},
    }))
    return path


def test_demo_reports_a_missing_best_value_and_fails_with_the_job(tmp_path):
    bundle = _demo_bundle(tmp_path / "bundle")
    env = dict(os.environ, LAKEVISION_CONFIG_DIR=str(CONFIG_DIR))
    proc = processes.run([sys.executable, "-m", "lakevision.cli", "demo", "--root", str(tmp_path / "root"),
                          "--bundle", str(bundle), "--images", "3"], env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.startswith("lakevision demo: cv_pipeline FAILED in ") for line in lines), proc.stdout
    assert "MLflow run r1: models:/m-1 (best val_map_50 n/a, data version 0)" in lines
    figures = json.loads(lines[-1])
    # the sample data was written for the job, and the job got its paths
    run = json.loads(next((tmp_path / "root" / "runs" / "cv_pipeline").glob("*/run.json")).read_text())
    tasks = {t["task_key"]: t for t in run["tasks"]}
    # the fixed costs: the train task less the fit() it reported, evaluate's time; no query without a deploy
    assert figures["status"] == "FAILED" and figures["test_metrics"] == {}
    assert figures["train_overhead_s"] == round(tasks["train"]["seconds"] - 0.5, 1)
    assert figures["evaluate_s"] == round(tasks["evaluate"]["seconds"], 1) and figures["first_query_ms"] is None
    assert run["parameters"]["annotations"] == str(tmp_path / "root" / "sample" / "annotations" / "instances.json")
    assert [(t["task_key"], t["status"]) for t in run["tasks"]] == [("train", "SUCCESS"), ("evaluate", "FAILED")]
