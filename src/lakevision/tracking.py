"""ExperimentTracker: one MLflow run per training run, on Databricks or on a local sqlite store.

Only the driver writes to MLflow (Ray workers hand their epoch metrics over through
:mod:`lakevision.training.metrics_relay`), and a run is addressed by id, so a worker group
restarted after a failure keeps logging into the same run.
"""

from __future__ import annotations

import logging
import os
import platform
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lakevision.errors import LakevisionError
from lakevision.runtime import DEFAULT_ROOT, ROOT_ENV, LocalLayout, on_databricks
from lakevision.tasks import TaskKind

log = logging.getLogger(__name__)

_PARAM_MAX = 6000  # MLflow's limit on one parameter value

# Names more than one module reads or writes: the tags and artifacts of lakevision's MLflow runs.
MODEL_URI_TAG = "lakevision.model_uri"  # train: the logged serving model
TASK_TAG = "lakevision.task"  # train: classification | detection | segmentation
DATA_TABLE_TAG, DATA_VERSION_TAG = "data.table", "data.version"  # the Delta table version a run read
CONVERGENCE_TAG, OVERFITTING_TAG = "training.convergence_epoch", "training.overfitting"
EVAL_MODEL_URI_TAG = "evaluation.model_uri"  # evaluate: which model, at which version, as which kind
EVAL_DATA_VERSION_TAG = "evaluation.data_version"
EVAL_TASK_TAG = "evaluation.task"
EVAL_KIND_TAG = "evaluation.kind"
GATE_DECISION_TAG = "gate.decision"
TEST_PREFIX = "test_"  # evaluate's metrics, as logged
BEST_PREFIX = "best_"  # train's best validation value of a metric
FIT_SECONDS_METRIC = "fit_seconds"  # train: the wall time of Lightning's fit() on rank 0 (epochs and checkpoints)
REFERENCE_PROFILE_ARTIFACT = "monitoring/reference_profile.json"
TRAINING_RESULT_ARTIFACT = "training_result.json"
EVALUATION_REPORT_ARTIFACT = "evaluation/report.md"
GATE_REPORT_ARTIFACT = "gate/report.json"
GATE_FIGURE_ARTIFACT = "gate/challenger_vs_champion.png"


class NoRunError(LakevisionError, LookupError):
    """No finished training run to pick."""


def local_tracking_uri(root: str | os.PathLike | None = None) -> str:
    root = Path(root or os.environ.get(ROOT_ENV, DEFAULT_ROOT))
    root.mkdir(parents=True, exist_ok=True)
    return LocalLayout(root).tracking_uri


