"""`lakevision bundle validate` and `summary` on the real bundle and on broken copies of it: the
rules of the Databricks CLI (variables, development-mode names, notebooks) and the failures a
workspace would only show at run time (task values from wheel tasks, runtimes, grants, emails)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from subprocess import CompletedProcess

import pytest
import yaml

from lakevision.bundle.loader import BundleError, load_bundle
from lakevision.bundle.presets import domain_friendly_name, normalize_prefix, short_name
from lakevision.local.bundle_validate import validate_bundle

from . import processes
from .conftest import REPO

TARGETS = ["dev", "staging", "prod", "local"]
SP = "6f0c1a8e-1111-4c2b-9d3e-000000000001"
PROD_VARS = {"service_principal": SP, "notification_email": "ml-oncall@lakevision.example"}
USER = "jane.doe@lakevision.example"


def _cli(*args: str, cwd: Path = REPO, env: dict | None = None) -> CompletedProcess:
    return processes.run([sys.executable, "-m", "lakevision.cli", *args], cwd=cwd, timeout=120, env=env)


def _vars(target: str) -> dict | None:
    return PROD_VARS if target == "prod" else None


# ------------------------------------------------------------------ the real bundle
@pytest.mark.parametrize("target", TARGETS)
def test_real_bundle_validates_for_every_target(target):
    bundle = load_bundle(REPO, target, _vars(target), user=USER)
    assert validate_bundle(bundle) == []
    assert set(bundle.resources["jobs"]) == {"ingest", "train", "evaluate", "deploy", "monitor", "score", "cv_pipeline"}
    assert set(bundle.resources) >= {"experiments", "registered_models", "schemas", "volumes"}
    pipeline = bundle.resources["jobs"]["cv_pipeline"]
    by_key = {t["task_key"]: t for t in pipeline["tasks"]}
    assert by_key["deploy"]["depends_on"] == [{"task_key": "gate_passed", "outcome": "true"}]
    assert by_key["gate_passed"]["condition_task"]["left"] == "{{tasks.gate.values.passed}}"
    # every step that publishes task values is a notebook task: the only kind whose values resolve
    assert {k for k, t in by_key.items() if "notebook_task" in t} == {"ingest", "train", "evaluate", "gate", "deploy"}
    gpu = next(c["new_cluster"] for c in pipeline["job_clusters"] if c["job_cluster_key"] == "gpu")
    assert gpu["spark_conf"]["spark.task.resource.gpu.amount"] == "1"
    assert gpu["spark_env_vars"]["LAKEVISION_TARGET"] == target
    assert "-gpu-ml-" in gpu["spark_version"] and gpu["driver_node_type_id"] == gpu["node_type_id"]
    cpu = next(c["new_cluster"] for c in pipeline["job_clusters"] if c["job_cluster_key"] == "cpu")
    assert "-cpu-ml-" in cpu["spark_version"]
    # the score job runs on the cluster of the target's profile: GPU tasks with one GPU each, or CPU
    score = bundle.resources["jobs"]["score"]
    scoring = score["job_clusters"][0]["new_cluster"]
    assert score["tasks"][0]["notebook_task"]["notebook_path"].endswith("jobs/score.py")
    if bundle.variables["profile"] == "gpu":
        assert "-gpu-ml-" in scoring["spark_version"] and scoring["spark_conf"]["spark.task.resource.gpu.amount"] == "1"
    else:
        assert "-cpu-ml-" in scoring["spark_version"] and "spark_conf" not in scoring
    assert score["schedule"]["quartz_cron_expression"] == "0 0 2 * * ?"  # daily


def test_dev_names_carry_the_users_prefix_and_every_job_reads_them():
    dev = load_bundle(REPO, "dev", user=USER)
    who = "jane_doe"  # the CLI's short name of jane.doe@...
    assert short_name(USER) == who and domain_friendly_name(USER) == "jane-doe"
    assert dev.resources["schemas"]["lakevision"]["name"] == f"dev_{who}_lakevision"
    assert dev.resources["registered_models"]["detector"]["name"] == f"dev_{who}_lakevision_detector"
    assert dev.resources["registered_models"]["detector"]["schema_name"] == f"dev_{who}_lakevision"
    assert dev.resources["volumes"]["raw"]["schema_name"] == f"dev_{who}_lakevision"
    assert dev.resources["volumes"]["raw"]["name"] == "raw"  # volumes keep their name: the schema moved
    assert dev.resources["experiments"]["lakevision"]["name"] == f"/Workspace/Users/{USER}/[dev {who}] lakevision"
    for key, job in dev.resources["jobs"].items():
        assert job["name"].startswith(f"[dev {who}] lakevision-"), key
        assert job["tags"] == {"dev": who}
        assert (job.get("schedule") or {}).get("pause_status", "PAUSED") == "PAUSED"
        for cluster in job["job_clusters"]:
            env = cluster["new_cluster"]["spark_env_vars"]
            assert env["LAKEVISION_SCHEMA"] == f"dev_{who}_lakevision", key
            assert env["LAKEVISION_MODEL_NAME"] == f"dev_{who}_lakevision_detector", key
            assert env["LAKEVISION_EXPERIMENT"] == f"/Workspace/Users/{USER}/[dev {who}] lakevision", key
            assert env["LAKEVISION_ENDPOINT"] == "lakevision-detector-dev-jane-doe", key
        for param in job.get("parameters") or []:
            if param["name"] in ("annotations", "images"):
                assert param["default"].startswith(f"/Volumes/main/dev_{who}_lakevision/raw/coco/"), key
    other = load_bundle(REPO, "dev", user="john.roe@lakevision.example")
    assert other.variables["endpoint_name"] != dev.variables["endpoint_name"]  # two developers, two endpoints
    assert other.resources["schemas"]["lakevision"]["name"] == "dev_john_roe_lakevision"


def test_production_names_are_as_written_and_schedules_run():
    prod = load_bundle(REPO, "prod", PROD_VARS, user=SP)
    staging = load_bundle(REPO, "staging", user=USER)
    assert prod.resources["schemas"]["lakevision"]["name"] == "lakevision"
    assert staging.resources["schemas"]["lakevision"]["name"] == "lakevision_staging"
    assert prod.resources["jobs"]["cv_pipeline"]["name"] == "lakevision-cv-pipeline"
    assert prod.resources["jobs"]["monitor"]["schedule"]["pause_status"] == "UNPAUSED"
    assert prod.resources["jobs"]["score"]["schedule"]["pause_status"] == "UNPAUSED"
    assert prod.run_as == {"service_principal_name": SP}
    assert prod.resources["jobs"]["monitor"]["email_notifications"]["on_failure"] == [PROD_VARS["notification_email"]]


def test_cli_validates_dev_and_staging_with_no_variables_and_prod_with_them():
    for target in ("dev", "staging", "local"):
        proc = _cli("bundle", "validate", "-t", target)
        assert proc.returncode == 0, proc.stderr
        assert "Validation OK!" in proc.stdout and f"Target: {target}" in proc.stdout
    extra = [a for k, v in PROD_VARS.items() for a in ("--var", f"{k}={v}")]
    proc = _cli("bundle", "validate", "-t", "prod", *extra)
    assert proc.returncode == 0, proc.stderr


def test_prod_without_its_variables_names_each_one():
    problems = [str(p) for p in validate_bundle(load_bundle(REPO, "prod", user=SP))]
    assert problems == [
        f"databricks.yml: variables.{name}: no value assigned to required variable {name} for target 'prod': give it "
        f"a default, set targets.prod.variables.{name}, or pass --var {name}=... (or BUNDLE_VAR_{name})"
        for name in ("notification_email", "service_principal")]


def test_every_variable_needs_a_value_in_every_target(bundle_copy):
    """The CLI's rule: an unused variable without a value fails dev too, not only the target using it."""
    def add(doc):
        doc["variables"]["unused"] = {"description": "declared, never given a value"}
    _edit(bundle_copy / "databricks.yml", add)
    for target in TARGETS:
        problems = [str(p) for p in validate_bundle(load_bundle(bundle_copy, target, _vars(target)))]
        assert any(p.startswith("databricks.yml: variables.unused: no value assigned to required variable unused "
                                f"for target '{target}'") for p in problems), (target, problems)
    # the variable-overrides file the CLI reads gives it one
    overrides = bundle_copy / ".databricks" / "bundle" / "dev" / "variable-overrides.json"
    overrides.parent.mkdir(parents=True)
    overrides.write_text(json.dumps({"unused": "from the file"}))
    dev = load_bundle(bundle_copy, "dev")
    assert validate_bundle(dev) == [] and dev.variables["unused"] == "from the file"


