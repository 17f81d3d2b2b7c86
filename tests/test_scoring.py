"""Batch scoring (the score job) on real Delta tables, a real registry and Sail's workers: one row per
(image, model version), incremental re-runs, error rows for bad files, a killed run completed by the
next one, and the bundle's score job through the local runner."""

from __future__ import annotations

import base64
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from lakevision import delta
from lakevision.bundle.loader import load_bundle
from lakevision.config import load_config
from lakevision.data.ingest import run_ingest
from lakevision.data.synthetic import generate_dataset
from lakevision.errors import DataError
from lakevision.packaging.batch import byte_batches, cached_model
from lakevision.packaging.pyfunc import IMAGE_COLUMN, load_image_model
from lakevision.registry.model_registry import CHAMPION, ModelRegistry
from lakevision.runtime import Runtime, TableRef
from lakevision.scoring.score import SCORE_COLUMNS, ScoringError, run_scoring

from .conftest import CONFIG_DIR, REPO
from .models import log_trained_model, log_unsendable_model
from .processes import owned, run

# the names the local target gives the tables and the model, as the runner's tasks see them
_LOCAL = load_bundle(REPO, "local", local_files=True)
SCHEMA = _LOCAL.resources["schemas"]["lakevision"]["name"]
MODEL = _LOCAL.resources["registered_models"]["detector"]["name"]
IMAGES = 24


# ------------------------------------------------------------------ the parts, without Spark
def test_batches_are_sized_by_bytes():
    sizes = [10, 10, 10, 50, 5, 5, 100, 1]
    assert [(s.start, s.stop) for s in byte_batches(sizes, max_bytes=30, max_rows=10)] == [
        (0, 3), (3, 4), (4, 6), (6, 7), (7, 8)]  # a file over the limit is a batch of its own
    assert [(s.start, s.stop) for s in byte_batches(sizes, max_bytes=1000, max_rows=3)] == [(0, 3), (3, 6), (6, 8)]
    assert list(byte_batches([], 10, 10)) == []


