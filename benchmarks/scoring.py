"""Batch scoring: the score job through Spark (Sail here) against a one-process loop over the same pyfunc.

The same 2,000 ingested images (the sample generator's shapes, 160-320 px) are scored by the trained
detector three ways, each in a fresh child process so that model loads and peak memory are its own:

- ``loop``: one process reads each file and calls the registered pyfunc's ``predict`` with the base64
  image, as a client of the served model would, with torch's default threads (all cores);
  ``loop-t1`` the same on one torch thread;
- ``spark-2`` / ``spark-1``: ``run_scoring`` (the score job's library call) with 2 or 1 partitions into
  a fresh output table: the model staged, loaded once per worker process, files read on the
  workers in byte-sized batches, one MERGE. Torch threads per task follow the job's rule (cores /
  concurrent tasks: 1 each for 2 partitions, 2 for 1); ``spark-1-t1`` gives the one task 1 thread.

Times include loading the model in every mode (and for Spark, staging it, the anti-join with the
output table and the MERGE); not Sail's start (about a second, once per job). Printed: images/s,
the ratio to the loop, model loads and peak RSS of each child process.

``ops-tN`` (not in the default modes) profiles the model's own forward pass on N torch threads over
the first 20 images and prints each operator's self time: where a second thread helps and where it
cannot (an operator whose time does not drop runs on one thread).

Usage: python benchmarks/scoring.py [--images 2000] [--modes loop,spark-2,spark-1,spark-1-t1,ops-t1,ops-t2]
                                    [--tracking-uri URI --model-uri URI]
The model defaults to the champion `make demo` trained (the local target's registered model in
./.lakevision); it is copied (weights and spec) into the benchmark's own registry under
benchmarks/.data/scoring, with the generated images and their Delta tables.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = HERE / ".data" / "scoring"
MODEL = "bench_detector"


def _config():
    from lakevision.config import load_config

    return load_config(REPO / "bundle" / "config", "local", [f"deployment.model_name={MODEL}"])


def _demo_model() -> tuple[str, str]:
    from lakevision.bundle.loader import load_bundle

    name = load_bundle(REPO, "local", local_files=True).resources["registered_models"]["detector"]["name"]
    return f"sqlite:///{REPO / '.lakevision' / 'mlflow.db'}", f"models:/{name}@champion"


def prepare(images: int, tracking_uri: str | None, model_uri: str | None) -> Path:
    """Generated images ingested under ``DATA/root-N``, and the detector registered there as the champion."""
    import mlflow

    from lakevision import delta
    from lakevision.data.ingest import run_ingest
    from lakevision.data.synthetic import generate_dataset
    from lakevision.packaging.pyfunc import ModelLoadError, load_image_model, log_image_model
    from lakevision.registry.model_registry import CHAMPION, ModelRegistry
    from lakevision.runtime import get_runtime

    root = DATA / f"root-{images}"
    rt = get_runtime(_config(), root)
    try:
        ref = rt.table("images")
        if not delta.table_exists(rt.spark, ref) or delta.read_table(rt.spark, ref).count() != images:
            ds = generate_dataset(DATA / f"data-{images}", num_images=images, seed=3)
            run_ingest(rt, str(ds.annotation_file), str(ds.image_dir))
        registry = ModelRegistry(rt, MODEL)
        if registry.by_alias(CHAMPION) is None:
            default_tracking, default_model = _demo_model()
            mlflow.set_tracking_uri(tracking_uri or default_tracking)
            mlflow.set_registry_uri(tracking_uri or default_tracking)
            try:
                source = load_image_model(model_uri or default_model)
            except ModelLoadError as exc:
                sys.exit(f"{exc}\nTrain one with `make demo`, or name a lakevision pyfunc with --tracking-uri and "
                         "--model-uri")
            example = Path(delta.read_table(rt.spark, ref).first()["path"]).read_bytes()
            mlflow.set_tracking_uri(rt.tracking_uri)
            mlflow.set_registry_uri(rt.registry_uri)
            mlflow.set_experiment("scoring-benchmark")
            with mlflow.start_run(run_name=f"copy of {model_uri or default_model}"):
                info = log_image_model(source.model, source.spec, example)
            version, _ = registry.register(info.model_uri)
            registry.set_alias(CHAMPION, version.version)
        print(f"data: {images} images in {ref.location}; model: {registry.by_alias(CHAMPION).registry_uri} "
              f"({registry.by_alias(CHAMPION).model_uri})", flush=True)
    finally:
        rt.stop()
    return root


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _image_paths(root: Path) -> list[str]:
    """The benchmark's image files in the images table's order, with MLflow pointed at its registry."""
    import mlflow
    from deltalake import DeltaTable

    from lakevision.runtime import LocalLayout

    layout = LocalLayout(root)
    mlflow.set_tracking_uri(layout.tracking_uri)
    mlflow.set_registry_uri(layout.tracking_uri)
    table = DeltaTable(str(layout.table(_config().target.schema_, "images")))
    return table.to_pandas(columns=["id", "path"]).sort_values("id")["path"].tolist()


def child_loop(root: Path, threads: int = 0) -> dict:
    """One process: the pyfunc's predict per image, in the images table's order (torch's default
    threads, or ``threads``)."""
    import base64

    import pandas as pd
    import torch

    if threads:
        torch.set_num_threads(threads)

    from lakevision.packaging.pyfunc import IMAGE_COLUMN, load_pyfunc

    paths = _image_paths(root)
    t0 = time.perf_counter()
    model, _ = load_pyfunc(f"models:/{MODEL}@champion")
    loaded = time.perf_counter() - t0
    boxes = 0
    for path in paths:
        answer = model.predict(pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(Path(path).read_bytes()).decode()]}))
        boxes += len(answer["boxes"].iloc[0])
    seconds = time.perf_counter() - t0
    return {"images": len(paths), "seconds": seconds, "model_load_s": loaded, "model_loads": 1, "boxes": boxes,
            "torch_threads": torch.get_num_threads(), "peak_rss_mib": _peak_rss_mib()}


def child_ops(root: Path, threads: int, images: int = 20, top: int = 8) -> dict:
    """Operator self times (ms per image) of the model's forward pass on ``threads`` torch threads,
    from torch's profiler, after one warm-up image."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from lakevision.packaging.pyfunc import decode_file, load_image_model, raw_outputs

    torch.set_num_threads(threads)
    paths = _image_paths(root)[:images + 1]
    image_model = load_image_model(f"models:/{MODEL}@champion")
    arrays = [decode_file(Path(p).read_bytes(), image_model.spec).array for p in paths]
    raw_outputs(image_model.model, arrays[:1], image_model.spec)
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        raw_outputs(image_model.model, arrays[1:], image_model.spec)
    seconds = time.perf_counter() - t0
    ops = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    n = len(arrays) - 1
    return {"images": n, "seconds": seconds, "torch_threads": threads, "ms_per_image": 1000 * seconds / n,
            "self_ms_per_image": {e.key: round(e.self_cpu_time_total / 1000 / n, 2) for e in ops},
            "model_loads": 1, "peak_rss_mib": _peak_rss_mib()}


