"""Shared fixtures: one real Sail server for the session, a fresh table root per test."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RUST_LOG", "warn,sail_common::actor=error")

from lakevision.config import load_config  # noqa: E402
from lakevision.local.sail import SailServer  # noqa: E402
from lakevision.runtime import Runtime  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CONFIG_DIR = REPO / "bundle" / "config"


@pytest.fixture(scope="session")
def spark():
    from pyspark.sql import SparkSession

    server = SailServer().start()
    session = SparkSession.builder.remote(server.url).getOrCreate()
    yield session
    session.stop()
    server.stop()


@pytest.fixture
def config():
    return load_config(CONFIG_DIR, "local")


@pytest.fixture
def runtime(spark, config, tmp_path) -> Runtime:
    """A local runtime on the shared Sail server with its own table root."""
    return Runtime(config=config, spark=spark, kind="local", root=tmp_path / "root")


@pytest.fixture(scope="module")
def ingested_runtime(spark, tmp_path_factory):
    """A runtime over a small ingested synthetic dataset, shared by one test module."""
    from lakevision.data.ingest import run_ingest
    from lakevision.data.synthetic import generate_dataset

    base = tmp_path_factory.mktemp("ingested")
    ds = generate_dataset(base / "data", num_images=40, seed=31, image_size=(128, 160))
    rt = Runtime(config=load_config(CONFIG_DIR, "local"), spark=spark, kind="local", root=base / "root")
    run_ingest(rt, str(ds.annotation_file), str(ds.image_dir))
    return rt


def pytest_collection_modifyitems(items):
    """Everything not marked slow is the unit tier (`make test-fast`)."""
    for item in items:
        if item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.unit)
