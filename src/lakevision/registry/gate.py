"""The metric gate: may this model be registered and deployed?

The challenger and the current champion are scored on the same test split at the same Delta
version (an evaluation already logged for that model and version is reused, not recomputed).
The gate passes only if every threshold holds and the challenger beats the champion's compared
metric by ``min_improvement_over_champion``; with no champion yet the thresholds decide alone.
Passing registers the version (once, however often the job is retried) and points
``challenger`` at it; failing registers and aliases nothing.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from lakevision import delta
from lakevision.errors import LakevisionError
from lakevision.registry.model_registry import CHALLENGER, CHAMPION, ModelRegistry, tag_key
from lakevision.runtime import Runtime
from lakevision.tasks import KINDS, greater_is_better
from lakevision.tracking import (EVAL_DATA_VERSION_TAG, EVAL_KIND_TAG, EVAL_MODEL_URI_TAG, GATE_DECISION_TAG,
                                 GATE_FIGURE_ARTIFACT, GATE_REPORT_ARTIFACT, TEST_PREFIX, mlflow_client)

log = logging.getLogger(__name__)



class GateFailedError(LakevisionError):
    """The challenger did not pass; the message lists every failing metric."""


@dataclass
class Check:
    metric: str
    value: float | None
    bound: float
    kind: str  # "min" or "max"
    passed: bool

    def describe(self) -> str:
        op = ">=" if self.kind == "min" else "<="
        got = "not computed" if self.value is None else f"{self.value:.4f}"
        return f"{self.metric} = {got} (needs {op} {self.bound:g})"


def check_thresholds(metrics: dict[str, float], thresholds: dict[str, float]) -> list[Check]:
    """A bound is a minimum, or a maximum for metrics where lower is better."""
    checks = []
    for metric, bound in thresholds.items():
        value = metrics.get(metric)
        if value is not None and not math.isfinite(value):
            value = None
        kind = "min" if greater_is_better(metric) else "max"
        ok = value is not None and (value <= bound if kind == "max" else value >= bound)
        checks.append(Check(metric, value, float(bound), kind, ok))
    return checks


@dataclass
class Comparison:
    metric: str
    challenger: float | None
    champion: float | None
    min_improvement: float
    passed: bool

    def describe(self) -> str:
        better = "higher" if greater_is_better(self.metric) else "lower"
        return (f"{self.metric}: challenger {self.challenger} vs champion {self.champion}; needs to be "
                f"{better} by at least {self.min_improvement:g}")


def compare_with_champion(challenger: dict[str, float], champion: dict[str, float], metric: str,
                          min_improvement: float) -> Comparison:
    a, b = challenger.get(metric), champion.get(metric)
    ok = a is not None and b is not None and math.isfinite(a) and math.isfinite(b)
    if ok:
        gain = (a - b) if greater_is_better(metric) else (b - a)
        ok = gain >= min_improvement - 1e-12
    return Comparison(metric, a, b, min_improvement, ok)


@dataclass
class GateReport:
    model_uri: str
    task: str
    data_version: int
    metrics: dict[str, float]
    checks: list[Check]
    champion: dict[str, Any] | None = None  # {"version", "model_uri", "metrics"}
    comparison: Comparison | None = None
    registered: dict[str, Any] | None = None  # {"name", "version", "created"}
    artifacts: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks) and (self.comparison is None or self.comparison.passed)

    def failures(self) -> list[str]:
        out = [c.describe() for c in self.checks if not c.passed]
        if self.comparison is not None and not self.comparison.passed:
            out.append(self.comparison.describe())
        return out

    def message(self) -> str:
        if self.passed:
            return f"gate passed for {self.model_uri} at data version {self.data_version}"
        return (f"gate failed for {self.model_uri} at data version {self.data_version}: "
                + "; ".join(self.failures()))

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["passed"] = self.passed
        out["failures"] = self.failures()
        out["message"] = self.message()
        return out


def _finite(metrics: dict[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(v)}


class MetricGate:
    def __init__(self, rt: Runtime, model_name: str | None = None, thresholds: dict[str, float] | None = None,
                 min_improvement: float | None = None, compare_metric: str | None = None):
        d = rt.config.deployment
        self.rt = rt
        self.registry = ModelRegistry(rt, model_name or d.model_name)
        self.thresholds = dict(d.metrics_threshold if thresholds is None else thresholds)
        self.min_improvement = d.min_improvement_over_champion if min_improvement is None else min_improvement
        self.compare_metric = compare_metric or d.compare_metric

    # ------------------------------------------------------------------ scoring
    def scores(self, model_uri: str, data_version: int) -> tuple[str, dict[str, float]]:
        """(task kind, test metrics) of ``model_uri`` at ``data_version``: from the model's run
        when the evaluate job already scored it there, else by running the evaluation now."""
        import mlflow

        from lakevision.evaluation.evaluate import run_evaluation

        info = mlflow.models.get_model_info(model_uri)
        if info.run_id:
            run = mlflow_client(self.rt.tracking_uri).get_run(info.run_id)
            tags = run.data.tags
            if (tags.get(EVAL_MODEL_URI_TAG) == model_uri and tags.get(EVAL_DATA_VERSION_TAG) == str(data_version)
                    and tags.get(EVAL_KIND_TAG) in KINDS):
                log.info("reusing the evaluation of %s at data version %s", model_uri, data_version)
                metrics = {k.removeprefix(TEST_PREFIX): v for k, v in run.data.metrics.items()
                           if k.startswith(TEST_PREFIX)}
                return tags[EVAL_KIND_TAG], metrics
        result = run_evaluation(self.rt, model_uri, data_version=data_version)
        return result.kind, _finite(result.metrics)

    def evaluate(self, model_uri: str, data_version: int | None = None) -> GateReport:
        """The decision, without registering anything."""
        if data_version is None:
            data_version = delta.table_version(self.rt.spark, self.rt.table("samples"))
        task, metrics = self.scores(model_uri, data_version)
        report = GateReport(model_uri, task, data_version, metrics, check_thresholds(metrics, self.thresholds))
        champion = self.registry.by_alias(CHAMPION)
        if champion is not None and champion.model_uri != model_uri:
            champ_task, champ_metrics = self.scores(champion.model_uri, data_version)
            if champ_task != task:
                raise LakevisionError(f"{self.registry.name}@{CHAMPION} (version {champion.version}) is a {champ_task} "
                                      f"model; {model_uri} is a {task} model")
            report.champion = {"version": champion.version, "model_uri": champion.model_uri, "metrics": champ_metrics}
            report.comparison = compare_with_champion(metrics, champ_metrics, self.compare_metric or KINDS[task].headline,
                                                      self.min_improvement)
        return report

    # ------------------------------------------------------------------ the gate job
    def run(self, model_uri: str, data_version: int | None = None) -> GateReport:
        """Decide; on a pass register the version and point ``challenger`` at it. The report
        (and the challenger-vs-champion figure) go into the model's run either way."""
        report = self.evaluate(model_uri, data_version)
        if report.passed:
            mv, created = self.registry.register(model_uri, tags=self._version_tags(report))
            self.registry.set_alias(CHALLENGER, mv.version)
            report.registered = {"name": mv.name, "version": mv.version, "created": created}
        self._log(report)
        return report

    @staticmethod
    def _version_tags(report: GateReport) -> dict[str, str]:
        # Unity Catalog tag keys: no dots (see model_registry.tag_key)
        tags = {"gate_decision": "passed", "gate_data_version": str(report.data_version),
                "gate_champion_version": report.champion["version"] if report.champion else "none"}
        tags.update({tag_key("gate_metric", k): f"{v:.6g}" for k, v in report.metrics.items()})
        if report.comparison is not None:
            tags["gate_compared_metric"] = report.comparison.metric
        return tags

    def _log(self, report: GateReport) -> None:
        import mlflow

        from lakevision.evaluation.evaluate import comparison_figure

        run_id = mlflow.models.get_model_info(report.model_uri).run_id
        if not run_id:
            return
        client = mlflow_client(self.rt.tracking_uri)
        if report.champion is not None:
            fig = comparison_figure(self.rt, {"challenger": report.model_uri,
                                              f"champion v{report.champion['version']}": report.champion["model_uri"]},
                                    report.data_version)
            client.log_figure(run_id, fig, GATE_FIGURE_ARTIFACT)
            report.artifacts.append(GATE_FIGURE_ARTIFACT)
        report.artifacts.append(GATE_REPORT_ARTIFACT)
        client.log_text(run_id, json.dumps(report.to_json(), indent=1), GATE_REPORT_ARTIFACT)
        client.set_tag(run_id, GATE_DECISION_TAG, "passed" if report.passed else "failed")