def test_concurrent_tasks_load_a_model_once():
    loads = []

    def loader():
        time.sleep(0.2)  # long enough for every thread to ask while the first one loads
        loads.append(1)
        return object()

    got = []
    threads = [threading.Thread(target=lambda: got.append(cached_model(("test", "once"), loader))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1 and len({id(m.model) for m in got}) == 1 and len({m.token for m in got}) == 1


def test_torch_threads_per_task_never_oversubscribe_a_core(monkeypatch):
    from lakevision.packaging import batch

    monkeypatch.setattr(batch.os, "cpu_count", lambda: 8)
    assert batch._auto_threads("cpu", None, concurrent_tasks=8) == 1  # Sail: 8 tasks at once on 8 cores
    assert batch._auto_threads("cpu", None, concurrent_tasks=2) == 4
    assert batch._auto_threads("cpu", 2, concurrent_tasks=8) == 2  # a cluster: spark.task.cpus says
    assert batch.concurrent_tasks(3) == 3 and batch.concurrent_tasks(20) == 8



def test_a_gpu_task_uses_the_gpu_spark_assigned_it(monkeypatch):
    """On a GPU cluster (spark.task.resource.gpu.amount 1) each task runs on its own GPU address, with
    the machine's cores shared by its GPUs' tasks; without use_gpu, or with no CUDA, it stays on the CPU
    with the cores spark.task.cpus reserved."""
    import torch

    from lakevision.packaging import batch

    before = torch.get_num_threads()
    monkeypatch.setattr(batch.os, "cpu_count", lambda: 8)
    monkeypatch.setattr(batch, "_task_context_resources", lambda: (["2"], 3))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    try:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        assert batch.TaskResources(use_gpu=True).apply() == "cuda:2" and torch.get_num_threads() == 2
        assert batch.TaskResources(use_gpu=False).apply() == "cpu" and torch.get_num_threads() == 3
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        assert batch.TaskResources(use_gpu=True).apply() == "cpu" and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)

# ------------------------------------------------------------------ scoring on Sail
def _local_names_config():
    cfg = load_config(CONFIG_DIR, "local")
    return cfg.model_copy(update={"target": cfg.target.model_copy(update={"schema_": SCHEMA}),
                                  "deployment": cfg.deployment.model_copy(update={"model_name": MODEL})})


def _register(rt: Runtime, seed: int) -> str:
    uri, _ = log_trained_model(rt, seed)
    registry = ModelRegistry(rt, MODEL)
    version, _ = registry.register(uri)
    registry.set_alias(CHAMPION, version.version)
    return version.version


@pytest.fixture(scope="module")
def scoring(spark, tmp_path_factory):
    """An ingested root under the local target's names, a classifier registered as the champion."""
    base = tmp_path_factory.mktemp("scoring")
    ds = generate_dataset(base / "data", num_images=IMAGES, seed=7, image_size=(128, 160))
    rt = Runtime(config=_local_names_config(), spark=spark, kind="local", root=base / "root")
    run_ingest(rt, str(ds.annotation_file), str(ds.image_dir))
    assert delta.read_table(spark, rt.table("images")).count() == IMAGES
    assert _register(rt, seed=1) == "1"
    return rt


def _scores(rt: Runtime, table: str = "scores") -> pd.DataFrame:
    return delta.read_table(rt.spark, rt.table(table)).toPandas()


@pytest.mark.slow
def test_scores_once_per_model_version(scoring):
    rt = scoring
    first = run_scoring(rt)
    assert (first.model_name, first.model_version, first.scored, first.errors, first.skipped) == (MODEL, "1", IMAGES, 0, 0)
    assert first.partitions == 2 and first.model_loads == 1 and first.worker_processes == 1
    rows = _scores(rt)
    assert sorted(rows.columns) == sorted(SCORE_COLUMNS) and len(rows) == IMAGES
    assert rows["error"].isna().all() and rows["inference_ms"].gt(0).all()
    # each prediction is the served model's answer to the same file, though two tasks shared the model
    served = load_image_model(f"models:/{MODEL}/1")
    for _, row in rows.iterrows():
        answer = served.predict_frame(pd.DataFrame(
            {IMAGE_COLUMN: [base64.b64encode(Path(row["path"]).read_bytes()).decode()]})).iloc[0].to_dict()
        stored = json.loads(row["prediction"])
        assert stored.keys() == answer.keys() and stored["label"] == answer["label"]
        assert stored["probabilities"] == pytest.approx(answer["probabilities"], abs=1e-6)
        assert stored["features"]["embedding"] == pytest.approx(answer["features"]["embedding"], rel=1e-3, abs=1e-4)

    again = run_scoring(rt)
    assert (again.scored, again.skipped, again.output["version"]) == (0, IMAGES, first.output["version"])

    assert _register(rt, seed=2) == "2"  # a new champion: every image again, under its version
    new = run_scoring(rt)
    assert (new.model_version, new.scored, new.skipped) == ("2", IMAGES, 0)
    rows = _scores(rt)
    assert rows.groupby("model_version")["image_id"].nunique().to_dict() == {"1": IMAGES, "2": IMAGES}


@pytest.mark.slow
def test_a_bad_image_is_an_error_row_and_a_bad_table_names_the_field(scoring, tmp_path):
    rt = scoring
    good = delta.read_table(rt.spark, rt.table("images")).orderBy("id").first()["path"]
    data = Path(good).read_bytes()
    (tmp_path / "noise.jpg").write_bytes(os.urandom(2000))
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 3])
    (tmp_path / "folder.jpg").mkdir()
    inputs = pd.DataFrame({"id": [1, 2, 3, 4, 5, 6],
                           "path": [good, str(tmp_path / "noise.jpg"), str(tmp_path / "truncated.jpg"),
                                    str(tmp_path / "missing.jpg"), str(tmp_path / "folder.jpg"), None]})
    table = str(tmp_path / "inputs")
    delta.overwrite(rt.spark, rt.spark.createDataFrame(inputs, "id long, path string"), TableRef("inputs", path=table))
    result = run_scoring(rt, input_table=table, output_table="bad_scores")
    assert (result.scored, result.errors) == (6, 5)  # the job succeeds: a bad image is its row's problem
    errors = _scores(rt, "bad_scores").set_index("image_id")["error"].to_dict()
    assert errors[1] is None
    assert errors[2] == "`image` is not a JPEG, PNG, WEBP, BMP image"
    assert errors[3].startswith("the image does not decode: ")
    assert errors[4] == "cannot read the file: No such file or directory"
    assert errors[5] == "cannot read the file: Is a directory"
    assert errors[6] == "cannot read the file: the path is empty"
    assert run_scoring(rt, input_table=table, output_table="bad_scores").scored == 0  # errors are not retried ...
    assert run_scoring(rt, input_table=table, output_table="bad_scores", retry_errors=True).scored == 5  # ... unless asked

    with pytest.raises(DataError, match=r"inputs@v0: no column 'file' \(columns: id, path\); name the right one "
                                        "with --path-column"):
        run_scoring(rt, input_table=table, path_column="file")
    repeated = pd.DataFrame({"id": [7, 7], "path": [good, good]})
    delta.overwrite(rt.spark, rt.spark.createDataFrame(repeated, "id long, path string"), TableRef("inputs", path=table))
    with pytest.raises(DataError, match=r"inputs@v1: id 7 is on 2 rows; image ids must be unique"):
        run_scoring(rt, input_table=table)
    mlflow.set_tracking_uri(rt.tracking_uri)
    with pytest.raises(ScoringError, match=r"is not a lakevision serving model \(it has no serving_spec.json\)"):
        run_scoring(rt, model=log_unsendable_model(), output_table="never")


