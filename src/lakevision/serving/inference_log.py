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
import json
import logging
import queue
import threading
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Databricks stores payloads up to 1 MiB and leaves larger ones null with this error code; it
# refuses requests over 16 MiB (HTTP 413).
MAX_PAYLOAD_BYTES = 1024 * 1024
MAX_REQUEST_BYTES = 16 * 1024 * 1024
PAYLOAD_TOO_LARGE = "MAX_REQUEST_SIZE_EXCEEDED"
RESPONSE_TOO_LARGE = "MAX_RESPONSE_SIZE_EXCEEDED"
ROWS_DROPPED = "ROWS_DROPPED"


def payload_table_name(prefix: str) -> str:
    return f"{prefix}_payload"


def inference_table_prefix(settings, endpoint: str) -> str:
    """The inference table's prefix for ``endpoint``: ``deployment.monitoring.inference_table_prefix``,
    else the endpoint name made a table name."""
    return settings.monitoring.inference_table_prefix or endpoint.replace("-", "_")


def inference_schema():
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
    ])


def split_client_request_id(request: bytes) -> tuple[str | None, bytes]:
    """The ``client_request_id`` a caller put in the request body, and the body without it: the
    gateway logs it (so a caller can join its own records, or its labels, with the table) and the
    model never sees it. A body that does not parse is left as it is, for the model to refuse."""
    if b"client_request_id" not in request:
        return None, request
    try:
        body = json.loads(request)
    except ValueError:
        return None, request
    if not isinstance(body, dict) or "client_request_id" not in body:
        return None, request
    value = body.pop("client_request_id")
    return (value if isinstance(value, str) else None), json.dumps(body).encode()


def inference_row(entity: str, status: int, duration_ms: float, request: bytes, response: bytes, requester: str,
                  at: dt.datetime | None = None, request_id: str | None = None,
                  client_request_id: str | None = None) -> dict[str, Any]:
    """One request as a row of exactly the AI Gateway columns: the table is per endpoint, and
    ``served_entity_id`` leads to the served entity (its model and version) in the endpoint's
    config. Payloads over :data:`MAX_PAYLOAD_BYTES` are left out, with a code."""
    at = at or dt.datetime.now(dt.timezone.utc)
    errors = []
    if len(request) > MAX_PAYLOAD_BYTES:
        errors.append(PAYLOAD_TOO_LARGE)
    if len(response) > MAX_PAYLOAD_BYTES:
        errors.append(RESPONSE_TOO_LARGE)
    return {
        "request_date": at.date(), "databricks_request_id": request_id or str(uuid.uuid4()),
        "client_request_id": client_request_id, "request_time": at, "status_code": status, "sampling_fraction": 1.0,
        "execution_duration_ms": round(duration_ms),
        "request": None if PAYLOAD_TOO_LARGE in errors else request.decode("utf-8", "replace"),
        "response": None if RESPONSE_TOO_LARGE in errors else response.decode("utf-8", "replace"),
        "served_entity_id": entity, "logging_error_codes": errors, "requester": requester,
    }


class InferenceLogger:
    """Appends rows to the Delta table at ``path`` from a background thread."""

    def __init__(self, path: str | Path, flush_seconds: float = 1.0, max_queued: int = 100_000,
                 delay_seconds: float = 0.0):
        self.path = Path(path)
        self.flush_seconds = flush_seconds
        # rows land this long after their request at the earliest, as Databricks' rows can arrive
        # up to an hour late: what reads the table must not take a recent gap for no traffic
        self.delay_seconds = delay_seconds
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

    def flush(self, everything: bool = False) -> int:
        """Write the queued rows that are due (all of them with ``everything``); the rows
        committed (0 when a write failed: they stay pending)."""
        with self._flushing:  # the background thread and a caller must not write the same rows twice
            return self._flush(everything)

    def _flush(self, everything: bool) -> int:
        while True:
            try:
                self._pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        due_before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=self.delay_seconds)
        due = self._pending if everything else [r for r in self._pending if r["request_time"] <= due_before]
        if not due:
            return 0
        if self._dropped:
            # the queue overflowed: say so on the rows that follow the gap
            due[0]["logging_error_codes"] = [*due[0]["logging_error_codes"], f"{ROWS_DROPPED}:{self._dropped}"]
            self._dropped = 0
        try:
            import pyarrow as pa
            from deltalake import write_deltalake

            write_deltalake(str(self.path), pa.Table.from_pylist(due, schema=inference_schema()), mode="append")
        except Exception:  # a full disk or a locked table must not take serving down; retried next flush
            log.exception("inference table %s: %d rows not written yet", self.path, len(due))
            return 0
        written = {id(r) for r in due}
        self._pending = [r for r in self._pending if id(r) not in written]
        return len(due)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            self.flush()

    def close(self) -> None:
        """Stop the thread and write everything still queued, due or not: nothing answered is lost."""
        self._stop.set()
        self._thread.join()
        self.flush(everything=True)
