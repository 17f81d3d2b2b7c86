"""The local workspace's Jobs API, driven by the real databricks-sdk: the bundle's jobs by name,
run-now with job parameters, runs through to their end state, the job's limit of concurrent runs
(skipped when queueing is off, queued when it is on), Databricks' errors, and the monitor's
retraining trigger, which makes the same calls here as on Databricks."""

from __future__ import annotations

import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from databricks.sdk.errors import InvalidParameterValue, ResourceDoesNotExist
from databricks.sdk.service.jobs import RunLifeCycleState, RunResultState

from lakevision.bundle.loader import load_bundle, local_job_id
from lakevision.local.process_tree import start_ticks
from lakevision.local.workspace.endpoints import LocalWorkspace
from lakevision.local.workspace.process import local_workspace_process
from lakevision.monitoring.monitor import trigger_retrain
from lakevision.serving.client import workspace_client

from .conftest import REPO
from .mini_bundle import mini_bundle, nb
from .processes import alive, command_line, kill_group, run

TOKEN = "jobs-api-test-token"
JOB_ID = local_job_id("j")  # the mini bundle's one job
ENDED = (RunLifeCycleState.TERMINATED, RunLifeCycleState.SKIPPED, RunLifeCycleState.INTERNAL_ERROR)


def _kill_runs(root: Path) -> None:
    """Every run process recorded under ``root`` that still lives (never this test process)."""
    for record in root.glob("runs/*/*/launch.json"):
        r = json.loads(record.read_text())
        pid = r.get("pid")
        if pid and pid != os.getpid() and alive(pid) and start_ticks(pid) == r.get("pid_start"):
            kill_group(pid, grace_s=0)


@pytest.fixture
def jobs_workspace(tmp_path):
    """``make(tasks, parameters, **job)``: a mini bundle, a local workspace in this process serving
    its job, and an SDK client on it (the one before it stops: one workspace owns a root). The
    workspace stops and every run it started is killed at the end of the test, passed or not."""
    started: list[LocalWorkspace] = []
    root = tmp_path / "root"

    def make(tasks: list[dict], parameters: list[dict] | None = None, bundle: bool = True, **job):
        for ws in started:
            ws.stop()
        bundle_dir = mini_bundle(tmp_path, tasks, parameters, **job) if bundle else None
        ws = LocalWorkspace(root, TOKEN, bundle_dir=bundle_dir)
        started.append(ws)
        url = ws.start()
        return url, workspace_client(url, TOKEN)

    try:
        yield make
    finally:
        for ws in started:
            ws.stop()
        _kill_runs(root)


def _wait_ended(w, run_id: int, timeout_s: float = 60):
    deadline = time.monotonic() + timeout_s
    while True:
        run = w.jobs.get_run(run_id)
        if run.state.life_cycle_state in ENDED:
            return run
        assert time.monotonic() < deadline, f"run {run_id} still {run.state.life_cycle_state} after {timeout_s} s"
        time.sleep(0.2)


def _result(root: Path, run_id: int) -> dict:
    return json.loads((root / "runs" / "j" / str(run_id) / "run.json").read_text())


def _run_processes(root: Path) -> list[int]:
    """Runner processes of runs under ``root`` that are alive now."""
    pids = []
    for record in root.glob("runs/*/*/launch.json"):
        pid = json.loads(record.read_text()).get("pid")
        if pid and pid != os.getpid() and alive(pid) and "--run-id" in command_line(pid):
            pids.append(pid)
    return pids


def test_jobs_list_finds_the_bundle_job_by_its_exact_name(jobs_workspace):
    _, w = jobs_workspace([nb("a")], max_concurrent_runs=2)
    (job,) = w.jobs.list(name="MINI")  # exact, but case-insensitive, as the Jobs API matches
    assert job.job_id == JOB_ID and job.settings.name == "mini"
    assert job.settings.max_concurrent_runs == 2 and job.settings.queue.enabled  # bundle deploy's default
    assert not job.settings.tasks  # tasks only with expand_tasks, as jobs/list answers
    assert list(w.jobs.list(name="min")) == []
    assert [t.task_key for t in next(iter(w.jobs.list(expand_tasks=True))).settings.tasks] == ["a"]


def test_run_now_passes_job_parameters_and_ends_terminated_success(jobs_workspace, tmp_path):
    _, w = jobs_workspace([nb("step", "v:got={{job.parameters.data}}", "v:job={{job.id}}", "v:run={{job.run_id}}")],
                          parameters=[{"name": "data", "default": "the-default"}, {"name": "other", "default": "o"}])
    waiter = w.jobs.run_now(job_id=JOB_ID, job_parameters={"data": "given"})
    run = waiter.result(timeout=timedelta(seconds=60))  # the SDK's own poll of runs/get
    assert run.state.life_cycle_state == RunLifeCycleState.TERMINATED
    assert run.state.result_state == RunResultState.SUCCESS
    assert run.run_id == waiter.run_id and run.job_id == JOB_ID and run.run_name == "mini"
    assert [(p.name, p.value, p.default) for p in run.job_parameters] == [
        ("data", "given", "the-default"), ("other", "o", "o")]
    assert 0 < run.start_time <= run.end_time
    assert [(t.task_key, t.state.result_state) for t in run.tasks] == [("step", RunResultState.SUCCESS)]
    # the run folder is the runner's, under the run id the API answered; {{job.id}} is the API's job id
    values = _result(tmp_path / "root", run.run_id)["tasks"][0]["values"]
    assert values["got"] == "given" and values["job"] == str(JOB_ID) and values["run"] == str(run.run_id)


