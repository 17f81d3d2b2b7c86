"""`lakevision bundle validate` on the real bundle and on broken copies of it, and the local job
runner's semantics (task values, condition tasks, run_if, retries, timeouts) on small jobs of
plain Python scripts."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from lakevision.bundle.loader import BundleError, load_bundle
from lakevision.bundle.runner import (EXCLUDED, FAILED, SUCCESS, TIMED_OUT, UPSTREAM_FAILED, LocalJobRunner, compare,
                                      decide)
from lakevision.bundle.validate import validate_bundle

from .conftest import REPO

TARGETS = ["dev", "staging", "prod", "local"]
PROD_VARS = {"service_principal": "6f0c1a8e-1111-4c2b-9d3e-000000000001"}


def _cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lakevision.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


# ------------------------------------------------------------------ the real bundle
@pytest.mark.parametrize("target", TARGETS)
def test_real_bundle_validates_for_every_target(target):
    bundle = load_bundle(REPO, target, PROD_VARS if target == "prod" else None)
    assert validate_bundle(bundle) == []
    assert set(bundle.resources["jobs"]) == {"ingest", "train", "evaluate", "deploy", "monitor", "cv_pipeline"}
    assert set(bundle.resources) >= {"experiments", "registered_models", "schemas", "volumes"}
    pipeline = bundle.resources["jobs"]["cv_pipeline"]
    by_key = {t["task_key"]: t for t in pipeline["tasks"]}
    assert by_key["deploy"]["depends_on"] == [{"task_key": "gate_passed", "outcome": "true"}]
    assert by_key["gate_passed"]["condition_task"]["left"] == "{{tasks.gate.values.passed}}"
    assert pipeline["schedule"]["quartz_cron_expression"] and pipeline["email_notifications"]["on_failure"]
    gpu = next(c["new_cluster"] for c in pipeline["job_clusters"] if c["job_cluster_key"] == "gpu")
    assert gpu["spark_conf"]["spark.task.resource.gpu.amount"] == "1"
    assert gpu["spark_env_vars"]["LAKEVISION_TARGET"] == target
    assert gpu["spark_env_vars"]["LAKEVISION_SCHEMA"] == bundle.variables["schema"]
    assert bundle.resources["jobs"]["monitor"]["schedule"]["pause_status"] == "UNPAUSED"


def test_targets_override_variables_mode_and_run_as():
    prod = load_bundle(REPO, "prod", PROD_VARS)
    dev = load_bundle(REPO, "dev")
    assert load_bundle(REPO).target == "dev"  # the default target
    assert (prod.mode, dev.mode) == ("production", "development")
    assert prod.run_as == {"service_principal_name": PROD_VARS["service_principal"]}
    assert prod.variables["schema"] == "lakevision" and dev.variables["schema"] == "lakevision_dev"
    assert prod.resources["registered_models"]["detector"]["schema_name"] == "lakevision"
    assert dev.resources["experiments"]["lakevision"]["name"].startswith("/Workspace/Users/")


def test_prod_without_its_service_principal_names_the_variable():
    problems = validate_bundle(load_bundle(REPO, "prod"))
    assert [str(p) for p in problems] == [
        "databricks.yml: targets.prod.run_as.service_principal_name: variable 'service_principal' has no value "
        "for target 'prod': give it a default, set targets.prod.variables.service_principal, or pass "
        "--var service_principal=... (or BUNDLE_VAR_service_principal)"]


def test_cli_validate_every_target():
    for target in TARGETS:
        extra = ["--var", f"service_principal={PROD_VARS['service_principal']}"] if target == "prod" else []
        proc = _cli("bundle", "validate", "-t", target, *extra)
        assert proc.returncode == 0, proc.stderr
        assert "Validation OK!" in proc.stdout and f"Target: {target}" in proc.stdout


# ------------------------------------------------------------------ broken copies
@pytest.fixture
def bundle_copy(tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(".venv", ".git", ".lakevision", "mlruns", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", ".ruff_cache", "benchmarks"))
    return dst


def _edit(path: Path, fn) -> None:
    doc = yaml.safe_load(path.read_text())
    fn(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _tasks(doc: dict, job: str) -> dict:
    return {t["task_key"]: t for t in doc["resources"]["jobs"][job]["tasks"]}


def _rename_task_type(doc):
    _tasks(doc, "train")["train"]["python_wheel_taks"] = _tasks(doc, "train")["train"].pop("python_wheel_task")


def _two_types(doc):
    _tasks(doc, "ingest")["ingest"]["spark_python_task"] = {"python_file": "../jobs/ingest.py"}


def _cycle(doc):
    _tasks(doc, "cv_pipeline")["ingest"]["depends_on"] = [{"task_key": "deploy"}]


def _missing_file(doc):
    task = _tasks(doc, "ingest")["ingest"]
    task.pop("python_wheel_task")
    task["spark_python_task"] = {"python_file": "../jobs/ingset.py"}


def _undefined_var(doc):
    _tasks(doc, "deploy")["deploy"]["python_wheel_task"]["parameters"][-1] = "${var.endpoint_nmae}"


def _bad_entry_point(doc):
    _tasks(doc, "evaluate")["evaluate"]["python_wheel_task"]["entry_point"] = "lakevison"


def _unknown_dependency(doc):
    _tasks(doc, "cv_pipeline")["evaluate"]["depends_on"] = [{"task_key": "training"}]


def _value_not_upstream(doc):
    _tasks(doc, "cv_pipeline")["train"]["python_wheel_task"]["parameters"][-1] = "{{tasks.gate.values.passed}}"


def _bad_enum(doc):
    _tasks(doc, "cv_pipeline")["gate_passed"]["condition_task"]["op"] = "EQUALS"


@pytest.mark.parametrize("file, edit, expected", [
    ("train.job.yml", _rename_task_type,
     "resources/train.job.yml: resources.jobs.train.tasks[0].python_wheel_taks: Unexpected field 'python_wheel_taks' for class Task"),
    ("ingest.job.yml", _two_types,
     "resources/ingest.job.yml: resources.jobs.ingest.tasks[0]: task 'ingest' has 2 task types (python_wheel_task, spark_python_task)"),
    ("cv_pipeline.job.yml", _cycle,
     "resources/cv_pipeline.job.yml: resources.jobs.cv_pipeline.tasks: depends_on has a cycle: "
     "ingest -> deploy -> gate_passed -> gate -> evaluate -> train -> ingest"),
    ("ingest.job.yml", _missing_file,
     "resources/ingest.job.yml: resources.jobs.ingest.tasks[0].spark_python_task.python_file: file not found: ../jobs/ingset.py"),
    ("deploy.job.yml", _undefined_var,
     "resources/deploy.job.yml: resources.jobs.deploy.tasks[0].python_wheel_task.parameters[6]: "
     "undefined reference ${var.endpoint_nmae}"),
    ("evaluate.job.yml", _bad_entry_point,
     "resources/evaluate.job.yml: resources.jobs.evaluate.tasks[0].python_wheel_task.entry_point: "
     "'lakevison' is not an entry point of lakevision"),
    ("cv_pipeline.job.yml", _unknown_dependency,
     "resources/cv_pipeline.job.yml: resources.jobs.cv_pipeline.tasks[2].depends_on[0].task_key: task 'evaluate' "
     "depends on 'training', which is not a task of job 'cv_pipeline'"),
    ("cv_pipeline.job.yml", _value_not_upstream,
     "resources/cv_pipeline.job.yml: resources.jobs.cv_pipeline.tasks[1]: {{tasks.gate.values.passed}}: task 'gate' "
     "is not upstream of 'train'"),
    ("cv_pipeline.job.yml", _bad_enum,
     "resources/cv_pipeline.job.yml: resources.jobs.cv_pipeline.tasks[4].condition_task.op: 'EQUALS' is not a valid "
     "ConditionTaskOp"),
])
def test_broken_bundle_fails_with_file_and_path(bundle_copy, file, edit, expected):
    _edit(bundle_copy / "resources" / file, edit)
    proc = _cli("bundle", "validate", "-t", "dev", cwd=bundle_copy)
    assert proc.returncode == 2
    assert expected in proc.stderr, proc.stderr


def test_broken_yaml_names_the_line(bundle_copy):
    path = bundle_copy / "resources" / "monitor.job.yml"
    path.write_text(path.read_text().replace("      schedule:", "      schedule:\n    - oops: [", 1))
    proc = _cli("bundle", "validate", cwd=bundle_copy)
    assert proc.returncode == 2
    assert "resources/monitor.job.yml: line " in proc.stderr and "not valid YAML" in proc.stderr


def test_unknown_target_and_top_level_key(bundle_copy):
    with pytest.raises(BundleError, match=r"targets.qa: unknown target; targets: \['dev', 'local', 'prod', 'staging'\]"):
        load_bundle(bundle_copy, "qa")
    _edit(bundle_copy / "databricks.yml", lambda d: d.update(resourcez={}))
    problems = [str(p) for p in validate_bundle(load_bundle(bundle_copy, "dev"))]
    assert any(p.startswith("databricks.yml: resourcez: unknown top-level key") for p in problems)


def test_job_defined_twice(bundle_copy):
    shutil.copy(bundle_copy / "resources" / "train.job.yml", bundle_copy / "resources" / "train2.job.yml")
    problems = [str(p) for p in validate_bundle(load_bundle(bundle_copy, "dev"))]
    assert "resources/train2.job.yml: resources.jobs.train: already defined in resources/train.job.yml" in problems


# ------------------------------------------------------------------ runner semantics
SCRIPT = """
import os, sys, time
from lakevision.bundle.task_context import set_task_values
args = dict(a.split("=", 1) for a in sys.argv[1:])
if "sleep" in args:
    time.sleep(float(args["sleep"]))
