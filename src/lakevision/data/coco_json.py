"""Parse a COCO instances file into Arrow tables, or fail naming the file and the field.

Structural problems (not JSON, a missing top-level list, an id that is not an integer) make the
whole file unusable and raise :class:`CocoFormatError` before anything is written. Problems with
one record's *content* (a bad box, an unknown category) are left for validation, which
quarantines that record alone.

Parsing goes through orjson with the garbage collector paused (it walks millions of new objects
for nothing) and builds columns with pyarrow, which is several times faster than ``json.load``
plus ``pycocotools.coco.COCO`` on COCO-sized files (benchmarks/ingest.py).
"""

from __future__ import annotations

import gc
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa

SEGMENTATION_TYPE = pa.struct(
    [
        pa.field("polygons", pa.list_(pa.list_(pa.float64()))),
        pa.field("rle_counts", pa.string()),  # COCO compressed RLE string (crowd regions)
        pa.field("rle_size", pa.list_(pa.int64())),  # [height, width]
    ]
)


class CocoFormatError(ValueError):
    """The annotation file cannot be used at all; nothing has been written."""


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


def _column(path: Path, records: list, section: str, key: str, typ: pa.DataType, required: bool) -> pa.Array:
    values = [r.get(key) for r in records]
    try:
        arr = pa.array(values, type=typ)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        arr = None
    want = {pa.int64(): int, pa.string(): str, pa.float64(): (int, float)}[typ]
    # pyarrow quietly accepts bools and floats (even 20.5) for int64: ids must be real integers.
    if arr is None or (typ == pa.int64() and any(type(v) is not int for v in values if v is not None)):
        for i, v in enumerate(values):
            if v is not None and (type(v) is bool or not isinstance(v, want)):
                raise _fail(path, f"{section}[{i}].{key}", f"expected {typ}, got {type(v).__name__} {v!r:.60}")
        raise _fail(path, f"{section}.{key}", f"cannot read as {typ}")  # pragma: no cover - defensive
    if required and arr.null_count:
        i = values.index(None)
        raise _fail(path, f"{section}[{i}].{key}", "required field is missing or null")
    return arr


def _bbox_column(records: list) -> pa.Array:
    """Boxes as list<double>; anything that is not a list of numbers becomes null (invalid_bbox)."""
    boxes = [r.get("bbox") for r in records]
    try:
        return pa.array(boxes, type=pa.list_(pa.float64()))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        clean = []
        for b in boxes:
            ok = isinstance(b, list) and all(isinstance(v, (int, float)) and type(v) is not bool for v in b)
            clean.append(b if ok else None)
        return pa.array(clean, type=pa.list_(pa.float64()))


def _segmentation_column(path: Path, records: list) -> pa.Array:
    from pycocotools import mask as mask_utils

    polygons: list[Any] = []
    rle_counts: list[str | None] = []
    rle_size: list[list[int] | None] = []
    for i, r in enumerate(records):
        seg = r.get("segmentation")
        if seg is None or type(seg) is list:
            polygons.append(seg)
            rle_counts.append(None)
            rle_size.append(None)
            continue
        if type(seg) is not dict or "counts" not in seg or "size" not in seg:
            raise _fail(path, f"annotations[{i}].segmentation", "expected a list of polygons or an RLE {counts, size}")
        h, w = seg["size"]
        counts = seg["counts"]
        if isinstance(counts, list):  # uncompressed RLE, as COCO writes crowd regions
            counts = mask_utils.frPyObjects(seg, h, w)["counts"]
        if isinstance(counts, bytes):
            counts = counts.decode("ascii")
        if not isinstance(counts, str):
            raise _fail(path, f"annotations[{i}].segmentation.counts", f"expected a list or a string, got {type(counts).__name__}")
        polygons.append(None)
        rle_counts.append(counts)
        rle_size.append([int(h), int(w)])
    try:
        poly_arr = pa.array(polygons, type=pa.list_(pa.list_(pa.float64())))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        for i, p in enumerate(polygons):
            if p is not None and not all(
                isinstance(ring, list) and all(isinstance(v, (int, float)) for v in ring) for ring in p
            ):
                raise _fail(path, f"annotations[{i}].segmentation", "polygons must be lists of numbers") from None
        raise
    return pa.StructArray.from_arrays(
        [poly_arr, pa.array(rle_counts, pa.string()), pa.array(rle_size, pa.list_(pa.int64()))],
        fields=list(SEGMENTATION_TYPE),
    )


