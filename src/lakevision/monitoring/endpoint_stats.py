"""Endpoint metrics from the inference table: latency, throughput and error rate per served
entity over a time window, appended to the ``endpoint_monitoring`` Delta table.

The inference table is the record of what was served, on Databricks (AI Gateway) and locally
(the local workspace writes the same shape), so these numbers do not depend on how long a
serving process has been up, unlike the endpoint's own last-minute metrics export.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from lakevision import delta
from lakevision.runtime import Runtime, TableRef
from lakevision.serving.inference_log import inference_table_prefix, payload_table_name

MONITORING_TABLE = "endpoint_monitoring"


def inference_table(rt: Runtime, endpoint: str) -> TableRef:
    return rt.table(payload_table_name(inference_table_prefix(rt.config.deployment, endpoint)))


def recent_requests(rt: Runtime, endpoint: str, window_minutes: float, now: dt.datetime | None = None):
    """The endpoint's rows of the last ``window_minutes``; None when nothing was ever logged."""
    from pyspark.sql import functions as F

    ref = inference_table(rt, endpoint)
    if not delta.table_exists(rt.spark, ref):
        return None
    now = now or dt.datetime.now(dt.timezone.utc)
    start = now - dt.timedelta(minutes=window_minutes)
    return (delta.read_table(rt.spark, ref)
            .where((F.col("endpoint_name") == endpoint) & (F.col("request_time") >= F.lit(start))
                   & (F.col("request_time") <= F.lit(now))))


def endpoint_stats(rt: Runtime, endpoint: str, window_minutes: float,
                   now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """One row per served entity: requests, p50/p99 latency, throughput, error rate, for the
    metrics named in ``deployment.monitoring.metrics``."""
    from pyspark.sql import functions as F

    now = now or dt.datetime.now(dt.timezone.utc)
    rows = recent_requests(rt, endpoint, window_minutes, now)
    if rows is None:
        return []
    wanted = set(rt.config.deployment.monitoring.metrics)
    aggs = [F.count(F.lit(1)).alias("requests")]
    if "latency" in wanted:
        aggs += [F.percentile_approx("execution_duration_ms", 0.5, 10_000).alias("latency_p50_ms"),
                 F.percentile_approx("execution_duration_ms", 0.99, 10_000).alias("latency_p99_ms")]
    if "error_rate" in wanted:
        aggs.append((F.sum(F.when(F.col("status_code") >= 400, 1).otherwise(0)) / F.count(F.lit(1))).alias("error_rate"))
    grouped = rows.groupBy("served_entity_id", "entity_name", "entity_version").agg(*aggs).collect()
    out = []
    for r in sorted(grouped, key=lambda r: r["served_entity_id"]):
        row = {"measured_at": now, "endpoint_name": endpoint, "window_minutes": float(window_minutes),
               "served_entity_id": r["served_entity_id"], "entity_name": r["entity_name"],
               "entity_version": r["entity_version"], "requests": int(r["requests"])}
        if "latency" in wanted:
            row["latency_p50_ms"], row["latency_p99_ms"] = float(r["latency_p50_ms"]), float(r["latency_p99_ms"])
        if "throughput" in wanted:
            row["throughput_rps"] = r["requests"] / (window_minutes * 60)
        if "error_rate" in wanted:
            row["error_rate"] = float(r["error_rate"])
        out.append(row)
    return out


def write_stats(rt: Runtime, stats: list[dict[str, Any]]) -> int | None:
    """Append ``stats`` to the monitoring table; its new version (None when there was nothing)."""
    if not stats:
        return None
    import pandas as pd

    ref = rt.table(MONITORING_TABLE)
    columns = ["measured_at", "endpoint_name", "window_minutes", "served_entity_id", "entity_name", "entity_version",
               "requests", "latency_p50_ms", "latency_p99_ms", "throughput_rps", "error_rate"]
    # every metric column always exists, so turning a metric off does not change the table's schema
    frame = pd.DataFrame([{c: s.get(c) for c in columns} for s in stats], columns=columns)
    frame = frame.astype({c: "float64" for c in columns[-4:]})
    delta.append(rt.spark, rt.spark.createDataFrame(frame), ref)
    return delta.table_version(rt.spark, ref)
