"""A load test of the local workspace: 8 concurrent clients on 127.0.0.1, a bounded number of
requests and a time limit, while the endpoint goes through a canary, a promote and a rollback.
No request may get a server error, every answered request must be in the inference table, and
the process' memory must stay bounded."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests
from deltalake import DeltaTable

from lakevision.local.workspace.endpoints import LocalWorkspace
from lakevision.serving.client import workspace_client
from lakevision.tracking import local_tracking_uri

from .test_inference_table import _table
from .test_workspace import RECORDS, TOKEN, V1, V2, entity, name_of, registry, split  # noqa: F401
from .test_workspace import config as endpoint_config

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

CLIENTS, REQUESTS_EACH = 8, 60
MAX_RSS_GROWTH_MB = 300  # measured: see benchmarks/RESULTS.md


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def test_eight_clients_through_a_canary_promote_and_rollback(registry, tmp_path):  # noqa: F811
    root = tmp_path / "ws"
    with LocalWorkspace(root, TOKEN, tracking_uri=local_tracking_uri(registry), seed=5) as ws:
        w = workspace_client(ws.url, TOKEN, retry_timeout_seconds=5)
        w.serving_endpoints.create_and_wait("load", config=endpoint_config("load", entity(V1)))
        w.serving_endpoints.put_ai_gateway("load", inference_table_config=_table(prefix="load"))
        url, headers = f"{ws.url}/serving-endpoints/load/invocations", {"Authorization": f"Bearer {TOKEN}"}
        before = _rss_mb()
        peak = [before]
        done = threading.Event()

        def sample_memory() -> None:
            while not done.wait(0.05):
                peak[0] = max(peak[0], _rss_mb())

        def client(_: int) -> list[tuple[int, float, str]]:
            out = []
            with requests.Session() as session:
                for _ in range(REQUESTS_EACH):
                    t0 = time.perf_counter()
                    r = session.post(url, json={"dataframe_records": RECORDS}, headers=headers, timeout=30)
                    out.append((r.status_code, time.perf_counter() - t0, r.headers.get("served-model-name", "")))
            return out

        sampler = threading.Thread(target=sample_memory, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            futures = [pool.submit(client, i) for i in range(CLIENTS)]
            # while they run: a 50% canary of v2, its promotion, and a rollback to v1
            for served, traffic in ([entity(V1), entity(V2)], split(v1=50, v2=50)), ([entity(V2)], None), \
                                   ([entity(V1)], None):
                w.serving_endpoints.update_config_and_wait("load", served_entities=served, traffic_config=traffic)
            results = [r for f in futures for r in f.result(timeout=180)]
        wall = time.perf_counter() - t0
        done.set()
        sampler.join()
    # the workspace has stopped: whatever it answered is in the table
    statuses = [s for s, _, _ in results]
    latencies = np.array([t for _, t, _ in results]) * 1000
    served = {n for _, _, n in results}
    rows = DeltaTable(str(root / "tables" / "lakevision" / "load_payload")).to_pandas()
    print(f"{len(results)} requests from {CLIENTS} clients in {wall:.2f} s ({len(results) / wall:.1f} req/s), "
          f"p50 {np.percentile(latencies, 50):.1f} ms, p99 {np.percentile(latencies, 99):.1f} ms, served by "
          f"{sorted(served)}; RSS {before:.0f} MB -> peak {peak[0]:.0f} MB; {len(rows)} rows in the table")
    assert len(results) == CLIENTS * REQUESTS_EACH
    assert [s for s in statuses if s >= 500] == [] and set(statuses) == {200}
    assert served == {name_of(V1), name_of(V2)}  # the config changes happened while they ran
    assert len(rows) == len(results) and set(rows["status_code"]) == {200}
    assert rows["databricks_request_id"].is_unique
    assert peak[0] - before < MAX_RSS_GROWTH_MB
