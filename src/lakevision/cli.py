"""The ``lakevision`` command: one CLI whose subcommands are the bundle's jobs.

Each subcommand parses its arguments and calls the library; ``jobs/*.py`` call :func:`main` with
their own name, so a Databricks job and a laptop run go through the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence

from lakevision.bundle.task_context import set_task_values
from lakevision.config import load_config
from lakevision.errors import LakevisionError

# Sail logs every session at INFO, and a warning for each idle task it aborts at shutdown.
os.environ.setdefault("RUST_LOG", "warn,sail_common::actor=error")


class UserError(LakevisionError):
    """A bad command-line argument."""


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=None,
                   help="deployment target from bundle/config/targets.yaml (default: $LAKEVISION_TARGET or local)")
    p.add_argument("--root", default=None,
                   help="local data root (tables, MLflow, staging); default $LAKEVISION_ROOT or .lakevision")
    p.add_argument("--config", default=None, help="config directory (default: $LAKEVISION_CONFIG_DIR or ./bundle/config)")
    p.add_argument("--profile", default=None,
                   help="partial config laid over the files: a name in <config>/profiles or a YAML path "
                        "(default: $LAKEVISION_PROFILE)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. training.optimization.max_epochs=3")
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")


def _optional_int(text: str) -> int | None:
    """An int, or None for an empty string: a job parameter left at its empty default."""
    return int(text) if text.strip() else None


def _optional_str(text: str) -> str | None:
    return text or None


def _data_version(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-version", type=_optional_int, default=None, help="samples table version (default: latest)")


def _task_and_data_version(p: argparse.ArgumentParser, task_help: str) -> None:
    """Arguments of the jobs that read the gold table for a task (train, evaluate)."""
    p.add_argument("--task", choices=["classification", "detection", "segmentation"], default=None, help=task_help)
    _data_version(p)
    _common(p)


@contextlib.contextmanager
def _runtime(args: argparse.Namespace):
    from lakevision.runtime import get_runtime

    cfg = load_config(args.config, args.target, args.overrides, args.profile)
    rt = get_runtime(cfg, args.root)
    try:
        yield rt
    finally:
        rt.stop()


@contextlib.contextmanager
def _stdout_for_json(enabled: bool):
    """With --json, anything else printed on stdout (Ray, Lightning) goes to stderr."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _print_tables(result) -> None:
    print(f"ingest run {result.run_id} finished in {result.seconds:.1f} s")
    print(f"{'table':<12} {'version':>7} {'rows':>9}  location")
    for name, t in result.tables.items():
        print(f"{name:<12} {t['version']:>7} {t['rows']:>9}  {t['location']}")
    if result.quarantine_by_reason:
        print("quarantined records by reason:")
        for code, n in result.quarantine_by_reason.items():
            print(f"  {code:<20} {n}")
    else:
        print("no record was quarantined")
    print("objects per category (train/val/test): "
          + ", ".join(f"{name} {c['train']}/{c['val']}/{c['test']}" for name, c in result.category_counts.items()))
    for warning in result.insufficient:
        print(f"WARNING too little data: {warning}")


