"""The evaluate step: COCO-exact metrics and plots of a logged model on the gold test split."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from lakevision.errors import LakevisionError
from lakevision.jobs.base import (WrappedResult, Step, common_arguments, data_version_argument, job_runtime, optional_str,
                                  task_argument)

if TYPE_CHECKING:
    from lakevision.evaluation.evaluate import EvaluationResult


class EvaluateStepResult(WrappedResult):
    result: EvaluationResult

    def task_values(self) -> dict[str, Any]:
        r = self.result
        return {"run_id": r.run_id, "data_version": r.data_version, "metrics": r.metrics}

    def summary(self) -> list[str]:
        r = self.result
        return [f"{r.task} model {r.model_uri} on {r.images} test images (data version {r.data_version}); "
                f"logged to MLflow run {r.run_id}",
                *(f"  {k:<28} {v:.4f}" for k, v in sorted(r.metrics.items())),
                f"per-image predictions: {r.predictions_table['location']} version {r.predictions_table['version']}"]



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model-uri", type=optional_str, default=None,
                   help="e.g. models:/m-..., runs:/RUN/model (default: the champion of --model-name)")
    p.add_argument("--model-name", type=optional_str, default=None,
                   help="registered model whose champion is evaluated when --model-uri is empty "
                        "(default: deployment.model_name)")
    task_argument(p, "checked against the model (default: taken from the model)")
    data_version_argument(p)
    common_arguments(p)


def run(args: argparse.Namespace) -> EvaluateStepResult:
    from lakevision.evaluation.evaluate import run_evaluation
    from lakevision.registry.model_registry import CHAMPION, ModelRegistry

    with job_runtime(args) as rt:
        model_uri = args.model_uri
        if model_uri is None:
            registry = ModelRegistry(rt, args.model_name or rt.config.deployment.model_name)
            champion = registry.by_alias(CHAMPION)
            if champion is None:
                raise LakevisionError(f"no --model-uri, and {registry.name} has no {CHAMPION} version to evaluate")
            model_uri = champion.registry_uri
        return EvaluateStepResult(run_evaluation(rt, model_uri, args.task, args.data_version))


STEP = Step("evaluate", "COCO-exact metrics of a logged model on the gold test split", add_arguments, run)
