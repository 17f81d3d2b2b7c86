"""The local job runner judges a job run as Databricks does: task values only from notebook tasks,
a wheel entry point's return value ignored, job parameters over task parameters, failures that
fail the run and fire its failure emails; plus condition tasks, run_if, retries and timeouts."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from subprocess import CompletedProcess

import pytest
import yaml

from lakevision.bundle.loader import BundleError, load_bundle
from lakevision.local.job_runner import (EXCLUDED, FAILED, SUCCESS, TIMED_OUT, UPSTREAM_FAILED, LocalJobRunner, compare,
                                      decide)
from lakevision.bundle.task_context import TASK_TYPE_ENV, TASK_VALUES_ENV, TaskValueError, set_task_values

from . import processes
from .mini_bundle import mini_bundle, nb, py


def _run(root: Path, data_root: Path, params: dict | None = None):
    events = []
    runner = LocalJobRunner(load_bundle(root, "local", local_files=True), data_root,
                            progress=lambda e, t, i, n: events.append((e, t.task_key, t.status)))
    return runner.run("j", params), events


def _cli(*args: str) -> CompletedProcess:
    return processes.run([sys.executable, "-m", "lakevision.cli", *args], timeout=120)


def test_task_values_parameters_and_condition_outcomes(tmp_path):
    tasks = [
        nb("produce", "v:model=m-{{job.parameters.name}}", "v:score=0.7"),
        nb("use", "v:got={{tasks.produce.values.model}}", depends=["produce"]),
        {"task_key": "good_enough", "depends_on": [{"task_key": "produce"}],
         "condition_task": {"left": "{{tasks.produce.values.score}}", "op": "GREATER_THAN_OR_EQUAL", "right": "0.65"}},
        nb("on_true", "v:ran=yes", depends=[{"task_key": "good_enough", "outcome": "true"}]),
        nb("on_false", "v:ran=yes", depends=[{"task_key": "good_enough", "outcome": "false"}]),
        nb("after_false", depends=["on_false"]),
    ]
    root = mini_bundle(tmp_path, tasks, parameters=[{"name": "name", "default": "a"}])
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


def test_task_values_from_a_python_task_fail_the_task(tmp_path):
    """On Databricks taskValues.set is a no-op outside notebooks: here the task fails, saying why."""
    run, _ = _run(mini_bundle(tmp_path, [py("a", "v:x=1")]), tmp_path / "data")
    assert run.status == FAILED and run.task("a").status == FAILED
    assert ("this task is a spark_python_task, and Databricks keeps task values only from a notebook_task"
            in run.task("a").message)


def _wheel_bundle(tmp_path: Path, monkeypatch, *tasks: tuple[str, str, list[str]]) -> Path:
    """A bundle whose wheel artifact is package ``fakepkg`` with three console scripts, installed
    (as a dist-info folder on PYTHONPATH) where the task processes find it."""
    site = tmp_path / "site"
    (site / "fakepkg-1.0.dist-info").mkdir(parents=True)
    (site / "fakepkg-1.0.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: fakepkg\nVersion: 1.0\n")
    scripts = {"returns-two": "returns_two", "exits-three": "exits_three", "raises": "raises"}
    (site / "fakepkg-1.0.dist-info" / "entry_points.txt").write_text(
        "[console_scripts]\n" + "".join(f"{k} = fakepkg:{v}\n" for k, v in scripts.items()))
    (site / "fakepkg.py").write_text("import sys\n"
                                     "def returns_two():\n    return 2\n"
                                     "def exits_three():\n    sys.exit(3)\n"
                                     "def raises():\n    raise RuntimeError('lakevision test: error: broken')\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    root = mini_bundle(tmp_path, [{"task_key": key, "job_cluster_key": "c", "python_wheel_task": {
        "package_name": "fakepkg", "entry_point": ep, "parameters": params}} for key, ep, params in tasks])
    (root / "pyproject.toml").write_text('[project]\nname = "fakepkg"\nversion = "1.0"\n[project.scripts]\n'
                                         + "".join(f'{k} = "fakepkg:{v}"\n' for k, v in scripts.items()))
    doc = yaml.safe_load((root / "databricks.yml").read_text())
    doc["artifacts"] = {"wheel": {"type": "whl", "path": "."}}
    (root / "databricks.yml").write_text(yaml.safe_dump(doc))
    return root


def test_wheel_entry_point_is_judged_as_on_databricks(tmp_path, monkeypatch):
    """A python_wheel_task calls the entry point and ignores what it returns: a `main()` that returns
    2 is a green task on Databricks, so it is here; SystemExit and exceptions fail it."""
    root = _wheel_bundle(tmp_path, monkeypatch, ("two", "returns-two", []), ("three", "exits-three", []),
                         ("boom", "raises", []))
    run, _ = _run(root, tmp_path / "data")
    status = {t.task_key: t.status for t in run.tasks}
    assert status == {"two": SUCCESS, "three": FAILED, "boom": FAILED}
    assert run.task("three").message.startswith("exit code 3")
    assert "RuntimeError: lakevision test: error: broken" in run.task("boom").message


def test_lakevision_entry_point_fails_the_task_on_bad_input(tmp_path):
    """The project's console script raises SystemExit(2) on a user error, so a wheel task fails."""
    proc = processes.run([sys.executable, "-c", "from lakevision.cli import entry_point; entry_point()", "ingest",
                          "--annotations", str(tmp_path / "nonexistent.json"), "--images", str(tmp_path)], timeout=120)
    assert proc.returncode == 2
    assert "lakevision ingest: error: " in proc.stderr and "nonexistent.json" in proc.stderr