def _cli_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEVISION_")}
    return {**env, "LAKEVISION_SCHEMA": SCHEMA, "LAKEVISION_MODEL_NAME": MODEL}


@pytest.mark.slow
def test_a_killed_run_leaves_a_readable_table_and_the_next_run_completes_it(scoring):
    rt = scoring
    out = Path(rt.table("killed").path)
    argv = [sys.executable, "-m", "lakevision.cli", "score", "--root", str(rt.root), "--output-table", "killed",
            "--partitions", "1", "--set", "deployment.scoring.round_images=2", "--json"]
    with owned(argv, cwd=REPO, env=_cli_env(), stdout=open(os.devnull, "w"), stderr=open(os.devnull, "w")) as proc:
        deadline = time.monotonic() + 120
        while not (out / "_delta_log" / "00000000000000000000.json").exists():
            assert proc.poll() is None and time.monotonic() < deadline, "the run ended or hung before its first round"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    committed = _scores(rt, "killed")  # readable at the last round the killed run committed
    assert 0 < len(committed) < IMAGES and committed["image_id"].is_unique
    rest = run_scoring(rt, output_table="killed")
    assert (rest.skipped, rest.scored) == (len(committed), IMAGES - len(committed))
    rows = _scores(rt, "killed")
    assert len(rows) == IMAGES and rows["image_id"].is_unique and rows["error"].isna().all()


@pytest.mark.slow
def test_the_score_job_runs_in_the_local_runner(scoring):
    rt = scoring
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAKEVISION_")}
    proc = run([sys.executable, "-m", "lakevision.cli", "bundle", "run", "-t", "local", "score", "--json",
                "--root", str(rt.root), "--param", "output_table=job_scores"], cwd=REPO, env=env, timeout=300)
    assert proc.stdout.strip(), proc.stderr[-3000:]
    job = json.loads(proc.stdout)
    task = job["tasks"][0]
    assert job["status"] == "SUCCESS", task["message"]
    champion = ModelRegistry(rt, MODEL).by_alias(CHAMPION).version
    assert task["values"]["scored"] == IMAGES and task["values"]["errors"] == 0
    assert task["values"]["model_version"] == champion
    assert len(_scores(rt, "job_scores")) == IMAGES