def _section(path: Path, doc: dict, key: str) -> list:
    if key not in doc:
        raise _fail(path, key, "required top-level field is missing")
    value = doc[key]
    if not isinstance(value, list):
        raise _fail(path, key, f"expected a list, got {type(value).__name__}")
    for i, rec in enumerate(value):
        if type(rec) is not dict:
            raise _fail(path, f"{key}[{i}]", f"expected an object, got {type(rec).__name__}")
    return value


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
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise CocoFormatError(f"{path}: not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise _fail(path, "<top level>", f"expected a JSON object, got {type(doc).__name__}")
        images = _section(path, doc, "images")
        annotations = _section(path, doc, "annotations")
        categories = _section(path, doc, "categories")
        source = str(path.resolve())
        tables = CocoTables(
            source_file=source,
            sha256=hashlib.sha256(raw).hexdigest(),
            images=_images_table(path, images),
            annotations=_annotations_table(path, annotations),
            categories=_categories_table(path, categories),
            info=doc.get("info") if isinstance(doc.get("info"), dict) else {},
        )
    finally:
        if gc_was_enabled:
            gc.enable()
    return tables


def _pos(n: int) -> pa.Array:
    return pa.array(np.arange(n, dtype=np.int64))


def _images_table(path: Path, recs: list) -> pa.Table:
    cols = {
        "id": _column(path, recs, "images", "id", pa.int64(), True),
        "file_name": _column(path, recs, "images", "file_name", pa.string(), True),
        "width": _column(path, recs, "images", "width", pa.int64(), True),
        "height": _column(path, recs, "images", "height", pa.int64(), True),
        "license": _column(path, recs, "images", "license", pa.int64(), False),
        "coco_url": _column(path, recs, "images", "coco_url", pa.string(), False),
        "date_captured": _column(path, recs, "images", "date_captured", pa.string(), False),
        "_pos": _pos(len(recs)),
    }
    return pa.table(cols)


def _annotations_table(path: Path, recs: list) -> pa.Table:
    area = _column(path, recs, "annotations", "area", pa.float64(), False)
    iscrowd = _column(path, recs, "annotations", "iscrowd", pa.int64(), False)
    bad_crowd = [i for i, v in enumerate(iscrowd.to_pylist()) if v not in (None, 0, 1)][:1]
    if bad_crowd:
        raise _fail(path, f"annotations[{bad_crowd[0]}].iscrowd", f"expected 0 or 1, got {recs[bad_crowd[0]]['iscrowd']!r}")
    cols = {
        "id": _column(path, recs, "annotations", "id", pa.int64(), True),
        "image_id": _column(path, recs, "annotations", "image_id", pa.int64(), True),
        "category_id": _column(path, recs, "annotations", "category_id", pa.int64(), True),
        "bbox": _bbox_column(recs),
        "area": area,
        "iscrowd": iscrowd.fill_null(0),
        "segmentation": _segmentation_column(path, recs),
        "_pos": _pos(len(recs)),
    }
    return pa.table(cols)


def _categories_table(path: Path, recs: list) -> pa.Table:
    return pa.table(
        {
            "id": _column(path, recs, "categories", "id", pa.int64(), True),
            "name": _column(path, recs, "categories", "name", pa.string(), True),
            "supercategory": _column(path, recs, "categories", "supercategory", pa.string(), False),
            "_pos": _pos(len(recs)),
        }
    )