def test_named_parameters_take_the_job_parameters(tmp_path, monkeypatch):
    """Job parameters reach a wheel task only when it takes keyword arguments, and win there."""
    root = _wheel_bundle(tmp_path, monkeypatch)
    (tmp_path / "site" / "fakepkg.py").write_text(
        "import json, os, sys\n"
        "def returns_two():\n"
        "    open(os.environ['ARGS_OUT'], 'w').write(json.dumps(sys.argv[1:]))\n"
        "exits_three = raises = returns_two\n")
    doc = yaml.safe_load((root / "databricks.yml").read_text())
    doc["resources"]["jobs"]["j"]["parameters"] = [{"name": "data", "default": "from-job"}]
    doc["resources"]["jobs"]["j"]["tasks"] = [{"task_key": "w", "job_cluster_key": "c", "python_wheel_task": {
        "package_name": "fakepkg", "entry_point": "returns-two",
        "named_parameters": {"data": "from-task", "other": "{{job.parameters.data}}-x"}}}]
    (root / "databricks.yml").write_text(yaml.safe_dump(doc))
    monkeypatch.setenv("ARGS_OUT", str(tmp_path / "args.json"))
    run, _ = _run(root, tmp_path / "data")
    assert run.status == SUCCESS, run.task("w").message
    assert json.loads((tmp_path / "args.json").read_text()) == ["--data=from-job", "--other=from-job-x"]


def test_failure_fails_the_run_marks_dependents_and_fires_failure_emails(tmp_path):
    tasks = [
        nb("ok"),
        nb("broken", "fail=the input is bad", depends=["ok"]),
        nb("downstream", depends=["broken"]),
        nb("further", depends=["downstream"]),
        nb("cleanup", depends=["broken"], run_if="ALL_DONE"),
        nb("alert", depends=["broken"], run_if="AT_LEAST_ONE_FAILED"),
        nb("no_alert", depends=["ok"], run_if="AT_LEAST_ONE_FAILED"),
    ]
    run, _ = _run(mini_bundle(tmp_path, tasks, email_notifications={"on_failure": ["team@lakevision.example"],
                                                                     "on_success": ["nobody@lakevision.example"]}),
                  tmp_path / "data")
    status = {t.task_key: t.status for t in run.tasks}
    assert run.status == FAILED
    assert status == {"ok": SUCCESS, "broken": FAILED, "downstream": UPSTREAM_FAILED, "further": UPSTREAM_FAILED,
                      "cleanup": SUCCESS, "alert": SUCCESS, "no_alert": EXCLUDED}
    assert run.task("broken").message == "exit code 1: RuntimeError: lakevision test: error: the input is bad"
    assert "broken failed" in run.task("downstream").message
    assert run.notifications == {"on_failure": ["team@lakevision.example"]}


