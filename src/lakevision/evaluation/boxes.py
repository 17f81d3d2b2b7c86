"""Box formats: everything is converted to COCO's xywh, the format COCOeval computes IoU in."""

from __future__ import annotations

import numpy as np

BOX_FORMATS = ("xyxy", "xywh", "cxcywh")


def check_box_format(box_format: str) -> None:
    if box_format not in BOX_FORMATS:
        raise ValueError(f"box_format must be one of {BOX_FORMATS}, got {box_format!r}")


def to_xywh(boxes: np.ndarray, box_format: str) -> np.ndarray:
    """(N, 4) float64 boxes in ``box_format`` as xywh (same float operations as a per-box loop)."""
    if box_format == "xywh":
        return boxes
    if box_format == "xyxy":
        return np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1)
    return np.concatenate([boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, 2:]], axis=1)
