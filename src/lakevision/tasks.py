"""The kinds of task a model solves, and the one metric that says how well, in one table.

Training picks its best epoch by a kind's validation metric, the gate compares challenger and
champion on its test metric, and the monitor watches that metric on live traffic. Semantic
segmentation is trained as ``training.task: segmentation`` with a semantic architecture
(DeepLabV3); its metrics are pixel metrics, so it is a kind of its own here.
"""

from __future__ import annotations

from dataclasses import dataclass

TRAINING_TASKS = ("classification", "detection", "segmentation")


@dataclass(frozen=True)
class TaskKind:
    name: str
    headline: str  # the test metric (as the evaluation reports it) that decides between two models
    val_metric: str  # what training reports per epoch for the same quality

    @property
    def greater_is_better(self) -> bool:
        return greater_is_better(self.headline)


KINDS = {
    "classification": TaskKind("classification", "accuracy", "val_acc"),
    "detection": TaskKind("detection", "map_50", "val_map_50"),
    "segmentation": TaskKind("segmentation", "segm_map_50", "val_map_50"),
    "semantic": TaskKind("semantic", "miou", "val_miou"),
}

# Every metric the evaluation and training report where lower is better; all others grow with quality.
LOWER_IS_BETTER = frozenset({"loss", "log_loss", "ece"})


def is_semantic(architecture: str) -> bool:
    """A per-pixel class architecture (DeepLabV3) rather than per-instance masks."""
    return architecture.startswith("deeplab")


def task_kind(task: str, semantic: bool = False) -> TaskKind:
    """The kind of a ``training.task`` (and whether its architecture is a semantic one)."""
    if task not in TRAINING_TASKS:
        raise ValueError(f"task must be one of {TRAINING_TASKS}, got {task!r}")
    return KINDS["semantic" if semantic and task == "segmentation" else task]


def greater_is_better(metric: str) -> bool:
    """The direction of a reported metric, by its name with the split prefix removed
    (``test_log_loss`` and ``val_loss`` are losses; ``segm_map_50`` and ``ap_circle`` are not)."""
    base = metric
    for prefix in ("test_", "val_", "train_"):
        base = base.removeprefix(prefix)
    return base not in LOWER_IS_BETTER and not base.endswith("_loss")


def configured_kind(training, task: str | None = None) -> tuple[str, TaskKind]:
    """The task (default: ``training.task``) and its kind under ``training``'s architecture for it."""
    task = task or training.task
    return task, task_kind(task, is_semantic(getattr(training.model.architectures, task)))
