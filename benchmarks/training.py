"""Training benchmarks: data loading against a plain decode+resize loop, CPU training throughput
per task, and the detection quality a time-boxed CPU run reaches on the synthetic shapes.

Usage:
  python benchmarks/training.py loading  [--images 400] [--workers 2]
  python benchmarks/training.py throughput [--steps 6]
  python benchmarks/training.py quality  [--minutes 5] [--images 400]
Generated data is cached under benchmarks/.data.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent
DATA = HERE / ".data"


def _dataset(n: int, size: tuple[int, int], seed: int = 4):
    from lakevision.data.synthetic import generate_dataset

    out = DATA / f"train_{n}_{size[0]}_{size[1]}"
    if not (out / "done").exists():
        generate_dataset(out, num_images=n, seed=seed, image_size=size)
        (out / "done").write_text("ok")
    doc = json.loads((out / "annotations" / "instances.json").read_text())
    by_image = {im["id"]: [] for im in doc["images"]}
    for a in doc["annotations"]:
        by_image[a["image_id"]].append(a)
    paths = [str(out / "images" / im["file_name"]) for im in doc["images"]]
    return out, paths, [{"image_id": i, "annotations": a} for i, a in by_image.items()]


def _decode_resize(path: str, size: int = 320) -> np.ndarray:
    """The baseline's work per image: decode, upright, RGB, resize; the pixels go back to the caller."""
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        scale = size / max(im.size)
        return np.asarray(im.resize((round(im.width * scale), round(im.height * scale)), Image.BILINEAR))


def bench_loading(n: int, workers: int, size: int = 320) -> None:
    from torch.utils.data import DataLoader

    from lakevision.data.dataset import COCODataset, worker_collate_fn
    from lakevision.data.transforms import build_transform

    _, paths, records = _dataset(n, (320, 640))
    ds = COCODataset(paths, records, build_transform("detection", size, train=False), "detection")
    for p in paths:  # warm the page cache for both sides
        Path(p).read_bytes()
    best_ours = best_loop = float("inf")
    for _ in range(2):
        t = time.perf_counter()
        with get_context("fork").Pool(workers) as pool:
            list(pool.imap(_decode_resize, paths, chunksize=8))
        best_loop = min(best_loop, time.perf_counter() - t)
        t = time.perf_counter()
        for _ in DataLoader(ds, batch_size=8, num_workers=workers, collate_fn=worker_collate_fn):
            pass
        best_ours = min(best_ours, time.perf_counter() - t)
    print(f"data loading, detection at {size} px, {n} images, {workers} worker processes:")
    print(f"  plain PIL decode+resize pool: {n / best_loop:7.1f} img/s")
    print(f"  COCODataset + DataLoader:     {n / best_ours:7.1f} img/s   ratio {best_loop / best_ours:.2f}x (goal >= 0.9x)")


def bench_throughput(steps: int) -> None:
    import pytorch_lightning as pl
    import torch
    from torch.utils.data import DataLoader

    from lakevision.config import ModelSettings
    from lakevision.data.dataset import COCODataset, collate_fn
    from lakevision.data.transforms import build_transform
    from lakevision.packaging.architectures import build_model
    from lakevision.training.module import BaseModel

    _, paths, records = _dataset(400, (320, 640))
    m = ModelSettings()
    cases = [("classification", "resnet18", 224, 16, False), ("detection", "fasterrcnn_mobilenet_v3_large_320_fpn", 320, 4, False),
             ("detection", "fasterrcnn_resnet18_fpn", 320, 4, False), ("segmentation", "maskrcnn_resnet18_fpn", 320, 2, False),
             ("segmentation", "maskrcnn_resnet50_fpn", 320, 2, False), ("segmentation", "deeplabv3_mobilenet_v3_large", 320, 4, True)]
    print(f"CPU training throughput, one process, {torch.get_num_threads()} threads, from scratch:")
    for task, arch, size, batch, semantic in cases:
        ds = COCODataset(paths, records, build_transform(task, size, True, semantic=semantic), task, semantic=semantic)
        model = build_model(task, arch, ds.num_classes, "none", size, m.rois_per_image, m.rpn_proposals)
        module = BaseModel(model, 1e-3, 1e-5, task, num_classes=ds.num_classes, semantic=semantic)
        collate = None if task == "classification" or semantic else collate_fn
        loader = DataLoader(ds, batch_size=batch, shuffle=True, num_workers=1, collate_fn=collate)

        class Timer(pl.Callback):
            def on_train_batch_start(self, trainer, *a):
                if trainer.global_step == 1:
                    self.t = time.perf_counter()

        timer = Timer()
        trainer = pl.Trainer(max_steps=steps + 1, accelerator="cpu", logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False, callbacks=[timer])
        trainer.fit(module, loader)
        elapsed = time.perf_counter() - timer.t
        print(f"  {task:<14} {arch:<40} {size} px batch {batch}: {steps * batch / elapsed:6.2f} img/s", flush=True)


def bench_quality(minutes: float, n: int) -> None:
    """The train job itself, on an ingested dataset, with a time budget for fit()."""
    out, _, _ = _dataset(n, (160, 320), seed=7)
    root = Path(tempfile.mkdtemp(prefix="lv-quality-"))
    env = dict(os.environ, LAKEVISION_CONFIG_DIR=str(HERE.parent / "bundle" / "config"))
    cli = [sys.executable, "-m", "lakevision.cli"]
    subprocess.run([*cli, "ingest", "--annotations", str(out / "annotations" / "instances.json"),
                    "--images", str(out / "images"), "--root", str(root), "--json"], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    overrides = [f"training.optimization.max_minutes={minutes}", "training.optimization.max_epochs=1000",
                 "training.optimization.early_stopping_patience=null", "training.distributed.num_workers=2",
                 "training.data.loader_workers=1", "training.data.image_size=160", "training.model.learning_rate=0.001",
                 "training.optimization.warmup_epochs=0.5"]
    t = time.perf_counter()
    proc = subprocess.run([*cli, "train", "--task", "detection", "--root", str(root), "--json",
                           *[a for o in overrides for a in ("--set", o)]], capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode:
        print(proc.stderr[-3000:])
        raise SystemExit(proc.returncode)
    result = json.loads(proc.stdout)
    m = result["metrics"]
    print(f"detection quality of {result['architecture']} after a {minutes:g}-minute fit() budget on CPU "
          f"(2 Ray workers, {n} images, 160 px):")
    print(f"  wall {wall:.0f} s (Ray start, fit, model logging); val mAP@0.5 {m.get('val_map_50', float('nan')):.3f} "
          f"(best {result['best_metric']['value']:.3f}), val mAP {m.get('val_map', float('nan')):.3f} (goal mAP@0.5 >= 0.5)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    a = sub.add_parser("loading")
    a.add_argument("--images", type=int, default=400)
    a.add_argument("--workers", type=int, default=2)
    b = sub.add_parser("throughput")
    b.add_argument("--steps", type=int, default=6)
    c = sub.add_parser("quality")
    c.add_argument("--minutes", type=float, default=5.0)
    c.add_argument("--images", type=int, default=400)
    args = p.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
    if args.what == "loading":
        bench_loading(args.images, args.workers)
    elif args.what == "throughput":
        bench_throughput(args.steps)
    else:
        bench_quality(args.minutes, args.images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
