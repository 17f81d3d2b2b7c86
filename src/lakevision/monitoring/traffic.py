"""What the endpoint was sent, read back from its inference table: the window the monitor judges,
and the image profile of the traffic in it.

Rows reach an inference table late (on Databricks up to an hour after the request), so the window
the monitor judges ends ``inference_delay_minutes`` before it runs, and a window that ends later
is reported as possibly incomplete rather than as a quiet endpoint.

The profile comes from the feature record the served model returns with every prediction (see
:attr:`~lakevision.packaging.pyfunc.ServingSpec.feature_output`): responses are small and always
logged, while an image over 1 MB leaves its request unlogged. Decoding the logged request is the
fallback, for a model that returns no records.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from typing import Any

from lakevision.monitoring.endpoint_stats import recent_requests
from lakevision.runtime import Runtime

log = logging.getLogger(__name__)

MAX_TRAFFIC_IMAGES = 2000  # newest successful images profiled per run


@dataclass(frozen=True)
class Window:
    """The span of request times the monitor judges, and whether every row of it can be in the table yet."""

    start: dt.datetime
    end: dt.datetime
    complete: bool
    delay_minutes: float

    @property
    def minutes(self) -> float:
        return (self.end - self.start).total_seconds() / 60

    def note(self) -> str | None:
        """Why the window's numbers may still grow; None for a complete window."""
        if self.complete:
            return None
        return (f"the window ends at {self.end:%Y-%m-%d %H:%M:%S} UTC, less than {self.delay_minutes:g} minutes ago: "
                f"inference rows can arrive that late, so it may be incomplete")


def monitoring_window(window_minutes: float, delay_minutes: float, now: dt.datetime | None = None,
                      since: dt.datetime | None = None, clock: dt.datetime | None = None) -> Window:
    """The window ending ``delay_minutes`` before this moment (``clock``), or at ``now`` when
    given, and starting ``window_minutes`` earlier, or at ``since`` when given."""
    clock = clock or dt.datetime.now(dt.timezone.utc)
    settled = clock - dt.timedelta(minutes=delay_minutes)
    end = now or settled
    start = since or end - dt.timedelta(minutes=window_minutes)
    return Window(start, end, end <= settled, delay_minutes)


def request_images(request_json: str) -> list[str]:
    """The base64 images of one logged request body, whichever MLflow input format it used."""
    from lakevision.packaging.wire import IMAGE_COLUMN

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


def response_predictions(response_json: str | None) -> list[dict[str, Any]]:
    """The per-image predictions of one logged response (empty when it was not logged or is not ours)."""
    if not response_json:
        return []
    try:
        predictions = json.loads(response_json).get("predictions")
    except (ValueError, AttributeError):
        return []
    return [p for p in predictions if isinstance(p, dict)] if isinstance(predictions, list) else []


@dataclass
class TrafficProfile:
    profile: Any  # ImageProfile | None (None: no successful requests in the window)
    from_records: int  # images profiled from the model's feature records
    from_payloads: int  # images decoded from logged requests (the fallback)
    unprofiled: int  # successful images with neither: a big request to a model without records


def traffic_profile(rt: Runtime, endpoint: str, window: Window, served=None) -> TrafficProfile:
    """The image profile of what the endpoint answered (200) in ``window``, newest first, from
    the responses' feature records; ``served`` (an ImageModel) decodes and profiles logged
    requests whose responses carry none."""
    from pyspark.sql import functions as F

    from lakevision.packaging.pyfunc import EMBEDDING_KEY, FEATURES_COLUMN, decode_image, profile_from_records

    rows = recent_requests(rt, endpoint, window.start, window.end)
    if rows is None:
        return TrafficProfile(None, 0, 0, 0)
    logged = (rows.where(F.col("status_code") == 200).orderBy(F.col("request_time").desc())
              .select("request", "response").limit(MAX_TRAFFIC_IMAGES).collect())
    records: list[dict] = []
    decoded = unprofiled = 0
    max_pixels = rt.config.deployment.serving.max_image_pixels
    for row in logged:
        if len(records) >= MAX_TRAFFIC_IMAGES:
            break
        predictions = response_predictions(row["response"])
        features = [p.get(FEATURES_COLUMN) for p in predictions]
        if features and all(isinstance(f, dict) and EMBEDDING_KEY in f for f in features):
            records.extend(features)
        elif row["request"] and served is not None:
            images = [decode_image(text, i, max_pixels) for i, text in enumerate(request_images(row["request"]))]
            records.extend(served.predict_with_features(images)[1])
            decoded += len(images)
        else:
            unprofiled += max(len(predictions), 1)
    if unprofiled:
        log.warning("endpoint %s: %d images answered in the window have neither a feature record nor a logged "
                    "request; drift cannot see them", endpoint, unprofiled)
    records = records[:MAX_TRAFFIC_IMAGES]
    decoded = min(decoded, len(records))
    profile = profile_from_records(records) if records else None
    return TrafficProfile(profile, len(records) - decoded, decoded, unprofiled)
