"""Parse a COCO instances file into Arrow tables, or fail naming the file and the field.

Structural problems (not JSON, a missing top-level list, an id that is not an integer) make the
whole file unusable and raise :class:`CocoFormatError` before anything is written. Problems with
one record's *content* (a bad box, an unknown category) are left for validation, which
quarantines that record alone.

Speed (benchmarks/ingest.py): msgspec decodes straight into typed structs (checking every type and
reporting the JSON path of a wrong one) with the garbage collector paused, since it would otherwise
walk millions of new float lists for nothing (11 s instead of 3 s on a COCO-sized file).
"""

from __future__ import annotations

import gc
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import msgspec
import numpy as np
import pyarrow as pa

from lakevision.errors import LakevisionError

POLYGONS_TYPE = pa.list_(pa.list_(pa.float64()))
SEGMENTATION_TYPE = pa.struct(
    [
        pa.field("polygons", POLYGONS_TYPE),
        pa.field("rle_counts", pa.string()),  # COCO compressed RLE string (crowd regions)
        pa.field("rle_size", pa.list_(pa.int64())),  # [height, width]
    ]
)


class CocoFormatError(LakevisionError, ValueError):
    """The annotation file cannot be used at all; nothing has been written."""


class _Image(msgspec.Struct, gc=False):
    id: int
    file_name: str
    width: int
    height: int
    license: Union[int, None] = None
    coco_url: Union[str, None] = None
    date_captured: Union[str, None] = None


class _RLE(msgspec.Struct, gc=False):
    counts: Union[list[int], str]
    size: list[int]


class _Annotation(msgspec.Struct, gc=False):
    id: int
    image_id: int
    category_id: int
    bbox: Any = None  # checked per record: a bad box quarantines one annotation, not the file
    area: Union[float, None] = None
    iscrowd: Literal[0, 1] = 0
    segmentation: Union[list[list[float]], _RLE, None] = None


class _Category(msgspec.Struct, gc=False):
    id: int
    name: str
    supercategory: Union[str, None] = None


class _Document(msgspec.Struct):
    images: list[_Image]
    annotations: list[_Annotation]
    categories: list[_Category]
    info: Any = None


_DECODER = msgspec.json.Decoder(_Document)
_AT = re.compile(r"^(?P<msg>.*?)(?: - at `\$(?P<loc>[^`]*)`)?$", re.S)


@dataclass
class CocoTables:
    """The three record lists of one annotation file as Arrow tables (``_pos`` = index in the file)."""

    source_file: str
    sha256: str
    images: pa.Table
    annotations: pa.Table
    categories: pa.Table
    info: dict


def _fail(path: Path, field: str, msg: str) -> CocoFormatError:
    return CocoFormatError(f"{path}: {field}: {msg}")


def _from_msgspec(path: Path, exc: msgspec.ValidationError) -> CocoFormatError:
    m = _AT.match(str(exc))
    loc = (m["loc"] or "").lstrip(".") or "<top level>"
    return _fail(path, loc, m["msg"])


def _segmentation_column(path: Path, anns: list[_Annotation]) -> pa.Array:
    from pycocotools import mask as mask_utils

    polygons: list[list | None] = []
    rle_counts: list[str | None] = []
    rle_size: list[list[int] | None] = []
    for i, a in enumerate(anns):
        seg = a.segmentation
        if type(seg) is not _RLE:
            polygons.append(seg)
            rle_counts.append(None)
            rle_size.append(None)
            continue
        if len(seg.size) != 2:
            raise _fail(path, f"annotations[{i}].segmentation.size", f"expected [height, width], got {seg.size}")
        h, w = seg.size
        counts = seg.counts
        if isinstance(counts, list):  # uncompressed RLE, as COCO writes crowd regions
            counts = mask_utils.frPyObjects({"counts": counts, "size": [h, w]}, h, w)["counts"].decode("ascii")
        polygons.append(None)
        rle_counts.append(counts)
        rle_size.append([h, w])
    return pa.StructArray.from_arrays(
        [pa.array(polygons, POLYGONS_TYPE), pa.array(rle_counts, pa.string()), pa.array(rle_size, pa.list_(pa.int64()))],
        fields=list(SEGMENTATION_TYPE),
    )


def _bbox_column(anns: list[_Annotation]) -> pa.Array:
    """Boxes as list<double>; anything that is not a list of numbers becomes null (invalid_bbox)."""
    boxes = [a.bbox for a in anns]
    try:
        return pa.array(boxes, type=pa.list_(pa.float64()))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        clean = [b if isinstance(b, list) and all(type(v) in (int, float) for v in b) else None for b in boxes]
        return pa.array(clean, type=pa.list_(pa.float64()))


def _pos(n: int) -> pa.Array:
    return pa.array(np.arange(n, dtype=np.int64))


def _table(records: list, fields: dict[str, pa.DataType]) -> pa.Table:
    cols = {name: pa.array([getattr(r, name) for r in records], typ) for name, typ in fields.items()}
    cols["_pos"] = _pos(len(records))
    return pa.table(cols)


def read_coco(annotation_file: str | Path) -> CocoTables:
    """Read and structurally validate ``annotation_file``."""
    path = Path(annotation_file)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CocoFormatError(f"{path}: cannot read annotation file: {exc.strerror or exc}") from exc
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        doc = _DECODER.decode(raw)
        anns = doc.annotations
        annotations = pa.table({
            "id": pa.array([a.id for a in anns], pa.int64()),
            "image_id": pa.array([a.image_id for a in anns], pa.int64()),
            "category_id": pa.array([a.category_id for a in anns], pa.int64()),
            "bbox": _bbox_column(anns),
            "area": pa.array([a.area for a in anns], pa.float64()),
            "iscrowd": pa.array([a.iscrowd for a in anns], pa.int64()),
            "segmentation": _segmentation_column(path, anns),
            "_pos": _pos(len(anns)),
        })
    except msgspec.ValidationError as exc:
        raise _from_msgspec(path, exc) from None
    except msgspec.DecodeError as exc:
        raise CocoFormatError(f"{path}: not valid JSON: {exc}") from None
    finally:
        if gc_was_enabled:
            gc.enable()
    return CocoTables(
        source_file=str(path.resolve()),
        sha256=hashlib.sha256(raw).hexdigest(),
        images=_table(doc.images, {"id": pa.int64(), "file_name": pa.string(), "width": pa.int64(),
                                   "height": pa.int64(), "license": pa.int64(), "coco_url": pa.string(),
                                   "date_captured": pa.string()}),
        annotations=annotations,
        categories=_table(doc.categories, {"id": pa.int64(), "name": pa.string(), "supercategory": pa.string()}),
        info=doc.info if isinstance(doc.info, dict) else {},
    )
