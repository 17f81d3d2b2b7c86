"""The ``lakevision`` command: the bundle's job steps, plus the tools around them.

Each job step (:mod:`lakevision.jobs`) is a subcommand run by one generic runner: parse, run,
print its result (``--json``: one object on stdout), and exit 2 when the step failed. The
bundle's notebooks in ``jobs/`` run the same steps as Databricks notebook tasks.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from lakevision.errors import LakevisionError
from lakevision.jobs import STEPS
from lakevision.jobs.base import positive_int, stop_on_sigterm

# Sail logs every session at INFO, and a warning for each idle task it aborts at shutdown.
os.environ.setdefault("RUST_LOG", "warn,sail_common::actor=error")


class UserError(LakevisionError):
    """A bad command-line argument."""


@contextlib.contextmanager
def _stdout_for_json(enabled: bool):
    """With --json, anything else printed on stdout (Ray, Lightning) goes to stderr."""
    if not enabled:
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def run_step(args: argparse.Namespace) -> int:
    """A job step from the command line: its result printed, its failure raised."""
    with _stdout_for_json(args.json), stop_on_sigterm():
        result = args.step.run(args)
    if args.json:
        print(json.dumps(result.to_json(), default=str))
    else:
        print("\n".join(result.summary()))
    result.raise_for_status()
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    import mlflow

    from lakevision.evaluation.explain import explain_image
    from lakevision.jobs.base import job_runtime

    with job_runtime(args) as rt:
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


def defect_count(text: str) -> tuple[str, int]:
    """``CODE`` or ``CODE=N`` with N >= 1."""
    code, sep, n = text.partition("=")
    return code, positive_int(n) if sep else 1


def cmd_generate(args: argparse.Namespace) -> int:
    from lakevision.data.synthetic import DEFECT_CODES, generate_dataset

    unknown = [code for code, _ in args.defect or [] if code not in DEFECT_CODES]
    if unknown:
        raise UserError(f"--defect {unknown[0]}: unknown code; known: {', '.join(DEFECT_CODES)}")
    ds = generate_dataset(args.out, num_images=args.images, seed=args.seed, defects=dict(args.defect or []))
    summary = {"annotation_file": str(ds.annotation_file), "image_dir": str(ds.image_dir),
               "images": ds.num_images, "annotations": ds.num_annotations, "defects": ds.defects}
    print(json.dumps(summary) if args.json else "\n".join(f"{k}: {v}" for k, v in summary.items()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from lakevision.demo import run_demo

    return run_demo(args.root, args.images, args.bundle)


def cmd_query(args: argparse.Namespace) -> int:
    from lakevision.demo import query_endpoint
    from lakevision.packaging.wire import FEATURES_COLUMN
    from lakevision.runtime import local_root

    answers = query_endpoint(local_root(args.root).resolve(), args.endpoint, [Path(p) for p in args.images], args.host)
    for answer in answers:
        if not args.features:
            answer["prediction"].pop(FEATURES_COLUMN, None)
        print(json.dumps(answer) if args.json else
              f"{answer['image']}: {answer['served_by']} in {answer['latency_ms']} ms: {json.dumps(answer['prediction'])}")
    return 0


def cmd_workspace(args: argparse.Namespace) -> int:
    from lakevision.runtime import local_root
    from lakevision.local.workspace.process import TOKEN_ENV, serve_forever

    token = args.token or os.environ.get(TOKEN_ENV)
    if not token:
        raise UserError(f"a token is required: --token or ${TOKEN_ENV} (the environment keeps it out of ps)")
    serve_forever(local_root(args.root), token, args.port, bundle_dir=args.bundle, target=args.target)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from lakevision.local.bundle_cli import add_bundle_commands
    from lakevision.jobs.base import common_arguments

    parser = argparse.ArgumentParser(prog="lakevision", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO")
    sub = parser.add_subparsers(dest="command", required=True)
    for step in STEPS.values():
        p = sub.add_parser(step.name, help=step.help)
        step.add_arguments(p)
        p.set_defaults(func=run_step, step=step)

    p = sub.add_parser("explain", help="Grad-CAM (classification) or per-box saliency (detection) as a PNG")
    p.add_argument("--model-uri", required=True, help="a logged lakevision model, e.g. models:/name@champion")
    p.add_argument("--image", required=True, help="image file")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--box", type=int, default=None, help="explain only this served box (detection)")
    common_arguments(p)
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("generate", help="write the synthetic shapes dataset (COCO format)")
    p.add_argument("--out", required=True)
    p.add_argument("--images", type=positive_int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--defect", action="append", type=defect_count, metavar="CODE[=N]", help="inject N bad records with this reason")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="generate the sample dataset and run the cv_pipeline job end to end here")
    p.add_argument("--root", default=None, help="local data root (default: $LAKEVISION_ROOT or .lakevision)")
    p.add_argument("--bundle", default=".", help="folder with databricks.yml")
    p.add_argument("--images", type=positive_int, default=400)
    p.set_defaults(func=cmd_demo)

    add_bundle_commands(sub)

    p = sub.add_parser("query", help="send image files to a serving endpoint, one request each")
    p.add_argument("images", nargs="+", help="image files (JPEG, PNG, WEBP or BMP)")
    p.add_argument("--endpoint", required=True, help="serving endpoint name")
    p.add_argument("--host", default=None, help="workspace URL, token from $DATABRICKS_TOKEN (default: the local "
                                                  "workspace over --root)")
    p.add_argument("--root", default=None, help="local data root (default: $LAKEVISION_ROOT or .lakevision)")
    p.add_argument("--features", action="store_true", help="keep each answer's feature record")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_query)

    p = sub.add_parser("workspace", help="serve the local stand-in for the workspace's Model Serving and Jobs APIs")
    p.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default 0: any free port)")
    p.add_argument("--token", default=None, help="the bearer token clients must send (default: $LAKEVISION_WORKSPACE_TOKEN)")
    p.add_argument("--root", default=None, help="local data root: MLflow registry and endpoint records; default .lakevision")
    p.add_argument("--bundle", default=None, help="folder with databricks.yml whose jobs the Jobs API serves (default: none)")
    p.add_argument("-t", "--target", default="local", help="the bundle target the jobs run with (default: local)")
    p.set_defaults(func=cmd_workspace)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The exit code of one command: 0, or 2 for an error the user can fix (printed in one line)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except (LakevisionError, FileNotFoundError) as exc:
        print(f"lakevision {args.command}: error: {exc}", file=sys.stderr)
        return 2


def entry_point() -> None:
    """The ``lakevision`` console script. A ``python_wheel_task`` ignores what its entry point
    returns, so a failure must leave through ``SystemExit`` to fail the task."""
    code = main()
    if code:
        raise SystemExit(code)


if __name__ == "__main__":
    entry_point()
