"""Training benchmarks: data loading against a plain decode+resize loop, CPU training throughput
per task, and the detection quality a time-boxed CPU run reaches on the synthetic shapes.

Usage:
  python benchmarks/training.py loading  [--images 400] [--workers 2]
  python benchmarks/training.py throughput [--steps 6]
  python benchmarks/training.py quality  [--minutes 5] [--images 400]
  python benchmarks/training.py ray-overhead [--images 240] [--epochs 2]
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


def _splits(n: int):
    """SplitRecords of generated data, 80% train and 20% val, as the train job hands them to workers."""
    from lakevision.data.samples import SplitRecords

    out, paths, records = _dataset(n, (160, 320), seed=7)
    cats = json.loads((out / "annotations" / "instances.json").read_text())["categories"]
    ids, names = [c["id"] for c in cats], [c["name"] for c in cats]
    cut = int(0.8 * n)

    def split(sl: slice, name: str) -> SplitRecords:
        return SplitRecords(paths[sl], records[sl], ids, names, f"bench.{name}", 0)

    return split(slice(0, cut), "train"), split(slice(cut, n), "val")


def bench_ray_overhead(n: int, epochs: int, batch: int) -> None:
    """RayTrainer with 2 CPU workers (batch ``batch`` each, one loader process each) against one plain
    Lightning process on both cores (batch 2 x ``batch``, one loader process): the same images,
    steps and validation per epoch. Compared: images/s of the last epoch (train + val, as
    ``epoch_seconds`` measures both sides), and the fixed cost of each side's fit."""
    import pytorch_lightning as pl
    import torch

    from lakevision.config import load_config
    from lakevision.packaging.architectures import build_model
    from lakevision.tracking import ExperimentTracker
    from lakevision.training.module import BaseModel
    from lakevision.training.ray_trainer import RayTrainer, _EpochLogger, make_loaders

    train, val = _splits(n)
    # the demo's settings (the cpu profile the local target sets), for a fixed number of epochs
    settings = load_config(HERE.parent / "bundle" / "config", "local", [
        f"training.data.batch_size={batch}", f"training.optimization.max_epochs={epochs}",
        "training.optimization.max_minutes=null", "training.distributed.cluster=local",
        "training.distributed.max_failures=0"], profile="cpu").training
    m = settings.model

    def module() -> BaseModel:
        torch.manual_seed(0)
        net = build_model("detection", m.architectures.detection, len(train.category_ids) + 1, "none",
                          settings.data.image_size, m.rois_per_image, m.rpn_proposals, m.box_head_size)
        return BaseModel(net, m.learning_rate, m.weight_decay, "detection", num_classes=len(train.category_ids) + 1,
                         warmup_epochs=settings.optimization.warmup_epochs)

    def epochs_from(path: Path) -> list[float]:
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return [r["metrics"]["epoch_seconds"] for r in sorted(rows, key=lambda r: r["epoch"])]

    tmp = Path(tempfile.mkdtemp(prefix="lv-rayovh-"))
    # plain: the worker's Trainer settings, no strategy, one process, torch's threads on all cores
    cfg = {"task": "detection", "semantic": False, "train": train, "val": val,
           "data": {**settings.data.model_dump(), "batch_size": 2 * batch}}
    plain_file = tmp / "plain.jsonl"
    opt = settings.optimization
    t = time.perf_counter()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=[_EpochLogger(str(plain_file))],
                         precision="32-true", gradient_clip_val=opt.gradient_clip_val, num_sanity_val_steps=0,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         logger=False)
    trainer.fit(module(), *make_loaders(cfg))
    plain_wall = time.perf_counter() - t
    plain = epochs_from(plain_file)

    tracking = f"sqlite:///{tmp / 'mlflow.db'}"
    with ExperimentTracker("ray-overhead", tracking_uri=tracking, run_name="ray") as tracker:
        t = time.perf_counter()
        RayTrainer(module(), num_workers=2, use_gpu=False, settings=settings).train(
            {"train": train, "val": val, "storage_path": str(tmp / "ray"), "name": "ray",
             "tracking_uri": tracking, "run_id": tracker.run_id, "log_to_driver": False})
        ray_wall = time.perf_counter() - t
    ray = epochs_from(tmp / "ray" / "ray.metrics.jsonl")
    images = len(train.image_paths) + len(val.image_paths)
    print(f"detection {m.architectures.detection} at {settings.data.image_size} px (box head {m.box_head_size}, "
          f"{m.rois_per_image} RoIs), {len(train.image_paths)} train + "
          f"{len(val.image_paths)} val images, {epochs} epochs, global batch {2 * batch}, torch {torch.__version__}:")
    for name, secs, wall in (("plain Lightning, 1 process x 2 threads", plain, plain_wall),
                             ("RayTrainer, 2 workers x 1 thread (DDP)", ray, ray_wall)):
        print(f"  {name}: epochs {', '.join(f'{s:.1f}' for s in secs)} s; last {images / secs[-1]:.2f} img/s; "
              f"fit wall {wall:.1f} s, of which {wall - sum(secs):.1f} s outside epochs")
    print(f"  RayTrainer / plain, last epoch: {plain[-1] / ray[-1]:.2f}x (goal >= 0.87x)")
    print(f"  RayTrainer / plain, whole fit:  {plain_wall / ray_wall:.2f}x")


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
    d = sub.add_parser("ray-overhead")
    d.add_argument("--images", type=int, default=240)
    d.add_argument("--epochs", type=int, default=2)
    d.add_argument("--batch", type=int, default=4, help="per Ray worker; the plain process takes twice this")
    args = p.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")
    if args.what == "loading":
        bench_loading(args.images, args.workers)
    elif args.what == "throughput":
        bench_throughput(args.steps)
    elif args.what == "quality":
        bench_quality(args.minutes, args.images)
    else:
        bench_ray_overhead(args.images, args.epochs, args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