def child_spark(root: Path, partitions: int, threads: int = 0) -> dict:
    from lakevision.runtime import get_runtime
    from lakevision.scoring.score import run_scoring

    config = _config()
    config = config.model_copy(update={"deployment": config.deployment.model_copy(update={
        "scoring": config.deployment.scoring.model_copy(update={"round_images": 1_000_000,
                                                                 "threads_per_task": threads})})})
    t0 = time.perf_counter()
    rt = get_runtime(config, root)
    started = time.perf_counter() - t0
    try:
        table = f"bench_p{partitions}_{int(time.time())}"
        result = run_scoring(rt, output_table=table, partitions=partitions)
    finally:
        rt.stop()
    import torch

    return {"images": result.scored, "errors": result.errors, "seconds": result.seconds, "sail_start_s": started,
            "partitions": result.partitions, "threads_per_task": threads or max(1, (os.cpu_count() or 1) // partitions),
            "main_thread_torch_threads": torch.get_num_threads(), "model_loads": result.model_loads,
            "worker_processes": result.worker_processes, "peak_rss_mib": _peak_rss_mib()}


def _run_child(mode: str, root: Path) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", mode, "--root", str(root)], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--modes", default="loop,spark-2,spark-1,spark-1-t1")
    parser.add_argument("--tracking-uri", default=None, help="where --model-uri is (default: ./.lakevision's store)")
    parser.add_argument("--model-uri", default=None, help="a lakevision pyfunc (default: the demo's champion)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--root", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("RUST_LOG", "warn,sail_common::actor=error")
    if args.child:
        root = Path(args.root)
        # spark-P: P partitions, threads per task by the job's rule; spark-P-tN: N torch threads per task
        mode = args.child.split("-")
        if mode[0] == "loop":  # loop, loop-tN
            out = child_loop(root, int(mode[1][1:]) if len(mode) > 1 else 0)
        elif mode[0] == "ops":  # ops-tN
            out = child_ops(root, int(mode[1][1:]))
        else:
            out = child_spark(root, int(mode[1]), int(mode[2][1:]) if len(mode) > 2 else 0)
        print(json.dumps(out))
        return
    root = prepare(args.images, args.tracking_uri, args.model_uri)
    print(f"{os.cpu_count()} cores; modes in this order, each in a fresh process: {args.modes}", flush=True)
    results = {}
    for mode in args.modes.split(","):
        results[mode] = r = _run_child(mode, root)
        r["images_per_s"] = r["images"] / r["seconds"]
        print(f"{mode:8} {json.dumps(r)}", flush=True)
    profiled = {m: results.pop(m) for m in [*results] if m.startswith("ops")}
    if profiled:
        names = list(dict.fromkeys(k for r in profiled.values() for k in r["self_ms_per_image"]))
        print("\nforward pass, self ms per image by operator:\n| operator | " + " | ".join(profiled) + " |\n"
              "|---|" + "---:|" * len(profiled))
        for name in names:
            print(f"| {name} | " + " | ".join(f"{r['self_ms_per_image'].get(name, 0):.1f}" for r in profiled.values())
                  + " |")
        print("| whole forward pass (under the profiler) | "
              + " | ".join(f"{r['ms_per_image']:.1f}" for r in profiled.values()) + " |")
    if not results:
        return
    base = results.get("loop") or next((r for m, r in results.items() if m.startswith("loop")), None)
    print("\n| mode | images | seconds | images/s | vs loop | model loads | peak RSS MiB |\n|---|---:|---:|---:|---:|---:|---:|")
    for mode, r in results.items():
        ratio = f"{r['images_per_s'] / base['images_per_s']:.2f}x" if base else "-"
        print(f"| {mode} | {r['images']:,} | {r['seconds']:.1f} | {r['images_per_s']:.2f} | {ratio} | "
              f"{r['model_loads']} | {r['peak_rss_mib']:.0f} |")
    if "spark-1" in results and "spark-2" in results:
        print(f"\n2 vs 1 partitions: {results['spark-2']['images_per_s'] / results['spark-1']['images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
