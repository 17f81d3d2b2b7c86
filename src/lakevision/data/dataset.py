"""COCODataset: images and COCO annotations as torch tensors in torchvision's target formats.

Records come either from the caller (paths + per-image annotation dicts) or from the gold
``samples`` Delta table at a chosen version (:func:`lakevision.data.samples.load_split`). Images
are read upright and RGB (:mod:`lakevision.data.images`); albumentations moves boxes and masks
with every geometric transform.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import Dataset

from lakevision.data.images import annotation_mask, load_rgb
from lakevision.data.samples import load_split
from lakevision.tasks import TRAINING_TASKS

if TYPE_CHECKING:
    import albumentations as A

    from lakevision.runtime import Runtime

log = logging.getLogger(__name__)

IGNORE_INDEX = 255  # semantic masks: crowd regions are neither background nor object
_MIN_BOX_SIDE = 1.0


def _label_for_image(anns: list[dict], rule: str) -> int | None:
    """The category of a multi-object image for classification."""
    objs = [a for a in anns if not a.get("iscrowd")]
    if not objs:
        return None
    if rule == "first":
        return objs[0]["category_id"]
    if rule == "most_common":
        return Counter(a["category_id"] for a in objs).most_common(1)[0][0]
    return max(objs, key=lambda a: a.get("area") or a["bbox"][2] * a["bbox"][3])["category_id"]


class COCODataset(Dataset):
    """Images and their COCO annotations for one task.

    ``annotations[i]`` belongs to ``image_paths[i]`` and is a dict with ``image_id`` and
    ``annotations`` (COCO annotation dicts: ``bbox`` xywh, ``category_id``, ``iscrowd``, ``area``,
    ``segmentation``). Category ids map to contiguous labels in ``category_ids`` order: 0..K-1 for
    classification, 1..K for detection and segmentation (0 is background).
    """

    def __init__(
        self,
        image_paths: list[str],
        annotations: list[dict],
        transform: A.Compose | None = None,
        task: str = "detection",
        category_ids: Sequence[int] | None = None,
        label_rule: str = "largest",
        semantic: bool = False,
    ):
        if task not in TRAINING_TASKS:
            raise ValueError(f"task must be one of {TRAINING_TASKS}, got {task!r}")
        if len(image_paths) != len(annotations):
            raise ValueError(f"{len(image_paths)} image paths but {len(annotations)} annotation records")
        self.task = task
        self.semantic = semantic and task == "segmentation"
        self.transform = transform
        ids = category_ids or sorted({a["category_id"] for rec in annotations for a in rec["annotations"]})
        self.category_ids = list(ids)
        offset = 0 if task == "classification" else 1
        self.label_of = {cid: i + offset for i, cid in enumerate(self.category_ids)}
        self.image_paths = list(image_paths)
        self.records = list(annotations)
        if task == "classification":
            labels = [_label_for_image(r["annotations"], label_rule) for r in self.records]
            keep = [i for i, lab in enumerate(labels) if lab is not None]
            if len(keep) < len(labels):
                log.warning("classification: %d images without objects left out", len(labels) - len(keep))
            self.image_paths = [self.image_paths[i] for i in keep]
            self.records = [self.records[i] for i in keep]
            self.class_labels = [self.label_of[labels[i]] for i in keep]

    @classmethod
    def from_samples(cls, rt: Runtime, split: str | Sequence[str], version: int | None = None,
                     transform: A.Compose | None = None, task: str = "detection", **kwargs) -> COCODataset:
        """The ``split`` rows of the gold ``samples`` table at Delta ``version`` (default: latest)."""
        records = load_split(rt, split, version)
        ds = cls(records.image_paths, records.annotations, transform, task, category_ids=records.category_ids, **kwargs)
        ds.source = records
        return ds

    @property
    def num_classes(self) -> int:
        """Classes the model predicts, background included where the task has one."""
        return len(self.category_ids) + (0 if self.task == "classification" else 1)

    def __len__(self) -> int:
        return len(self.image_paths)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, dict]:
        image = load_rgb(self.image_paths[idx])
        record = self.records[idx]
        image_id = torch.tensor(int(record["image_id"]))
        if self.task == "classification":
            if self.transform is not None:
                image = self.transform(image=image)["image"]
            return _to_tensor(image, scale=self.transform is None), {
                "label": torch.tensor(self.class_labels[idx]), "image_id": image_id}
        if self.semantic:
            return self._semantic(image, record["annotations"], image_id)
        return self._instances(image, record["annotations"], image_id)

    def _semantic(self, image: np.ndarray, anns: list[dict], image_id: torch.Tensor) -> tuple[torch.Tensor, dict]:
        h, w = image.shape[:2]
        mask = np.zeros((h, w), np.uint8)
        # Larger objects first, so a small object on top of a large one keeps its pixels.
        for a in sorted(anns, key=lambda a: -(a.get("area") or 0)):
            mask[annotation_mask(a, h, w) > 0] = IGNORE_INDEX if a.get("iscrowd") else self.label_of[a["category_id"]]
        if self.transform is not None:
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return _to_tensor(image, scale=self.transform is None), {
            "mask": torch.as_tensor(np.asarray(mask), dtype=torch.int64), "image_id": image_id}

    def _instances(self, image: np.ndarray, anns: list[dict], image_id: torch.Tensor) -> tuple[torch.Tensor, dict]:
        h, w = image.shape[:2]
        # torchvision's detection references train without crowd regions (they only matter to eval)
        objs = [a for a in anns if not a.get("iscrowd")]
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in objs], np.float32).reshape(-1, 4)
        boxes[:, 0::2] = boxes[:, 0::2].clip(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clip(0, h)
        ok = ((boxes[:, 2] - boxes[:, 0]) >= _MIN_BOX_SIDE) & ((boxes[:, 3] - boxes[:, 1]) >= _MIN_BOX_SIDE)
        objs = [a for a, k in zip(objs, ok) if k]
        boxes = boxes[ok]
        labels = [self.label_of[a["category_id"]] for a in objs]
        need_masks = self.task == "segmentation"
        masks = [annotation_mask(a, h, w) for a in objs] if need_masks else None
        keep = list(range(len(objs)))
        if self.transform is not None:
            kwargs = {"masks": masks} if need_masks and masks else {}
            out = self.transform(image=image, bboxes=boxes, labels=labels, ann_index=keep, **kwargs)
            image = out["image"]
            boxes = np.asarray(out["bboxes"], np.float32).reshape(-1, 4)
            labels, keep = list(out["labels"]), [int(i) for i in out["ann_index"]]
            if need_masks and masks:
                masks = [np.asarray(out["masks"][i]) for i in keep]
        # uint8 across the DataLoader's process boundary (4x less than float32); BaseModel scales
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        target = {
            "boxes": torch.as_tensor(boxes, dtype=torch.float32),
            "labels": torch.as_tensor(labels, dtype=torch.int64),
            "image_id": image_id,
            "area": torch.as_tensor((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), dtype=torch.float32),
            "iscrowd": torch.zeros(len(labels), dtype=torch.int64),
        }
        if need_masks:
            th, tw = tensor.shape[-2:]
            target["masks"] = (torch.as_tensor(np.stack(masks), dtype=torch.uint8) if masks
                               else torch.zeros((0, th, tw), dtype=torch.uint8))
        return tensor, target


def _to_tensor(image: np.ndarray, scale: bool) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    return t.float().div_(255) if scale else t.float()


def collate_fn(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Detection batches keep per-image sizes: lists, not stacked tensors."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def worker_collate_fn(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """:func:`collate_fn` for DataLoader worker processes: the small target tensors travel as
    numpy arrays, since each tensor crossing a process boundary costs a shared-memory segment and
    five per image cost more than the pixels (benchmarks/training.py: 185 -> 300+ img/s).
    :meth:`BaseModel.on_after_batch_transfer` turns them back into tensors on the device."""
    images, targets = collate_fn(batch)
    return images, [{k: v.numpy() for k, v in t.items()} for t in targets]
