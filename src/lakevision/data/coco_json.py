"""Parse a COCO instances file into Arrow tables, or fail naming the file and the field.

Structural problems (not JSON, not UTF-8, nested too deeply, a missing top-level list, an id that
is not an integer) make the whole file unusable and raise :class:`CocoFormatError`, naming the JSON
path or the byte offset, before anything is written. A record whose values have the right types but
cannot be used is taken out here and listed in :attr:`CocoTables.rejected` for the quarantine, with
the field named: an integer outside int64 (``invalid_value``), a crowd RLE that does not decode
(``invalid_segmentation``, see :mod:`lakevision.data.coco_rle`). Other problems with one record's
*content* (a bad box, an unknown category) are left for validation, which quarantines that record
alone.

Speed (benchmarks/ingest.py): msgspec decodes straight into typed structs (checking every type and
reporting the JSON path of a wrong one) with the garbage collector paused, since it would otherwise
walk millions of new float lists for nothing (11 s instead of 3 s on a COCO-sized file).
"""

from __future__ import annotations

import gc
import hashlib
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Union

import msgspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lakevision.data.coco_rle import rle_problem, show_int
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
_INT64 = (-(2**63), 2**63 - 1)
# msgspec decodes nested JSON recursively: deeper than this it stops with RecursionError, where a
# recursion limit raised by someone else would let it overflow the C stack instead
_MAX_NESTING = 1000
_KIND = {"images": "image", "annotations": "annotation", "categories": "category"}
_REJECTED_SCHEMA = pa.schema([("record_kind", pa.string()), ("record_id", pa.int64()), ("reason", pa.string()),
                             ("detail", pa.string()), ("_pos", pa.int64())])


@dataclass
class CocoTables:
    """The three record lists of one annotation file as Arrow tables (``_pos`` = index in the file)."""

    source_file: str
    sha256: str
    images: pa.Table
    annotations: pa.Table
    categories: pa.Table
    info: dict
    # records taken out while parsing: record_kind, record_id, reason, detail, _pos
    rejected: pa.Table


class _Rejects:
    """Records of the file with a value the tables cannot hold, one reason each (the first found).

    Such a record's ``record_id`` is its id, or ``-(index + 1)`` when the id itself is the value
    that does not fit: the quarantine needs an int64 key, and the detail names the real one.
    """

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self.positions: dict[str, set[int]] = {section: set() for section in _KIND}

    def add(self, section: str, records: list, i: int, reason: str, field: str, why: str) -> None:
        if i in self.positions[section]:
            return
        self.positions[section].add(i)
        record_id = records[i].id
        if not _INT64[0] <= record_id <= _INT64[1]:
            record_id = -(i + 1)
        self.rows.append({"record_kind": _KIND[section], "record_id": record_id, "reason": reason,
                          "detail": f"{section}[{i}].{field}: {why}", "_pos": i})

    def keep(self, section: str, table: pa.Table) -> pa.Table:
        """``table`` without the rejected records of ``section``."""
        bad = self.positions[section]
        if not bad:
            return table
        return table.filter(pc.invert(pc.is_in(table["_pos"], value_set=pa.array(sorted(bad), pa.int64()))))

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.rows, schema=_REJECTED_SCHEMA)


def _int_column(section: str, records: list, name: str, rejects: _Rejects) -> pa.Array:
    """The int64 column ``name``; a record with a value outside int64 is rejected (null here)."""
    values = [getattr(r, name) for r in records]
    try:
        return pa.array(values, pa.int64())
    except (OverflowError, pa.ArrowInvalid):
        for i, v in enumerate(values):
            if v is not None and not _INT64[0] <= v <= _INT64[1]:
                rejects.add(section, records, i, "invalid_value", name, f"{show_int(v)} does not fit in a 64-bit integer")
                values[i] = None
        return pa.array(values, pa.int64())


def _fail(path: Path, field: str, msg: str) -> CocoFormatError:
    return CocoFormatError(f"{path}: {field}: {msg}")


def _from_msgspec(path: Path, exc: msgspec.ValidationError) -> CocoFormatError:
    m = _AT.match(str(exc))
    loc = (m["loc"] or "").lstrip(".") or "<top level>"
    return _fail(path, loc, m["msg"])


def _deepest(raw: bytes) -> tuple[int, int]:
    """(depth, byte offset) of the deepest bracket outside strings of a JSON text."""
    b = np.frombuffer(raw, np.uint8)
    quotes = np.flatnonzero(b == ord('"'))
    escaped = np.zeros(len(quotes), bool)
    for i in np.flatnonzero((quotes > 0) & (b[np.maximum(quotes - 1, 0)] == ord("\\"))):
        q = start = int(quotes[i])
        while q > 0 and b[q - 1] == ord("\\"):
            q -= 1
        escaped[i] = (start - q) % 2 == 1
    quotes = quotes[~escaped]
    opens = (b == ord("[")) | (b == ord("{"))
    brackets = np.flatnonzero(opens | (b == ord("]")) | (b == ord("}")))
    brackets = brackets[np.searchsorted(quotes, brackets, side="right") % 2 == 0]
    if not len(brackets):
        return 0, 0
    depth = np.cumsum(np.where(opens[brackets], 1, -1))
    i = int(np.argmax(depth))
    return int(depth[i]), int(brackets[i])