def test_sys_exit_in_a_notebook_fails_the_task(tmp_path):
    """A notebook ends with dbutils.notebook.exit or an exception; sys.exit(0) is not a success."""
    run, _ = _run(mini_bundle(tmp_path, [nb("quits", "exit=0")]), tmp_path / "data")
    assert run.task("quits").status == FAILED
    assert "the notebook called sys.exit(0)" in run.task("quits").message


def test_notebooks_run_from_their_folder_without_file(tmp_path):
    root = mini_bundle(tmp_path, [])
    (root / "nbs").mkdir()
    (root / "nbs" / "where.py").write_text(textwrap.dedent("""\
        # Databricks notebook source
        import os
        from lakevision.bundle.task_context import set_task_values
        set_task_values(cwd=os.getcwd(), has_file="__file__" in globals())
        """))
    doc = yaml.safe_load((root / "databricks.yml").read_text())
    doc["resources"]["jobs"]["j"]["tasks"] = [{"task_key": "nb", "job_cluster_key": "c",
                                               "notebook_task": {"notebook_path": "nbs/where"}}]
    (root / "databricks.yml").write_text(yaml.safe_dump(doc))
    run, _ = _run(root, tmp_path / "data")
    assert run.task("nb").values == {"cwd": str(root / "nbs"), "has_file": False}


def test_job_parameters_win_over_base_parameters(tmp_path):
    """Databricks pushes job parameters into a notebook as widgets, over a base parameter of the same key."""
    task = nb("t")
    task["notebook_task"]["base_parameters"] = {"args": "v:from=base_parameters", "extra": "kept"}
    root = mini_bundle(tmp_path, [task], parameters=[{"name": "args", "default": "v:from=job"}])
    run, _ = _run(root, tmp_path / "data")
    assert run.task("t").values["from"] == "job"


def test_missing_task_value_fails_the_task_with_the_reference(tmp_path):
    tasks = [nb("a", "v:x=1"), nb("b", "v:y={{tasks.a.values.nope}}", depends=["a"])]
    run, _ = _run(mini_bundle(tmp_path, tasks), tmp_path / "data")
    assert run.task("b").status == FAILED
    assert "{{tasks.a.values.nope}}: task 'a' set no value 'nope' (it set: ['env_schema', 'root', 'x'])" in run.task("b").message


def test_retries_then_success_and_timeout(tmp_path):
    counter = tmp_path / "count"
    tasks = [nb("flaky", f"counter={counter}", "fail_times=2", max_retries=2),
             nb("slow", "sleep=30", timeout_seconds=2, depends=["flaky"])]
    run, _ = _run(mini_bundle(tmp_path, tasks), tmp_path / "data")
    assert run.task("flaky").status == SUCCESS and run.task("flaky").attempts == 3
    assert run.task("slow").status == TIMED_OUT and run.task("slow").seconds < 10
    assert run.status == FAILED


def test_unknown_parameter_and_invalid_bundle_refused(tmp_path):
    root = mini_bundle(tmp_path, [nb("a")], parameters=[{"name": "p", "default": "1"}])
    with pytest.raises(Exception, match=r"job 'j' has no parameter 'q'; parameters: \['p'\]"):
        _run(root, tmp_path / "data", {"q": "2"})
    broken = mini_bundle(tmp_path / "b", [nb("a", depends=["a"])])
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
    root = mini_bundle(tmp_path, [nb("a", "v:x=1"), nb("b", "fail=nope", depends=["a"])])
    proc = _cli("bundle", "run", "j", "--bundle", str(root), "--root", str(tmp_path / "data"), "--json")
    assert proc.returncode == 1
    out = json.loads(proc.stdout)
    assert [(t["task_key"], t["status"]) for t in out["tasks"]] == [("a", SUCCESS), ("b", FAILED)]
    assert out["tasks"][0]["values"]["x"] == "1" and out["status"] == FAILED