def mlflow_client(tracking_uri: str, registry_uri: str | None = None):
    """The one way lakevision builds an MLflow client: explicit URIs, never the process-wide ones."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri or tracking_uri)


_BEST_RUN_CANDIDATES = 100


def best_training_run(client, experiment_name: str, task: str, kind: TaskKind) -> dict[str, Any]:
    """The finished training run of ``task`` with the best ``best_<val metric>`` of its kind:
    its run id, model URI, metric name and value. A run that failed or logged no model is skipped."""
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        raise NoRunError(f"experiment {experiment_name!r} does not exist; run `lakevision train` first")
    metric = BEST_PREFIX + kind.val_metric
    order = "DESC" if kind.greater_is_better else "ASC"
    runs = client.search_runs([exp.experiment_id],
                              filter_string=f"attributes.status = 'FINISHED' and tags.`{TASK_TAG}` = '{task}'",
                              order_by=[f"metrics.{metric} {order}"], max_results=_BEST_RUN_CANDIDATES)
    # a run that crashed after its status was set, or was logged by hand, may have no model
    run = next((r for r in runs if MODEL_URI_TAG in r.data.tags), None)
    if run is None:
        raise NoRunError(f"experiment {experiment_name!r} has no finished {task} training run with a model")
    return {"run_id": run.info.run_id, "model_uri": run.data.tags[MODEL_URI_TAG], "metric": metric,
            "value": run.data.metrics.get(metric)}


def resolve_tracking_uri(uri: str | None, root: str | os.PathLike | None = None) -> str:
    """``databricks`` off Databricks (and with no workspace configured) means the local store."""
    if uri in (None, "", "databricks"):
        has_workspace = on_databricks() or os.environ.get("DATABRICKS_HOST")
        return "databricks" if has_workspace else local_tracking_uri(root)
    if uri.startswith("file:") or "://" not in uri:
        raise ValueError(
            f"tracking_uri {uri!r}: MLflow's plain file store is in maintenance mode; "
            "use sqlite:///path/mlflow.db (or databricks)"
        )
    return uri


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; values cut to MLflow's parameter limit."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)[:_PARAM_MAX]
    return out


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def environment_tags() -> dict[str, str]:
    import torch

    tags = {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "cuda_available": str(torch.cuda.is_available())}
    for mod in ("pytorch_lightning", "ray", "torchvision", "mlflow"):
        try:
            tags[mod] = __import__(mod).__version__
        except ImportError:
            pass
    if torch.cuda.is_available():
        tags["gpu"] = torch.cuda.get_device_name(0)
    commit = _git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def pinned_requirements(*packages: str, version: Callable[[str], str] | None = None) -> list[str]:
    """``name==version`` for each installed package, without local version labels: a GPU runtime's
    ``torch 2.7.0+cu126`` is pinned as ``torch==2.7.0``, because no package index serves the
    labelled build and the serving image would fail to build (MLflow's own pinning does the same).
    ``version`` looks a version up (default: the installed distribution's)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from packaging.version import Version

    lookup = version or installed
    pins = []
    for name in packages:
        try:
            pins.append(f"{name}=={Version(lookup(name)).public}")
        except PackageNotFoundError:
            pins.append(name)
    return pins


class ExperimentTracker:
    """MLflow experiment and run handling for lakevision jobs; also a context manager."""

    def __init__(
        self,
        experiment_name: str,
        tracking_uri: str = "databricks",
        run_name: str | None = None,
        registry_uri: str | None = None,
        artifact_location: str | None = None,
        run_id: str | None = None,
    ):
        import mlflow

        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.registry_uri = registry_uri or ("databricks-uc" if self.tracking_uri == "databricks" else self.tracking_uri)
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.run_id = run_id
        self._mlflow = mlflow
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.registry_uri)
        exp = mlflow.get_experiment_by_name(experiment_name)
        if exp is None:
            if artifact_location is None and self.tracking_uri.startswith("sqlite:///"):
                db = Path(self.tracking_uri.removeprefix("sqlite:///"))
                artifact_location = LocalLayout(db.parent).artifacts.as_uri()
            self.experiment_id = mlflow.create_experiment(experiment_name, artifact_location=artifact_location)
        else:
            self.experiment_id = exp.experiment_id

    # ------------------------------------------------------------------ run lifecycle
    def start_run(self) -> None:
        """Start (or, with ``run_id``, resume) the run and make it the active one."""
        run = self._mlflow.start_run(run_id=self.run_id, experiment_id=None if self.run_id else self.experiment_id,
                                     run_name=None if self.run_id else self.run_name)
        self.run_id = run.info.run_id
        self._mlflow.set_tags(environment_tags())

    def end_run(self, status: str = "FINISHED") -> None:
        if self._mlflow.active_run() is not None:
            self._mlflow.end_run(status=status)

    def __enter__(self) -> ExperimentTracker:
        self.start_run()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.end_run("FAILED" if exc_type else "FINISHED")

    # ------------------------------------------------------------------ logging
    def log_parameters(self, params: dict[str, Any]) -> None:
        items = flatten(params)
        keys = list(items)
        for i in range(0, len(keys), 100):  # MLflow takes at most 100 params per batch
            self._mlflow.log_params({k: items[k] for k in keys[i : i + 100]})

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self._mlflow.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)

    def log_model(self, model, model_name: str, input_example=None, **kwargs):
        """Log a torch model with a signature inferred from ``input_example``; returns the ModelInfo."""
        import numpy as np
        import torch
        from mlflow.models import infer_signature

        signature = None
        if input_example is not None:
            example = input_example.detach().cpu() if isinstance(input_example, torch.Tensor) else input_example
            model.eval()
            with torch.no_grad():
                output = model(example)
            out = output.detach().cpu().numpy() if isinstance(output, torch.Tensor) else None
            signature = infer_signature(np.asarray(example), out)
            # MLflow validates an example by predicting with it, which needs a single-tensor output
            input_example = np.asarray(example) if out is not None else None
        # pickle, as on Databricks: torch.export (MLflow's local default) cannot trace detection models
        kwargs.setdefault("serialization_format", "pickle")
        # pinned from this environment; MLflow's own inference reloads the model in a subprocess (~20 s)
        kwargs.setdefault("pip_requirements", pinned_requirements("torch", "torchvision", "numpy", "pillow"))
        return self._mlflow.pytorch.log_model(model, name=model_name, signature=signature,
                                              input_example=input_example, **kwargs)

    def log_dataset(self, table: str, version: int, split: str, rows: list[dict] | None = None) -> None:
        """Record which Delta table version a run read (lineage in the MLflow UI)."""
        import pandas as pd
        from mlflow.data.delta_dataset_source import DeltaDatasetSource

        is_path = "/" in table
        source = DeltaDatasetSource(path=table if is_path else None, delta_table_name=None if is_path else table,
                                    delta_table_version=version)
        frame = pd.DataFrame(rows or [])
        dataset = self._mlflow.data.from_pandas(frame, source=source, name=f"{Path(table).name}@v{version}:{split}")
        self._mlflow.log_input(dataset, context=split)
        self._mlflow.set_tags({DATA_TABLE_TAG: table, DATA_VERSION_TAG: str(version)})

    def set_tags(self, tags: dict[str, str]) -> None:
        self._mlflow.set_tags(tags)

    def log_report(self, text: str, figure, name: str) -> None:
        """A markdown report and its figure: ``<name>/report.md`` and ``<name>/curves.png``."""
        self._mlflow.log_text(text, f"{name}/report.md")
        self._mlflow.log_figure(figure, f"{name}/curves.png")

    def log_dict(self, data: dict, artifact_file: str) -> None:
        self._mlflow.log_dict(data, artifact_file)
