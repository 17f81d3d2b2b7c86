"""Endpoint metrics from the inference table: latency, throughput, server and client error rates
per served entity over a time window, appended to the ``endpoint_monitoring`` Delta table.

The inference table is the record of what was served, on Databricks (AI Gateway) and locally
(the local workspace writes the same shape), so these numbers do not depend on how long a
serving process has been up, unlike the endpoint's own last-minute metrics export.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any

from lakevision import delta
from lakevision.runtime import Runtime, TableRef
from lakevision.serving.inference_log import inference_table_prefix, payload_table_name

MONITORING_TABLE = "endpoint_monitoring"
_COLUMNS = {"measured_at": "timestamp", "endpoint_name": "string", "window_minutes": "double",
            "served_entity_id": "string", "entity_name": "string", "entity_version": "string", "requests": "bigint",
            "latency_p50_ms": "double", "latency_p99_ms": "double", "throughput_rps": "double",
            "error_rate": "double", "client_error_rate": "double"}


def inference_table(rt: Runtime, endpoint: str) -> TableRef:
    return rt.table(payload_table_name(inference_table_prefix(rt.config.deployment, endpoint)))


def recent_requests(rt: Runtime, endpoint: str, start: dt.datetime, end: dt.datetime):
    """The rows of ``endpoint``'s inference table (one table per endpoint) with a request time in
    [start, end]; None when nothing was ever logged."""
    from pyspark.sql import functions as F

    ref = inference_table(rt, endpoint)
    if not delta.table_exists(rt.spark, ref):
        return None
    return (delta.read_table(rt.spark, ref)
            .where((F.col("request_time") >= F.lit(start)) & (F.col("request_time") <= F.lit(end))))


def endpoint_stats(rt: Runtime, endpoint: str, start: dt.datetime, end: dt.datetime,
                   entities: Mapping[str, Mapping[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One row per served entity: requests, p50/p99 latency, throughput, error rate (5xx) and
    client error rate (4xx) in [start, end], for the metrics named in
    ``deployment.monitoring.metrics``. ``entities`` (served entity id -> its ``entity_name`` and
    ``entity_version``, from the endpoint's config) names the model behind each id; the table
    itself has only the id."""
    from pyspark.sql import functions as F

    rows = recent_requests(rt, endpoint, start, end)
    if rows is None:
        return []
    entities = entities or {}
    minutes = (end - start).total_seconds() / 60
    wanted = set(rt.config.deployment.monitoring.metrics)
    aggs = [F.count(F.lit(1)).alias("requests")]
    if "latency" in wanted:
        aggs += [F.percentile_approx("execution_duration_ms", 0.5, 10_000).alias("latency_p50_ms"),
                 F.percentile_approx("execution_duration_ms", 0.99, 10_000).alias("latency_p99_ms")]
    if "error_rate" in wanted:
        def share(condition):
            return F.sum(F.when(condition, 1).otherwise(0)) / F.count(F.lit(1))

        aggs += [share(F.col("status_code") >= 500).alias("error_rate"),
                 share((F.col("status_code") >= 400) & (F.col("status_code") < 500)).alias("client_error_rate")]
    grouped = rows.groupBy("served_entity_id").agg(*aggs).collect()
    out = []
    for r in sorted(grouped, key=lambda r: r["served_entity_id"]):
        served = entities.get(r["served_entity_id"], {})
        row = {"measured_at": end, "endpoint_name": endpoint, "window_minutes": float(minutes),
               "served_entity_id": r["served_entity_id"], "entity_name": served.get("entity_name"),
               "entity_version": served.get("entity_version"), "requests": int(r["requests"])}
        if "latency" in wanted:
            row["latency_p50_ms"], row["latency_p99_ms"] = float(r["latency_p50_ms"]), float(r["latency_p99_ms"])
        if "throughput" in wanted:
            row["throughput_rps"] = r["requests"] / (minutes * 60)
        if "error_rate" in wanted:
            row["error_rate"], row["client_error_rate"] = float(r["error_rate"]), float(r["client_error_rate"])
        out.append(row)
    return out


def write_stats(rt: Runtime, stats: list[dict[str, Any]]) -> int | None:
    """Append ``stats`` to the monitoring table; its new version (None when there was nothing)."""
    if not stats:
        return None
    import pandas as pd

    ref = rt.table(MONITORING_TABLE)
    # every metric column always exists, so turning a metric off does not change the table's schema
    frame = pd.DataFrame([{c: s.get(c) for c in _COLUMNS} for s in stats], columns=list(_COLUMNS))
    schema = ", ".join(f"{name} {kind}" for name, kind in _COLUMNS.items())
    delta.append(rt.spark, rt.spark.createDataFrame(frame, schema=schema), ref)
    return delta.table_version(rt.spark, ref)
