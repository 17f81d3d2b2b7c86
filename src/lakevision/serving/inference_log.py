"""Inference tables for the local workspace: one row per served request, in the shape of
Databricks AI Gateway inference tables (``<prefix>_payload``), appended to a Delta table.

A request never waits for the table: :meth:`InferenceLogger.log` only puts the row on a queue,
and a background thread appends whatever has queued up every ``flush_seconds`` (one Delta
commit per flush, not per request). :meth:`InferenceLogger.close` drains the queue, so a clean
shutdown loses nothing. A write that fails is retried on the next flush, so rows pile up while the
table cannot be written: what is held (queued and waiting for a retry alike) is bounded in rows
(``max_queued``) and in bytes (``max_queued_bytes``). A row beyond either bound is dropped; the next
row written says how many were, and :attr:`InferenceLogger.dropped_total` counts them for the
endpoint's metrics (``inference_rows_dropped_total``).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
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
DEFAULT_MAX_QUEUED_ROWS = 100_000
DEFAULT_MAX_QUEUED_BYTES = 256 * 1024 * 1024
_ROW_OVERHEAD_BYTES = 512  # ids, time, codes and the Python objects around a row, roughly


def row_bytes(row: dict[str, Any]) -> int:
    """About what ``row`` holds in memory: its payloads and a fixed overhead."""
    return _ROW_OVERHEAD_BYTES + sum(len(row[k]) for k in ("request", "response") if row.get(k))


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
    """Appends rows to the Delta table at ``path`` from a background thread, holding at most
    ``max_queued`` rows and ``max_queued_bytes`` of them (see :func:`row_bytes`) until they are written."""

    def __init__(self, path: str | Path, flush_seconds: float = 1.0, max_queued: int = DEFAULT_MAX_QUEUED_ROWS,
                 delay_seconds: float = 0.0, max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES):
        self.path = Path(path)
        self.flush_seconds = flush_seconds
        # rows land this long after their request at the earliest, as Databricks' rows can arrive
        # up to an hour late: what reads the table must not take a recent gap for no traffic
        self.delay_seconds = delay_seconds
        self.max_queued, self.max_queued_bytes = max_queued, max_queued_bytes
        self._held: list[tuple[dict, int]] = []  # (row, its bytes) logged, not committed: queued or to retry
        self._held_bytes = 0
        self._dropped = 0  # since the last row written, which says so
        self.dropped_total = 0  # since this logger started
        self._lock = threading.Lock()  # guards the four above; never held while writing
        self._flushing = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"inference-log-{self.path.name}", daemon=True)
        self._thread.start()

    @property
    def held(self) -> tuple[int, int]:
        """Rows and bytes held now, queued or waiting for a retry."""
        with self._lock:
            return len(self._held), self._held_bytes

    def log(self, row: dict[str, Any]) -> None:
        """Queue ``row``, or drop it when the bounds are reached; never blocks and never raises into
        the request."""
        size = row_bytes(row)
        with self._lock:
            if len(self._held) >= self.max_queued or self._held_bytes + size > self.max_queued_bytes:
                self._dropped += 1
                self.dropped_total += 1
                return
            self._held.append((row, size))
            self._held_bytes += size

    def flush(self, everything: bool = False) -> int:
        """Write the queued rows that are due (all of them with ``everything``); the rows
        committed (0 when a write failed: they stay held, for the next flush)."""
        with self._flushing:  # the background thread and a caller must not write the same rows twice
            return self._flush(everything)

    def _flush(self, everything: bool) -> int:
        due_before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=self.delay_seconds)
        with self._lock:
            due = [(r, n) for r, n in self._held if everything or r["request_time"] <= due_before]
            dropped = self._dropped
        if not due:
            return 0
        rows = [r for r, _ in due]
        if dropped:  # rows were dropped: say so on the row that follows the gap
            rows[0] = {**rows[0], "logging_error_codes": [*rows[0]["logging_error_codes"], f"{ROWS_DROPPED}:{dropped}"]}
        try:
            import pyarrow as pa
            from deltalake import write_deltalake

            write_deltalake(str(self.path), pa.Table.from_pylist(rows, schema=inference_schema()), mode="append")
        except Exception:  # a full disk or a locked table must not take serving down; retried next flush
            log.exception("inference table %s: %d rows not written yet", self.path, len(due))
            return 0
        written = {id(r) for r, _ in due}
        with self._lock:
            self._held = [(r, n) for r, n in self._held if id(r) not in written]
            self._held_bytes -= sum(n for _, n in due)
            self._dropped -= dropped
        return len(due)

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            self.flush()

    def close(self) -> None:
        """Stop the thread and write everything still queued, due or not: nothing answered is lost."""
        self._stop.set()
        self._thread.join()
        self.flush(everything=True)
