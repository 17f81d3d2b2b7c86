"""The metric gate and the registry on real MLflow models, real Delta tables and real evaluations."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from lakevision import delta
from lakevision.registry.gate import MetricGate, check_thresholds, compare_with_champion
from lakevision.registry.model_registry import CHALLENGER, CHAMPION, PREVIOUS_CHAMPION, ModelRegistry

from .models import log_trained_model

NAME = "gate_test_model"


def test_thresholds_are_direction_aware():
    checks = {c.metric: c for c in check_thresholds({"accuracy": 0.7, "log_loss": 0.4, "ece": float("nan")},
                                                    {"accuracy": 0.6, "log_loss": 0.3, "ece": 0.1, "f1_macro": 0.1})}
    assert checks["accuracy"].passed and checks["accuracy"].kind == "min"
    assert not checks["log_loss"].passed and checks["log_loss"].kind == "max"
    assert checks["log_loss"].describe() == "log_loss = 0.4000 (needs <= 0.3)"
    assert not checks["ece"].passed and checks["ece"].value is None  # NaN is not a pass
    assert checks["f1_macro"].describe() == "f1_macro = not computed (needs >= 0.1)"


def test_champion_comparison_uses_the_margin_in_the_metric_direction():
    assert compare_with_champion({"map_50": 0.61}, {"map_50": 0.60}, "map_50", 0.01).passed
    assert not compare_with_champion({"map_50": 0.605}, {"map_50": 0.60}, "map_50", 0.01).passed
    assert compare_with_champion({"log_loss": 0.50}, {"log_loss": 0.60}, "log_loss", 0.05).passed
    assert not compare_with_champion({"log_loss": 0.60}, {"log_loss": 0.50}, "log_loss", 0.0).passed
    assert not compare_with_champion({}, {"map_50": 0.1}, "map_50", 0.0).passed


def _versions(runtime):
    return MlflowClient(runtime.tracking_uri).search_model_versions(f"name = '{NAME}'")


def test_gate_registers_aliases_and_compares_with_the_champion(ingested_runtime):
    rt = ingested_runtime
    mlflow.set_tracking_uri(rt.tracking_uri)
    data_version = delta.table_version(rt.spark, rt.table("samples"))
    first, first_run = log_trained_model(rt, seed=1)
    second, second_run = log_trained_model(rt, seed=2)
    registry = ModelRegistry(rt, NAME)

    # thresholds alone decide while there is no champion; failing registers nothing
    failed = MetricGate(rt, NAME, thresholds={"accuracy": 1.01, "log_loss": 0.0001}).run(first)
    assert not failed.passed and failed.registered is None and failed.champion is None
    assert "accuracy = " in failed.message() and "(needs >= 1.01)" in failed.message()
    assert "(needs <= 0.0001)" in failed.message()
    assert _versions(rt) == [] and registry.by_alias(CHALLENGER) is None
    client = MlflowClient(rt.tracking_uri)
    logged = mlflow.artifacts.load_dict(f"runs:/{first_run}/gate/report.json")
    assert logged["passed"] is False and logged["data_version"] == data_version

    passed = MetricGate(rt, NAME, thresholds={"accuracy": 0.0}).run(first)
    assert passed.passed and passed.registered == {"name": NAME, "version": "1", "created": True}
    assert registry.by_alias(CHALLENGER).version == "1"
    tags = client.get_model_version(NAME, "1").tags
    assert tags["gate_decision"] == "passed" and tags["gate_champion_version"] == "none"
    assert float(tags["gate_metric_accuracy"]) == pytest.approx(passed.metrics["accuracy"], rel=1e-5)
    # the evaluation logged into the run is reused, not recomputed, on a retry: same version
    again = MetricGate(rt, NAME, thresholds={"accuracy": 0.0}).run(first)
    assert again.registered == {"name": NAME, "version": "1", "created": False} and len(_versions(rt)) == 1
    assert registry.promote("1") is None and registry.by_alias(CHAMPION).version == "1"
    assert registry.by_alias(CHALLENGER) is None

    # the second model must beat version 1 on accuracy, scored at the same data version
    strict = MetricGate(rt, NAME, thresholds={"accuracy": 0.0}, min_improvement=1.0).run(second)
    assert not strict.passed and strict.champion["version"] == "1"
    assert strict.comparison.metric == "accuracy"
    assert strict.comparison.champion == pytest.approx(passed.metrics["accuracy"])
    assert "accuracy: challenger" in strict.message() and "higher by at least 1" in strict.message()
    assert len(_versions(rt)) == 1 and registry.by_alias(CHALLENGER) is None

    lenient = MetricGate(rt, NAME, thresholds={"accuracy": 0.0}, min_improvement=-1.0).run(second)
    assert lenient.passed and lenient.registered["version"] == "2"
    assert client.get_model_version(NAME, "2").tags["gate_champion_version"] == "1"
    preds = delta.read_table(rt.spark, rt.table("predictions")).filter(f"data_version = {data_version}")
    assert {r["model_uri"] for r in preds.select("model_uri").distinct().collect()} >= {first, second}
    artifacts = {a.path for a in client.list_artifacts(second_run, "gate")}
    assert {"gate/report.json", "gate/challenger_vs_champion.png"} <= artifacts
    assert registry.promote("2").version == "1"
    assert registry.by_alias(CHAMPION).version == "2" and registry.by_alias(PREVIOUS_CHAMPION).version == "1"