def test_a_run_beyond_the_limit_is_skipped_when_queueing_is_off(jobs_workspace, tmp_path):
    _, w = jobs_workspace([nb("slow", "sleep=60")], queue={"enabled": False})
    first = w.jobs.run_now(job_id=JOB_ID).run_id
    (active,) = w.jobs.list_runs(job_id=JOB_ID, active_only=True)
    assert active.run_id == first and active.state.life_cycle_state == RunLifeCycleState.RUNNING
    second = w.jobs.run_now(job_id=JOB_ID).run_id
    skipped = w.jobs.wait_get_run_job_terminated_or_skipped(second, timeout=timedelta(seconds=10))
    assert skipped.state.life_cycle_state == RunLifeCycleState.SKIPPED
    assert skipped.state.state_message == ("Skipping this run because the limit of 1 maximum concurrent runs "
                                           "has been reached.")
    first_pid = json.loads((tmp_path / "root" / "runs" / "j" / str(first) / "launch.json").read_text())["pid"]
    assert _run_processes(tmp_path / "root") == [first_pid]  # no second runner was started
    assert [r.run_id for r in w.jobs.list_runs(job_id=JOB_ID, active_only=True)] == [first]
    assert [r.run_id for r in w.jobs.list_runs(job_id=JOB_ID, completed_only=True)] == [second]
    assert [r.run_id for r in w.jobs.list_runs(job_id=JOB_ID)] == [second, first]  # newest first


def test_bundle_run_from_a_shell_is_admitted_as_run_now_admits_it(jobs_workspace, tmp_path):
    """`lakevision bundle run` counts against the same limit as the Jobs API, and shows in it."""
    _, w = jobs_workspace([nb("slow", "sleep=60")], queue={"enabled": False})
    first = w.jobs.run_now(job_id=JOB_ID).run_id
    proc = run([sys.executable, "-m", "lakevision.cli", "bundle", "run", "j", "--bundle", str(tmp_path / "mini"),
                "--root", str(tmp_path / "root")], timeout=60)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert proc.stdout.rstrip().endswith(": SKIPPED: Skipping this run because the limit of 1 maximum concurrent "
                                         "runs has been reached.")
    latest = next(iter(w.jobs.list_runs(job_id=JOB_ID, limit=1)))
    assert latest.run_id > first and latest.state.life_cycle_state == RunLifeCycleState.SKIPPED


def test_a_run_beyond_the_limit_waits_in_the_queue_when_queueing_is_on(jobs_workspace, tmp_path):
    _, w = jobs_workspace([nb("short", "v:at={{job.run_id}}", "sleep=1.5")])  # queue: bundle deploy's default, on
    first = w.jobs.run_now(job_id=JOB_ID).run_id
    second = w.jobs.run_now(job_id=JOB_ID).run_id
    assert w.jobs.get_run(second).state.life_cycle_state == RunLifeCycleState.QUEUED
    assert {r.run_id for r in w.jobs.list_runs(job_id=JOB_ID, active_only=True)} == {first, second}
    done = [_wait_ended(w, run_id) for run_id in (first, second)]
    assert [r.state.result_state for r in done] == [RunResultState.SUCCESS, RunResultState.SUCCESS]
    assert done[1].queue_duration > 0
    # one at a time: the queued run started its task only after the first run had ended
    first_end = (tmp_path / "root" / "runs" / "j" / str(first) / "run.json").stat().st_mtime
    second_task_log = tmp_path / "root" / "runs" / "j" / str(second) / "short.log"
    assert second_task_log.stat().st_ctime >= first_end


def test_failed_and_dead_runs_end_as_the_jobs_api_reports_them(jobs_workspace, tmp_path):
    _, w = jobs_workspace([nb("step", "fail={{job.parameters.fail}}", "sleep={{job.parameters.sleep}}")],
                          parameters=[{"name": "fail", "default": ""}, {"name": "sleep", "default": "0"}],
                          max_concurrent_runs=2)
    failed = _wait_ended(w, w.jobs.run_now(job_id=JOB_ID, job_parameters={"fail": "bad input"}).run_id)
    assert (failed.state.life_cycle_state, failed.state.result_state) == (RunLifeCycleState.INTERNAL_ERROR,
                                                                          RunResultState.FAILED)
    assert failed.state.state_message.startswith("Task step failed with message: exit code 1: ")
    assert "bad input" in failed.state.state_message
    killed = w.jobs.run_now(job_id=JOB_ID, job_parameters={"sleep": "60"}).run_id
    pid = json.loads((tmp_path / "root" / "runs" / "j" / str(killed) / "launch.json").read_text())["pid"]
    # between its fork and its exec the runner's command line is still its parent's
    deadline = time.monotonic() + 10
    while pid not in _run_processes(tmp_path / "root") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pid in _run_processes(tmp_path / "root")
    kill_group(pid, grace_s=0)  # the runner dies without writing its result
    dead = _wait_ended(w, killed, timeout_s=10)
    assert (dead.state.life_cycle_state, dead.state.result_state) == (RunLifeCycleState.INTERNAL_ERROR,
                                                                      RunResultState.FAILED)
    assert f"the run's process {pid} ended without a result" in dead.state.state_message