def test_task_values_refused_when_databricks_would(monkeypatch, tmp_path):
    monkeypatch.setenv(TASK_VALUES_ENV, str(tmp_path / "v.json"))
    monkeypatch.setenv(TASK_TYPE_ENV, "notebook_task")
    with pytest.raises(TaskValueError, match="'big': .* bytes of JSON, over Databricks' limit"):
        set_task_values(big="x" * 60_000)
    with pytest.raises(TaskValueError, match="'obj': not JSON-serializable"):
        set_task_values(obj=object())
    set_task_values(a=1)
    set_task_values(b=[1, 2])
    assert json.loads((tmp_path / "v.json").read_text()) == {"a": 1, "b": [1, 2]}
    monkeypatch.setenv(TASK_TYPE_ENV, "python_wheel_task")
    with pytest.raises(TaskValueError, match="this task is a python_wheel_task"):
        set_task_values(c=3)
    assert "c" not in json.loads((tmp_path / "v.json").read_text())


def test_widget_reads_the_runner_environment(monkeypatch):
    from lakevision.bundle.task_context import widget

    monkeypatch.setenv("LAKEVISION_WIDGET_MODEL_URI", "models:/x/1")
    assert widget("model_uri", "d") == "models:/x/1" and widget("other", "d") == "d"