def _decode(path: Path, raw: bytes) -> _Document:
    """msgspec's decode, with every way it can fail as a :class:`CocoFormatError`."""
    depth = 0
    frame = sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    limit = sys.getrecursionlimit()
    try:
        sys.setrecursionlimit(min(limit, depth + _MAX_NESTING))
        return _DECODER.decode(raw)
    except msgspec.ValidationError as exc:
        raise _from_msgspec(path, exc) from None
    except msgspec.DecodeError as exc:
        raise CocoFormatError(f"{path}: not valid JSON: {exc}") from None
    except UnicodeDecodeError:  # msgspec names the offset in the string; Python's codec, in the file
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CocoFormatError(f"{path}: byte {exc.start}: not valid UTF-8 ({exc.reason})") from None
        raise CocoFormatError(f"{path}: not valid UTF-8") from None
    except RecursionError:
        levels, offset = _deepest(raw)
        raise CocoFormatError(f"{path}: byte {offset}: nested {levels} levels deep, too deep to read") from None
    finally:
        sys.setrecursionlimit(limit)


def _segmentation_column(anns: list[_Annotation], rejects: _Rejects) -> pa.Array:
    from pycocotools import mask as mask_utils

    polygons: list[list | None] = []
    rle_counts: list[str | None] = []
    rle_size: list[list[int] | None] = []
    for i, a in enumerate(anns):
        seg = a.segmentation
        problem = rle_problem(seg.size, seg.counts) if type(seg) is _RLE else None
        if problem is not None:
            rejects.add("annotations", anns, i, "invalid_segmentation", f"segmentation.{problem[0]}", problem[1])
            seg = None
        if type(seg) is not _RLE:
            polygons.append(seg)
            rle_counts.append(None)
            rle_size.append(None)
            continue
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


def _box(b: Any) -> list[float] | None:
    """A box as floats; None (invalid_bbox) when it is not a list of numbers that floats can hold."""
    if type(b) is not list or not all(type(v) in (int, float) for v in b):
        return None
    try:
        return [float(v) for v in b]
    except OverflowError:  # an integer beyond the float range
        return None


def _bbox_column(anns: list[_Annotation]) -> pa.Array:
    """Boxes as list<double>; anything that is not a list of numbers becomes null (invalid_bbox)."""
    boxes = [a.bbox for a in anns]
    try:
        return pa.array(boxes, type=pa.list_(pa.float64()))
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        return pa.array([_box(b) for b in boxes], type=pa.list_(pa.float64()))


def _pos(n: int) -> pa.Array:
    return pa.array(np.arange(n, dtype=np.int64))


def _table(section: str, records: list, fields: dict[str, pa.DataType], rejects: _Rejects) -> pa.Table:
    cols = {name: _int_column(section, records, name, rejects) if typ == pa.int64()
            else pa.array([getattr(r, name) for r in records], typ) for name, typ in fields.items()}
    cols["_pos"] = _pos(len(records))
    return pa.table(cols)


def read_coco(annotation_file: str | Path) -> CocoTables:
    """Read and structurally validate ``annotation_file``."""
    path = Path(annotation_file)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CocoFormatError(f"{path}: cannot read annotation file: {exc.strerror or exc}") from exc
    rejects = _Rejects()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        doc = _decode(path, raw)
        anns = doc.annotations
        annotations = pa.table({
            "id": _int_column("annotations", anns, "id", rejects),
            "image_id": _int_column("annotations", anns, "image_id", rejects),
            "category_id": _int_column("annotations", anns, "category_id", rejects),
            "bbox": _bbox_column(anns),
            "area": pa.array([a.area for a in anns], pa.float64()),
            "iscrowd": pa.array([a.iscrowd for a in anns], pa.int64()),
            "segmentation": _segmentation_column(anns, rejects),
            "_pos": _pos(len(anns)),
        })
    finally:
        if gc_was_enabled:
            gc.enable()
    images = _table("images", doc.images, {"id": pa.int64(), "file_name": pa.string(), "width": pa.int64(),
                                           "height": pa.int64(), "license": pa.int64(), "coco_url": pa.string(),
                                           "date_captured": pa.string()}, rejects)
    categories = _table("categories", doc.categories, {"id": pa.int64(), "name": pa.string(),
                                                       "supercategory": pa.string()}, rejects)
    return CocoTables(
        source_file=str(path.resolve()),
        sha256=hashlib.sha256(raw).hexdigest(),
        images=rejects.keep("images", images),
        annotations=rejects.keep("annotations", annotations),
        categories=rejects.keep("categories", categories),
        info=doc.info if isinstance(doc.info, dict) else {},
        rejected=rejects.table(),
    )
