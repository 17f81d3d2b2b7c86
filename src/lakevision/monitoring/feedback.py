"""Labelled feedback: the champion's logged predictions scored against ground truth that a
labelling process appends later, so a falling metric can start retraining.

The feedback table (``deployment.monitoring.feedback_table``) has one row per labelled request:

* ``request_id``: the request's ``databricks_request_id`` from the inference table, or the
  ``client_request_id`` the caller sent in the request body;
* ``ground_truth``: JSON, a list with one entry per image of the request, in the order sent:
  ``{"label": <category id>}`` for classification, ``{"boxes": [[x1, y1, x2, y2], ...],
  "labels": [<category id>, ...]}`` for detection (pixel corners, as the endpoint answers);
* ``labeled_at``: when the label was written.

A request labelled twice (by either of its ids) counts once, with its newest label.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from lakevision import delta
from lakevision.errors import DataError
from lakevision.monitoring.endpoint_stats import recent_requests
from lakevision.monitoring.traffic import Window, response_predictions
from lakevision.runtime import Runtime

log = logging.getLogger(__name__)

MAX_LABELLED_REQUESTS = 5000
SCORED_KINDS = ("classification", "detection")
FEEDBACK_SCHEMA = "request_id string, ground_truth string, labeled_at timestamp"


@dataclass
class FeedbackScore:
    metric: str
    value: float | None  # None: nothing labelled to score, or a task this does not score
    images: int  # labelled images scored
    note: str | None = None


def append_feedback(rt: Runtime, rows: list[dict[str, Any]]) -> int:
    """Append labels (``request_id``, ``ground_truth`` as a list per request, ``labeled_at``) to
    the feedback table, as a labelling process does; its new version."""
    import pandas as pd

    for i, row in enumerate(rows):
        if not isinstance(row.get("request_id"), str) or not row["request_id"]:
            raise DataError(f"feedback row {i}: request_id must be a non-empty string")
        if not isinstance(row.get("ground_truth"), list):
            raise DataError(f"feedback row {i} ({row['request_id']}): ground_truth must be a list, one entry per image")
    frame = pd.DataFrame({"request_id": [r["request_id"] for r in rows],
                          "ground_truth": [json.dumps(r["ground_truth"]) for r in rows],
                          "labeled_at": [r["labeled_at"] for r in rows]})
    ref = rt.table(rt.config.deployment.monitoring.feedback_table)
    delta.append(rt.spark, rt.spark.createDataFrame(frame, schema=FEEDBACK_SCHEMA), ref)
    return delta.table_version(rt.spark, ref)


def labelled_predictions(rt: Runtime, endpoint: str, window: Window, served_entities: set[str]) -> list[tuple]:
    """(predictions, ground truth) per labelled request the ``served_entities`` answered in ``window``."""
    from pyspark.sql import Window as SparkWindow
    from pyspark.sql import functions as F

    ref = rt.table(rt.config.deployment.monitoring.feedback_table)
    rows = recent_requests(rt, endpoint, window.start, window.end)
    if rows is None or not delta.table_exists(rt.spark, ref) or not served_entities:
        return []
    labels = delta.read_table(rt.spark, ref).select("request_id", "ground_truth", "labeled_at")
    answered = rows.where((F.col("status_code") == 200) & F.col("response").isNotNull()
                          & F.col("served_entity_id").isin(sorted(served_entities)))
    joined = answered.join(labels, (answered["databricks_request_id"] == labels["request_id"])
                           | (answered["client_request_id"] == labels["request_id"]))
    # a request labelled again, by either of its ids, counts once, with its newest label
    newest = SparkWindow.partitionBy("databricks_request_id").orderBy(F.col("labeled_at").desc())
    latest = joined.withColumn("rank", F.row_number().over(newest)).where(F.col("rank") == 1)
    return [(response_predictions(r["response"]), json.loads(r["ground_truth"]), r["databricks_request_id"])
            for r in latest.select("response", "ground_truth", "databricks_request_id")
            .limit(MAX_LABELLED_REQUESTS).collect()]


def score_feedback(kind: str, metric: str, labelled: list[tuple]) -> FeedbackScore:
    """The task's headline metric of the labelled predictions."""
    if kind not in SCORED_KINDS:
        return FeedbackScore(metric, None, 0, f"feedback is scored for {' and '.join(SCORED_KINDS)}, not {kind}")
    pairs = []
    for predictions, truth, request_id in labelled:
        if not isinstance(truth, list) or len(truth) != len(predictions):
            log.warning("feedback for request %s: %s ground-truth entries for %d predicted images; skipped",
                        request_id, len(truth) if isinstance(truth, list) else "no list of", len(predictions))
            continue
        pairs.extend(zip(predictions, truth))
    if not pairs:
        return FeedbackScore(metric, None, 0, "no labelled requests in the window")
    if kind == "classification":
        correct = sum(int(p.get("label") == t.get("label")) for p, t in pairs)
        return FeedbackScore(metric, correct / len(pairs), len(pairs))
    from lakevision.evaluation.detection import DetectionMetrics

    metrics = DetectionMetrics(0.5)
    predictions = [{"image_id": i, "boxes": p.get("boxes") or [], "labels": p.get("labels") or [],
                    "scores": p.get("scores") or []} for i, (p, _) in enumerate(pairs)]
    truth = [{"image_id": i, "boxes": t.get("boxes") or [], "labels": t.get("labels") or []}
             for i, (_, t) in enumerate(pairs)]
    try:
        metrics.update(predictions, truth)
    except ValueError as exc:
        raise DataError(f"feedback table: a ground-truth entry is malformed: {exc}") from None
    return FeedbackScore(metric, float(metrics.compute()["map_50"]), len(pairs))
