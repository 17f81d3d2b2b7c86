"""``lakevision bundle run``: one job of the bundle on this machine, with the semantics of a
Databricks job run.

Tasks run one at a time in dependency order (a 2-core laptop gains nothing from running two
training processes side by side), each in its own process with its job cluster's
``spark_env_vars``, so a task starts as cleanly as on a fresh cluster. Between tasks the runner
does what the Jobs service does: resolves ``{{job.parameters.*}}`` and ``{{tasks.*.values.*}}``,
evaluates condition tasks, applies ``run_if`` and ``depends_on`` outcomes, retries
``max_retries`` times, enforces ``timeout_seconds``, and marks dependents of a failed task
``UPSTREAM_FAILED``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lakevision.bundle.loader import Bundle, BundleError, Problem, local_job_id
from lakevision.bundle.task_context import NOTEBOOK_TASK, TASK_TYPE_ENV, TASK_VALUES_ENV, WIDGET_ENV_PREFIX, widget_env
from lakevision.local.job_runs import SKIPPED, end_without_result, submit, wait_for_turn
from lakevision.local.process_tree import kill_tree, run_mark
from lakevision.local.bundle_validate import DYNAMIC_REF, notebook_file, validate_bundle
from lakevision import progress
from lakevision.errors import LakevisionError
from lakevision.jobs.base import stop_on_sigterm
from lakevision.runtime import ROOT_ENV, LocalLayout

SUCCESS, FAILED, UPSTREAM_FAILED, EXCLUDED, TIMED_OUT = "SUCCESS", "FAILED", "UPSTREAM_FAILED", "EXCLUDED", "TIMED_OUT"
_LOG_TAIL_LINES = 12
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
HEARTBEAT_S = 30.0  # how often a long task without new progress says it is still running
# a task being cancelled or past its timeout gets SIGTERM and this long to end its MLflow run, stop
# what it started and remove its staging, before SIGKILL
KILL_GRACE_S = 10.0

# Runs the console script `entry_point` of distribution `package` with the remaining arguments,
# as a python_wheel_task does on a cluster: the entry point's return value is ignored (see
# databricks/cli bundle/trampoline/python_wheel.go), so only an exception or SystemExit fails it.
_WHEEL_LAUNCHER = """
import sys
from importlib.metadata import distribution
package, entry_point = sys.argv[1:3]
matches = [e for e in distribution(package).entry_points if e.group == "console_scripts" and e.name == entry_point]
if not matches:
    sys.exit(f"package {package} has no console_scripts entry point {entry_point!r}")
sys.argv = [entry_point, *sys.argv[3:]]
matches[0].load()()
"""

# Runs a Databricks source-format notebook as a notebook task does: from the notebook's own
# folder (the working directory of a workspace notebook), with no __file__ (a notebook has none).
# A cell that raises fails the task; sys.exit() is no way to end a notebook (dbutils.notebook.exit
# is), so it fails the task too rather than passing for success.
_NOTEBOOK_LAUNCHER = """
import os, sys
path = os.path.abspath(sys.argv[1])
os.chdir(os.path.dirname(path))
sys.argv = [path]
code = compile(open(path, encoding="utf-8").read(), path, "exec")
try:
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
except SystemExit as exc:
    if exc.code == 143:  # SIGTERM: the run was cancelled or the task timed out, and the step stopped
        raise
    sys.exit(f"{os.path.basename(path)}: the notebook called sys.exit({exc.code!r}); a notebook task ends with "
             "dbutils.notebook.exit() or fails by raising an exception")
"""

# Stops a run's processes when its runner dies without doing so (SIGKILL, a crash): it waits for the
# runner to close its end of a pipe and, unless the runner wrote "done" first, stops every process
# that carries the run's mark as a cancelled run's are stopped (SIGTERM, the grace period, SIGKILL).
_GUARD = """
import sys
from lakevision.local.process_tree import kill_tree
marker, grace = sys.argv[1], float(sys.argv[2])
if sys.stdin.buffer.read() != b"done":
    kill_tree(None, grace, marker)
