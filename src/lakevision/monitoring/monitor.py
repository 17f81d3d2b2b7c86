"""The monitor job: endpoint health, endpoint metrics from the inference table, drift of recent
traffic from the champion's training images, and a retraining run when one is due.

Each run appends its metrics to ``endpoint_monitoring`` and its drift tests to ``drift_results``
(one row per test, with the decision), so the history of what the monitor saw is a Delta table.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Any

from lakevision import delta
from lakevision.data.image_profile import ImageProfile, embed_images
from lakevision.errors import LakevisionError
from lakevision.monitoring.drift import DriftReport, ModelMonitor, RetrainDecision
from lakevision.monitoring.endpoint_stats import endpoint_stats, recent_requests, write_stats
from lakevision.monitoring.health import endpoint_health
from lakevision.registry.model_registry import CHAMPION, ModelRegistry
from lakevision.runtime import Runtime
from lakevision.serving.client import DEFAULT_RETRY_TIMEOUT_S, workspace_client, workspace_connection
from lakevision.tasks import task_kind
from lakevision.tracking import REFERENCE_PROFILE_ARTIFACT, TEST_PREFIX, mlflow_client

log = logging.getLogger(__name__)

DRIFT_TABLE = "drift_results"
_MAX_TRAFFIC_IMAGES = 2000  # newest successful requests profiled per run


class MonitorError(LakevisionError):
    """The monitor cannot judge (no champion, no reference profile)."""


def request_images(request_json: str) -> list[str]:
    """The base64 images of one logged request body, whichever MLflow input format it used."""
    from lakevision.packaging.pyfunc import IMAGE_COLUMN

    body = json.loads(request_json)
    if "dataframe_records" in body:
        return [r[IMAGE_COLUMN] for r in body["dataframe_records"] if IMAGE_COLUMN in r]
    if "dataframe_split" in body:
        split = body["dataframe_split"]
        i = split["columns"].index(IMAGE_COLUMN)
        return [row[i] for row in split["data"]]
    if "inputs" in body and isinstance(body["inputs"], dict):
        return list(body["inputs"].get(IMAGE_COLUMN, []))
    return []


def traffic_images(rt: Runtime, endpoint: str, window_minutes: float, now: dt.datetime | None = None) -> list:
    """Upright RGB arrays of the images the endpoint answered (200) in the window, newest first,
    decoded as the serving model decodes them."""
    from pyspark.sql import functions as F

    from lakevision.packaging.pyfunc import decode_image

    rows = recent_requests(rt, endpoint, window_minutes, now)
    if rows is None:
        return []
    max_pixels = rt.config.deployment.serving.max_image_pixels
    bodies = (rows.where((F.col("status_code") == 200) & F.col("request").isNotNull())
              .orderBy(F.col("request_time").desc()).select("request").limit(_MAX_TRAFFIC_IMAGES).collect())
    images = [decode_image(text, i, max_pixels) for r in bodies for i, text in enumerate(request_images(r["request"]))]
    return images[:_MAX_TRAFFIC_IMAGES]


def champion_reference(rt: Runtime, model_name: str):
    """The champion version, its served model and the reference profile its train run logged."""
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
    reference = ImageProfile.from_dict(profile)
    return champion, load_image_model(champion.registry_uri), reference


def _baseline(rt: Runtime, champion, metric: str) -> float | None:
    return mlflow_client(rt.tracking_uri).get_run(champion.run_id).data.metrics.get(TEST_PREFIX + metric)


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
    window_end: dt.datetime  # the end of the window the metrics and the drift test looked at
    health: dict[str, Any]  # healthy, problems, and the endpoint's state and routes
    stats: list[dict[str, Any]]  # per served entity: requests, latency percentiles, error rate
    monitoring_table_version: int
    model_version: str | None  # the champion the traffic was compared with (None: no champion yet)
    n_current: int  # traffic images the drift test saw
    retrain: bool
    reasons: list[str]
    drift: dict[str, Any] | None
    drift_table_version: int
    triggered: dict[str, Any] | None  # the retraining run it started

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def run_monitoring(rt: Runtime, endpoint: str | None = None, host: str | None = None, retrain: bool = True,
                   retrain_job: str | None = None, bundle_dir: str | os.PathLike | None = None,
                   now: dt.datetime | None = None, since: dt.datetime | None = None) -> MonitorReport:
    """One pass of the monitor job; the report says what it measured, decided and started. The
    window is ``deployment.monitoring.window_minutes`` up to ``now`` (default: this moment), or
    from ``since`` when given."""
    d = rt.config.deployment
    m = d.monitoring
    name = endpoint or d.endpoint_name
    now = now or dt.datetime.now(dt.timezone.utc)  # one window for the metrics and the drift test
    window_minutes = (now - since).total_seconds() / 60 if since is not None else m.window_minutes
    health = endpoint_health(rt, name, host)
    stats = endpoint_stats(rt, name, window_minutes, now)
    stats_version = write_stats(rt, stats)
    champion, served, reference = champion_reference(rt, d.model_name)
    n_current = 0
    if champion is None:
        decision = RetrainDecision(True, [f"{d.model_name} has no {CHAMPION} yet"])
        version = None
    else:
        images = traffic_images(rt, name, window_minutes, now)
        n_current = len(images)
        current = None
        if images:
            current = ImageProfile.from_images(images, embeddings=embed_images(served.model, images,
                                                                                served.spec.image_size))
        kind = task_kind(served.spec.task, served.spec.semantic)
        monitor = ModelMonitor(reference, m.drift, baseline_metric=_baseline(rt, champion, kind.headline),
                               metric_name=kind.headline, higher_is_better=kind.greater_is_better)
        decision = monitor.should_retrain(current_profile=current)
        if current is None:
            decision.reasons.append(f"no successful requests in the last {window_minutes:g} minutes")
        version = champion.version
    drift_version = write_drift(rt, name, version or "", decision.drift, decision.retrain, decision.reasons, n_current)
    triggered = None
    if decision.retrain and retrain:  # the workspace the endpoint is served from runs the job too
        with workspace_connection(rt, host, bundle_dir) as (url, token):
            triggered = trigger_retrain(url, token, retrain_job or m.retrain_job, d.workspace.retry_timeout_seconds)
    return MonitorReport(endpoint=name, window_end=now, health=health, stats=stats,
                         monitoring_table_version=stats_version, model_version=version, n_current=n_current,
                         retrain=decision.retrain, reasons=decision.reasons,
                         drift=decision.drift.to_dict() if decision.drift else None,
                         drift_table_version=drift_version, triggered=triggered)