def test_unknown_jobs_and_runs_are_answered_as_databricks_does(jobs_workspace):
    _, w = jobs_workspace([nb("a")], parameters=[{"name": "p", "default": "1"}])
    with pytest.raises(InvalidParameterValue, match=r"^Job 12345 does not exist\.$"):
        w.jobs.run_now(job_id=12345)
    with pytest.raises(InvalidParameterValue, match=r"^Job 12345 does not exist\.$"):
        list(w.jobs.list_runs(job_id=12345))
    # 400 INVALID_PARAMETER_VALUE, which the SDK turns into ResourceDoesNotExist for runs/get
    with pytest.raises(ResourceDoesNotExist, match=r"^Run 999 does not exist\.$"):
        w.jobs.get_run(999)
    with pytest.raises(InvalidParameterValue, match=r"job 'j' has no parameter 'q'"):
        w.jobs.run_now(job_id=JOB_ID, job_parameters={"q": "2"})
    _, bare = jobs_workspace([], bundle=False)  # a workspace without a bundle has no jobs
    assert list(bare.jobs.list()) == []
    with pytest.raises(InvalidParameterValue, match=rf"^Job {JOB_ID} does not exist\.$"):
        bare.jobs.run_now(job_id=JOB_ID)


def test_trigger_retrain_refuses_while_a_run_is_active_then_starts_with_the_last_parameters(jobs_workspace, tmp_path):
    """The monitor's trigger, through the Jobs API as on Databricks: by name or id, one retraining
    at a time, and a new run reads what the latest run read."""
    url, w = jobs_workspace([nb("step", "v:got={{job.parameters.data}}", "sleep={{job.parameters.pause}}")],
                            parameters=[{"name": "data", "default": "default-data"}, {"name": "pause", "default": "0"}],
                            max_concurrent_runs=5)
    first = w.jobs.run_now(job_id=JOB_ID, job_parameters={"data": "the-last-data", "pause": "2"}).run_id
    refused = trigger_retrain(url, TOKEN, "mini")
    assert refused == {"job_id": JOB_ID, "started": False, "reason": f"run {first} is still active"}
    assert len(_run_processes(tmp_path / "root")) == 1
    assert _wait_ended(w, first).state.result_state == RunResultState.SUCCESS
    started = trigger_retrain(url, TOKEN, str(JOB_ID))
    assert started["started"] and started["parameters"] == {"data": "the-last-data", "pause": "2"}
    run = _wait_ended(w, started["run_id"])
    assert run.state.result_state == RunResultState.SUCCESS
    assert _result(tmp_path / "root", run.run_id)["tasks"][0]["values"]["got"] == "the-last-data"


def test_trigger_retrain_names_a_job_it_cannot_find(jobs_workspace):
    url, _ = jobs_workspace([nb("a")])
    with pytest.raises(Exception, match="retraining is due, but no job is named 'cv_pipeline' in the workspace"):
        trigger_retrain(url, TOKEN, "cv_pipeline")


def test_runs_outlive_the_workspace_process_that_started_them(tmp_path):
    """``lakevision workspace --bundle``: a run started through it goes on after it stops, as a
    Databricks run outlives its client, and a later workspace reports how it ended."""
    bundle = mini_bundle(tmp_path, [nb("step", "v:x=1", "sleep=2")])
    root = tmp_path / "root"
    try:
        with local_workspace_process(root, bundle_dir=bundle) as (url, token):
            run_id = workspace_client(url, token).jobs.run_now(job_id=JOB_ID).run_id
        (pid,) = _run_processes(root)
        ws = LocalWorkspace(root, TOKEN)  # no bundle: runs/get still reads the runs under the root
        try:
            run = _wait_ended(workspace_client(ws.start(), TOKEN), run_id)
        finally:
            ws.stop()
        assert run.state.result_state == RunResultState.SUCCESS and run.run_id == run_id
        assert not alive(pid)
    finally:
        _kill_runs(root)


def test_the_real_bundle_gives_the_monitor_the_retrain_jobs_local_id():
    local = load_bundle(REPO, "local", local_files=True)
    params = local.resources["jobs"]["monitor"]["tasks"][0]["notebook_task"]["base_parameters"]
    assert params["retrain_job"] == str(local_job_id("cv_pipeline"))
    deployed = load_bundle(REPO, "dev")  # left for the CLI to fill in at deploy time
    params = deployed.resources["jobs"]["monitor"]["tasks"][0]["notebook_task"]["base_parameters"]
    assert params["retrain_job"] == "${resources.jobs.cv_pipeline.id}"
