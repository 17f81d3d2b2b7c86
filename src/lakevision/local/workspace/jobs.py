"""The part of the Jobs API 2.2 that the project uses, served by the local workspace over one
bundle's jobs (one target) and run by the local runner: ``jobs/list``, ``jobs/run-now``,
``jobs/runs/get`` and ``jobs/runs/list``, in the shapes the databricks-sdk sends and parses
(``databricks.sdk.service.jobs``), so ``WorkspaceClient().jobs`` drives it unchanged.

A job's id is :func:`~lakevision.bundle.loader.local_job_id` of its key. ``run-now`` admits the
run as the Jobs service does (:mod:`lakevision.local.job_runs`: the job's ``max_concurrent_runs``,
default 1; beyond it queued, or skipped when queueing is off) and starts
``lakevision bundle run <key> --run-id <id>`` in a session of its own, which outlives this
workspace as a Databricks run outlives its client. A run's state is read from its folder: the
runner's ``run.json`` once it has ended, else whether its process lives.

States as the Jobs API reports them:

* a run that ended well: ``TERMINATED`` / ``SUCCESS``;
* a run with a failed task: ``INTERNAL_ERROR`` / ``FAILED`` in the (deprecated) ``state``, with
  ``status.state`` ``TERMINATED`` and the code ``RUN_EXECUTION_ERROR`` (what a workspace answers,
  as measured for databricks/cli ``libs/testserver/jobs.go``);
* a run whose process died without a result: ``INTERNAL_ERROR`` / ``FAILED``, code
  ``INTERNAL_ERROR``, the message naming the process and the end of its output;
* a skipped run: ``SKIPPED``, result ``MAXIMUM_CONCURRENT_RUNS_REACHED``, code
  ``MAX_CONCURRENT_RUNS_EXCEEDED`` (the meanings the SDK's enums give these values);
* a queued run: ``QUEUED`` with ``queue_details`` code ``MAX_CONCURRENT_RUNS_REACHED``.

An unknown job or run is answered as the Jobs API answers it: 400 ``INVALID_PARAMETER_VALUE``,
"Job 123 does not exist." / "Run 456 does not exist." (the shape databricks-sdk's
``errors/overrides.py`` matches to raise ``ResourceDoesNotExist`` for ``jobs/get`` and
``jobs/runs/get``; the run-now message is quoted in astronomer/astronomer-providers pull request 1254).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from lakevision.bundle.loader import Bundle, BundleError, load_bundle, local_job_id
from lakevision.local.job_runner import JobRunError, job_parameters, render_value
from lakevision.local.job_runs import (OUTPUT, QUEUED, RESULT, RUNNING, SKIPPED, RunFolder, all_run_folders,
                                       find_run, job_run_folders, submit)
from lakevision.local.process_tree import RUN_MARK_PREFIX
from lakevision.local.workspace.api import TOKEN_ENV, ApiError, invalid
from lakevision.runtime import LocalLayout

# the run-now fields of task kinds this runner passes no other way than job parameters
_TASK_PARAMETER_FIELDS = ("notebook_params", "python_params", "python_named_params", "jar_params",
                          "spark_submit_params", "sql_params", "dbt_commands", "pipeline_params")
_BUNDLE_ONLY_KEYS = ("permissions",)  # resource fields the CLI sends elsewhere than the job's settings
_TASK_STATES = {  # the local runner's task status -> (life_cycle_state, result_state)
    "SUCCESS": ("TERMINATED", "SUCCESS"), "FAILED": ("TERMINATED", "FAILED"),
    "TIMED_OUT": ("TERMINATED", "TIMEDOUT"), "UPSTREAM_FAILED": ("SKIPPED", "UPSTREAM_FAILED"),
    "EXCLUDED": ("SKIPPED", "EXCLUDED"),
}


def no_job(job_id: Any) -> ApiError:
    return invalid(f"Job {job_id} does not exist.")


def _int(query: dict[str, Any], name: str, default: int | None = None) -> int | None:
    value = query.get(name)
    if value is None or value == "":
        return default
    if isinstance(value, bool):
        raise invalid(f"{name} must be an integer, got {value!r}")
    try:
        return int(value)
    except (TypeError, ValueError):
        raise invalid(f"{name} must be an integer, got {value!r}") from None


def _bool(query: dict[str, Any], name: str) -> bool:
    value = str(query.get(name, "false")).lower()
    if value not in ("true", "false"):
        raise invalid(f"{name} must be true or false, got {query.get(name)!r}")
    return value == "true"


def _page(items: list, key: str, query: dict[str, Any], default_limit: int, max_limit: int,
          zero_is_max: bool = False) -> dict:
    """One page of ``items``: ``limit`` from ``page_token`` (or the deprecated ``offset``)."""
    limit = _int(query, "limit", default_limit)
    if limit == 0 and zero_is_max:
        limit = max_limit
    if not 1 <= limit <= max_limit:
        raise invalid(f"limit must be between 1 and {max_limit}, got {limit}")
    token = query.get("page_token")
    start = _int({"page_token": token}, "page_token", None) if token else _int(query, "offset", 0)
    if start < 0:
        raise invalid(f"page_token or offset must not be negative, got {start}")
    page = items[start:start + limit]
    out: dict[str, Any] = {key: page, "has_more": start + limit < len(items)}
    if out["has_more"]:
        out["next_page_token"] = str(start + limit)
    if start > 0:
        out["prev_page_token"] = str(max(0, start - limit))
    return out


class LocalJobs:
    """The Jobs API of a local workspace over ``bundle_dir``'s jobs for ``target`` (no bundle: no jobs)."""

    def __init__(self, root: str | os.PathLike, bundle_dir: str | os.PathLike | None = None, target: str = "local"):
        self.root = Path(root).resolve()
        self.bundle_dir = Path(bundle_dir).resolve() if bundle_dir is not None else None
        self.target = target
        self._lock = threading.Lock()  # guards _bundle and _children
        self._bundle: Bundle | None = None
        self._children: dict[int, subprocess.Popen] = {}  # runs this workspace started, until reaped

    # -- the jobs

    def bundle(self) -> Bundle | None:
        """The bundle, loaded once (as a deploy fixes a workspace's jobs); None without one."""
        if self.bundle_dir is None:
            return None
        with self._lock:
            if self._bundle is None:
                try:
                    self._bundle = load_bundle(self.bundle_dir, self.target, local_files=True)
                except BundleError as exc:
                    raise ApiError(500, "INTERNAL_ERROR", f"the local workspace's bundle {self.bundle_dir} "
                                                          f"(target {self.target}) cannot be loaded: {exc}") from None
            return self._bundle

    def _jobs(self) -> dict[int, tuple[str, dict]]:
        """Job id -> (key, resolved definition)."""
        bundle = self.bundle()
        jobs = (bundle.resources.get("jobs") or {}) if bundle is not None else {}
        out: dict[int, tuple[str, dict]] = {}
        for key, job in sorted(jobs.items()):
            job_id = local_job_id(key)
            if job_id in out:  # two keys, one crc32: refuse rather than run the wrong job
                raise ApiError(500, "INTERNAL_ERROR", f"jobs {out[job_id][0]!r} and {key!r} have the same local id "
                                                      f"{job_id}; rename one")
            out[job_id] = (key, job)
        return out

    def _job(self, job_id: Any) -> tuple[int, str, dict]:
        if isinstance(job_id, bool) or not isinstance(job_id, int):
            raise invalid(f"job_id must be an integer, got {job_id!r}")
        found = self._jobs().get(job_id)
        if found is None:
            raise no_job(job_id)
        return job_id, *found

    def _job_json(self, job_id: int, key: str, job: dict, expand_tasks: bool) -> dict:
        """``BaseJob``: the job's settings as deployed (without tasks and clusters unless expanded)."""
        bundle = self.bundle()
        assert bundle is not None
        settings = {k: copy.deepcopy(v) for k, v in job.items() if k not in _BUNDLE_ONLY_KEYS}
        if not expand_tasks:
            settings.pop("tasks", None)
            settings.pop("job_clusters", None)
        settings.setdefault("max_concurrent_runs", 1)
        settings.setdefault("queue", {"enabled": True})  # bundle deploy's default (see job_runs)
        settings.setdefault("format", "MULTI_TASK")
        source = bundle.sources.get(("jobs", key))
        created = int(source.stat().st_mtime * 1000) if source is not None and source.exists() else 0
        return {"job_id": job_id, "created_time": created,
                "creator_user_name": bundle.workspace["current_user"]["userName"], "settings": settings}

    def list_jobs(self, query: dict[str, Any]) -> dict:
        """``GET /api/2.2/jobs/list``: ``name`` filters on the exact name, case-insensitively."""
        expand = _bool(query, "expand_tasks")
        name = query.get("name")
        jobs = [self._job_json(job_id, key, job, expand) for job_id, (key, job) in self._jobs().items()
                if name is None or str(job.get("name") or "").casefold() == name.casefold()]
        jobs.sort(key=lambda j: (j["settings"].get("name") or "", j["job_id"]))
        return _page(jobs, "jobs", query, default_limit=20, max_limit=100)

    # -- runs

    def run_now(self, body: dict) -> dict:
        """``POST /api/2.2/jobs/run-now``: admit and start a run; ``{run_id, number_in_job}``."""
        job_id, key, job = self._job(body.get("job_id"))
        given = [f for f in _TASK_PARAMETER_FIELDS if body.get(f)]
        if given:
            raise invalid(f"{', '.join(given)}: the local workspace passes parameters only as job_parameters")
        raw = body.get("job_parameters") or {}
        if not isinstance(raw, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in raw.items()):
            raise invalid("job_parameters must map parameter names to string values")
        try:
            params = job_parameters(key, job, raw)
        except JobRunError as exc:
            raise invalid(str(exc)) from None
        token = body.get("idempotency_token")
        if token:
            earlier = next((r for r in job_run_folders(self.root, key)
                            if (r.record or {}).get("idempotency_token") == token), None)
            if earlier is not None:  # a request sent again returns the run it started
                return {"run_id": earlier.run_id, "number_in_job": earlier.run_id}
        self._reap()
        record = submit(self.root, key, job, params, lambda run_id: self._start(key, run_id, params),
                        queue=body.get("queue"), extra={"idempotency_token": token} if token else None)
        return {"run_id": record["run_id"], "number_in_job": record["run_id"]}

    def _start(self, key: str, run_id: int, params: dict[str, str]) -> tuple[int, str]:
        """Start the runner for run ``run_id`` in a session of its own; its pid and output file."""
        assert self.bundle_dir is not None
        output = LocalLayout(self.root).job_runs(key) / str(run_id) / OUTPUT
        argv = [sys.executable, "-m", "lakevision.cli", "bundle", "run", key, "-t", self.target,
                "--bundle", str(self.bundle_dir), "--root", str(self.root), "--run-id", str(run_id),
                *[a for k, v in params.items() for a in ("--param", f"{k}={v}")]]
        # the run has no use for this workspace's token; and it is a run of its own, which outlives the
        # task that started this workspace: it does not carry that task's run mark
        env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV and not k.startswith(RUN_MARK_PREFIX)}
        with open(output, "w") as out:
            proc = subprocess.Popen(argv, cwd=self.bundle_dir, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        with self._lock:
            self._children[proc.pid] = proc
        return proc.pid, str(output)

    def _reap(self) -> None:
        """Collect the exit status of runs this workspace started that have ended (no zombies)."""
        with self._lock:
            for pid, proc in list(self._children.items()):
                if proc.poll() is not None:
                    del self._children[pid]

    def get_run(self, query: dict[str, Any]) -> dict:
        """``GET /api/2.2/jobs/runs/get?run_id=``."""
        run_id = _int(query, "run_id")
        if run_id is None:
            raise invalid("run_id is required")
        self._reap()
        run = find_run(self.root, run_id)
        if run is None:
            raise invalid(f"Run {run_id} does not exist.")
        return self._run_json(run, with_tasks=True)

    def list_runs(self, query: dict[str, Any]) -> dict:
        """``GET /api/2.2/jobs/runs/list``: newest first; ``job_id``, ``active_only``,
        ``completed_only``, ``start_time_from``/``start_time_to``, ``limit`` (at most 25; 0 is 25)."""
        active_only, completed_only = _bool(query, "active_only"), _bool(query, "completed_only")
        if active_only and completed_only:
            raise invalid("active_only and completed_only cannot both be true")
        job_id = _int(query, "job_id")
        self._reap()
        if job_id is not None:
            _, key, _ = self._job(job_id)
            runs = job_run_folders(self.root, key)
        else:
            runs = all_run_folders(self.root)
        if query.get("run_type") not in (None, "JOB_RUN"):
            runs = []  # every run here is a run-now run of a job
        out = []
        start_from, start_to = _int(query, "start_time_from"), _int(query, "start_time_to")
        expand = _bool(query, "expand_tasks")
        for run in runs:
            item = self._run_json(run, with_tasks=expand)
            ended = item["state"]["life_cycle_state"] not in ("QUEUED", "PENDING", "RUNNING", "TERMINATING")
            if (active_only and ended) or (completed_only and not ended):
                continue
            if (start_from is not None and item["start_time"] < start_from) or (
                    start_to is not None and item["start_time"] > start_to):
                continue
            out.append(item)
        return _page(out, "runs", query, default_limit=20, max_limit=25, zero_is_max=True)

    def _run_json(self, run: RunFolder, with_tasks: bool) -> dict:
        """A run as ``runs/get`` answers it (``Run``; without tasks, the ``BaseRun`` of a list)."""
        record, result = run.record or {}, run.result
        parameters = record.get("parameters") if record else (result or {}).get("parameters", {})
        start = record.get("start_time") or run.run_id
        state, status, end = self._state(run)
        defaults = {}
        found = self._jobs_or_empty().get(run.job_id)
        if found is not None:
            defaults = {p["name"]: render_value(p.get("default")) for p in found[1].get("parameters") or []}
        out = {
            "job_id": run.job_id, "run_id": run.run_id, "number_in_job": run.run_id,
            "original_attempt_run_id": run.run_id, "attempt_number": 0,
            "run_name": record.get("run_name") or run.job_key, "run_type": "JOB_RUN", "trigger": "ONE_TIME",
            "run_page_url": run.path.as_uri(), "state": state, "status": status,
            "start_time": start, "end_time": end or 0,
            "setup_duration": 0, "cleanup_duration": 0,
            "execution_duration": (end - start) if end else 0, "run_duration": (end - start) if end else 0,
            "job_parameters": [{"name": k, "value": v, **({"default": defaults[k]} if k in defaults else {})}
                               for k, v in sorted((parameters or {}).items())],
        }
        if "queue_duration" in record:
            out["queue_duration"] = record["queue_duration"]
        if with_tasks and result is not None:
            out["tasks"] = [self._task_json(run, t) for t in result.get("tasks") or []]
        return out

    def _jobs_or_empty(self) -> dict[int, tuple[str, dict]]:
        try:
            return self._jobs()
        except ApiError:
            return {}

    @staticmethod
    def _task_json(run: RunFolder, task: dict) -> dict:
        life, result = _TASK_STATES.get(task["status"], ("TERMINATED", "FAILED"))
        out = {"task_key": task["task_key"], "attempt_number": max(0, task.get("attempts", 1) - 1),
               "state": {"life_cycle_state": life, "result_state": result, "state_message": task.get("message", "")}}
        if task.get("log"):
            out["run_page_url"] = Path(task["log"]).as_uri()
        return out

    @staticmethod
    def _state(run: RunFolder) -> tuple[dict, dict, int | None]:
        """``state`` and ``status`` of a run, and when it ended (None while it has not)."""
        record, result = run.record or {}, run.result
        if result is not None:
            end = int((run.path / RESULT).stat().st_mtime * 1000)
            if result.get("status") == "SUCCESS":
                return ({"life_cycle_state": "TERMINATED", "result_state": "SUCCESS", "state_message": ""},
                        {"state": "TERMINATED", "termination_details": {"code": "SUCCESS", "type": "SUCCESS",
                                                                        "message": ""}}, end)
            if result.get("status") != SKIPPED:
                failed = next((t for t in result.get("tasks") or [] if t["status"] in ("FAILED", "TIMED_OUT")), None)
                message = (f"Task {failed['task_key']} failed with message: {failed.get('message', '')}."
                           if failed else "The run failed.")
                return ({"life_cycle_state": "INTERNAL_ERROR", "result_state": "FAILED", "state_message": message},
                        {"state": "TERMINATED", "termination_details": {"code": "RUN_EXECUTION_ERROR",
                                                                        "type": "CLIENT_ERROR", "message": message}},
                        end)
        admission = record.get("state")
        message = record.get("state_message", "")
        if admission == SKIPPED or (result or {}).get("status") == SKIPPED:
            message = message or (result or {}).get("message", "")
            return ({"life_cycle_state": "SKIPPED", "result_state": "MAXIMUM_CONCURRENT_RUNS_REACHED",
                     "state_message": message},
                    {"state": "TERMINATED", "termination_details": {"code": "MAX_CONCURRENT_RUNS_EXCEEDED",
                                                                    "type": "CLIENT_ERROR", "message": message}},
                    record.get("end_time") or record.get("start_time"))
        if admission == QUEUED and run.queued:
            return ({"life_cycle_state": "QUEUED", "state_message": message, "queue_reason": message},
                    {"state": "QUEUED", "queue_details": {"code": "MAX_CONCURRENT_RUNS_REACHED", "message": message}},
                    None)
        if admission == RUNNING and run.running:
            return ({"life_cycle_state": "RUNNING", "state_message": ""}, {"state": "RUNNING"}, None)
        pid = record.get("pid")
        message = record.get("state_message") if "end_time" in record else ""
        message = message or f"the run's process {pid} ended without a result"
        tail = run.output_tail
        if tail:
            message += f"; its output ends with:\n{tail}"
        end = record.get("end_time")
        if end is None:
            output = run.path / OUTPUT
            end = int((output if output.exists() else run.path).stat().st_mtime * 1000)
        return ({"life_cycle_state": "INTERNAL_ERROR", "result_state": "FAILED", "state_message": message},
                {"state": "TERMINATED", "termination_details": {"code": "INTERNAL_ERROR", "type": "INTERNAL_ERROR",
                                                                "message": message}}, end)
