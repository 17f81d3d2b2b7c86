"""The local MLflow store: a job killed while MLflow builds the sqlite file must not leave a store
that no later client can open."""

from __future__ import annotations

import alembic.command
import pytest
from mlflow import MlflowClient

from lakevision.runtime import LocalLayout, _create_mlflow_db


class _Killed(BaseException):
    """Stands for the end of the process: nothing after it runs (BaseException, like SystemExit)."""


def test_a_store_interrupted_while_being_built_is_absent_and_the_next_job_builds_it(tmp_path, monkeypatch):
    layout = LocalLayout(tmp_path)
    upgrade = alembic.command.upgrade

    def dies_halfway(config, revision, **kw):
        upgrade(config, "451aebb31d03")  # some migrations in: the one that adds metrics.step
        raise _Killed

    monkeypatch.setattr(alembic.command, "upgrade", dies_halfway)
    with pytest.raises(_Killed):
        layout.tracking_uri  # noqa: B018 (the property builds the store)
    assert not layout.mlflow_db.exists()
    assert list(tmp_path.iterdir()) == []  # nor the copy it was building aside

    monkeypatch.undo()
    client = MlflowClient(layout.tracking_uri)
    run = client.create_run(client.create_experiment("e"))
    client.log_metric(run.info.run_id, "m", 1.0, step=3)
    assert client.get_metric_history(run.info.run_id, "m")[0].step == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]


def test_a_store_another_process_built_first_is_kept(tmp_path):
    layout = LocalLayout(tmp_path)
    client = MlflowClient(layout.tracking_uri)
    experiment = client.create_experiment("kept")
    # a second process that saw no store, built its own, and links it second: the first one stays
    _create_mlflow_db(layout.mlflow_db, layout.artifacts)
    assert MlflowClient(layout.tracking_uri).get_experiment(experiment).name == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]
