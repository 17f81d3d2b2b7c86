"""The monitor job: endpoint health, endpoint metrics from the inference table, drift of recent
traffic from the champion's training images, and a retraining run when one is due.

Each run appends its metrics to ``endpoint_monitoring`` and its drift tests to ``drift_results``
(one row per test, with the decision), so the history of what the monitor saw is a Delta table.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

from lakevision import delta
from lakevision.data.image_profile import ImageProfile
from lakevision.errors import DataError, LakevisionError
from lakevision.monitoring.drift import DriftReport, ModelMonitor
from lakevision.monitoring.endpoint_stats import endpoint_stats, write_stats
from lakevision.monitoring.health import endpoint_health
from lakevision.registry.model_registry import CHAMPION, ModelRegistry
from lakevision.runtime import Runtime
from lakevision.serving.client import DEFAULT_RETRY_TIMEOUT_S, workspace_client, workspace_connection
from lakevision.tasks import task_kind
from lakevision.tracking import REFERENCE_PROFILE_ARTIFACT, TEST_PREFIX, mlflow_client

log = logging.getLogger(__name__)

DRIFT_TABLE = "drift_results"


class MonitorError(LakevisionError):
    """The monitor cannot judge (no champion, no reference profile)."""


def champion_reference(rt: Runtime, model_name: str):
    """The champion version, its served model (an ImageModel) and the reference profile its
    train run logged."""
    import mlflow

    from lakevision.packaging.pyfunc import load_image_model

    champion = ModelRegistry(rt, model_name).by_alias(CHAMPION)
    if champion is None:
        return None, None, None
    try:
        # load_dict downloads into a folder it removes; download_artifacts would leave one per run
        profile = mlflow.artifacts.load_dict(f"runs:/{champion.run_id}/{REFERENCE_PROFILE_ARTIFACT}")
    except Exception as exc:  # MLflow raises several types for a missing artifact
        raise MonitorError(f"{champion.registry_uri}: run {champion.run_id} has no {REFERENCE_PROFILE_ARTIFACT} "
                           f"(trained before reference profiles were logged?): {exc}") from None
    try:
        reference = ImageProfile.from_dict(profile)
    except DataError as exc:
        raise MonitorError(f"{champion.registry_uri}: its reference profile cannot be used ({exc}); "
                           "retrain to log a current one") from None
    return champion, load_image_model(champion.registry_uri), reference


def _baseline(rt: Runtime, champion, metric: str) -> float | None:
    return mlflow_client(rt.tracking_uri).get_run(champion.run_id).data.metrics.get(TEST_PREFIX + metric)


def new_data_reason(rt: Runtime) -> str | None:
    """Why the gold table calls for training, or None: a version newer than every training run
    read. Compared with the runs, not the champion, so data a failed gate already saw does not
    start a run every hour."""
    from lakevision.tracking import DATA_VERSION_TAG

    ref = rt.table("samples")
    if not delta.table_exists(rt.spark, ref):
        return None
    current = delta.table_version(rt.spark, ref)
    client = mlflow_client(rt.tracking_uri)
    experiment = client.get_experiment_by_name(rt.experiment_name)
    runs = [] if experiment is None else client.search_runs(
        [experiment.experiment_id], f"tags.`{DATA_VERSION_TAG}` != ''", max_results=1,
        order_by=[f"tags.`{DATA_VERSION_TAG}` DESC"])
    trained = max((int(r.data.tags[DATA_VERSION_TAG]) for r in runs), default=None)
    if trained is not None and current <= trained:
        return None
    return (f"samples version {current} is newer than the last trained on ({trained})" if trained is not None
            else f"samples version {current} has no training run yet")


def write_drift(rt: Runtime, endpoint: str, version: str, report: DriftReport | None, retrain: bool,
                reasons: list[str], n_current: int) -> int:
    """Append one row per drift test (or one row saying why there was none) to ``drift_results``."""
    import pandas as pd

    now = dt.datetime.now(dt.timezone.utc)
    base = {"measured_at": now, "endpoint_name": endpoint, "model_version": version, "n_current": n_current,
            "retrain": retrain, "reasons": "; ".join(reasons)}
    rows = []
    if report is not None:
        for name, f in report.features.items():
            rows.append({**base, "test": name, "statistic": f.ks_statistic, "p_value": f.p_adjusted,
                         "psi": f.psi, "drifted": f.drifted})
        if report.embedding is not None:
            e = report.embedding
            rows.append({**base, "test": "embedding_mmd", "statistic": e.statistic, "p_value": e.p_value,
                         "psi": None, "drifted": report.embedding_drifted})
    else:
        rows.append({**base, "test": "none", "statistic": None, "p_value": None, "psi": None, "drifted": False})
    frame = pd.DataFrame(rows).astype({"statistic": "float64", "p_value": "float64", "psi": "float64"})
    ref = rt.table(DRIFT_TABLE)
    delta.append(rt.spark, rt.spark.createDataFrame(frame), ref)
    return delta.table_version(rt.spark, ref)


def trigger_retrain(host: str | None, token: str | None, job: str | int,
                    retry_timeout_seconds: int = DEFAULT_RETRY_TIMEOUT_S) -> dict:
    """Start the training job through the Jobs API without waiting for it, the same calls on
    Databricks and on the local workspace. ``job`` is a job id, or a job's exact name (looked up
    with ``jobs.list``). Nothing starts while the job has an active run: the answer names it.
    Otherwise ``jobs.run_now`` with the parameters of the job's latest run, so the new run reads
    the same data."""
    w = workspace_client(host, token, retry_timeout_seconds)
    job_id = _retrain_job_id(w, job)
    active = next(iter(w.jobs.list_runs(job_id=job_id, active_only=True)), None)
    if active is not None:
        return {"job_id": job_id, "started": False, "reason": f"run {active.run_id} is still active"}
    latest = next(iter(w.jobs.list_runs(job_id=job_id, limit=1)), None)
    parameters = {p.name: p.value for p in (latest.job_parameters or []) if p.value is not None} if latest else {}
    run = w.jobs.run_now(job_id=job_id, job_parameters=parameters or None)
    return {"job_id": job_id, "started": True, "run_id": run.run_id, "parameters": parameters}


def _retrain_job_id(w, job: str | int) -> int:
    text = str(job).strip()
    if text.isdigit():
        return int(text)
    ids = [j.job_id for j in w.jobs.list(name=text)]
    if len(ids) != 1:
        found = f"{len(ids)} jobs are" if ids else "no job is"
        raise MonitorError(f"retraining is due, but {found} named {text!r} in the workspace: "
                           "pass --retrain-job JOB_ID (or a job name that is unique)")
    return ids[0]


@dataclass
class MonitorReport:
    """One pass of the monitor: what it measured on the endpoint, what it decided, what it started."""

    endpoint: str
    window_start: dt.datetime
    window_end: dt.datetime  # the window the metrics, the drift test and the feedback looked at
    window_complete: bool  # False: inference rows of the window may still arrive
    health: dict[str, Any]  # healthy, problems, and the endpoint's state and routes
    stats: list[dict[str, Any]]  # per served entity: requests, latency percentiles, error rates
    monitoring_table_version: int | None
    model_version: str | None  # the champion the traffic was compared with (None: no champion yet)
    n_current: int  # traffic images the drift test saw
    feedback: dict[str, Any] | None  # the champion's metric on labelled requests
    retrain: bool
    reasons: list[str]
    drift: dict[str, Any] | None
    drift_table_version: int
    triggered: dict[str, Any] | None  # the retraining run it started

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _entities(health: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Served entity id -> its model and version, from the endpoint's config."""
    status = health.get("status") or {}
    return {e["name"]: e for e in status.get("served_entities", [])}