def test_summary_shows_the_resolved_names():
    proc = _cli("bundle", "summary", "-t", "dev", "--json", env={**_env(), "DATABRICKS_USER": USER})
    assert proc.returncode == 0, proc.stderr
    names = json.loads(proc.stdout)["resources"]
    assert names["jobs"]["cv_pipeline"] == {"name": "[dev jane_doe] lakevision-cv-pipeline", "schedule": "PAUSED"}
    assert names["registered_models"]["detector"]["name"] == "main.dev_jane_doe_lakevision.dev_jane_doe_lakevision_detector"
    assert names["volumes"]["raw"]["path"] == "/Volumes/main/dev_jane_doe_lakevision/raw"
    assert names["serving_endpoints"]["deploy job"]["name"] == "lakevision-detector-dev-jane-doe"


def _env() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("BUNDLE_VAR_", "DATABRICKS_"))}


@pytest.mark.parametrize("prefix, expected", [("[dev jane] ", "dev_jane_"), ("[dev Jöhn.Doe] ", "dev_jöhn_doe_"),
                                              ("team-a ", "team_a")])
def test_uc_prefix_is_normalized_as_the_cli_does(prefix, expected):
    assert normalize_prefix(prefix) == expected


# ------------------------------------------------------------------ broken copies
@pytest.fixture
def bundle_copy(tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(REPO, dst, ignore=shutil.ignore_patterns(".venv", ".git", ".lakevision", "mlruns", "*.egg-info",
                                                             "__pycache__", ".pytest_cache", ".ruff_cache", "benchmarks",
                                                             ".databricks"))
    return dst


def _edit(path: Path, fn) -> None:
    doc = yaml.safe_load(path.read_text())
    fn(doc)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))


