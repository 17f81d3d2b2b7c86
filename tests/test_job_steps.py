"""What a workspace would otherwise find out at run time: job notebooks read their widgets right,
notebooks opened in a deployed folder find their bundle, the wheel brings what the runtime lacks,
model requirements are installable, and registry tags pass Unity Catalog's rules."""

from __future__ import annotations

import argparse
import ast
import os
import re
import shutil
import sys
import tempfile
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import mlflow
import pytest
import yaml

from lakevision.local.ml_runtimes import runtime_table
from lakevision.jobs import STEPS
from lakevision.jobs.notebook import WidgetError, _WidgetParser, widget_arguments
from lakevision.registry.model_registry import RegistryError, check_tag_key, tag_key
from lakevision.local.workspace.serving import ImageBuildError, check_installable
from lakevision.tracking import pinned_requirements

from . import processes
from .conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def _parser(step: str) -> argparse.ArgumentParser:
    parser = _WidgetParser(prog=f"jobs/{step}")
    STEPS[step].add_arguments(parser)
    return parser


def test_widgets_become_the_steps_command_line():
    widgets = {"model_uri": "models:/m-1", "data_version": "3", "continue_on_fail": "true", "model_name": "",
               "set": "training.a=1\n\ndeployment.b=[1, 2]\n", "json": "true"}
    argv = widget_arguments(_parser("gate"), lambda name, default: widgets.get(name, default))
    assert argv == ["--model-uri", "models:/m-1", "--data-version", "3", "--continue-on-fail",
                    "--set", "training.a=1", "--set", "deployment.b=[1, 2]"]  # empty widgets and json are left out
    args = _parser("gate").parse_args(argv)
    assert (args.data_version, args.continue_on_fail, args.overrides) == (3, True, ["training.a=1", "deployment.b=[1, 2]"])
    flag_off = widget_arguments(_parser("gate"), lambda name, default: {"continue_on_fail": "false"}.get(name, default))
    assert "--continue-on-fail" not in flag_off


def test_bad_widgets_fail_with_the_widget_named():
    with pytest.raises(WidgetError, match="widget 'continue_on_fail': 'maybe' is not true or false"):
        widget_arguments(_parser("gate"), lambda name, default: {"continue_on_fail": "maybe"}.get(name, default))
    with pytest.raises(WidgetError, match="jobs/gate: the following arguments are required: --model-uri"):
        _parser("gate").parse_args([])
    with pytest.raises(WidgetError, match="argument --data-version: invalid optional_int value: 'v3'"):
        _parser("train").parse_args(["--data-version", "v3"])


def test_every_step_has_its_notebook_and_every_notebook_its_step():
    assert sorted(p.stem for p in (REPO / "jobs").glob("*.py")) == sorted(STEPS)
    for name in STEPS:
        text = (REPO / "jobs" / f"{name}.py").read_text()
        assert text.startswith("# Databricks notebook source\n") and f'run_notebook_step("{name}")' in text


# ------------------------------------------------------------------ notebooks on a workspace
def _deployed_copy(tmp_path: Path, target: str) -> Path:
    files = tmp_path / "Workspace" / "Users" / "jane.doe@lakevision.example" / ".bundle" / "lakevision" / target / "files"
    shutil.copytree(REPO, files, ignore=shutil.ignore_patterns(".venv", ".git", ".lakevision", "mlruns", "*.egg-info",
                                                               "__pycache__", ".pytest_cache", "benchmarks", "tests"))
    return files


@pytest.fixture
def clean_env(monkeypatch):
    """No lakevision or Databricks variables; and the environment as it was afterwards, as
    notebook_config exports the bundle's names for the notebook's later cells."""
    saved = dict(os.environ)
    for key in list(os.environ):
        if key.startswith(("LAKEVISION_", "DATABRICKS_", "BUNDLE_VAR_")):
            monkeypatch.delenv(key)
    yield monkeypatch
    os.environ.clear()
    os.environ.update(saved)


def test_a_notebook_in_a_deployed_folder_finds_its_target_and_names(tmp_path, clean_env):
    from lakevision.notebook_setup import notebook_config

    files = _deployed_copy(tmp_path, "dev")
    clean_env.chdir(files / "notebooks")
    clean_env.setenv("DATABRICKS_USER", "jane.doe@lakevision.example")
    cfg = notebook_config(read=lambda name, default: default)
    assert cfg.target_name == "dev"
    assert cfg.config_dir == files / "bundle" / "config"
    assert (cfg.target.catalog, cfg.target.schema_) == ("main", "dev_jane_doe_lakevision")
    assert cfg.deployment.model_name == "dev_jane_doe_lakevision_detector"
    assert cfg.deployment.endpoint_name == "lakevision-detector-dev-jane-doe"
    assert cfg.target.experiment == "/Workspace/Users/jane.doe@lakevision.example/[dev jane_doe] lakevision"


def test_a_notebook_in_a_checkout_is_local(clean_env):
    from lakevision.notebook_setup import notebook_config

    clean_env.chdir(REPO / "notebooks")
    cfg = notebook_config(read=lambda name, default: default)
    assert cfg.target_name == "local" and cfg.config_dir == REPO / "bundle" / "config"
    assert cfg.target.schema_.startswith("dev_") and cfg.target.schema_.endswith("_lakevision")


def test_notebooks_install_the_wheel_the_bundle_deployed():
    """`bundle deploy` uploads the wheel to <root>/artifacts/.internal (databricks/cli libraries/filer.go)
    and syncs the notebooks to <root>/files/notebooks: the %pip line installs that file, built from
    this version, and builds nothing inside /Workspace."""
    version = PYPROJECT["project"]["version"]
    wheel = f"lakevision-{version}-py3-none-any.whl"
    for path in sorted((REPO / "notebooks").glob("*.py")):
        pips = re.findall(r"^# MAGIC %pip install (.+)$", path.read_text(), re.MULTILINE)
        assert pips == [f"--quiet ../../artifacts/.internal/{wheel}"], path.name