def _dead_by(pid: int, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while processes.alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not processes.alive(pid)


def test_job_timeout_stops_the_running_task_and_the_rest(tmp_path):
    tasks = [nb("a", "sleep=30"), nb("b", depends=["a"]), nb("c")]
    run, _ = _run(mini_bundle(tmp_path, tasks, timeout_seconds=2), tmp_path / "data")
    assert [(t.task_key, t.status) for t in run.tasks] == [("a", TIMED_OUT), ("b", UPSTREAM_FAILED), ("c", TIMED_OUT)]
    assert run.task("a").message == "did not finish within 2 s" and run.task("c").attempts == 0
    assert run.status == FAILED and run.seconds < 15


def test_a_timed_out_task_is_killed_with_what_it_started(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    run, _ = _run(mini_bundle(tmp_path, [nb("a", f"spawn={pidfile}", "sleep=30", timeout_seconds=3)]), tmp_path / "data")
    pid = int(pidfile.read_text())
    try:
        assert run.task("a").status == TIMED_OUT
        # the grandchild left the task's process group, as Spark and Ray daemons do; it died anyway
        assert _dead_by(pid)
    finally:
        processes.kill_group(pid, grace_s=0)


def test_sigterm_to_the_runner_kills_the_running_task_tree(tmp_path):
    pidfile = tmp_path / "grandchild.pid"
    root = mini_bundle(tmp_path, [nb("a", f"spawn={pidfile}", "sleep=60")])
    argv = [sys.executable, "-m", "lakevision.cli", "bundle", "run", "j", "--bundle", str(root), "--root", str(tmp_path / "data")]
    with processes.owned(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as runner:
        deadline = time.monotonic() + 60
        while not pidfile.exists() or not pidfile.read_text():
            assert runner.poll() is None and time.monotonic() < deadline, runner.stderr.read()
            time.sleep(0.1)
        pid = int(pidfile.read_text())
        task = [p for p in processes.descendants(runner.pid) if "step_nb.py" in processes.command_line(p)]
        try:
            assert task, "the task process is not under the runner"
            runner.send_signal(signal.SIGTERM)
            assert runner.wait(timeout=30) == 128 + signal.SIGTERM
            assert _dead_by(pid) and all(_dead_by(p) for p in task)
        finally:
            processes.kill_group(pid, grace_s=0)


def test_unsupported_task_types_fail_naming_the_type(tmp_path):
    tasks = [{"task_key": "sql", "sql_task": {"warehouse_id": "w1", "query": {"query_id": "q1"}}},
             nb("after", depends=["sql"])]
    run, _ = _run(mini_bundle(tmp_path, tasks), tmp_path / "data")
    assert run.task("sql").status == FAILED and run.task("sql").message == (
        "task 'sql': a sql_task cannot run on this machine; only python_wheel_task, spark_python_task, "
        "notebook_task and condition_task can")
    assert run.task("after").status == UPSTREAM_FAILED and run.status == FAILED


def test_a_condition_on_a_missing_value_fails_and_excludes_its_branch(tmp_path):
    tasks = [nb("a", "v:x=1"),
             {"task_key": "check", "depends_on": [{"task_key": "a"}],
              "condition_task": {"op": "EQUAL_TO", "left": "{{tasks.a.values.nope}}", "right": "1"}},
             nb("then", depends=[{"task_key": "check", "outcome": "true"}])]
    run, _ = _run(mini_bundle(tmp_path, tasks), tmp_path / "data")
    check = run.task("check")
    assert check.status == FAILED and check.outcome is None
    assert check.message == ("task 'check': {{tasks.a.values.nope}}: task 'a' set no value 'nope' "
                             "(it set: ['env_schema', 'root', 'x'])")
    assert run.task("then").status == UPSTREAM_FAILED and run.status == FAILED


def test_retry_interval_counts_from_the_start_of_the_failed_attempt(tmp_path):
    counter, stamps = tmp_path / "count", tmp_path / "stamps"
    # the attempt fails after at least 1 s; the retry starts 4 s after the failed attempt started,
    # where an interval counted from its end would start it 5 s or more after
    tasks = [nb("flaky", f"stamps={stamps}", "sleep=1", f"counter={counter}", "fail_times=1",
                max_retries=1, min_retry_interval_millis=4000)]
    run, _ = _run(mini_bundle(tmp_path, tasks), tmp_path / "data")
    assert run.task("flaky").status == SUCCESS and run.task("flaky").attempts == 2
    first, second = (float(line) for line in stamps.read_text().split())
    assert 3.95 <= second - first < 4.9


def test_retries_minus_one_retries_until_success(tmp_path):
    counter = tmp_path / "count"
    run, _ = _run(mini_bundle(tmp_path, [nb("a", f"counter={counter}", "fail_times=3", max_retries=-1)]),
                  tmp_path / "data")
    assert run.task("a").status == SUCCESS and run.task("a").attempts == 4


def test_a_task_does_not_see_the_widgets_of_the_task_its_run_was_started_from(tmp_path, monkeypatch):
    """A run started from inside a task (the monitor's retraining) starts as cleanly as on a
    fresh cluster: the starting task's widgets do not reach its tasks."""
    monkeypatch.setenv("LAKEVISION_WIDGET_ARGS", "v:leaked=yes")
    task = nb("t")
    del task["notebook_task"]["base_parameters"]
    run, _ = _run(mini_bundle(tmp_path, [task]), tmp_path / "data")
    assert run.task("t").status == SUCCESS and run.task("t").values == {}


def test_the_runner_shows_progress_lines_not_the_last_log_line(tmp_path, monkeypatch):
    """A task's library warnings stay in its log: the screen gets its marked progress lines."""
    from lakevision import progress
    from lakevision.local import job_runner

    monkeypatch.setattr(job_runner, "HEARTBEAT_S", 0.5)
    bundle = mini_bundle(tmp_path, [nb("slow", "progress=step 1 of 2", "sleep=2.5")])
    seen = []
    runner = LocalJobRunner(load_bundle(bundle, "local", local_files=True), tmp_path / "data",
                            progress=lambda event, task, i, n: seen.append((event, task.message)))
    run = runner.run("j")
    assert run.status == "SUCCESS", run.message
    shown = [m for e, m in seen if e == "running"]
    # the progress line, and before it appears a plain sign of life: never the warning after it
    assert "step 1 of 2" in shown and set(shown) <= {"step 1 of 2", "running"}, seen
    assert progress.latest("x\n(RayTrainWorker pid=7) " + progress.MARK + "epoch 2\nwarning\n") == "epoch 2"
    assert progress.latest("no marks here\n") is None
