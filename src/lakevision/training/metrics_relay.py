"""Per-epoch metrics from Ray workers to the driver's MLflow run, without MLflow on the workers.

A Ray worker on a Databricks cluster has no workspace credentials: an MLflow call there fails
unless the driver exports a token into every worker's environment before Ray-on-Spark starts.
Instead, rank 0 appends one JSON line per epoch to a file on the storage the driver and the
workers share (the run's checkpoint folder, a Unity Catalog volume on Databricks), and a thread
on the driver logs each new line into the run as it arrives. The same path runs on a laptop.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path

from lakevision.tracking import mlflow_client

log = logging.getLogger(__name__)
_MLFLOW_BATCH = 1000  # metrics per log_batch call, MLflow's limit


def append_epoch(path: str | os.PathLike, epoch: int, metrics: dict[str, float]) -> None:
    """Rank 0's side: one complete line per epoch, on disk before the epoch is reported."""
    line = json.dumps({"epoch": epoch, "timestamp_ms": int(time.time() * 1000), "metrics": metrics}) + "\n"
    with open(path, "a", encoding="utf-8") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())


class MetricsRelay:
    """The driver's side: tails ``path`` and logs every complete line into ``run_id``."""

    def __init__(self, path: str | os.PathLike, tracking_uri: str, run_id: str, interval_s: float = 1.0):
        self.path = Path(path)
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.interval_s = interval_s
        self._offset = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="lakevision-metrics-relay", daemon=True)
        self.epochs_logged = 0

    def __enter__(self) -> MetricsRelay:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.drain()  # lines written after the last poll

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.drain()
            except Exception:  # a failed MLflow call must not end training; the final drain retries
                log.warning("could not relay epoch metrics to MLflow yet", exc_info=True)

    def drain(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, "rb") as f:
            f.seek(self._offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next drain
        if not end:
            return
        from mlflow.entities import Metric

        metrics = []
        for raw in data[:end].splitlines():
            row = json.loads(raw)
            metrics += [Metric(k, float(v), int(row["timestamp_ms"]), int(row["epoch"]))
                        for k, v in row["metrics"].items()]
        client = mlflow_client(self.tracking_uri)
        for i in range(0, len(metrics), _MLFLOW_BATCH):
            client.log_batch(self.run_id, metrics=metrics[i:i + _MLFLOW_BATCH])
        self.epochs_logged += len(data[:end].splitlines())
        self._offset += end
