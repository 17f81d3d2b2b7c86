"""Small bundles of one job whose tasks are plain Python steps, to test the local job runner.

A step reads ``k=v`` arguments (from its widget ``args`` as a notebook task, from its command line
as a Python file or wheel task) and acts on them: ``sleep=S``, ``fail=MSG``, ``exit=N``,
``counter=FILE fail_times=N`` (fail until the file counted N attempts), ``progress=MSG`` (report a
progress line, then print a coloured warning), ``v:name=value`` (publish
a task value), ``stamps=FILE`` (append the time this attempt's process started), ``spawn=FILE`` (start a
sleeping grandchild in a session of its own, as Spark and Ray do, and write its pid), plus the job
cluster's schema and the data root as values. With ``mlflow=EXPERIMENT`` the step runs as a job
step does: under :func:`lakevision.jobs.base.stop_on_sigterm`, inside an MLflow run in the data
root's store, with a child process in its own process group that it stops when it ends, and
``delta=N`` appends N one-row commits to the Delta table ``<root>/tables/mini/commits``."""

from __future__ import annotations

from pathlib import Path

import yaml

STEP = """
import contextlib, os, sys, time
from lakevision.bundle.task_context import set_task_values, widget
args = dict(a.split("=", 1) for a in (widget("args").splitlines() if NOTEBOOK else sys.argv[1:]))
step = contextlib.ExitStack()
if "mlflow" in args:
    import subprocess
    import mlflow
    from lakevision.jobs.base import stop_on_sigterm
    from lakevision.tracking import local_tracking_uri
    step.enter_context(stop_on_sigterm())
    mlflow.set_tracking_uri(local_tracking_uri())  # the data root's store, as the jobs open it
    mlflow.set_experiment(args["mlflow"])
    step.enter_context(mlflow.start_run())
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    step.callback(child.wait)
    step.callback(child.terminate)


def body():
    if "stamps" in args:  # when the runner started this process: /proc's start time, not now (startup varies)
        ticks = int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[19])
        btime = next(int(line.split()[1]) for line in open("/proc/stat") if line.startswith("btime"))
        open(args["stamps"], "a").write(f"{btime + ticks / os.sysconf('SC_CLK_TCK')}\\n")
    if "spawn" in args:
        import subprocess
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
        open(args["spawn"], "w").write(str(grandchild.pid))
    if "delta" in args:
        import pyarrow as pa
        from deltalake import write_deltalake
        table = os.path.join(os.environ["LAKEVISION_ROOT"], "tables", "mini", "commits")
        for i in range(int(args["delta"])):
            write_deltalake(table, pa.table({"pid": [os.getpid()], "i": [i]}), mode="append")
    if "progress" in args:  # a progress line, then the kind of library noise that follows one
        from lakevision import progress
        progress.report(args["progress"])
        print("UserWarning: \x1b[33mnot the user's business\x1b[0m", file=sys.stderr, flush=True)
    if "sleep" in args:
        time.sleep(float(args["sleep"]))
    counter = args.get("counter")
    if counter:
        n = int(open(counter).read()) if os.path.exists(counter) else 0
        open(counter, "w").write(str(n + 1))
        if n < int(args["fail_times"]):
            raise RuntimeError(f"lakevision test: error: attempt {n + 1} fails")
    if args.get("fail"):
        raise RuntimeError("lakevision test: error: " + args["fail"])
    if args.get("exit"):
        sys.exit(int(args["exit"]))
    values = {k[2:]: v for k, v in args.items() if k.startswith("v:")}
    if values or args.get("publish"):
        set_task_values(**values, env_schema=os.environ.get("LAKEVISION_SCHEMA"),
                        root=os.environ.get("LAKEVISION_ROOT"))


with step:
    body()
"""


def mini_bundle(tmp_path: Path, tasks: list[dict], parameters: list[dict] | None = None, **job) -> Path:
    root = tmp_path / "mini"
    (root / "src").mkdir(parents=True, exist_ok=True)
    (root / "src" / "step_nb.py").write_text("# Databricks notebook source\nNOTEBOOK = True\n" + STEP)
    (root / "src" / "step.py").write_text("NOTEBOOK = False\n" + STEP)
    (root / "databricks.yml").write_text(yaml.safe_dump({
        "bundle": {"name": "mini"},
        "variables": {"schema": {"default": "s1"}},
        "targets": {"local": {"default": True, "variables": {"schema": "s_local"}}},
        "resources": {"jobs": {"j": {
            "name": "mini", "parameters": parameters or [],
            "job_clusters": [{"job_cluster_key": "c", "new_cluster": {
                "spark_version": "17.3.x-cpu-ml-scala2.13", "node_type_id": "m5d.xlarge", "num_workers": 1,
                "spark_env_vars": {"LAKEVISION_SCHEMA": "${var.schema}"}}}],
            "tasks": tasks, **job}}},
    }))
    return root


def _deps(task: dict, depends: list | None) -> dict:
    if depends:
        task["depends_on"] = [d if isinstance(d, dict) else {"task_key": d} for d in depends]
    return task


def nb(key: str, *args: str, depends: list | None = None, **extra) -> dict:
    """A notebook task running the step with ``args``."""
    return _deps({"task_key": key, "job_cluster_key": "c",
                  "notebook_task": {"notebook_path": "src/step_nb.py", "base_parameters": {"args": "\n".join(args)}},
                  **extra}, depends)


def py(key: str, *args: str, depends: list | None = None, **extra) -> dict:
    """A spark_python_task running the step with ``args``."""
    return _deps({"task_key": key, "job_cluster_key": "c",
                  "spark_python_task": {"python_file": "src/step.py", "parameters": list(args)}, **extra}, depends)
