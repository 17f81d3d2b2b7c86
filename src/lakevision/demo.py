"""``make demo``: the sample dataset through the bundle's ``cv_pipeline`` job on this machine, then
one query to the deployed endpoint and a report of what every stage left behind."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from lakevision.bundle.loader import load_bundle
from lakevision.local.job_runner import SUCCESS, JobRun, LocalJobRunner
from lakevision.local.bundle_cli import print_task_progress
from lakevision.runtime import LocalLayout, local_root

DEMO_JOB = "cv_pipeline"
DEMO_TARGET = "local"


def query_endpoint(root: Path, endpoint: str, images: list[Path], host: str | None = None) -> list[dict[str, Any]]:
    """Ask ``endpoint`` about each image, one request each: on ``host`` (token from
    ``DATABRICKS_TOKEN``), or on a local workspace started again over ``root`` (endpoints persist)."""
    from lakevision.serving.client import resolve_token
    from lakevision.serving.model_server import ModelServer
    from lakevision.local.workspace.process import local_workspace_process

    with contextlib.ExitStack() as stack:
        url, token = (host, resolve_token()) if host else stack.enter_context(local_workspace_process(root))
        server = ModelServer(url, token, "")
        answers = []
        for image in images:
            t0 = time.perf_counter()
            preds, served_by = server.query(endpoint, [base64.b64encode(image.read_bytes()).decode()])
            answers.append({"image": str(image), "served_by": served_by,
                            "latency_ms": round((time.perf_counter() - t0) * 1000, 1), "prediction": preds[0]})
        state = server.monitor_endpoint(endpoint)
    for answer in answers:
        answer.update(state=state["state"], routes=state["routes"])
    return answers


def demo_figures(run: JobRun, sample: dict | None, seconds: float) -> dict[str, Any]:
    """What a demo run is judged by: its minutes and test metrics, each stage's seconds, and the
    fixed costs: the train task less Lightning's fit() (Ray, setup, packaging), evaluate, the first query."""
    stages = {t.task_key: round(t.seconds, 1) for t in run.tasks if t.attempts}
    train = next((t for t in run.tasks if t.task_key == "train"), None)
    fit = (train.values.get("seconds") or {}).get("fit") if train else None
    evaluate = next((t for t in run.tasks if t.task_key == "evaluate"), None)
    return {
        "status": run.status, "minutes": round(seconds / 60, 2), "stages": stages,
        "test_metrics": (evaluate.values.get("metrics") or {}) if evaluate else {},
        "train_overhead_s": round(train.seconds - fit, 1) if train and fit is not None else None,
        "evaluate_s": stages.get("evaluate"),
        "first_query_ms": sample["latency_ms"] if sample else None,
    }


