"""Stack per-image annotation dicts into columns and validate them, naming the image and field at fault.

Detection and instance-segmentation inputs are lists of per-image dicts whose values may be tensors,
arrays or lists. Checking and converting them image by image in Python would cost more than the
C++ evaluation they feed, so each field is concatenated once and checked with vectorized NumPy;
every row keeps its image id and its index inside that image so an error can still point at it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from lakevision.evaluation._arrays import to_numpy


@dataclass(frozen=True)
class Field:
    """A numeric per-instance field: ``trailing`` is its shape after the instance axis."""

    name: str
    trailing: tuple[int, ...] = ()
    required: bool = True
    integer: bool = False
    minimum: float | None = None
    maximum: float | None = None


@dataclass(frozen=True)
class Columns:
    """Fields of many images stacked row-wise (float64, integer fields as int64)."""

    side: str  # "predictions" or "ground_truth", for messages
    image_ids: list[int]  # the images the input mentions, in input order
    row_image: np.ndarray  # image id of each row
    row_index: np.ndarray  # index of each row inside its image's arrays
    values: dict[str, np.ndarray]
    provided: dict[str, np.ndarray]  # per row: whether an optional field was given (else 0 filled in)

    def fail_first(self, bad: np.ndarray, field: str, problem: str) -> None:
        """Raise for the first row flagged in ``bad``, if any."""
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(
                f"{self.side}: image_id {int(self.row_image[row])}: "
                f"{field}[{int(self.row_index[row])}] {problem}"
            )

    def validated(self, fields: Sequence[Field]) -> Columns:
        """Check finiteness, integrality and range of every field; integer fields become int64."""
        values = dict(self.values)
        for f in fields:
            v = values[f.name]
            rows = v.reshape(len(v), int(np.prod(f.trailing)))
            self.fail_first(~np.isfinite(rows).all(axis=1), f.name, "is NaN or infinite")
            if f.integer:
                self.fail_first((rows != np.floor(rows)).any(axis=1), f.name, "is not an integer")
            if f.minimum is not None:
                self.fail_first((rows < f.minimum).any(axis=1), f.name, f"is below {f.minimum:g}")
            if f.maximum is not None:
                self.fail_first((rows > f.maximum).any(axis=1), f.name, f"is above {f.maximum:g}")
            if f.integer:
                values[f.name] = v.astype(np.int64)
        return Columns(self.side, self.image_ids, self.row_image, self.row_index, values, self.provided)


def image_id_of(record: Any, side: str, position: int) -> int:
    if not isinstance(record, Mapping) or "image_id" not in record:
        raise ValueError(f"{side}[{position}]: expected a dict with an 'image_id' field")
    return int(record["image_id"])


def unique_image_ids(records: Sequence[Mapping], side: str) -> list[int]:
    ids = [image_id_of(r, side, i) for i, r in enumerate(records)]
    seen: set[int] = set()
    for image_id in ids:
        if image_id in seen:
            raise ValueError(f"{side}: image_id {image_id} appears more than once")
        seen.add(image_id)
    return ids


def _field_array(record: Mapping, f: Field, side: str, image_id: int, count: int | None) -> np.ndarray:
    arr = to_numpy(record[f.name])
    if arr.size == 0 and count in (None, 0):
        return np.zeros((0, *f.trailing))  # "[]" is a valid empty field whatever its nominal shape
    if arr.ndim != 1 + len(f.trailing) or arr.shape[1:] != f.trailing or count not in (None, len(arr)):
        expected = ", ".join(map(str, ("N" if count is None else count, *f.trailing)))
        raise ValueError(f"{side}: image_id {image_id}: {f.name} has shape {arr.shape}, expected ({expected})")
    return arr


def stack_records(records: Sequence[Mapping], side: str, fields: Sequence[Field]) -> Columns:
    """Concatenate ``fields`` over per-image dicts; the first field fixes each image's instance count."""
    image_ids = unique_image_ids(records, side)
    parts: dict[str, list[np.ndarray]] = {f.name: [] for f in fields}
    given: dict[str, list[bool]] = {f.name: [] for f in fields if not f.required}
    counts = np.zeros(len(records), dtype=np.int64)
    for i, (record, image_id) in enumerate(zip(records, image_ids)):
        count = None
        for f in fields:
            if f.name in record:
                arr = _field_array(record, f, side, image_id, count)
                count = len(arr)
            elif f.required:
                raise ValueError(f"{side}: image_id {image_id}: missing field '{f.name}'")
            else:
                arr = np.zeros((count or 0, *f.trailing))
            parts[f.name].append(arr)
            if not f.required:
                given[f.name].append(f.name in record)
        counts[i] = count or 0
    starts = np.cumsum(counts) - counts
    return Columns(
        side=side,
        image_ids=image_ids,
        row_image=np.repeat(np.asarray(image_ids, dtype=np.int64), counts),
        row_index=np.arange(int(counts.sum())) - np.repeat(starts, counts),
        values={
            f.name: np.concatenate(parts[f.name]).astype(np.float64, copy=False).reshape(-1, *f.trailing)
            if parts[f.name] else np.zeros((0, *f.trailing))
            for f in fields
        },
        provided={name: np.repeat(np.asarray(flags, dtype=bool), counts) for name, flags in given.items()},
    )


# Fields shared by every COCO instance input (boxes and masks alike).
LABELS = Field("labels", integer=True, minimum=1)  # COCO category ids
SCORES = Field("scores")
ISCROWD = Field("iscrowd", required=False, integer=True, minimum=0, maximum=1)
AREA = Field("area", required=False, minimum=0)
