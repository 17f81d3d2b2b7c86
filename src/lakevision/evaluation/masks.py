"""Instance masks as COCO compressed RLE, the form COCOeval computes mask IoU on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from faster_coco_eval.core import mask as fast_mask_utils
from pycocotools import mask as mask_utils

from lakevision.evaluation._arrays import to_numpy


def _compressed(rle: Any, where: str) -> dict:
    if not isinstance(rle, Mapping) or "size" not in rle or "counts" not in rle:
        raise ValueError(f"{where} is not a COCO RLE dict with 'size' and 'counts'")
    height, width = (int(v) for v in rle["size"])
    if isinstance(rle["counts"], list):  # uncompressed RLE, as in COCO crowd annotations
        return mask_utils.frPyObjects(dict(rle), height, width)
    return {"size": [height, width], "counts": rle["counts"]}


def encode_masks(masks: Any, side: str, image_id: int) -> tuple[list[dict], tuple[int, int] | None]:
    """RLEs of ``masks`` (N x H x W binary, or a list of RLE dicts) and their (H, W) if known."""
    if isinstance(masks, (list, tuple)) and (not masks or isinstance(masks[0], Mapping)):
        rles = [_compressed(r, f"{side}: image_id {image_id}: masks[{i}]") for i, r in enumerate(masks)]
        sizes = list(dict.fromkeys(tuple(r["size"]) for r in rles))
        if len(sizes) > 1:
            raise ValueError(f"{side}: image_id {image_id}: masks have different sizes {sizes}")
        return rles, sizes[0] if sizes else None
    arr = to_numpy(masks)
    if arr.ndim != 3:
        raise ValueError(f"{side}: image_id {image_id}: masks has shape {arr.shape}, expected (N, H, W)")
    not_binary = ((arr != 0) & (arr != 1)).any(axis=(1, 2))
    if not_binary.any():
        raise ValueError(f"{side}: image_id {image_id}: masks[{int(np.argmax(not_binary))}] is not binary (0/1)")
    # pycocotools encodes column-major (H, W, N) uint8 stacks.
    rles = mask_utils.encode(np.asfortranarray(arr.transpose(1, 2, 0), dtype=np.uint8))
    return rles, (int(arr.shape[1]), int(arr.shape[2]))


def decode_masks(masks: Any) -> np.ndarray:
    """(N, H, W) uint8 array of masks given as arrays or RLE dicts (for drawing)."""
    if isinstance(masks, (list, tuple)) and masks and isinstance(masks[0], Mapping):
        rles = [_compressed(r, "masks") for r in masks]
        return mask_utils.decode(rles).transpose(2, 0, 1)
    return to_numpy(masks).astype(np.uint8)


def mask_areas(rles: list[dict]) -> np.ndarray:
    """Pixel count of each RLE as float64."""
    # pycocotools 2.0.11's area() overflows on lists of more than 255 RLEs; faster-coco-eval's is the
    # same C routine without that bug.
    return np.asarray(fast_mask_utils.area(rles), dtype=np.float64).reshape(-1)