def _tasks(doc: dict, job: str) -> dict:
    return {t["task_key"]: t for t in doc["resources"]["jobs"][job]["tasks"]}


def _rename_task_type(doc):
    _tasks(doc, "train")["train"]["notebook_taks"] = _tasks(doc, "train")["train"].pop("notebook_task")


def _two_types(doc):
    _tasks(doc, "ingest")["ingest"]["spark_python_task"] = {"python_file": "../benchmarks/ingest.py"}


def _cycle(doc):
    _tasks(doc, "cv_pipeline")["ingest"]["depends_on"] = [{"task_key": "deploy"}]


def _missing_file(doc):
    task = _tasks(doc, "ingest")["ingest"]
    task.pop("notebook_task")
    task["spark_python_task"] = {"python_file": "../jobs/ingset.py"}


def _undefined_var(doc):
    _tasks(doc, "monitor")["endpoint_health"]["notebook_task"]["base_parameters"]["endpoint"] = "${var.endpoint_nmae}"


def _bad_entry_point(doc):
    task = _tasks(doc, "evaluate")["evaluate"]
    task.pop("notebook_task")
    task["python_wheel_task"] = {"package_name": "lakevision", "entry_point": "lakevison", "parameters": ["evaluate"]}


def _unknown_dependency(doc):
    _tasks(doc, "cv_pipeline")["evaluate"]["depends_on"] = [{"task_key": "training"}]


def _value_not_upstream(doc):
    _tasks(doc, "cv_pipeline")["train"]["notebook_task"]["base_parameters"]["data_version"] = "{{tasks.gate.values.passed}}"


def _bad_enum(doc):
    _tasks(doc, "cv_pipeline")["gate_passed"]["condition_task"]["op"] = "EQUALS"


