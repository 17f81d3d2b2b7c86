"""COCO evaluation benchmark: this project's metrics against pycocotools and faster-coco-eval.

Same process, same generated data (fixed seed): 5,000 images with ~25,000 ground-truth boxes
(3 classes, 5% crowd) and ~35,000 detections for bbox; 500 images with masks for segm.

* ours: ``DetectionMetrics.compute_metrics`` / ``SegmentationMetrics.compute_metrics`` on per-image
  dicts of torch tensors, conversion and validation included (for segm, RLE encoding of the binary
  masks too; a second segm row gives ours the masks already RLE-encoded, like the baselines);
* pycocotools: ``COCO()`` + ``dataset=`` + ``createIndex()`` on an in-memory COCO dataset dict,
  ``loadRes`` of a results list, then evaluate/accumulate/summarize;
* faster-coco-eval: the same calls with its ``COCO`` and ``COCOeval_faster``.

The baselines start from COCO-format dicts (RLE already encoded) built before timing, which
favours them. Every run's 12 stats must agree with pycocotools' to 1e-9.

Usage: python benchmarks/coco_eval.py [--images 5000] [--segm-images 500] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import faster_coco_eval
import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from lakevision.evaluation import DetectionMetrics, SegmentationMetrics
from lakevision.evaluation.coco import STAT_KEYS

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' data generator
from tests.coco_synthetic import coco_dataset, coco_results, synthetic_detections  # noqa: E402

NUM_CLASSES = 3
TOL = 1e-9


def _baseline(coco_cls, eval_cls, dataset: dict, results: list, iou_type: str) -> np.ndarray:
    with contextlib.redirect_stdout(io.StringIO()):
        gt = coco_cls()
        gt.dataset = dataset
        gt.createIndex()
        coco_eval = eval_cls(gt, gt.loadRes(results), iou_type)
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return np.asarray(coco_eval.stats[:12])


def _timed(run: Callable[..., np.ndarray], prepare: Callable[[], tuple],
           repeats: int) -> tuple[float, list[np.ndarray]]:
    """Median seconds of ``run(*prepare())`` (preparation untimed) and the stats of every run."""
    times, stats = [], []
    for _ in range(repeats):
        args = prepare()
        start = time.perf_counter()
        stats.append(run(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), stats


def _as_tensors(records: list[dict]) -> list[dict]:
    return [{k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in r.items()} for r in records]


def _masks_by_image(annotations: list[dict]) -> dict[int, list[dict]]:
    masks: dict[int, list[dict]] = defaultdict(list)
    for annotation in annotations:
        masks[annotation["image_id"]].append(annotation["segmentation"])
    return masks


def bench(task: str, num_images: int, repeats: int) -> list[dict]:
    """One row per input form of ours; all rows share the baselines' timings."""
    data = synthetic_detections(num_images, masks=task == "segm", num_classes=NUM_CLASSES,
                                image_size=(160, 192) if task == "segm" else (480, 640), seed=0)
    dataset = coco_dataset(data.ground_truth, range(1, NUM_CLASSES + 1), data.image_size)
    results = coco_results(data.predictions)
    preds, gts = _as_tensors(data.predictions), _as_tensors(data.ground_truth)
    # loadRes and COCOeval add keys to the dicts they get: every run gets fresh copies.
    fresh = lambda: (copy.deepcopy(dataset), copy.deepcopy(results))  # noqa: E731

    def ours(predictions: list[dict], ground_truth: list[dict]) -> np.ndarray:
        if task == "bbox":
            result = DetectionMetrics().compute_metrics(predictions, ground_truth, num_classes=NUM_CLASSES)
        else:
            result = SegmentationMetrics(NUM_CLASSES).compute_metrics(predictions, ground_truth)
        return np.array([result[k] for k in STAT_KEYS])

    t_py, s_py = _timed(lambda d, r: _baseline(COCO, COCOeval, d, r, task), fresh, repeats)
    t_fast, s_fast = _timed(
        lambda d, r: _baseline(faster_coco_eval.COCO, faster_coco_eval.COCOeval_faster, d, r, task),
        fresh, repeats,
    )
    our_inputs = {"tensors": (preds, gts)}
    if task == "segm":
        # Masks already encoded, as the baselines get them (e.g. read from a results file).
        dt_masks, gt_masks = _masks_by_image(results), _masks_by_image(dataset["annotations"])
        our_inputs["RLE masks"] = ([{**p, "masks": dt_masks[p["image_id"]]} for p in preds],
                                   [{**g, "masks": gt_masks[g["image_id"]]} for g in gts])
    rows = []
    for input_form, inputs in our_inputs.items():
        t_ours, s_ours = _timed(ours, lambda inputs=inputs: inputs, repeats)
        for name, all_stats in (("faster-coco-eval", s_fast), (f"ours ({input_form})", s_ours)):
            worst = max(float(np.max(np.abs(stats - s_py[0]))) for stats in all_stats)
            assert worst <= TOL, f"{task}: {name} differs from pycocotools by {worst}"
        rows.append({"task": task, "input": input_form, "images": num_images, "gt": len(dataset["annotations"]),
                     "dets": len(results), "pycocotools": t_py, "faster": t_fast, "ours": t_ours})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--segm-images", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows = bench("bbox", args.images, args.repeats)
    if args.segm_images:
        rows += bench("segm", args.segm_images, args.repeats)
    print(f"median of {args.repeats} runs each; the 12 COCO stats of every run equal pycocotools' within {TOL:g}\n")
    print("| task | our input | images | GT | detections | pycocotools s | faster-coco-eval s | ours s "
          "| pycocotools / ours | faster-coco-eval / ours |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['task']} | {r['input']} | {r['images']:,} | {r['gt']:,} | {r['dets']:,} | {r['pycocotools']:.2f} "
              f"| {r['faster']:.2f} | {r['ours']:.2f} | {r['pycocotools'] / r['ours']:.1f}x "
              f"| {r['faster'] / r['ours']:.2f}x |")


if __name__ == "__main__":
    main()
