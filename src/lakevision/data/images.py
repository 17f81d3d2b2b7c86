"""Image files and masks as the stages read them: upright RGB arrays and COCO RLEs.

Training, evaluation, explanations and the served model all decode an image the same way (PIL,
EXIF orientation applied, RGB), so a prediction never depends on where the pixels were read.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image, ImageOps
from pycocotools import mask as mask_utils

from lakevision.errors import LakevisionError


class ImageLoadError(LakevisionError, RuntimeError):
    """An image that ingest accepted can no longer be read (changed or removed since)."""


def upright_rgb(im: Image.Image) -> np.ndarray:
    """An opened image as an upright (EXIF-oriented) RGB uint8 array (H, W, 3): the one
    conversion training, evaluation and serving share."""
    return np.array(ImageOps.exif_transpose(im).convert("RGB"))  # writable, as torch wants


def load_rgb(path: str) -> np.ndarray:
    """The image file as an upright RGB uint8 array (H, W, 3)."""
    try:
        with Image.open(path) as im:
            return upright_rgb(im)
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageLoadError(f"{path}: cannot load image: {exc}") from exc


def segmentation_to_rle(seg: Any, height: int, width: int) -> dict | None:
    """A COCO RLE for any of: a list of polygons, an RLE dict (compressed or not), or the
    ``samples`` table struct ``{polygons, rle_counts, rle_size}``."""
    if seg is None:
        return None
    if isinstance(seg, dict) and ("polygons" in seg or "rle_counts" in seg):
        if seg.get("rle_counts"):
            return {"counts": seg["rle_counts"].encode("ascii"), "size": list(seg["rle_size"])}
        seg = seg.get("polygons")
        if seg is None:
            return None
    if isinstance(seg, dict):
        rle = seg if not isinstance(seg["counts"], list) else mask_utils.frPyObjects(seg, height, width)
        if isinstance(rle["counts"], str):
            rle = {"counts": rle["counts"].encode("ascii"), "size": rle["size"]}
        return rle
    polys = [list(map(float, p)) for p in seg if len(p) >= 6]
    if not polys:
        return None
    return mask_utils.merge(mask_utils.frPyObjects(polys, height, width))


def annotation_mask(ann: dict, height: int, width: int) -> np.ndarray:
    """A (H, W) uint8 mask; a box-shaped one when the annotation has no segmentation."""
    rle = segmentation_to_rle(ann.get("segmentation"), height, width)
    if rle is not None:
        return mask_utils.decode(rle)
    x, y, w, h = ann["bbox"]
    m = np.zeros((height, width), np.uint8)
    m[int(y) : int(np.ceil(y + h)), int(x) : int(np.ceil(x + w))] = 1
    return m