def _values_from_a_wheel_task(doc):
    """The layout this project had: a wheel task cannot publish what train reads."""
    task = _tasks(doc, "cv_pipeline")["ingest"]
    task.pop("notebook_task")
    task["python_wheel_task"] = {"package_name": "lakevision", "entry_point": "lakevision",
                                 "parameters": ["ingest", "--annotations", "{{job.parameters.annotations}}",
                                                "--images", "{{job.parameters.images}}"]}


def _python_file_is_a_notebook(doc):
    task = _tasks(doc, "ingest")["ingest"]
    task.pop("notebook_task")
    task["spark_python_task"] = {"python_file": "../jobs/ingest.py"}


def _unsupported_runtime(doc):
    doc["variables"]["cpu_cluster"]["default"]["spark_version"] = "15.4.x-cpu-ml-scala2.12"


def _old_mlflow_runtime(doc):
    doc["variables"]["gpu_cluster"]["default"]["spark_version"] = "16.4.x-gpu-ml-scala2.12"


def _cpu_runtime_on_gpu_nodes(doc):
    doc["variables"]["gpu_cluster"]["default"]["spark_version"] = "17.3.x-cpu-ml-scala2.13"


def _cpu_driver_for_gpu_runtime(doc):
    doc["variables"]["gpu_cluster"]["default"]["driver_node_type_id"] = "m5d.xlarge"