counter = args.get("counter")
if counter:  # fail until the file has seen `fail_times` attempts
    n = int(open(counter).read()) if os.path.exists(counter) else 0
    open(counter, "w").write(str(n + 1))
    if n < int(args["fail_times"]):
        sys.exit(f"lakevision test: error: attempt {n + 1} fails")
if args.get("fail"):
    sys.exit("lakevision test: error: " + args["fail"])
set_task_values(**{k[2:]: v for k, v in args.items() if k.startswith("v:")},
                env_schema=os.environ.get("LAKEVISION_SCHEMA"), root=os.environ.get("LAKEVISION_ROOT"))
"""


def _mini_bundle(tmp_path: Path, tasks: list[dict], parameters: list[dict] | None = None, **job) -> Path:
    root = tmp_path / "mini"
    (root / "src").mkdir(parents=True)
    (root / "src" / "step.py").write_text(SCRIPT)
    (root / "databricks.yml").write_text(yaml.safe_dump({
        "bundle": {"name": "mini"},
        "variables": {"schema": {"default": "s1"}},
        "targets": {"local": {"default": True, "variables": {"schema": "s_local"}}},
        "resources": {"jobs": {"j": {
            "name": "mini", "parameters": parameters or [],
            "job_clusters": [{"job_cluster_key": "c", "new_cluster": {
                "spark_version": "x", "num_workers": 1, "spark_env_vars": {"LAKEVISION_SCHEMA": "${var.schema}"}}}],
            "tasks": tasks, **job}}},
    }))
    return root


def _py(key: str, *params: str, depends: list | None = None, **extra) -> dict:
    task = {"task_key": key, "job_cluster_key": "c",
            "spark_python_task": {"python_file": "src/step.py", "parameters": list(params)}, **extra}
    if depends:
        task["depends_on"] = [d if isinstance(d, dict) else {"task_key": d} for d in depends]
    return task


def _run(root: Path, data_root: Path, params: dict | None = None):
    events = []
    runner = LocalJobRunner(load_bundle(root, "local", local_files=True), data_root,
                            progress=lambda e, t, i, n: events.append((e, t.task_key, t.status)))
    return runner.run("j", params), events


def test_task_values_parameters_and_condition_outcomes(tmp_path):
    tasks = [
        _py("produce", "v:model=m-{{job.parameters.name}}", "v:score=0.7"),
        _py("use", "v:got={{tasks.produce.values.model}}", depends=["produce"]),
        {"task_key": "good_enough", "depends_on": [{"task_key": "produce"}],
         "condition_task": {"left": "{{tasks.produce.values.score}}", "op": "GREATER_THAN_OR_EQUAL", "right": "0.65"}},
        _py("on_true", "v:ran=yes", depends=[{"task_key": "good_enough", "outcome": "true"}]),
        _py("on_false", "v:ran=yes", depends=[{"task_key": "good_enough", "outcome": "false"}]),
        _py("after_false", depends=["on_false"]),
    ]
    root = _mini_bundle(tmp_path, tasks, parameters=[{"name": "name", "default": "a"}])
    run, events = _run(root, tmp_path / "data", {"name": "zz"})
    status = {t.task_key: t.status for t in run.tasks}
    assert run.status == SUCCESS
    assert status == {"produce": SUCCESS, "use": SUCCESS, "good_enough": SUCCESS, "on_true": SUCCESS,
                      "on_false": EXCLUDED, "after_false": EXCLUDED}
    assert run.task("use").values["got"] == "m-zz"
    assert run.task("good_enough").outcome == "true"
    # the job cluster's environment and the data root reach the task's process
    assert run.task("produce").values["env_schema"] == "s_local"
    assert run.task("produce").values["root"] == str((tmp_path / "data").resolve())
    assert ("start", "produce", "RUNNING") in events and ("done", "on_false", EXCLUDED) in events
    saved = json.loads((Path(run.run_dir) / "run.json").read_text())
    assert saved["tasks"][1]["values"] == {"got": "m-zz", "env_schema": "s_local", "root": str((tmp_path / "data").resolve())}


def test_failure_marks_dependents_and_run_if_runs_cleanup(tmp_path):
    tasks = [
        _py("ok"),
        _py("broken", "fail=the input is bad", depends=["ok"]),
        _py("downstream", depends=["broken"]),
        _py("further", depends=["downstream"]),
        _py("cleanup", depends=["broken"], run_if="ALL_DONE"),
        _py("alert", depends=["broken"], run_if="AT_LEAST_ONE_FAILED"),
        _py("no_alert", depends=["ok"], run_if="AT_LEAST_ONE_FAILED"),
    ]
    run, _ = _run(_mini_bundle(tmp_path, tasks), tmp_path / "data")
    status = {t.task_key: t.status for t in run.tasks}
    assert run.status == FAILED
    assert status == {"ok": SUCCESS, "broken": FAILED, "downstream": UPSTREAM_FAILED, "further": UPSTREAM_FAILED,
                      "cleanup": SUCCESS, "alert": SUCCESS, "no_alert": EXCLUDED}
    assert run.task("broken").message == "exit code 1: lakevision test: error: the input is bad"
    assert "broken failed" in run.task("downstream").message


def test_missing_task_value_fails_the_task_with_the_reference(tmp_path):
    tasks = [_py("a", "v:x=1"), _py("b", "v:y={{tasks.a.values.nope}}", depends=["a"])]
    run, _ = _run(_mini_bundle(tmp_path, tasks), tmp_path / "data")
    assert run.task("b").status == FAILED
    assert "{{tasks.a.values.nope}}: task 'a' set no value 'nope' (it set: ['env_schema', 'root', 'x'])" in run.task("b").message


def test_retries_then_success_and_timeout(tmp_path):
    counter = tmp_path / "count"
    tasks = [_py("flaky", f"counter={counter}", "fail_times=2", max_retries=2),
             _py("slow", "sleep=30", timeout_seconds=2, depends=["flaky"])]
    run, _ = _run(_mini_bundle(tmp_path, tasks), tmp_path / "data")
    assert run.task("flaky").status == SUCCESS and run.task("flaky").attempts == 3
    assert run.task("slow").status == TIMED_OUT and run.task("slow").seconds < 10
    assert run.status == FAILED


def test_unknown_parameter_and_invalid_bundle_refused(tmp_path):
    root = _mini_bundle(tmp_path, [_py("a")], parameters=[{"name": "p", "default": "1"}])
    with pytest.raises(Exception, match=r"job 'j' has no parameter 'q'; parameters: \['p'\]"):
        _run(root, tmp_path / "data", {"q": "2"})
    broken = _mini_bundle(tmp_path / "b", [_py("a", depends=["a"])])
    with pytest.raises(BundleError, match=r"depends_on has a cycle: a -> a"):
        _run(broken, tmp_path / "data")


@pytest.mark.parametrize("run_if, deps, expected", [
    ("ALL_SUCCESS", ["success", "success"], None),
    ("ALL_SUCCESS", ["success", "excluded"], EXCLUDED),
    ("ALL_SUCCESS", ["failed", "excluded"], UPSTREAM_FAILED),
    ("NONE_FAILED", ["success", "excluded"], None),
    ("NONE_FAILED", ["excluded"], EXCLUDED),
    ("AT_LEAST_ONE_SUCCESS", ["failed", "success"], None),
    ("ALL_DONE", ["failed", "excluded"], None),
    ("ALL_FAILED", ["failed", "success"], EXCLUDED),
    ("ALL_FAILED", ["failed", "failed"], None),
])
def test_run_if_rules(run_if, deps, expected):
    assert decide(run_if, deps) == expected


def test_condition_compares_numbers_as_numbers():
    assert compare("10", "GREATER_THAN", "9") and not compare("10", "GREATER_THAN", "9a")
    assert compare("true", "EQUAL_TO", "true") and compare("1.0", "EQUAL_TO", "1")


def test_cli_run_json_reports_one_object(tmp_path):
    root = _mini_bundle(tmp_path, [_py("a", "v:x=1"), _py("b", "fail=nope", depends=["a"])])
    proc = _cli("bundle", "run", "j", "--bundle", str(root), "--root", str(tmp_path / "data"), "--json")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert [(t["task_key"], t["status"]) for t in out["tasks"]] == [("a", SUCCESS), ("b", FAILED)]
    assert out["tasks"][0]["values"]["x"] == "1" and out["status"] == FAILED


def test_task_values_refused_when_databricks_would(monkeypatch, tmp_path):
    from lakevision.bundle.task_context import TASK_VALUES_ENV, TaskValueError, set_task_values

    monkeypatch.setenv(TASK_VALUES_ENV, str(tmp_path / "v.json"))
    with pytest.raises(TaskValueError, match="'big': .* bytes of JSON, over Databricks' limit"):
        set_task_values(big="x" * 60_000)
    with pytest.raises(TaskValueError, match="'obj': not JSON-serializable"):
        set_task_values(obj=object())
    set_task_values(a=1)
    set_task_values(b=[1, 2])
    assert json.loads((tmp_path / "v.json").read_text()) == {"a": 1, "b": [1, 2]}


def test_widget_reads_the_runner_environment(monkeypatch):
    from lakevision.bundle.task_context import widget

    monkeypatch.setenv("LAKEVISION_WIDGET_MODEL_URI", "models:/x/1")
    assert widget("model_uri", "d") == "models:/x/1" and widget("other", "d") == "d"


def test_notebook_task_gets_widgets(tmp_path):
    root = _mini_bundle(tmp_path, [])
    (root / "nb.py").write_text(textwrap.dedent("""\
        # Databricks notebook source
        from lakevision.bundle.task_context import set_task_values, widget
        set_task_values(seen=widget("who", "nobody") + "/" + widget("name", "?"))
        """))
    doc = yaml.safe_load((root / "databricks.yml").read_text())
    doc["resources"]["jobs"]["j"]["parameters"] = [{"name": "name", "default": "p"}]
    doc["resources"]["jobs"]["j"]["tasks"] = [{"task_key": "nb", "job_cluster_key": "c",
                                               "notebook_task": {"notebook_path": "nb", "base_parameters": {"who": "w"}}}]
    (root / "databricks.yml").write_text(yaml.safe_dump(doc))
    run, _ = _run(root, tmp_path / "data")
    assert run.task("nb").status == SUCCESS and run.task("nb").values["seen"] == "w/p"
