"""Serving latency: the local workspace's endpoint against `mlflow models serve`, same model, same client.

Both serve one registered lakevision pyfunc from the same sqlite registry, each in its own
process; one client (a keep-alive `requests.Session`, the transport the Databricks SDK uses)
sends the same base64 image, one request at a time, alternating blocks between the two servers
so that drift on a busy machine hits both alike. Printed: p50/p99 latency and requests/s of each,
and the p50 overhead of the workspace (routing, auth, per-entity metrics) over the baseline.
A fourth target serves version 2 without the table, to tell the two costs apart.
A third target is a second endpoint of the same workspace with its inference table on, serving
version 2 of the model: the same weights with feature records on (each prediction carries the
image's statistics and embedding, for drift). Its p50 against the first endpoint's (version 1,
no records, no table) is what logging every request and the feature records cost together, and
after the workspace stops, the table must hold every request it answered.

Usage: python benchmarks/serving.py [--requests 400] [--task classification] [--image-size 128]
Generated data and the MLflow store live under benchmarks/.data/serving.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import requests

HERE = Path(__file__).resolve().parent
DATA = HERE / ".data" / "serving"
ARCH = {"classification": "resnet18", "detection": "fasterrcnn_resnet18_fpn"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _register(task: str, image_size: int, root: Path) -> tuple[str, bytes]:
    """One untrained model of ``task`` registered twice (inference cost is what matters): version 1
    without feature records, version 2 with them."""
    import mlflow
    import torch

    from lakevision.data.synthetic import generate_dataset
    from lakevision.packaging.pyfunc import ServingSpec, log_image_model
    from lakevision.packaging.architectures import build_model

    ds = generate_dataset(root / "data", num_images=4, seed=1, image_size=(240, 320))
    image = sorted(ds.image_dir.iterdir())[0].read_bytes()
    mlflow.set_tracking_uri(f"sqlite:///{root / 'mlflow.db'}")
    mlflow.set_experiment("serving-benchmark")
    torch.manual_seed(0)
    n = 3 if task == "classification" else 4
    model = build_model(task, ARCH[task], n, "none", image_size, 64, 100)
    name = f"bench_{task}"
    for features in (False, True):
        spec = ServingSpec(task, False, image_size, [1, 2, 3], ["circle", "square", "triangle"],
                           architecture=ARCH[task], feature_output=features)
        with mlflow.start_run():
            info = log_image_model(model, spec, image)
        mlflow.register_model(info.model_uri, name)
    return name, image


def _wait_http(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[:4]} exited with {proc.returncode}")
        try:
            requests.get(url, timeout=1)
            return
        except requests.ConnectionError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer in {timeout} s")


def _timed(session: requests.Session, url: str, body: bytes, headers: dict, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = session.post(url, data=body, headers=headers, timeout=60)
        out.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {r.status_code}: {r.text[:300]}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=400, help="per server")
    ap.add_argument("--block", type=int, default=50, help="requests in a row before switching server")
    ap.add_argument("--task", choices=sorted(ARCH), default="classification")
    ap.add_argument("--image-size", type=int, default=128)
    args = ap.parse_args()

    from lakevision.packaging.pyfunc import IMAGE_COLUMN, encode_image
    from lakevision.serving.model_server import ModelServer
    from lakevision.local.workspace.process import local_workspace_process

    root = DATA / f"{args.task}_{args.image_size}_{int(time.time())}"
    root.mkdir(parents=True)
    name, image = _register(args.task, args.image_size, root)
    # `mlflow models serve` execs `uvicorn` by name: this interpreter's scripts must be on PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    port = _free_port()
    baseline = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}/1",
                                 "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    body = json.dumps({"dataframe_records": [{IMAGE_COLUMN: encode_image(image)}]}).encode()
    json_headers = {"Content-Type": "application/json"}
    try:
        with local_workspace_process(root) as (url, token):
            server = ModelServer(url, token, name, "1")
            server.create_endpoint("bench", "Standard_DS3_v2", 0, 1)
            ModelServer(url, token, name, "2").create_endpoint("bench-records", "Standard_DS3_v2", 0, 1)
            ModelServer(url, token, name, "2").create_endpoint("bench-logged", "Standard_DS3_v2", 0, 1)
            server.enable_inference_table("bench-logged", None, "bench", "bench_logged")
            _wait_http(f"http://127.0.0.1:{port}/ping", baseline)
            targets = {
                "mlflow models serve": (f"http://127.0.0.1:{port}/invocations", json_headers),
                "local workspace": (f"{url}/serving-endpoints/bench/invocations",
                                    {**json_headers, "Authorization": f"Bearer {token}"}),
                "workspace + records": (f"{url}/serving-endpoints/bench-records/invocations",
                                         {**json_headers, "Authorization": f"Bearer {token}"}),
                "workspace + table + records": (f"{url}/serving-endpoints/bench-logged/invocations",
                                                {**json_headers, "Authorization": f"Bearer {token}"}),
            }
            session = requests.Session()
            for target, headers in targets.values():  # warm-up: lazy imports, allocator, caches
                _timed(session, target, body, headers, 20)
            times: dict[str, list[float]] = {k: [] for k in targets}
            wall: dict[str, float] = {k: 0.0 for k in targets}
            while len(times["local workspace"]) < args.requests:
                for label, (target, headers) in targets.items():
                    t0 = time.perf_counter()
                    times[label] += _timed(session, target, body, headers, args.block)
                    wall[label] += time.perf_counter() - t0
    finally:
        baseline.send_signal(signal.SIGTERM)
        baseline.wait(30)

    print(f"task {args.task} ({ARCH[args.task]}, image size {args.image_size}), {args.requests} requests per "
          f"server in blocks of {args.block}, one at a time, keep-alive")
    print(f"{'server':<28} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7}")
    stats = {}
    for label, ts in times.items():
        p50, p99 = np.percentile(ts, 50), np.percentile(ts, 99)
        stats[label] = p50
        print(f"{label:<28} {p50:8.2f} {p99:8.2f} {len(ts) / wall[label]:7.1f}")
    ratio = stats["local workspace"] / stats["mlflow models serve"]
    print(f"p50 ratio local workspace / mlflow models serve = {ratio:.3f} (overhead {100 * (ratio - 1):+.1f}%; "
          "goal <= +10%)")
    records = stats["workspace + records"] / stats["local workspace"]
    print(f"p50 ratio with / without feature records (no table) = {records:.3f} ({100 * (records - 1):+.1f}%)")
    logged = stats["workspace + table + records"] / stats["local workspace"]
    print(f"p50 ratio with / without the inference table and feature records = {logged:.3f} "
          f"({100 * (logged - 1):+.1f}%; goal <= +10%)")
    from deltalake import DeltaTable

    rows = len(DeltaTable(str(root / "tables" / "bench" / "bench_logged_payload")).to_pyarrow_table())
    sent = len(times["workspace + table + records"]) + 20  # with the warm-up
    print(f"inference table rows after shutdown: {rows} of {sent} requests answered")


if __name__ == "__main__":
    main()
