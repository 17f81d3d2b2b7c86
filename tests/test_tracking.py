"""The deploy job's choice of run: the best finished run of the task that logged a model."""

from __future__ import annotations

import pytest
from mlflow import MlflowClient
from mlflow.entities import RunStatus

from lakevision.tasks import KINDS
from lakevision.tracking import BEST_PREFIX, MODEL_URI_TAG, TASK_TAG, NoRunError, best_training_run

EXPERIMENT = "lakevision"


@pytest.fixture
def client(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return MlflowClient(tracking_uri=uri)


def _run(client, task: str, metric: str, value: float | None, status: str = "FINISHED", model: bool = True) -> str:
    exp = client.get_experiment_by_name(EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(EXPERIMENT)
    run = client.create_run(exp_id, tags={TASK_TAG: task, **({MODEL_URI_TAG: f"models:/m-{value}"} if model else {})})
    if value is not None:
        client.log_metric(run.info.run_id, metric, value)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_failed_runs_runs_without_a_model_and_other_tasks_are_skipped(client):
    metric = BEST_PREFIX + KINDS["classification"].val_metric
    chosen = _run(client, "classification", metric, 0.5)
    _run(client, "classification", metric, 0.4)
    _run(client, "classification", metric, 0.9, status=RunStatus.to_string(RunStatus.FAILED))
    _run(client, "classification", metric, 0.8, status="KILLED")
    _run(client, "classification", metric, 0.95, model=False)
    _run(client, "detection", BEST_PREFIX + KINDS["detection"].val_metric, 0.99)
    best = best_training_run(client, EXPERIMENT, "classification", KINDS["classification"])
    assert best == {"run_id": chosen, "model_uri": "models:/m-0.5", "metric": metric, "value": 0.5}


def test_no_run_is_a_user_error_naming_the_experiment(client):
    with pytest.raises(NoRunError, match="experiment 'lakevision' does not exist; run `lakevision train` first"):
        best_training_run(client, EXPERIMENT, "detection", KINDS["detection"])
    _run(client, "detection", "best_val_map_50", 0.7, status="FAILED")
    with pytest.raises(NoRunError, match="has no finished detection training run with a model"):
        best_training_run(client, EXPERIMENT, "detection", KINDS["detection"])
