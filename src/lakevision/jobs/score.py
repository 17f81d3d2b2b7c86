"""The score step: a model version over a Delta table of images on the Spark workers, merged into
the scores table (only images without a row for that version are scored)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from lakevision.jobs.base import WrappedResult, Step, common_arguments, optional_int, optional_str

if TYPE_CHECKING:
    from lakevision.scoring.score import ScoreResult


class ScoreStepResult(WrappedResult):
    result: ScoreResult

    def task_values(self) -> dict[str, Any]:
        r = self.result
        return {"model_uri": r.model_uri, "model_version": r.model_version, "scored": r.scored, "errors": r.errors,
                "skipped": r.skipped, "output_table": r.output["location"], "output_version": r.output["version"]}

    def summary(self) -> list[str]:
        r = self.result
        lines = [f"{r.model_uri} over {r.source['table']} version {r.source['version']} ({r.source['rows']} images): "
                 f"{r.scored} scored ({r.errors} with an error), {r.skipped} already scored",
                 f"  {r.rounds} round(s) x {r.partitions} partition(s), {r.images_per_second:.2f} images/s, "
                 f"{r.model_loads} model load(s) in {r.worker_processes} worker process(es), {r.seconds:.1f} s",
                 f"  scores: {r.output['location']} version {r.output['version']} ({r.output['rows']} rows)"]
        lines += [f"  error: image {e['image_id']} ({e['path']}): {e['error']}" for e in r.error_examples]
        return lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=optional_str, default=None,
                   help="@alias of --model-name, models:/name@alias, models:/name/N or another model URI "
                        "(default: @champion)")
    p.add_argument("--model-name", type=optional_str, default=None,
                   help="registered model of an @alias (default: deployment.model_name)")
    p.add_argument("--input-table", type=optional_str, default=None,
                   help="Delta table of images: a name in the target's schema, catalog.schema.table or a path "
                        "(default: the images silver table)")
    p.add_argument("--input-version", type=optional_int, default=None, help="its version (default: latest)")
    p.add_argument("--id-column", default="id", help="the input's integer image id column (default: id)")
    p.add_argument("--path-column", default="path", help="the input's image path column (default: path)")
    p.add_argument("--output-table", type=optional_str, default=None,
                   help="the scores table (default: deployment.scoring.output_table)")
    p.add_argument("--partitions", type=optional_int, default=None,
                   help="Spark partitions per round (default: deployment.scoring.partitions, 0 = the cluster's cores)")
    p.add_argument("--retry-errors", action="store_true", help="score again the images whose row is an error")
    common_arguments(p)


def run(args: argparse.Namespace) -> ScoreStepResult:
    from lakevision.jobs.base import job_runtime
    from lakevision.scoring.score import run_scoring

    with job_runtime(args) as rt:
        return ScoreStepResult(run_scoring(rt, args.model, args.model_name, args.input_table, args.input_version,
                                           args.id_column, args.path_column, args.output_table, args.partitions,
                                           args.retry_errors))


STEP = Step("score", "a model version over a Delta table of images on the Spark workers, into the scores table",
            add_arguments, run)
