"""Configuration loading: the repo's files, defaults, and errors that name the file and key."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from lakevision.config import ConfigError, load_config

from .conftest import CONFIG_DIR


def _copy_config(tmp_path: Path) -> Path:
    dst = tmp_path / "config"
    shutil.copytree(CONFIG_DIR, dst)
    return dst


def test_repo_config_has_api_reference_values():
    cfg = load_config(CONFIG_DIR, "local")
    dp = cfg.data
    assert (dp.batch_size, dp.num_workers) == (32, 4)
    assert (dp.validation.min_image_size, dp.validation.max_image_size) == (100, 2000)
    assert cfg.training.model.learning_rate == pytest.approx(1e-4)
    assert cfg.training.model.weight_decay == pytest.approx(1e-5)
    assert cfg.training.distributed.num_workers == 4
    assert cfg.training.distributed.use_gpu is True
    ep = cfg.deployment.endpoint
    assert (ep.instance_type, ep.min_instances, ep.max_instances) == ("Standard_DS3_v2", 1, 5)
    assert cfg.deployment.monitoring.metrics == ["latency", "throughput", "error_rate"]


@pytest.mark.parametrize("target", ["local", "dev", "staging", "prod"])
def test_every_target_loads(target):
    cfg = load_config(CONFIG_DIR, target)
    assert cfg.target_name == target
    assert cfg.target.runtime == ("local" if target == "local" else "databricks")


def test_absent_files_keep_defaults(tmp_path):
    cfg = load_config(tmp_path, "local")
    assert cfg.data.validation.min_image_size == 100


@pytest.mark.parametrize(
    "file, text, expected",
    [
        ("data_config.yaml", "data_processing:\n  batch_sise: 32\n",
         r"data_config.yaml: data_processing.batch_sise: Extra inputs are not permitted"),
        ("data_config.yaml", "data_processing:\n  validation:\n    min_image_size: big\n",
         r"data_config.yaml: data_processing.validation.min_image_size: .*integer.*'big'"),
        ("data_config.yaml", "data_processing:\n  validation:\n    min_image_size: -5\n",
         r"data_processing.validation.min_image_size: Input should be greater than 0 \(got -5\)"),
        ("data_config.yaml", "data_processing:\n  validation:\n    min_image_size: 3000\n",
         r"data_processing.validation: .*min_image_size \(3000\) is larger than max_image_size \(2000\)"),
        ("data_config.yaml", "data_processing:\n  splits: {train: 0.9, val: 0.2, test: 0.1}\n",
         r"data_processing.splits: .*must be 1.0, got 1.2"),
        ("training_config.yaml", "training:\n  distributed:\n    use_gpu: maybe\n",
         r"training_config.yaml: training.distributed.use_gpu: .*boolean"),
        ("deployment_config.yaml", "deployment:\n  monitoring:\n    metrics: [latency, vibes]\n",
         r"deployment_config.yaml: deployment.monitoring.metrics.1: .*'latency', 'throughput' or 'error_rate'"),
        ("deployment_config.yaml", "deployment:\n  endpoint:\n    min_instances: 9\n",
         r"deployment.endpoint: .*min_instances \(9\) is larger than max_instances \(5\)"),
        ("data_config.yaml", "data_processing: [1, 2\n", r"data_config.yaml: not valid YAML"),
        ("data_config.yaml", "- just\n- a list\n", r"data_config.yaml: <top level>: expected a mapping, got list"),
        ("targets.yaml", "targets:\n  dev:\n    runtime: databricks\n    schema: x\n",
         r"targets.yaml: targets.dev: .*needs `catalog` and `volume`"),
    ],
)
def test_bad_config_names_file_and_key(tmp_path, file, text, expected):
    cdir = _copy_config(tmp_path)
    (cdir / file).write_text(text)
    target = "dev" if file == "targets.yaml" else "local"
    with pytest.raises(ConfigError, match=expected):
        load_config(cdir, target)


def test_unknown_target(tmp_path):
    with pytest.raises(ConfigError, match=r"targets.yaml: targets.qa: unknown target; known: \['dev', 'local'"):
        load_config(CONFIG_DIR, "qa")


def test_missing_config_dir(tmp_path):
    with pytest.raises(ConfigError, match="config directory does not exist"):
        load_config(tmp_path / "nope")


def test_cpu_profile_lays_over_the_files_and_set_wins():
    cfg = load_config(CONFIG_DIR, "local", ["training.data.image_size=96"], profile="cpu")
    t = cfg.training
    assert (t.data.image_size, t.model.learning_rate, t.distributed.use_gpu) == (96, 1e-3, False)
    assert t.model.weight_decay == pytest.approx(1e-5)  # untouched keys keep the file's value
    assert cfg.profile == str(CONFIG_DIR / "profiles" / "cpu.yaml")


def test_profile_errors_name_the_profile(tmp_path):
    bad = tmp_path / "tiny.yaml"
    bad.write_text("training:\n  data:\n    image_sise: 3\n")
    with pytest.raises(ConfigError, match=r"training_config.yaml \+ .*tiny.yaml: training.data.image_sise: Extra inputs"):
        load_config(CONFIG_DIR, "local", profile=str(bad))
    bad.write_text("trainig:\n  data: {}\n")
    with pytest.raises(ConfigError, match=r"tiny.yaml: trainig: unknown section"):
        load_config(CONFIG_DIR, "local", profile=str(bad))
    with pytest.raises(ConfigError, match=r"profile 'laptop' not found; known profiles: \['cpu', 'gpu'\]"):
        load_config(CONFIG_DIR, "local", profile="laptop")


def test_target_and_uc_names_from_the_environment(monkeypatch):
    monkeypatch.setenv("LAKEVISION_TARGET", "staging")
    monkeypatch.setenv("LAKEVISION_SCHEMA", "from_bundle")
    monkeypatch.setenv("LAKEVISION_EXPERIMENT", "/Shared/x")
    cfg = load_config(CONFIG_DIR)
    assert cfg.target_name == "staging"
    assert (cfg.target.schema_, cfg.target.experiment, cfg.target.catalog) == ("from_bundle", "/Shared/x", "main")


@pytest.mark.parametrize("override", ["deployment.x=[1,", "training.model.learning_rate={a: b", 'data_processing.batch_size="x'])
def test_a_set_value_that_is_not_yaml_names_the_key(override):
    key, _, value = override.partition("=")
    with pytest.raises(ConfigError, match=rf"^override {re.escape(key)}: {re.escape(repr(value))} is not a YAML value: "):
        load_config(CONFIG_DIR, "local", [override])


def test_a_bad_set_value_is_one_line_from_the_command_line(capsys):
    from lakevision.cli import main

    assert main(["train", "--config", str(CONFIG_DIR), "--set", "deployment.x=[1,"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lakevision train: error: override deployment.x: '[1,' is not a YAML")