def run_monitoring(rt: Runtime, endpoint: str | None = None, host: str | None = None, retrain: bool = True,
                   retrain_job: str | None = None, bundle_dir: str | os.PathLike | None = None,
                   now: dt.datetime | None = None, since: dt.datetime | None = None) -> MonitorReport:
    """One pass of the monitor job; the report says what it measured, decided and started. The
    window is ``deployment.monitoring.window_minutes`` ending ``inference_delay_minutes`` ago
    (rows arrive late), or ends at ``now`` and starts at ``since`` when those are given."""
    from lakevision.monitoring.feedback import labelled_predictions, score_feedback
    from lakevision.monitoring.traffic import monitoring_window, traffic_profile

    d = rt.config.deployment
    m = d.monitoring
    name = endpoint or d.endpoint_name
    window = monitoring_window(m.window_minutes, m.inference_delay_minutes, now, since)
    health = endpoint_health(rt, name, host)
    entities = _entities(health)
    stats = endpoint_stats(rt, name, window.start, window.end, entities)
    stats_version = write_stats(rt, stats)
    champion, served, reference = champion_reference(rt, d.model_name)
    reasons = [note] if (note := window.note()) else []
    n_current, feedback, drift, retrain_due = 0, None, None, False
    if champion is None:
        reasons.append(f"{d.model_name} has no {CHAMPION} yet: no drift or metric to judge")
        version = None
    else:
        version = champion.version
        traffic = traffic_profile(rt, name, window, served)
        n_current = traffic.profile.n if traffic.profile is not None else 0
        kind = task_kind(served.spec.task, served.spec.semantic)
        serving_champion = {e for e, spec in entities.items() if str(spec.get("entity_version")) == str(version)}
        score = score_feedback(kind.name, kind.headline, labelled_predictions(rt, name, window, serving_champion))
        feedback = {"metric": score.metric, "value": score.value, "images": score.images, "note": score.note}
        enough_labels = score.value is not None and score.images >= m.drift.min_samples
        if score.value is not None and not enough_labels:
            reasons.append(f"only {score.images} of {m.drift.min_samples} labelled images: no metric verdict")
        monitor = ModelMonitor(reference, m.drift, baseline_metric=_baseline(rt, champion, kind.headline),
                               metric_name=kind.headline, higher_is_better=kind.greater_is_better)
        decision = monitor.should_retrain(current_profile=traffic.profile,
                                          current_metric=score.value if enough_labels else None)
        if traffic.profile is None:
            decision.reasons.append("no successful requests logged in the window" + (
                " so far" if not window.complete else ""))
        reasons += decision.reasons
        drift, retrain_due = decision.drift, decision.retrain
    if (data_reason := new_data_reason(rt)) is not None:
        reasons.append(data_reason)
        retrain_due = True
    drift_version = write_drift(rt, name, version or "", drift, retrain_due, reasons, n_current)
    triggered = None
    if retrain_due and retrain:  # the workspace the endpoint is served from runs the job too
        job = retrain_job or m.retrain_job
        if job is None:
            raise MonitorError("retraining is due (" + "; ".join(reasons) + "), and no job is named to run: pass "
                               "--retrain-job JOB_ID_OR_NAME or set deployment.monitoring.retrain_job")
        with workspace_connection(rt, host, bundle_dir) as (url, token):
            triggered = trigger_retrain(url, token, job, d.workspace.retry_timeout_seconds)
    return MonitorReport(endpoint=name, window_start=window.start, window_end=window.end,
                         window_complete=window.complete, health=health, stats=stats,
                         monitoring_table_version=stats_version, model_version=version, n_current=n_current,
                         feedback=feedback, retrain=retrain_due, reasons=reasons,
                         drift=drift.to_dict() if drift else None, drift_table_version=drift_version,
                         triggered=triggered)
