"""Epoch metrics reach the driver's MLflow run through the shared file, never from a worker."""

from __future__ import annotations

import json

import mlflow
from mlflow import MlflowClient

from lakevision.training.metrics_relay import MetricsRelay, append_epoch


def test_relay_logs_complete_lines_and_waits_for_partial_ones(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("relay")).info.run_id
    path = tmp_path / "run.metrics.jsonl"
    relay = MetricsRelay(path, uri, run_id)
    relay.drain()  # no file yet: nothing to do
    append_epoch(path, 0, {"val_loss": 1.5, "val_map_50": 0.1})
    with open(path, "a") as f:  # a line rank 0 is still writing
        f.write(json.dumps({"epoch": 1, "timestamp_ms": 1, "metrics": {"val_loss": 1.0}})[:20])
    relay.drain()
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val_loss")] == [(0, 1.5)]
    with open(path, "a") as f:
        f.write(json.dumps({"epoch": 1, "timestamp_ms": 1, "metrics": {"val_loss": 1.0}})[20:] + "\n")
    relay.drain()
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "val_loss")) == [(0, 1.5), (1, 1.0)]
    assert relay.epochs_logged == 2


def test_relay_thread_logs_during_training_and_drains_at_the_end(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("relay")).info.run_id
    path = tmp_path / "run.metrics.jsonl"
    # more metrics than one log_batch call takes
    metrics = {f"m{i}": float(i) for i in range(600)}
    with MetricsRelay(path, uri, run_id, interval_s=0.05):
        append_epoch(path, 0, metrics)
        append_epoch(path, 1, metrics)
    logged = client.get_run(run_id).data.metrics
    assert len(logged) == 600 and logged["m599"] == 599.0
    assert sorted(m.step for m in client.get_metric_history(run_id, "m7")) == [0, 1]
    assert mlflow.get_tracking_uri() != uri  # the relay set no process-wide state