# ------------------------------------------------------------------ the wheel and the runtime
def _top(module: str) -> str:
    """The importable package: ``databricks`` is a namespace shared by the SDK and the bundle classes."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "databricks" else parts[0]


def _third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {_top(a.name) for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(_top(node.module))
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("lakevision", "__future__")}


# Local stand-ins and the laptop runtime: their packages come with the `local` extra, never on a cluster.
LOCAL_ONLY = {"fastapi": "the local workspace", "starlette": "the local workspace", "uvicorn": "the local workspace",
              "deltalake": "local Delta table versions and the local inference table", "pysail": "the local Spark",
              "databricks.bundles": "bundle validate"}


def test_the_wheel_brings_what_the_default_runtime_lacks():
    """Every package the code imports is in the runtime the bundle's clusters use, a core dependency
    of the wheel, or a package of the local stand-ins only."""
    table = runtime_table()
    bundle = yaml.safe_load((REPO / "databricks.yml").read_text())
    runtime = table.runtimes[bundle["variables"]["gpu_spark_version"]["default"]]
    from packaging.requirements import Requirement

    from packaging.utils import canonicalize_name

    wheel = {canonicalize_name(Requirement(r).name) for r in PYPROJECT["project"]["dependencies"]}
    shipped = {canonicalize_name(k) for k in runtime.libraries} | {"pyspark"}  # pyspark is the runtime's own Spark
    dists = packages_distributions()
    missing = []
    for path in sorted((REPO / "src" / "lakevision").rglob("*.py")):
        for module in _third_party_imports(path):
            if module in LOCAL_ONLY:
                continue
            candidates = {"databricks.sdk": ["databricks-sdk"]}.get(module) or dists.get(module) or [module]
            if not {canonicalize_name(d) for d in candidates} & (shipped | wheel):
                missing.append(f"{path.relative_to(REPO)}: {module} ({', '.join(candidates)})")
    assert missing == []
    assert set(table.not_in_runtimes) <= wheel  # what no runtime has, the wheel installs


def test_the_wheel_does_not_force_what_the_runtime_provides():
    from packaging.requirements import Requirement

    wheel = {Requirement(r).name.lower() for r in PYPROJECT["project"]["dependencies"]}
    assert not wheel & {"pyspark", "torch", "torchvision", "mlflow", "mlflow-skinny", "ray"}


def test_runtime_table_in_readme_matches_the_file():
    readme = (REPO / "README.md").read_text()
    doc = yaml.safe_load((REPO / "src" / "lakevision" / "local" / "ml_runtimes.yaml").read_text())
    for name, spec in doc["runtimes"].items():
        row = next((line for line in readme.splitlines() if line.startswith(f"| {name} |")), None)
        assert row is not None, name
        for package in ("mlflow", "torch", "torchvision", "ray"):
            assert f" {spec['libraries'][package]} " in row, (name, package)
        assert f" {spec['spark']} " in row


# ------------------------------------------------------------------ model requirements and registry tags
def test_pins_drop_local_version_labels():
    fake = {"torch": "2.7.0+cu126", "torchvision": "0.22.0+cpu", "numpy": "2.1.3"}.__getitem__
    assert pinned_requirements("torch", "torchvision", "numpy", version=fake) == [
        "torch==2.7.0", "torchvision==0.22.0", "numpy==2.1.3"]


def test_local_workspace_refuses_a_model_no_index_could_build():
    check_installable(["mlflow==3.17.2", "torch==2.7.0", "# a comment", "", "pillow>=10"])
    with pytest.raises(ImageBuildError, match=r"requirements.txt pins torch==2.7.0\+cu126, a local version"):
        check_installable(["mlflow==3.17.2", "torch==2.7.0+cu126"])


class _Echo(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def test_local_workspace_load_reads_the_registered_requirements(tmp_path):
    """Through the path an endpoint takes: the registered version's own requirements.txt decides."""
    from lakevision.local.workspace.serving import load_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    for name, pin in (("built", "torch==2.7.0"), ("local_pin", "torch==2.7.0+cu126")):
        with mlflow.start_run():
            mlflow.pyfunc.log_model(name="m", python_model=_Echo(), pip_requirements=[pin], registered_model_name=name)
    assert load_model("built", "1").model.predict([1, 2]) == [1, 2]
    with pytest.raises(ImageBuildError, match=r"pins torch==2.7.0\+cu126"):
        load_model("local_pin", "1")
    # the load downloaded into a folder of its own and removed it (the suite's leak check sees the rest)
    assert not list(Path(tempfile.gettempdir()).glob("lakevision-model-*"))


@pytest.mark.parametrize("key", ["gate.decision", "gate-decision", "a=b", "a/b", "a:b", "a,b", ""])
def test_uc_tag_keys_refused(key):
    with pytest.raises(RegistryError, match="Unity Catalog refuses"):
        check_tag_key(key)


def test_gate_tag_keys_pass_the_uc_rule():
    check_tag_key("gate_decision")
    assert tag_key("gate_metric", "ap_my-class.v2") == "gate_metric_ap_my_class_v2"


def test_the_command_line_starts_without_the_ml_stack():
    """`lakevision bundle validate` and `--help` must not pay for torch, Spark or MLflow: every step's
    library is imported only when the step runs."""
    code = ("import sys, lakevision.cli; lakevision.cli.build_parser(); "
            "print(sorted(m for m in ('torch', 'pyspark', 'mlflow', 'ray') if m in sys.modules))")
    out = processes.run([sys.executable, "-c", code], timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