def cmd_ingest(args: argparse.Namespace) -> int:
    from lakevision.data.ingest import run_ingest

    with _runtime(args) as rt:
        result = run_ingest(rt, args.annotations, args.images, progress=not args.json)
    set_task_values(ingest_run_id=result.run_id, samples_version=result.tables["samples"]["version"],
                    table_versions={k: t["version"] for k, t in result.tables.items()},
                    quarantined=sum(result.quarantine_by_reason.values()), insufficient=result.insufficient)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        _print_tables(result)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from lakevision.training.train import run_training

    with _stdout_for_json(args.json), _runtime(args) as rt:
        result = run_training(rt, args.task, args.data_version, log_to_driver=not args.json)
    set_task_values(run_id=result["run_id"], model_uri=result["model_uri"], task=result["task"],
                    data_version=result["data_version"], best_metric=result["best_metric"]["name"],
                    best_value=result["best_metric"]["value"])
    if args.json:
        print(json.dumps(result))
    else:
        print(f"MLflow run {result['run_id']}  model {result['model_uri']}")
        print(f"data {result['data_table']} version {result['data_version']}")
        best = result["best_metric"]
        print(f"best {best['name']} = {best['value']}")
        for k, v in sorted(result["metrics"].items()):
            print(f"  {k:<28} {v:.4f}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from lakevision.evaluation.evaluate import run_evaluation

    with _stdout_for_json(args.json), _runtime(args) as rt:
        result = run_evaluation(rt, args.model_uri, args.task, args.data_version)
    set_task_values(run_id=result["run_id"], data_version=result["data_version"], metrics=result["metrics"])
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['task']} model {result['model_uri']} on {result['images']} test images "
              f"(data version {result['data_version']}); logged to MLflow run {result['run_id']}")
        for k, v in sorted(result["metrics"].items()):
            print(f"  {k:<28} {v:.4f}")
        print(f"per-image predictions: {result['predictions_table']['location']}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    import mlflow

    from lakevision.evaluation.explain import explain_image

    with _runtime(args) as rt:
        mlflow.set_tracking_uri(rt.tracking_uri)
        mlflow.set_registry_uri(rt.registry_uri)
        result = explain_image(args.model_uri, args.image, args.out, args.box)
    if args.json:
        print(json.dumps(result, default=str))
    elif "boxes" in result:
        shown = ", ".join(f"box {i} {result['categories'][i]} {result['scores'][i]:.2f}" for i in result["explained"])
        print(f"{result['task']}: {len(result['boxes'])} boxes; explained {shown or 'none'} -> {result['out_path']}")
    else:
        print(f"{result['task']}: {result['category']} ({result.get('score', result.get('pixel_share')):.3f}) "
              f"-> {result['out_path']}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from lakevision.data.synthetic import DEFECT_CODES, generate_dataset

    defects = {}
    for item in args.defect or []:
        code, _, n = item.partition("=")
        if code not in DEFECT_CODES:
            raise UserError(f"--defect {item}: unknown code {code!r}; known: {', '.join(DEFECT_CODES)}")
        defects[code] = int(n or 1)
    ds = generate_dataset(args.out, num_images=args.images, seed=args.seed, defects=defects)
    summary = {"annotation_file": str(ds.annotation_file), "image_dir": str(ds.image_dir),
               "images": ds.num_images, "annotations": ds.num_annotations, "defects": ds.defects}
    print(json.dumps(summary) if args.json else "\n".join(f"{k}: {v}" for k, v in summary.items()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lakevision.demo import run_demo

    return run_demo(args.root, args.images, args.bundle)


def cmd_gate(args: argparse.Namespace) -> int:
    from lakevision.registry.gate import GateFailedError, MetricGate

    with _stdout_for_json(args.json), _runtime(args) as rt:
        report = MetricGate(rt, args.model_name).run(args.model_uri, args.data_version)
    gate = report.to_json()
    set_task_values(passed=report.passed, message=report.message(),
                    model_version=(gate["registered"] or {}).get("version"))
    if args.json:
        print(json.dumps(gate))
    else:
        _print_gate(gate)
    if not report.passed and not args.continue_on_fail:
        raise GateFailedError(report.message())
    return 0


def _print_gate(gate: dict) -> None:
    print(f"gate {'passed' if gate['passed'] else 'FAILED'}: {gate['model_uri']} ({gate['task']}) "
          f"on test data version {gate['data_version']}")
    for c in gate["checks"]:
        op = ">=" if c["kind"] == "min" else "<="
        print(f"  {'ok  ' if c['passed'] else 'FAIL'} {c['metric']:<16} {c['value']} {op} {c['bound']}")
    if gate["comparison"]:
        c = gate["comparison"]
        print(f"  {'ok  ' if c['passed'] else 'FAIL'} vs champion v{gate['champion']['version']}: {c['metric']} "
              f"{c['challenger']} vs {c['champion']} (min improvement {c['min_improvement']})")
    if gate["registered"]:
        r = gate["registered"]
        print(f"registered {r['name']} version {r['version']}{'' if r['created'] else ' (already registered)'}"
              f", alias challenger")


def cmd_deploy(args: argparse.Namespace) -> int:
    from lakevision.registry.gate import GateFailedError
    from lakevision.serving.model_server import DeploymentError
    from lakevision.serving.pipeline import run_deployment

    with _stdout_for_json(args.json), _runtime(args) as rt:
        report = run_deployment(rt, args.model_name, args.endpoint, args.traffic, args.model_uri, args.task, args.host)
    set_task_values(status=report["status"], endpoint=report["endpoint"],
                    champion_version=(report.get("champion") or {}).get("version"))
    if args.json:
        print(json.dumps(report, default=str))
    else:
        if "best_run" in report:
            b = report["best_run"]
            print(f"best run {b['run_id']}: {b['metric']} = {b['value']}")
        _print_gate(report["gate"])
        dep = report.get("deployment") or {}
        if dep:
            print(f"deployment: {dep['status']} ({dep['action']}), traffic steps {dep.get('steps')}")
            smoke = dep.get("smoke") or {}
            for problem in smoke.get("problems", []):
                print(f"  problem: {problem}")
        if report.get("champion"):
            print(f"champion: version {report['champion']['version']} (previous: {report['champion']['previous']})")
        state = report.get("endpoint_state")
        if state:
            routes = ", ".join(f"{r['served_entity_name']} {r['traffic_percentage']}%" for r in state["routes"])
            print(f"endpoint {state['name']}: {state['state']['ready']}, {state['state']['config_update']}; {routes}")
    if report["status"] == "gate_failed":
        raise GateFailedError(report["gate"]["message"])
    if report["status"] != "deployed":
        raise DeploymentError(f"{report['model_name']} was not deployed to {report['endpoint']}: "
                              + "; ".join((report.get("deployment") or {}).get("smoke", {}).get("problems", [])))
    return 0


def cmd_monitor(args: argparse.Namespace) -> int:
    from lakevision.monitoring.monitor import run_monitoring

    with _stdout_for_json(args.json), _runtime(args) as rt:
        report = run_monitoring(rt, args.endpoint, args.host, retrain=not args.no_retrain,
                                retrain_job=args.retrain_job, bundle_dir=args.bundle)
    health = report["health"]
    set_task_values(healthy=health["healthy"], problems=health["problems"], retrain=report["retrain"],
                    reasons=report["reasons"], model_version=report["model_version"],
                    triggered=(report["triggered"] or {}).get("run_id") or (report["triggered"] or {}).get("pid"))
    if args.json:
        print(json.dumps(report, default=str))
    else:
        status = health["status"]
        if status:
            routes = ", ".join(f"{r['served_entity_name']} {r['traffic_percentage']}%" for r in status["routes"])
            print(f"endpoint {status['name']}: {status['state']['ready']}, {status['state']['config_update']}; {routes}")
        for s in report["stats"]:
            print(f"  {s['served_entity_id']}: {s['requests']} requests, p50 {s.get('latency_p50_ms')} ms, "
                  f"p99 {s.get('latency_p99_ms')} ms, error rate {s.get('error_rate')}")
        print("healthy" if health["healthy"] else "UNHEALTHY: " + "; ".join(health["problems"]))
        print(f"drift: {'retrain' if report['retrain'] else 'no retrain'}; " + "; ".join(report["reasons"]))
        if report["triggered"]:
            print(f"started {report['triggered']}")
    if not health["healthy"]:
        raise EndpointUnhealthyError(f"endpoint {report['endpoint']}: " + "; ".join(health["problems"]))
    return 0


class EndpointUnhealthyError(LakevisionError):
    """The monitor found the endpoint down or outside its bounds."""


def _load_bundle(args: argparse.Namespace, local_files: bool = False):
    from lakevision.bundle.loader import load_bundle
    from lakevision.bundle.runner import parse_params

    return load_bundle(args.bundle, args.target, parse_params(args.var, "--var"), local_files=local_files)


def cmd_bundle_validate(args: argparse.Namespace) -> int:
    from lakevision.bundle.loader import BundleError
    from lakevision.bundle.validate import validate_bundle

    bundle = _load_bundle(args)
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


def print_task_progress(event: str, task, i: int, n: int) -> None:
    """One line when a task starts and one when it ends (status, seconds, what it passed on)."""
    if event == "start":
        print(f"[{i}/{n}] {task.task_key} ...", flush=True)
        return
    if event == "running":
        print(f"      {task.task_key} {task.seconds:.0f} s: {task.message}", flush=True)
        return
    took = f" {task.seconds:.1f} s" if task.attempts else ""
    print(f"[{i}/{n}] {task.task_key}: {task.status}{took}" + (f"  {task.message}" if task.message else ""),
          flush=True)


def cmd_bundle_run(args: argparse.Namespace) -> int:
    from lakevision.bundle.runner import SUCCESS, LocalJobRunner, parse_params
    from lakevision.runtime import local_root

    bundle = _load_bundle(args, local_files=True)
    runner = LocalJobRunner(bundle, local_root(args.root), progress=None if args.json else print_task_progress)
    run = runner.run(args.job, parse_params(args.param, "--param"))
    if args.json:
        print(json.dumps(run.to_json(), default=str))
    else:
        print(f"run {run.run_id} of {run.job_key} ({run.target}): {run.status} in {run.seconds:.1f} s; logs in {run.run_dir}")
    return 0 if run.status == SUCCESS else 1


def cmd_workspace(args: argparse.Namespace) -> int:
    from lakevision.runtime import local_root
    from lakevision.serving.workspace import TOKEN_ENV, serve_forever

    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        raise UserError(f"a token is required: --token or ${TOKEN_ENV} (the environment keeps it out of ps)")
    serve_forever(local_root(args.root), token, args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lakevision", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="COCO annotations + images -> Delta tables")
    p.add_argument("--annotations", required=True, help="COCO instances JSON file")
    p.add_argument("--images", required=True, help="folder with the image files")
    _common(p)
    p.set_defaults(func=cmd_ingest)

    p = sub.add_parser("train", help="train a torchvision model with Ray Train, logged to MLflow")
    _task_and_data_version(p, "default: training.task from training_config.yaml")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="COCO-exact metrics of a logged model on the gold test split")
    p.add_argument("--model-uri", required=True, help="e.g. models:/m-..., runs:/RUN/model, models:/name@champion")
    _task_and_data_version(p, "checked against the model (default: taken from the model)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("explain", help="Grad-CAM (classification) or per-box saliency (detection) as a PNG")
    p.add_argument("--model-uri", required=True, help="a logged lakevision model, e.g. models:/name@champion")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--box", type=int, default=None, help="explain only this served box (detection)")
    _common(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("generate", help="write the synthetic shapes dataset (COCO format)")
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--defect", action="append", metavar="CODE[=N]", help="inject N bad records with this reason")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="generate the sample dataset and run the cv_pipeline job end to end here")
    p.add_argument("--root", default=None, help="local data root (default: $LAKEVISION_ROOT or .lakevision)")
    p.add_argument("--bundle", default=".", help="folder with databricks.yml")
    p.add_argument("--images", type=int, default=400)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("gate", help="metric gate: register the model and alias it challenger if it passes")
    p.add_argument("--model-uri", required=True, help="the challenger, e.g. models:/m-... from the train job")
    p.add_argument("--model-name", default=None, help="registered model (default: deployment.model_name)")
    _data_version(p)
    p.add_argument("--continue-on-fail", action="store_true",
                   help="exit 0 when the gate fails; a job's condition task reads the `passed` task value")
    _common(p)
    p.set_defaults(func=cmd_gate)

    p = sub.add_parser("deploy", help="best run -> gate -> register -> canary -> promote or roll back")
    p.add_argument("--model-name", default=None, help="registered model (default: deployment.model_name)")
    p.add_argument("--endpoint", default=None, help="serving endpoint (default: deployment.endpoint_name)")
    p.add_argument("--traffic", type=int, default=None, metavar="P",
                   help="canary share of the new version, 1-100 (default: deployment.canary.traffic_percentage)")
    p.add_argument("--model-uri", type=_optional_str, default=None,
                   help="deploy this model instead of the experiment's best run")
    p.add_argument("--task", choices=["classification", "detection", "segmentation"], default=None,
                   help="task of the best run to pick (default: training.task)")
    p.add_argument("--host", default=None, help="workspace URL (default: a local workspace for --target local, "
                                                "deployment.workspace.host or $DATABRICKS_HOST otherwise)")
    _common(p)
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("monitor", help="endpoint health, metrics from the inference table, drift, retraining")
    p.add_argument("--endpoint", default=None, help="serving endpoint (default: deployment.endpoint_name)")
    p.add_argument("--host", default=None, help="workspace URL (default: a local workspace for --target local)")
    p.add_argument("--retrain-job", default=None,
                   help="job to start when retraining is due: a job id on Databricks, a bundle job key here "
                        "(default: deployment.monitoring.retrain_job)")
    p.add_argument("--no-retrain", action="store_true", help="report a due retraining without starting it")
    p.add_argument("--bundle", default=".", help="folder with databricks.yml, for a local retraining run")
    _common(p)
    p.set_defaults(func=cmd_monitor)

    p = sub.add_parser("bundle", help="validate the asset bundle, or run one of its jobs on this machine")
    bsub = p.add_subparsers(dest="bundle_command", required=True)
    for name, helptext in (("validate", "check databricks.yml, its includes and every job, for one target"),
                           ("run", "run a job's tasks here in dependency order, as a job run would")):
        b = bsub.add_parser(name, help=helptext)
        b.add_argument("-t", "--target", default=None, help="bundle target (default: the one marked default)")
        b.add_argument("--bundle", default=".", help="folder with databricks.yml (default: .)")
        b.add_argument("--var", action="append", default=[], metavar="NAME=VALUE", help="set a bundle variable")
        b.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    b.add_argument("job", help="job key under resources.jobs, e.g. cv_pipeline")
    b.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="set a job parameter")
    b.add_argument("--root", default=None, help="local data root (default: $LAKEVISION_ROOT or .lakevision)")
    bsub.choices["validate"].set_defaults(func=cmd_bundle_validate)
    b.set_defaults(func=cmd_bundle_run)

    p = sub.add_parser("workspace", help="serve the local stand-in for the workspace's Model Serving API")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default 0: any free port)")
    p.add_argument("--token", default=None, help="the bearer token clients must send (default: $LAKEVISION_WORKSPACE_TOKEN)")
    p.add_argument("--root", default=None, help="local data root: MLflow registry and endpoint records; default .lakevision")
    p.set_defaults(func=cmd_workspace)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (LakevisionError, FileNotFoundError) as exc:
        print(f"lakevision {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
