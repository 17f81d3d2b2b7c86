"""Inference tables for the local workspace: one row per served request, in the shape of
Databricks AI Gateway inference tables (``<prefix>_payload``), appended to a Delta table.

A request never waits for the table: :meth:`InferenceLogger.log` only puts the row on a queue,
and a background thread appends whatever has queued up every ``flush_seconds`` (one Delta
commit per flush, not per request). :meth:`InferenceLogger.close` drains the queue, so a clean
shutdown loses nothing. A write that fails is retried on the next flush; rows are dropped only
when more than ``max_queued`` pile up, and the next rows written say how many.
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Databricks stores payloads up to 1 MiB and leaves larger ones null with this error code.
MAX_PAYLOAD_BYTES = 1024 * 1024
PAYLOAD_TOO_LARGE = "MAX_REQUEST_SIZE_EXCEEDED"
RESPONSE_TOO_LARGE = "MAX_RESPONSE_SIZE_EXCEEDED"
ROWS_DROPPED = "ROWS_DROPPED"


def payload_table_name(prefix: str) -> str:
    return f"{prefix}_payload"


def inference_table_prefix(settings, endpoint: str) -> str:
    """The inference table's prefix for ``endpoint``: ``deployment.monitoring.inference_table_prefix``,
    else the endpoint name made a table name."""
    return settings.monitoring.inference_table_prefix or endpoint.replace("-", "_")


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("request_date", pa.date32()),
        ("databricks_request_id", pa.string()),
        ("client_request_id", pa.string()),
        ("request_time", pa.timestamp("us", tz="UTC")),
        ("status_code", pa.int32()),
        ("sampling_fraction", pa.float64()),
        ("execution_duration_ms", pa.int64()),
        ("request", pa.string()),
        ("response", pa.string()),
        ("served_entity_id", pa.string()),
        ("logging_error_codes", pa.list_(pa.string())),
        ("requester", pa.string()),
        # not in Databricks' table, where served_entity_id is joined with system tables for these
        ("endpoint_name", pa.string()),
        ("entity_name", pa.string()),
        ("entity_version", pa.string()),
    ])


def inference_row(endpoint: str, entity: str, entity_name: str, entity_version: str, status: int,
                  duration_ms: float, request: bytes, response: bytes, requester: str,
                  at: dt.datetime | None = None, request_id: str | None = None) -> dict[str, Any]:
    """One request as a row; payloads over :data:`MAX_PAYLOAD_BYTES` are left out, with a code."""
    at = at or dt.datetime.now(dt.timezone.utc)
    errors = []
    if len(request) > MAX_PAYLOAD_BYTES:
        errors.append(PAYLOAD_TOO_LARGE)
    if len(response) > MAX_PAYLOAD_BYTES:
        errors.append(RESPONSE_TOO_LARGE)
    return {
        "request_date": at.date(), "databricks_request_id": request_id or str(uuid.uuid4()),
        "client_request_id": None, "request_time": at, "status_code": status, "sampling_fraction": 1.0,
        "execution_duration_ms": round(duration_ms),
        "request": None if PAYLOAD_TOO_LARGE in errors else request.decode("utf-8", "replace"),
        "response": None if RESPONSE_TOO_LARGE in errors else response.decode("utf-8", "replace"),
        "served_entity_id": entity, "logging_error_codes": errors, "requester": requester,
        "endpoint_name": endpoint, "entity_name": entity_name, "entity_version": entity_version,
    }


class InferenceLogger:
    """Appends rows to the Delta table at ``path`` from a background thread."""

    def __init__(self, path: str | Path, flush_seconds: float = 1.0, max_queued: int = 100_000):
        self.path = Path(path)
        self.flush_seconds = flush_seconds
        self._queue: queue.Queue[dict] = queue.Queue(maxsize=max_queued)
        self._pending: list[dict] = []  # taken off the queue, not yet committed
        self._dropped = 0
        self._flushing = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"inference-log-{self.path.name}", daemon=True)
        self._thread.start()

    def log(self, row: dict[str, Any]) -> None:
        """Queue ``row``; never blocks and never raises into the request."""
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self._dropped += 1

    def flush(self) -> int:
        """Write what has queued up now; the rows committed (0 when a write failed: they stay pending)."""
        with self._flushing:  # the background thread and a caller must not write the same rows twice
            return self._flush()

    def _flush(self) -> int:
        while True:
            try:
                self._pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        if not self._pending:
            return 0
        if self._dropped:
            # the queue overflowed: say so on the rows that follow the gap
            self._pending[0]["logging_error_codes"] = [*self._pending[0]["logging_error_codes"],
                                                       f"{ROWS_DROPPED}:{self._dropped}"]
            self._dropped = 0
        try:
            import pyarrow as pa
            from deltalake import write_deltalake

            write_deltalake(str(self.path), pa.Table.from_pylist(self._pending, schema=_schema()), mode="append")
        except Exception:  # a full disk or a locked table must not take serving down; retried next flush
            log.exception("inference table %s: %d rows not written yet", self.path, len(self._pending))
            return 0
        written, self._pending = len(self._pending), []
        return written

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            self.flush()

    def close(self) -> None:
        """Stop the thread and write everything still queued."""
        self._stop.set()
        self._thread.join()
        self.flush()
