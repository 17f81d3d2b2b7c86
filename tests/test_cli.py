"""The `lakevision` command and the jobs/ingest.py notebook as a job runs them: real processes, real tables."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from deltalake import DeltaTable

from lakevision.data.synthetic import DEFECT_CODES, generate_dataset

from .conftest import REPO
from .processes import notebook_step, owned, run

pytestmark = pytest.mark.slow  # ingest processes, one killed

TABLES = ("images", "annotations", "categories", "quarantine", "samples")


def _run(*args, check=True):
    env = dict(os.environ, LAKEVISION_CONFIG_DIR=str(REPO / "bundle" / "config"))
    proc = run([sys.executable, *args], env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def _ingest_args(ds, root):
    return ["--annotations", str(ds.annotation_file), "--images", str(ds.image_dir), "--root", str(root)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("cli") / "data", num_images=30, seed=21,
                            defects={c: 1 for c in DEFECT_CODES})


def test_ingest_json_prints_exactly_one_object(dataset, tmp_path):
    proc = _run("-m", "lakevision.cli", "ingest", *_ingest_args(dataset, tmp_path / "root"), "--json")
    out = json.loads(proc.stdout)  # fails on any extra output
    assert set(out) == {"tables", "quarantine_by_reason", "category_counts", "insufficient"}
    assert set(out["tables"]) == set(TABLES)
    for t in out["tables"].values():
        assert set(t) == {"location", "version", "rows"}
        assert DeltaTable(t["location"]).version() == t["version"]
    assert out["quarantine_by_reason"] == {c: 1 for c in sorted(DEFECT_CODES)}


def test_job_notebook_publishes_values_and_prints_summary(dataset, tmp_path):
    root = tmp_path / "root"
    proc = notebook_step("ingest", {"annotations": str(dataset.annotation_file), "images": str(dataset.image_dir),
                                     "root": str(root)}, tmp_path / "values.json")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checking images" in proc.stderr
    for name in TABLES:
        assert name in proc.stdout
    assert "missing_file" in proc.stdout
    values = json.loads((tmp_path / "values.json").read_text())
    assert values["samples_version"] == DeltaTable(str(root / "tables" / "lakevision" / "samples")).version()
    assert values["quarantined"] == len(DEFECT_CODES)


def test_failing_job_notebook_fails_and_names_the_problem(dataset, tmp_path):
    proc = notebook_step("ingest", {"annotations": str(tmp_path / "missing.json"), "images": str(dataset.image_dir),
                                     "root": str(tmp_path / "root")}, tmp_path / "values.json")
    assert proc.returncode != 0
    assert "missing.json" in proc.stderr.splitlines()[-1]
    proc = notebook_step("ingest", {"images": str(dataset.image_dir)}, tmp_path / "values.json")
    assert proc.returncode != 0
    assert "WidgetError: jobs/ingest: the following arguments are required: --annotations" in proc.stderr


def test_malformed_file_exits_2_with_the_field(dataset, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [], "annotations": [{"id": 1}], "categories": []}')
    proc = _run("-m", "lakevision.cli", "ingest", "--annotations", str(bad), "--images", str(dataset.image_dir),
                "--root", str(tmp_path / "root"), check=False)
    assert proc.returncode == 2
    assert f"{bad}: annotations[0]: Object missing required field `image_id`" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "root" / "tables").exists()


def test_bad_config_exits_2_naming_the_key(dataset, tmp_path):
    cdir = tmp_path / "cfg"
    cdir.mkdir()
    (cdir / "data_config.yaml").write_text("data_processing:\n  validation:\n    max_image_size: 0\n")
    proc = _run("-m", "lakevision.cli", "ingest", *_ingest_args(dataset, tmp_path / "root"), "--config", str(cdir),
                check=False)
    assert proc.returncode == 2
    assert "data_config.yaml: data_processing.validation.max_image_size: Input should be greater than 0" in proc.stderr


def test_killed_ingest_leaves_readable_tables_and_rerun_completes(tmp_path):
    ds = generate_dataset(tmp_path / "data", num_images=150, seed=5, defects={"missing_file": 1})
    root = tmp_path / "root"
    env = dict(os.environ, LAKEVISION_CONFIG_DIR=str(REPO / "bundle" / "config"))
    tables = root / "tables" / "lakevision"
    first_commit = tables / "categories" / "_delta_log" / "00000000000000000000.json"
    with owned([sys.executable, "-m", "lakevision.cli", "ingest", *_ingest_args(ds, root), "--json"],
               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        deadline = time.monotonic() + 120
        while not first_commit.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "ingest never committed its first table"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (tables / "samples" / "_delta_log").exists(), "the kill came too late to be mid-ingest"

    for name in TABLES:
        log = tables / name / "_delta_log"
        if log.exists():
            DeltaTable(str(tables / name)).to_pyarrow_table()  # every committed table reads
    out = json.loads(_run("-m", "lakevision.cli", "ingest", *_ingest_args(ds, root), "--json").stdout)
    assert out["tables"]["images"]["rows"] == 150
    assert out["tables"]["samples"]["rows"] == 150
    assert out["quarantine_by_reason"] == {"missing_file": 1}
    assert DeltaTable(str(tables / "samples")).to_pyarrow_table().num_rows == 150


def test_generate_and_top_level_imports(tmp_path):
    proc = _run("-m", "lakevision.cli", "generate", "--out", str(tmp_path / "g"), "--images", "5",
                "--defect", "too_small=2", "--json")
    summary = json.loads(proc.stdout)
    assert summary["images"] == 7 and len(summary["defects"]["too_small"]) == 2
    import lakevision

    for name in lakevision.__all__:
        assert getattr(lakevision, name) is not None