"""


class JobRunError(LakevisionError):
    """A job that cannot be started (unknown job or parameter)."""


@dataclass
class TaskRun:
    task_key: str
    status: str
    seconds: float = 0.0
    attempts: int = 0
    values: dict[str, Any] = field(default_factory=dict)
    outcome: str | None = None  # condition tasks: "true" / "false"
    message: str = ""
    log: str | None = None


@dataclass
class JobRun:
    job_key: str
    run_id: int
    target: str
    status: str  # SUCCESS, FAILED, or SKIPPED (the job's limit of concurrent runs was reached)
    parameters: dict[str, str]
    tasks: list[TaskRun]
    seconds: float
    run_dir: str
    # who the job's email_notifications would write to about this run, by rule (on_failure, ...)
    notifications: dict[str, list[str]] = field(default_factory=dict)
    message: str = ""  # why a run was skipped

    def task(self, key: str) -> TaskRun:
        return next(t for t in self.tasks if t.task_key == key)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def render_value(value: Any) -> str:
    """A task value as ``{{tasks.X.values.Y}}`` renders it: JSON booleans, plain strings."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return ""
    if isinstance(value, (str, int, float)):
        return str(value)
    return json.dumps(value)


def compare(left: str, op: str, right: str) -> bool:
    """A condition task: numbers compare as numbers, anything else as strings."""
    try:
        a, b = float(left), float(right)
    except ValueError:
        a, b = left, right  # type: ignore[assignment]
    return {"EQUAL_TO": a == b, "NOT_EQUAL": a != b, "GREATER_THAN": a > b, "GREATER_THAN_OR_EQUAL": a >= b,
            "LESS_THAN": a < b, "LESS_THAN_OR_EQUAL": a <= b}[op]


def topological_order(tasks: list[dict]) -> list[dict]:
    """Dependencies first; among tasks that are ready, the order they are written in."""
    pending = list(tasks)
    done: set[str] = set()
    order: list[dict] = []
    while pending:
        ready = next(t for t in pending if all(d["task_key"] in done for d in t.get("depends_on") or []))
        pending.remove(ready)
        done.add(ready["task_key"])
        order.append(ready)
    return order


def decide(run_if: str, deps: list[str]) -> str | None:
    """None when the task runs, else the status it gets. ``deps`` are each dependency's state as
    this task sees it: "success", "failed" or "excluded" (skipped, or a condition outcome that
    does not match)."""
    if not deps:
        return None
    ok, failed = deps.count("success"), deps.count("failed")
    rule = {
        "ALL_SUCCESS": ok == len(deps),
        "AT_LEAST_ONE_SUCCESS": ok > 0,
        "NONE_FAILED": failed == 0 and ok > 0,
        "ALL_DONE": True,
        "AT_LEAST_ONE_FAILED": failed > 0,
        "ALL_FAILED": failed == len(deps),
    }[run_if]
    if rule:
        return None
    if failed and run_if in ("ALL_SUCCESS", "AT_LEAST_ONE_SUCCESS", "NONE_FAILED"):
        return UPSTREAM_FAILED
    return EXCLUDED


def _dep_state(dep: dict, upstream: TaskRun) -> str:
    if upstream.status in (FAILED, UPSTREAM_FAILED, TIMED_OUT):
        return "failed"
    if upstream.status != SUCCESS:
        return "excluded"
    if "outcome" in dep and upstream.outcome != str(dep["outcome"]).lower():
        return "excluded"
    return "success"


def _summary(values: dict[str, Any], width: int = 60) -> str:
    parts = []
    for k, v in values.items():
        text = render_value(v)
        parts.append(f"{k}={text if len(text) <= width else text[:width - 3] + '...'}")
    return ", ".join(parts)


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    text = _ANSI.sub("", path.read_text(errors="replace")).splitlines() if path.exists() else []
    errors = [ln for ln in text if ": error: " in ln]  # the lakevision CLI's own one-line error
    return errors[-1] if errors else "\n".join(ln for ln in text[-lines:] if ln.strip())


