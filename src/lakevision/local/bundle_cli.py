"""``lakevision bundle validate | summary | run``: the asset bundle on this machine."""

from __future__ import annotations

import argparse
import json
from typing import Any

from lakevision.bundle.loader import Bundle, BundleError, load_bundle


def _load(args: argparse.Namespace, local_files: bool = False) -> Bundle:
    from lakevision.local.job_runner import parse_params

    return load_bundle(args.bundle, args.target, parse_params(args.var, "--var"), local_files=local_files)


def cmd_validate(args: argparse.Namespace) -> int:
    from lakevision.local.bundle_validate import validate_bundle

    bundle = _load(args)
    problems = validate_bundle(bundle)
    if args.json:
        print(json.dumps({"name": bundle.name, "target": bundle.target, "valid": not problems,
                          "problems": [vars(p) for p in problems],
                          "resources": {t: sorted(r) for t, r in bundle.resources.items()}}))
    if problems:
        raise BundleError(problems)
    if not args.json:
        print(f"Name: {bundle.name}\nTarget: {bundle.target}\nWorkspace path: {bundle.workspace['root_path']}")
        for rtype, items in sorted(bundle.resources.items()):
            print(f"  {rtype}: {', '.join(sorted(items))}")
        print("Validation OK!")
    return 0


def resolved_names(bundle: Bundle) -> dict[str, dict[str, Any]]:
    """What each resource will be called in the workspace, as ``databricks bundle summary`` shows:
    job names, experiment paths, Unity Catalog names, the volume's path, and the endpoint the
    deploy job serves on."""
    r = bundle.resources
    out: dict[str, dict[str, Any]] = {}
    for key, job in (r.get("jobs") or {}).items():
        schedule = job.get("schedule") or {}
        out.setdefault("jobs", {})[key] = {"name": job.get("name"), "schedule": schedule.get("pause_status")}
    for key, exp in (r.get("experiments") or {}).items():
        out.setdefault("experiments", {})[key] = {"name": exp.get("name")}
    for key, schema in (r.get("schemas") or {}).items():
        out.setdefault("schemas", {})[key] = {"name": f"{schema.get('catalog_name')}.{schema.get('name')}"}
    for key, vol in (r.get("volumes") or {}).items():
        out.setdefault("volumes", {})[key] = {"name": f"{vol.get('catalog_name')}.{vol.get('schema_name')}.{vol.get('name')}",
                                              "path": f"/Volumes/{vol.get('catalog_name')}/{vol.get('schema_name')}/{vol.get('name')}"}
    for key, model in (r.get("registered_models") or {}).items():
        out.setdefault("registered_models", {})[key] = {
            "name": f"{model.get('catalog_name')}.{model.get('schema_name')}.{model.get('name')}"}
    if "endpoint_name" in bundle.variables:
        out["serving_endpoints"] = {"deploy job": {"name": bundle.variables["endpoint_name"]}}
    return out


def cmd_summary(args: argparse.Namespace) -> int:
    bundle = _load(args)
    if bundle.problems:
        raise BundleError(bundle.problems)
    names = resolved_names(bundle)
    if args.json:
        print(json.dumps({"name": bundle.name, "target": bundle.target, "mode": bundle.mode,
                          "workspace": {"root_path": bundle.workspace["root_path"],
                                        "user": bundle.workspace["current_user"]["userName"]},
                          "resources": names}))
        return 0
    print(f"Name: {bundle.name}\nTarget: {bundle.target} (mode: {bundle.mode or 'default'})\n"
          f"Workspace:\n  User: {bundle.workspace['current_user']['userName']}\n  Path: {bundle.workspace['root_path']}")
    print("Resources:")
    for kind, items in names.items():
        print(f"  {kind}:")
        for key, fields in items.items():
            print(f"    {key}: " + ", ".join(f"{k} {v}" for k, v in fields.items() if v is not None))
    return 0


def print_task_progress(event: str, task, i: int, n: int) -> None:
    """One line when a task starts and one when it ends (status, seconds, what it passed on)."""
    if event == "start":
        print(f"[{i}/{n}] {task.task_key} ...", flush=True)
        return
    if event == "running":
        print(f"      {task.task_key} {task.seconds:.0f} s: {task.message}", flush=True)
        return
    if event == "queued":
        print(task.message, flush=True)
        return
    took = f" {task.seconds:.1f} s" if task.attempts else ""
    print(f"[{i}/{n}] {task.task_key}: {task.status}{took}" + (f"  {task.message}" if task.message else ""),
          flush=True)


def cmd_run(args: argparse.Namespace) -> int:
    from lakevision.local.job_runner import SUCCESS, LocalJobRunner, parse_params
    from lakevision.runtime import local_root

    bundle = _load(args, local_files=True)
    runner = LocalJobRunner(bundle, local_root(args.root), progress=None if args.json else print_task_progress)
    run = runner.run(args.job, parse_params(args.param, "--param"), run_id=args.run_id)
    if args.json:
        print(json.dumps(run.to_json(), default=str))
    elif run.message:
        print(f"run {run.run_id} of {run.job_key} ({run.target}): {run.status}: {run.message}")
    else:
        print(f"run {run.run_id} of {run.job_key} ({run.target}): {run.status} in {run.seconds:.1f} s; logs in {run.run_dir}")
        for rule, recipients in run.notifications.items():
            print(f"email ({rule}) to: {', '.join(recipients)}")
    return 0 if run.status == SUCCESS else 1


def add_bundle_commands(sub) -> None:
    p = sub.add_parser("bundle", help="validate the asset bundle, show its resolved names, or run one of its jobs here")
    bsub = p.add_subparsers(dest="bundle_command", required=True)
    commands = (("validate", "check databricks.yml, its includes and every job, for one target", cmd_validate),
                ("summary", "the names every resource gets in the workspace for one target", cmd_summary),
                ("run", "run a job's tasks here in dependency order, as a job run would", cmd_run))
    for name, helptext, func in commands:
        b = bsub.add_parser(name, help=helptext)
        b.add_argument("-t", "--target", default=None, help="bundle target (default: the one marked default)")
        b.add_argument("--bundle", default=".", help="folder with databricks.yml (default: .)")
        b.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="set a bundle variable")
        b.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
        b.set_defaults(func=func)
    b.add_argument("job", help="job key under resources.jobs, e.g. cv_pipeline")
    b.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="set a job parameter")
    b.add_argument("--root", default=None, help="local data root (default: $LAKEVISION_ROOT or .lakevision)")
    b.add_argument("--run-id", type=int, default=None,
                   help="the id the local workspace's Jobs API gave this run (run-now starts the runner with it)")
