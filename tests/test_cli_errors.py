"""Every user error leaves the command line as exit 2 and one line that names the bad value,
never as a traceback; nothing is written on the way."""

from __future__ import annotations

import os
import sys

import pandas as pd
import pytest
from deltalake import DeltaTable, write_deltalake

from lakevision.config import load_config
from lakevision.data.synthetic import generate_dataset
from lakevision.runtime import LocalLayout

from . import processes
from .conftest import CONFIG_DIR


def _cli(*args: str, cwd=None) -> tuple[str, str]:
    env = dict(os.environ, LAKEVISION_CONFIG_DIR=str(CONFIG_DIR))
    proc = processes.run([sys.executable, "-m", "lakevision.cli", *args], env=env, cwd=cwd, timeout=300)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stderr.strip().splitlines()[-1], proc.stdout


@pytest.mark.parametrize(("args", "line"), [
    (["--defect", "too_small=x"], "lakevision generate: error: argument --defect: invalid defect_count value: 'too_small=x'"),
    (["--defect", "too_small=0"], "lakevision generate: error: argument --defect: must be at least 1, got 0"),
    (["--defect", "nope"], "lakevision generate: error: --defect nope: unknown code; known: missing_file, "
                           "undecodable, too_small, too_large, size_mismatch, unknown_image, unknown_category, "
                           "bbox_out_of_bounds, invalid_bbox, duplicate_id, unsafe_file, invalid_value, "
                           "invalid_segmentation"),
    (["--images", "-3"], "lakevision generate: error: argument --images: must be at least 1, got -3"),
    (["--images", "many"], "lakevision generate: error: argument --images: invalid positive_int value: 'many'"),
])
def test_generate_refuses_bad_numbers_and_codes(tmp_path, args, line):
    assert _cli("generate", "--out", str(tmp_path / "out"), *args)[0] == line
    assert not (tmp_path / "out").exists()


def test_deploy_refuses_a_traffic_share_outside_1_to_100():
    assert _cli("deploy", "--traffic", "500")[0] == (
        "lakevision deploy: error: argument --traffic: must be a percentage from 1 to 100, got 500")


def test_a_workspace_target_off_databricks_is_refused(tmp_path):
    line, _ = _cli("evaluate", "--target", "dev", "--model-uri", "models:/m-1", "--root", str(tmp_path))
    assert line == ("lakevision evaluate: error: target 'dev' runs on Databricks and there is no Spark session here: "
                    "run it as a bundle job, set SPARK_REMOTE (Databricks Connect), or use --target local")


@pytest.mark.slow  # a Sail server
def test_ingest_into_a_table_with_other_columns_writes_nothing(tmp_path):
    ds = generate_dataset(tmp_path / "data", num_images=6, seed=1)
    root = tmp_path / "root"
    schema = load_config(CONFIG_DIR).target.schema_
    images = LocalLayout(root).table(schema, "images")
    write_deltalake(str(images), pd.DataFrame({"id": [1], "legacy": ["x"]}))
    line, _ = _cli("ingest", "--annotations", str(ds.annotation_file), "--images", str(ds.image_dir),
                   "--root", str(root))
    assert line == (f"lakevision ingest: error: {images}: the existing table has columns ['id', 'legacy'], this job "
                    "needs ['file_name', 'width', 'height']; nothing was written (migrate the table or use another schema)")
    assert DeltaTable(str(images)).version() == 0
    assert sorted(p.name for p in images.parent.iterdir()) == ["images"]  # no other table was started
