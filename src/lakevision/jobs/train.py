"""The train step: a torchvision model trained with Ray Train on the gold table, logged to MLflow."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from lakevision.jobs.base import WrappedResult, Step, common_arguments, data_version_argument, job_runtime, task_argument

if TYPE_CHECKING:
    from lakevision.training.train import TrainingResult


class TrainStepResult(WrappedResult):
    result: TrainingResult

    def task_values(self) -> dict[str, Any]:
        r = self.result
        return {"run_id": r.run_id, "model_uri": r.model_uri, "task": r.task, "data_version": r.data_version,
                "best_metric": r.best_metric["name"], "best_value": r.best_metric["value"], "seconds": r.seconds}

    def summary(self) -> list[str]:
        r = self.result
        return [f"MLflow run {r.run_id}", f"model {r.model_uri}", f"data {r.data_table} version {r.data_version}",
                f"best {r.best_metric['name']} = {r.best_metric['value']}",
                *(f"  {k:<28} {v:.4f}" for k, v in sorted(r.metrics.items()))]



def add_arguments(p: argparse.ArgumentParser) -> None:
    task_argument(p, "default: training.task from training_config.yaml")
    data_version_argument(p)
    common_arguments(p)


def run(args: argparse.Namespace) -> TrainStepResult:
    from lakevision.training.train import run_training

    with job_runtime(args) as rt:
        return TrainStepResult(run_training(rt, args.task, args.data_version, log_to_driver=not args.json))


STEP = Step("train", "train a torchvision model with Ray Train, logged to MLflow", add_arguments, run)