@pytest.mark.parametrize("file, edit, expected", [
    ("train.job.yml", _rename_task_type,
     "resources/train.job.yml: resources.jobs.train.tasks[0].notebook_taks: Unexpected field 'notebook_taks' for class Task"),
    ("ingest.job.yml", _two_types,
     "resources/ingest.job.yml: resources.jobs.ingest.tasks[0]: task 'ingest' has 2 task types (notebook_task, spark_python_task)"),
    ("cv_pipeline.job.yml", _cycle,
     "resources/cv_pipeline.job.yml: resources.jobs.cv_pipeline.tasks: depends_on has a cycle: "
     "ingest -> deploy -> gate_passed -> gate -> evaluate -> train -> ingest"),
    ("ingest.job.yml", _missing_file,
     "resources/ingest.job.yml: resources.jobs.ingest.tasks[0].spark_python_task.python_file: file not found: ../jobs/ingset.py"),
    ("monitor.job.yml", _undefined_var,
     "resources/monitor.job.yml: resources.jobs.monitor.tasks[0].notebook_task.base_parameters.endpoint: "
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
    ("cv_pipeline.job.yml", _values_from_a_wheel_task,
     "resources/cv_pipeline.job.yml: resources.jobs.cv_pipeline.tasks[1]: {{tasks.ingest.values.samples_version}}: "
     "task 'ingest' is a python_wheel_task, which cannot set task values (dbutils.jobs.taskValues.set works only in "
     "notebooks); make it a notebook_task"),
    ("ingest.job.yml", _python_file_is_a_notebook,
     "resources/ingest.job.yml: resources.jobs.ingest.tasks[0].spark_python_task.python_file: file at "
     "../jobs/ingest.py is a notebook; use a notebook_task for it"),
])
def test_broken_bundle_fails_with_file_and_path(bundle_copy, file, edit, expected):
    _edit(bundle_copy / "resources" / file, edit)
    proc = _cli("bundle", "validate", "-t", "dev", cwd=bundle_copy)
    assert proc.returncode == 2
    assert expected in proc.stderr, proc.stderr


@pytest.mark.parametrize("edit, expected", [
    (_unsupported_runtime, "resources.jobs.ingest.job_clusters[0].new_cluster.spark_version: '15.4.x-cpu-ml-scala2.12' "
                           "is not a supported Databricks ML runtime; supported: 16.4.x-cpu-ml-scala2.12, "
                           "16.4.x-gpu-ml-scala2.12, 17.3.x-cpu-ml-scala2.13, 17.3.x-gpu-ml-scala2.13"),
    (_old_mlflow_runtime, "resources.jobs.train.job_clusters[0].new_cluster.spark_version: 16.4 LTS ML ships mlflow "
                          "2.21.3; the code needs mlflow>=3.0"),
    (_cpu_runtime_on_gpu_nodes, "resources.jobs.train.job_clusters[0].new_cluster.node_type_id: 'g5.xlarge' is a GPU "
                                "node type, but 17.3.x-cpu-ml-scala2.13 is a CPU runtime"),
    (_cpu_driver_for_gpu_runtime, "resources.jobs.train.job_clusters[0].new_cluster.driver_node_type_id: 'm5d.xlarge' "
                                  "is not a GPU node type, but 17.3.x-gpu-ml-scala2.13 is a GPU runtime"),
])
def test_clusters_need_a_supported_runtime_on_matching_nodes(bundle_copy, edit, expected):
    _edit(bundle_copy / "bundle" / "compute.yml", edit)
    problems = [str(p) for p in validate_bundle(load_bundle(bundle_copy, "dev"))]
    assert any(expected in p for p in problems), problems


def test_notebook_task_on_a_plain_file_is_refused(bundle_copy):
    path = bundle_copy / "jobs" / "gate.py"
    path.write_text(path.read_text().replace("# Databricks notebook source\n", ""))
    problems = [str(p) for p in validate_bundle(load_bundle(bundle_copy, "dev"))]
    assert ("resources/cv_pipeline.job.yml: resources.jobs.cv_pipeline.tasks[3].notebook_task.notebook_path: file at "
            "../jobs/gate.py is not a notebook: a Python notebook starts with '# Databricks notebook source'") in problems


def test_prod_service_principal_needs_its_grants(bundle_copy):
    def drop_volume_grants(doc):
        doc["targets"]["prod"]["resources"]["volumes"]["raw"]["grants"] = [
            {"principal": SP, "privileges": ["READ_VOLUME"]}]
    _edit(bundle_copy / "databricks.yml", drop_volume_grants)
    problems = [str(p) for p in validate_bundle(load_bundle(bundle_copy, "prod", PROD_VARS))]
    assert problems == [f"resources/raw.volume.yml: resources.volumes.raw.grants: the run_as service principal {SP} "
                        "lacks WRITE_VOLUME on volume 'raw'; its jobs write there"]


@pytest.mark.parametrize("email, why", [(SP, "is the run_as service principal"), ("ml-oncall", "is not an email address")])
def test_failure_emails_must_reach_a_person(email, why):
    problems = [str(p) for p in validate_bundle(load_bundle(REPO, "prod", {**PROD_VARS, "notification_email": email}))]
    assert len(problems) == 7 and all(f"email_notifications.on_failure[0]: '{email}' {why}" in p for p in problems)


def test_a_service_principal_deploying_cannot_be_the_default_recipient():
    # staging mails whoever deploys it; when CI deploys as a service principal that is an application id
    problems = [str(p) for p in validate_bundle(load_bundle(REPO, "staging", user=SP))]
    assert problems and all(f"'{SP}' is an application id" in p for p in problems)


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


def test_development_mode_rules(bundle_copy):
    def bad_dev(doc):
        doc["targets"]["dev"]["presets"] = {"name_prefix": "[team] ", "trigger_pause_status": "UNPAUSED"}
        doc["targets"]["dev"]["workspace"] = {"root_path": "/Workspace/Shared/.bundle/x"}
    _edit(bundle_copy / "databricks.yml", bad_dev)
    problems = {p.path: p.message for p in validate_bundle(load_bundle(bundle_copy, "dev", user=USER))}
    assert problems["targets.dev.presets.name_prefix"].startswith("prefix should contain the current username")
    assert problems["targets.dev.presets.trigger_pause_status"].startswith("target with 'mode: development' cannot")
    assert problems["targets.dev.workspace.root_path"].startswith("root_path must start with '~/' or contain")


def test_validate_json_reports_every_problem(bundle_copy):
    _edit(bundle_copy / "resources" / "cv_pipeline.job.yml", _cycle)
    proc = _cli("bundle", "validate", "-t", "dev", "--json", cwd=bundle_copy)
    assert proc.returncode == 2
    out = json.loads(proc.stdout)
    assert out["valid"] is False and out["target"] == "dev"
    assert [p["path"] for p in out["problems"]] == ["resources.jobs.cv_pipeline.tasks"]