def _report(run: JobRun, root: Path, sample: dict | None, figures: dict[str, Any]) -> list[str]:
    values = {t.task_key: t.values for t in run.tasks}
    status = {t.task_key: t.status for t in run.tasks}
    lines = ["", "=" * 72, f"lakevision demo: {run.job_key} {run.status} in {run.seconds / 60:.1f} min", "=" * 72]
    ingest = values.get("ingest") or {}
    if ingest:
        versions = ", ".join(f"{k} v{v}" for k, v in ingest["table_versions"].items())
        lines.append(f"Delta tables under {root / 'tables'}: {versions}; {ingest['quarantined']} records quarantined")
    train = values.get("train") or {}
    if train:
        # no best value when no epoch produced the metric (e.g. max_epochs=0 or every val batch empty)
        best = "n/a" if train.get("best_value") is None else f"{train['best_value']:.3f}"
        lines.append(f"MLflow run {train['run_id']}: {train['model_uri']} (best {train['best_metric']} "
                     f"{best}, data version {train['data_version']})")
        if train.get("seconds"):
            lines.append("train: " + ", ".join(f"{k} {v:.0f} s" for k, v in train["seconds"].items()))
    metrics = (values.get("evaluate") or {}).get("metrics") or {}
    if metrics:
        shown = {k: v for k, v in metrics.items() if k in ("map", "map_50", "map_75", "accuracy", "miou")}
        lines.append("test metrics: " + ", ".join(f"{k} {v:.3f}" for k, v in shown.items()))
    gate = values.get("gate") or {}
    if gate:
        registered = f", registered version {gate['model_version']}" if gate.get("model_version") else ""
        lines.append(f"gate: {'passed' if gate['passed'] else 'FAILED'}: {gate['message']}{registered}")
    deploy = values.get("deploy") or {}
    if deploy:
        lines.append(f"deploy: {deploy['status']} to endpoint {deploy['endpoint']}, champion version "
                     f"{deploy['champion_version']}")
    elif "deploy" in status:
        lines.append(f"deploy: {status['deploy']} (the gate did not pass)")
    if sample:
        pred = sample["prediction"]
        boxes = pred.get("boxes") or []
        top = sorted(zip(pred.get("scores") or [], pred.get("categories") or [], boxes, strict=False), reverse=True)[:3]
        lines.append(f"endpoint {sample['state']['ready']}; routes "
                     + ", ".join(f"{r['served_entity_name']} {r['traffic_percentage']}%" for r in sample["routes"]))
        lines.append(f"sample query ({Path(sample['image']).name}, {sample['latency_ms']} ms, {sample['served_by']}): "
                     f"{len(boxes)} boxes; top: " + "; ".join(f"{c} {s:.2f} {[round(x) for x in b]}" for s, c, b in top))
    if sample:
        lines.append(f"query it again: lakevision query --root {root} --endpoint {deploy['endpoint']} {sample['image']}")
    lines.append("stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in figures["stages"].items()))
    fixed = [f"train overhead (the task less fit()) {figures['train_overhead_s']:.0f} s"
             if figures["train_overhead_s"] is not None else None,
             f"evaluate {figures['evaluate_s']:.0f} s" if figures["evaluate_s"] is not None else None,
             f"first query {figures['first_query_ms']:.0f} ms" if figures["first_query_ms"] is not None else None]
    if any(fixed):
        lines.append("fixed costs: " + ", ".join(f for f in fixed if f))
    lines.append(f"task logs: {run.run_dir}")
    layout = LocalLayout(root)
    lines.append(f"MLflow UI: mlflow ui --backend-store-uri {layout.tracking_uri} --default-artifact-root {layout.artifacts}")
    return lines


def run_demo(root: str | os.PathLike | None = None, images: int = 400, bundle_dir: str | os.PathLike = ".") -> int:
    from lakevision.data.synthetic import DEFECT_CODES, generate_dataset

    root = local_root(root).resolve()
    t0 = time.monotonic()
    data_dir = root / "sample"
    print(f"generating {images} sample images (and one bad record of each kind) in {data_dir}", flush=True)
    ds = generate_dataset(data_dir, num_images=images, seed=0, defects={c: 1 for c in DEFECT_CODES})
    bundle = load_bundle(bundle_dir, DEMO_TARGET, local_files=True)
    print(f"running job {DEMO_JOB} of bundle {bundle.name} (target {DEMO_TARGET}) with data root {root}", flush=True)
    runner = LocalJobRunner(bundle, root, progress=print_task_progress)
    run = runner.run(DEMO_JOB, {"annotations": str(ds.annotation_file), "images": str(ds.image_dir)})
    sample = None
    deploy = next((t for t in run.tasks if t.task_key == "deploy"), None)
    if deploy is not None and deploy.status == SUCCESS:
        image = sorted(Path(ds.image_dir).iterdir())[0]
        (sample,) = query_endpoint(root, deploy.values["endpoint"], [image])
    figures = demo_figures(run, sample, time.monotonic() - t0)
    for line in _report(run, root, sample, figures):
        print(line)
    print(json.dumps(figures))  # the last line: what benchmarks/demo.py reads
    return 0 if run.status == SUCCESS else 1