def _latest_progress(path: Path, width: int = 110) -> str | None:
    """The task's newest progress line (:mod:`lakevision.progress`) in the log's tail."""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 16384))
        tail = f.read().decode(errors="replace")
    line = progress.latest(_ANSI.sub("", tail))  # Ray colours its worker prefixes
    return line[:width] if line else None


class LocalJobRunner:
    """Runs ``bundle``'s jobs here; ``root`` is the local data root every task shares."""

    def __init__(self, bundle: Bundle, root: str | os.PathLike,
                 progress: Callable[[str, TaskRun | None, int, int], None] | None = None):
        problems = validate_bundle(bundle)
        if problems:
            raise BundleError(problems)
        self.bundle = bundle
        self.root = Path(root).resolve()
        self.progress = progress

    # ------------------------------------------------------------------ references
    def _resolve(self, text: str, ctx: dict[str, Any], where: str) -> str:
        def sub(m) -> str:
            ref = m.group(1)
            parts = ref.split(".")
            if parts[:2] == ["job", "parameters"]:
                return ctx["parameters"][parts[2]]
            if parts[0] == "tasks":
                values = ctx["values"].get(parts[1], {})
                if parts[3] not in values:
                    raise JobRunError(f"{where}: {{{{{ref}}}}}: task {parts[1]!r} set no value {parts[3]!r} "
                                      f"(it set: {sorted(values) or 'none'})")
                return render_value(values[parts[3]])
            return render_value(ctx["run"][ref])

        return DYNAMIC_REF.sub(sub, text)

    # ------------------------------------------------------------------ one task
    def _command(self, task: dict, job: dict, ctx: dict, key: str) -> tuple[list[str], dict[str, str]]:
        where = f"task {task['task_key']!r}"
        env: dict[str, str] = {}
        src = self.bundle.sources[("jobs", key)]
        if "python_wheel_task" in task:
            w = task["python_wheel_task"]
            res = [self._resolve(str(p), ctx, where) for p in w.get("parameters") or []]
            named = w.get("named_parameters")
            if named is not None:  # job parameters reach a wheel task only as keyword arguments, and win
                named = {**{k: self._resolve(str(v), ctx, where) for k, v in named.items()}, **ctx["parameters"]}
                res += [f"--{k}={v}" for k, v in named.items()]
            return [sys.executable, "-c", _WHEEL_LAUNCHER, w["package_name"], w["entry_point"], *res], env
        if "spark_python_task" in task:
            s = task["spark_python_task"]
            res = [self._resolve(str(p), ctx, where) for p in s.get("parameters") or []]
            return [sys.executable, str((src.parent / s["python_file"]).resolve()), *res], env
        if "notebook_task" in task:
            n = task["notebook_task"]
            path = notebook_file(src.parent, n["notebook_path"])
            if path is None or path.suffix != ".py":
                raise JobRunError(f"{where}: {n['notebook_path']}: only Python notebooks in source format "
                                  "(# Databricks notebook source) run on this machine")
            # widgets: the task's base_parameters, and the job's parameters, which win on the same key
            widgets = {**{k: self._resolve(str(v), ctx, where) for k, v in (n.get("base_parameters") or {}).items()},
                       **ctx["parameters"]}
            env.update({widget_env(k): v for k, v in widgets.items()})
            return [sys.executable, "-c", _NOTEBOOK_LAUNCHER, str(path)], env
        kind = next(k for k in task if k.endswith("_task"))
        raise JobRunError(f"{where}: a {kind} cannot run on this machine; only python_wheel_task, "
                          "spark_python_task, notebook_task and condition_task can")

    def _cluster_env(self, task: dict, job: dict) -> dict[str, str]:
        spec = task.get("new_cluster")
        if spec is None and task.get("job_cluster_key"):
            spec = next(c["new_cluster"] for c in job.get("job_clusters") or []
                        if c.get("job_cluster_key") == task["job_cluster_key"])
        return {k: str(v) for k, v in ((spec or {}).get("spark_env_vars") or {}).items()}

    def _run_process(self, task: dict, job: dict, key: str, ctx: dict, run_dir: Path,
                     deadline: float | None) -> TaskRun:
        tkey = task["task_key"]
        log = run_dir / f"{tkey}.log"
        values_file = run_dir / f"{tkey}.values.json"
        result = TaskRun(tkey, FAILED, log=str(log))
        try:
            argv, extra_env = self._command(task, job, ctx, key)
        except JobRunError as exc:
            result.message = str(exc)
            return result
        kind = next(k for k in task if k.endswith("_task"))
        # not the widgets of a task this runner itself runs under (a job the monitor task started)
        inherited = {k: v for k, v in os.environ.items() if not k.startswith(WIDGET_ENV_PREFIX)}
        env = {**inherited, **self._cluster_env(task, job), **extra_env,
               TASK_TYPE_ENV: kind, ROOT_ENV: str(self.root), "PYTHONUNBUFFERED": "1", run_mark(ctx["marker"]): "1"}
        env.pop(TASK_VALUES_ENV, None)
        if kind == NOTEBOOK_TASK:  # the only task type whose values Databricks keeps
            env[TASK_VALUES_ENV] = str(values_file)
        retries = int(task.get("max_retries") or 0)  # -1: until it succeeds (or the job times out)
        # measured from the start of the failed attempt, as the Jobs API defines it
        interval = int(task.get("min_retry_interval_millis") or 0) / 1000
        limit = task.get("timeout_seconds") or None  # 0: no timeout
        attempt = 0
        while True:
            attempt += 1
            result.attempts = attempt
            values_file.unlink(missing_ok=True)
            timeout = limit
            if deadline is not None:
                timeout = min(timeout or 1e9, max(1.0, deadline - time.monotonic()))
            started = time.monotonic()
            with open(log, "a") as out:
                shown = argv[3:] if argv[1] == "-c" else argv[1:]  # the launcher's code is noise
                out.write(f"=== attempt {attempt} at {time.strftime('%H:%M:%S')}: {shlex.join(shown)}\n")
                out.flush()
                # its own session, so a timeout kills the task's Spark, Ray and workspace children too
                code = self._wait(subprocess.Popen(argv, cwd=self.bundle.root, env=env, stdout=out,
                                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                   start_new_session=True),
                                  timeout, result, log, ctx["marker"])
            if code == 0:
                result.status = SUCCESS
                result.values = json.loads(values_file.read_text()) if values_file.exists() else {}
                result.message = _summary(result.values)
                return result
            if code is None:
                result.status, result.message = TIMED_OUT, f"did not finish within {timeout:.0f} s"
                if not task.get("retry_on_timeout"):  # by default a timed-out task is not retried
                    return result
            else:
                result.status, result.message = FAILED, f"exit code {code}: {_tail(log)}"
            if retries != -1 and attempt > retries:
                return result
            if deadline is not None and time.monotonic() + interval >= deadline:
                return result  # no time left in the job for another attempt
            time.sleep(max(0.0, interval - (time.monotonic() - started)))

    def _wait(self, proc: subprocess.Popen, timeout: float | None, result: TaskRun, log: Path,
              marker: str) -> int | None:
        """The exit code, or None after stopping a process that ran past ``timeout`` (SIGTERM, then
        SIGKILL after KILL_GRACE_S); reports the log's latest line every HEARTBEAT_S so a long task
        shows it is alive. Ctrl-C and SIGTERM leave through :meth:`run`, which stops the task."""
        started = time.monotonic()
        beat, shown = started, None
        while True:
            try:
                return proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                now = time.monotonic()
                if timeout is not None and now - started > timeout:
                    kill_tree(proc.pid, KILL_GRACE_S, marker)
                    proc.wait()
                    return None
                latest = _latest_progress(log)
                if latest != shown or now - beat >= HEARTBEAT_S:
                    # a new progress line at once; otherwise a sign of life, never a library's warning
                    beat, shown = now, latest
                    self._report("running", TaskRun(result.task_key, "RUNNING", seconds=round(now - started, 1),
                                                    message=latest or "running"), 0, 0)

    def _run_condition(self, task: dict, ctx: dict) -> TaskRun:
        c = task["condition_task"]
        where = f"task {task['task_key']!r}"
        try:
            left, right = self._resolve(str(c["left"]), ctx, where), self._resolve(str(c["right"]), ctx, where)
        except JobRunError as exc:
            return TaskRun(task["task_key"], FAILED, attempts=1, message=str(exc))
        outcome = "true" if compare(left, c["op"], right) else "false"
        return TaskRun(task["task_key"], SUCCESS, attempts=1, outcome=outcome,
                       message=f"{left!r} {c['op']} {right!r} -> {outcome}")

    # ------------------------------------------------------------------ the job
    def run(self, job_key: str, parameters: dict[str, str] | None = None, run_id: int | None = None) -> JobRun:
        """Run ``job_key`` here. Without ``run_id`` the run is asked for as ``jobs.run_now`` asks:
        skipped or queued when the job's limit of concurrent runs is reached (see
        :mod:`lakevision.local.job_runs`). With one, it is the run the local Jobs API admitted
        under that id, and a queued run waits here for its turn."""
        job = self.bundle.job(job_key)
        params = job_parameters(job_key, job, parameters)
        if run_id is None:
            record = submit(self.root, job_key, job, params, lambda _: (os.getpid(), None))
            run_id = record["run_id"]
            if record["state"] == SKIPPED:
                return JobRun(job_key, run_id, self.bundle.target, SKIPPED, params, [], 0.0,
                              str(LocalLayout(self.root).job_runs(job_key) / str(run_id)),
                              message=record["state_message"])
        # every task process of this run carries it, and so does whatever the task starts
        marker = f"{run_id}_{uuid.uuid4().hex[:8]}"
        with _guarded(marker):
            try:
                with stop_on_sigterm(end_mlflow_runs=False):
                    wait_for_turn(self.root, job_key, run_id, job, params, on_wait=lambda message: self._report(
                        "queued", TaskRun(job_key, "QUEUED", message=message), 0, 0))
                run = self._run(job_key, job, params, run_id, marker)
            except BaseException as exc:  # Ctrl-C, SIGTERM, a bug: the run ends with no result, and says so
                # the running task gets SIGTERM and KILL_GRACE_S to end its MLflow run and clean up
                kill_tree(None, KILL_GRACE_S, marker)
                end_without_result(self.root, job_key, run_id, f"the runner stopped: {type(exc).__name__}: {exc}")
                raise
            # a run ends as its job cluster does: whatever its tasks left running is stopped
            kill_tree(None, KILL_GRACE_S, marker)
            return run

    def _run(self, job_key: str, job: dict, params: dict[str, str], run_id: int, marker: str) -> JobRun:
        run_dir = LocalLayout(self.root).job_runs(job_key) / str(run_id)
        run_dir.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        deadline = started + job["timeout_seconds"] if job.get("timeout_seconds") else None
        ctx: dict[str, Any] = {"parameters": params, "values": {}, "marker": marker, "run": {
            "job.id": str(local_job_id(job_key)), "job.name": job.get("name", job_key), "job.run_id": str(run_id),
            "job.repair_count": "0", "job.trigger.type": "one_time",
            "job.start_time.iso_date": time.strftime("%Y-%m-%d", time.gmtime()),
            "job.start_time.iso_datetime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "job.start_time.timestamp_ms": str(run_id)}}
        order = topological_order(job.get("tasks") or [])
        runs: dict[str, TaskRun] = {}
        with stop_on_sigterm(end_mlflow_runs=False):
            for i, task in enumerate(order, 1):
                self._run_task(task, i, len(order), job, job_key, runs, ctx, run_id, run_dir, deadline)
        tasks = [runs[t["task_key"]] for t in job.get("tasks") or []]
        failed = any(t.status in (FAILED, TIMED_OUT) for t in tasks)
        status = FAILED if failed else SUCCESS
        run = JobRun(job_key, run_id, self.bundle.target, status, params, tasks,
                     round(time.monotonic() - started, 2), str(run_dir), notifications(job, status))
        (run_dir / "run.json").write_text(json.dumps(run.to_json(), indent=2))
        return run

    def _run_task(self, task: dict, i: int, n: int, job: dict, job_key: str, runs: dict[str, TaskRun],
                  ctx: dict, run_id: int, run_dir: Path, deadline: float | None) -> None:
        tkey = task["task_key"]
        deps = [_dep_state(d, runs[d["task_key"]]) for d in task.get("depends_on") or []]
        skip = decide(task.get("run_if", "ALL_SUCCESS"), deps)
        if skip is None and deadline is not None and time.monotonic() > deadline:
            skip = TIMED_OUT
        if skip is not None:
            runs[tkey] = TaskRun(tkey, skip, message="not run: " + ", ".join(
                f"{d['task_key']} {runs[d['task_key']].status.lower()}"
                + (f" (outcome {runs[d['task_key']].outcome}, needs {d['outcome']})" if "outcome" in d else "")
                for d in task.get("depends_on") or []))
            self._report("done", runs[tkey], i, n)
            return
        self._report("start", TaskRun(tkey, "RUNNING"), i, n)
        ctx["run"].update({"task.name": tkey, "task.run_id": f"{run_id}-{i}", "task.execution_count": "1"})
        t0 = time.monotonic()
        if "condition_task" in task:
            result = self._run_condition(task, ctx)
        else:
            result = self._run_process(task, job, job_key, ctx, run_dir, deadline)
        result.seconds = round(time.monotonic() - t0, 2)
        runs[tkey] = result
        ctx["values"][tkey] = result.values
        self._report("done", result, i, n)

    def _report(self, event: str, task: TaskRun, i: int, n: int) -> None:
        if self.progress is not None:
            self.progress(event, task, i, n)


@contextlib.contextmanager
def _guarded(marker: str) -> Iterator[None]:
    """A guard process for the block (see _GUARD): if this process dies inside it, even by SIGKILL,
    the processes marked with ``marker`` are stopped all the same."""
    read, write = os.pipe()  # neither end is inherited by the tasks (PEP 446, close_fds)
    try:
        guard = subprocess.Popen([sys.executable, "-c", _GUARD, marker, str(KILL_GRACE_S)], stdin=read,
                                 stdout=subprocess.DEVNULL, start_new_session=True)
    finally:
        os.close(read)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # a guard killed from outside
            os.write(write, b"done")
        os.close(write)
        guard.wait()


def job_parameters(job_key: str, job: dict, given: dict[str, str] | None) -> dict[str, str]:
    """Every parameter of the job: its defaults with ``given`` over them (an unknown name is refused)."""
    defaults = {p["name"]: render_value(p.get("default")) for p in job.get("parameters") or []}
    unknown = sorted(set(given or {}) - set(defaults))
    if unknown:
        raise JobRunError(f"job {job_key!r} has no parameter {unknown[0]!r}; parameters: {sorted(defaults)}")
    return {**defaults, **(given or {})}


def notifications(job: dict, status: str) -> dict[str, list[str]]:
    """The job's email rules that fire for a run that ended with ``status``."""
    rules = job.get("email_notifications") or {}
    rule = "on_success" if status == SUCCESS else "on_failure"
    return {rule: list(rules[rule])} if rules.get(rule) else {}


def parse_params(items: list[str], flag: str) -> dict[str, str]:
    """``k=v`` strings from the command line."""
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise BundleError([Problem("<command line>", flag, f"{item!r}: expected NAME=VALUE")])
        out[k] = v
    return out
