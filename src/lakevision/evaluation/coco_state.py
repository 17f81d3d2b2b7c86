"""Validated COCO-style annotations accumulated per worker and merged before one final evaluation.

COCO AP cannot be averaged over shards (precision is accumulated over all images' detections
sorted by score), so workers keep their validated inputs instead of partial results; merging is
concatenation and the driver evaluates once. The state holds only NumPy arrays, lists and dicts,
so it pickles cheaply for Ray, Spark or torch.distributed object collectives.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import numpy as np

IOU_TYPES = ("bbox", "segm")


@dataclass(frozen=True)
class Annotations:
    """Instances of a batch of images in column form.

    ``regions`` is an (N, 4) float64 array of xywh boxes for ``bbox`` and a list of N compressed
    RLE dicts for ``segm``; ``score`` is None for ground truth.
    """

    image_id: np.ndarray
    category_id: np.ndarray
    area: np.ndarray
    iscrowd: np.ndarray
    regions: np.ndarray | list[dict]
    score: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.image_id)

    @staticmethod
    def concat(batches: list[Annotations], iou_type: str, scored: bool) -> Annotations:
        if not batches:
            empty = np.zeros(0)
            return Annotations(
                image_id=empty.astype(np.int64),
                category_id=empty.astype(np.int64),
                area=empty,
                iscrowd=empty.astype(np.int64),
                regions=np.zeros((0, 4)) if iou_type == "bbox" else [],
                score=empty if scored else None,
            )
        return Annotations(
            image_id=np.concatenate([b.image_id for b in batches]),
            category_id=np.concatenate([b.category_id for b in batches]),
            area=np.concatenate([b.area for b in batches]),
            iscrowd=np.concatenate([b.iscrowd for b in batches]),
            regions=np.concatenate([b.regions for b in batches]) if iou_type == "bbox"
            else list(itertools.chain.from_iterable(b.regions for b in batches)),
            score=np.concatenate([b.score for b in batches]) if scored else None,
        )


@dataclass
class CocoState:
    """Ground truth and detections of the images seen so far; each image is owned by one state."""

    iou_type: str
    image_sizes: dict[int, tuple[int, int]] = field(default_factory=dict)  # image id -> (height, width)
    ground_truth: list[Annotations] = field(default_factory=list)
    detections: list[Annotations] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.iou_type not in IOU_TYPES:
            raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {self.iou_type!r}")

    def merge(self, other: CocoState) -> None:
        if other.iou_type != self.iou_type:
            raise ValueError(f"cannot merge a {other.iou_type!r} state into a {self.iou_type!r} state")
        # An image in two states would silently count its ground truth twice.
        overlap = next((i for i in other.image_sizes if i in self.image_sizes), None)
        if overlap is not None:
            raise ValueError(f"image_id {overlap} is already in this evaluation state")
        self.image_sizes.update(other.image_sizes)
        self.ground_truth.extend(other.ground_truth)
        self.detections.extend(other.detections)

    def all_ground_truth(self) -> Annotations:
        return Annotations.concat(self.ground_truth, self.iou_type, scored=False)

    def all_detections(self) -> Annotations:
        return Annotations.concat(self.detections, self.iou_type, scored=True)

    def category_ids(self) -> np.ndarray:
        """Sorted ids of every category that occurs in ground truth or detections."""
        return np.unique(np.concatenate(
            [np.zeros(0, np.int64)] + [b.category_id for b in self.ground_truth + self.detections]
        ))

    def state_dict(self) -> dict[str, Any]:
        return {
            "iou_type": self.iou_type,
            "image_sizes": dict(self.image_sizes),
            "ground_truth": [dict(vars(b)) for b in self.ground_truth],
            "detections": [dict(vars(b)) for b in self.detections],
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> CocoState:
        return cls(
            iou_type=state["iou_type"],
            image_sizes=dict(state["image_sizes"]),
            ground_truth=[Annotations(**b) for b in state["ground_truth"]],
            detections=[Annotations(**b) for b in state["detections"]],
        )
