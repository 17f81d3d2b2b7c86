"""Property-based: hostile COCO documents, file names and RLEs end in tables, quarantine rows or the
project's own error, never another exception and never a hang.

The parsing layer is pure Python (no Spark per example): :func:`read_coco` for whole documents,
:func:`check_file` for the names they give, :func:`rle_problem` for crowd regions. The settings are
fixed for CI: derandomized (the same examples on every run), no example database (nothing written
to ``.hypothesis``), a bounded number of examples and a deadline per example.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pycocotools import mask as mask_utils

from lakevision.data.coco_json import POLYGONS_TYPE, SEGMENTATION_TYPE, CocoFormatError, read_coco
from lakevision.data.coco_rle import decode_counts, rle_problem
from lakevision.data.image_check import check_file
from lakevision.data.processor import REASON_CODES

HOSTILE = settings(
    max_examples=200,
    deadline=5000,  # ms per example: a slow path (deep nesting) is fine, a hang is not
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=False,
)

EDGE_INTS = [0, -1, 1, 2**31, 2**63 - 1, 2**63, -(2**63), -(2**63) - 1, 2**64, 10**30, -(10**30), 10**400]
ints = st.one_of(st.integers(-5, 3000), st.integers(1, 3000), st.sampled_from(EDGE_INTS), st.integers())
finite = st.floats(allow_nan=False, allow_infinity=False)
scalars = st.one_of(st.none(), st.booleans(), ints, finite, st.text(max_size=8))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=4), inner, max_size=4)),
                           max_leaves=12)
FILE_NAMES = ["a.jpg", "../../etc/hostname", "/etc/hostname", "/dev/zero", "", ".", "..", "a\x00b.jpg",
              "sub/../../x.jpg", "./a.jpg", "x" * 5000, "\u00e9\u4e2d.png", "a/b/c/d.jpg", "\\..\\..\\x.jpg"]
file_names = st.one_of(st.sampled_from(FILE_NAMES), st.text(max_size=30))
rle_counts = st.one_of(st.lists(ints, max_size=6), st.text(max_size=12),
                       st.text(alphabet=st.characters(min_codepoint=48, max_codepoint=111), max_size=12))


@st.composite
def good_rles(draw) -> dict:
    """An RLE that decodes: runs that cover an h x w mask, compressed or not."""
    h, w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    cuts = sorted(draw(st.sets(st.integers(1, h * w - 1), max_size=6))) if h * w > 1 else []
    counts = [b - a for a, b in zip([0, *cuts], [*cuts, h * w])]
    if draw(st.booleans()):
        counts = mask_utils.frPyObjects({"counts": counts, "size": [h, w]}, h, w)["counts"].decode()
    return {"counts": counts, "size": [h, w]}


rle_sizes = st.one_of(st.tuples(st.integers(1, 12), st.integers(1, 12)).map(list), st.lists(ints, max_size=3))
rles = st.one_of(good_rles(), st.fixed_dictionaries({"counts": rle_counts, "size": rle_sizes}))
boxes = st.lists(st.one_of(ints, finite), max_size=5)
polygons = st.lists(st.lists(st.floats(-1e6, 1e6), max_size=8), max_size=3)


def record(fields: dict, optional: dict, typed: bool):
    """A record whose values have the right types (``typed``), or anything at all with keys missing."""
    if typed:
        return st.fixed_dictionaries(fields, optional=optional)
    anything = {k: st.one_of(v, json_values) for k, v in {**fields, **optional}.items()}
    return st.fixed_dictionaries({}, optional=anything)


def coco(typed: bool):
    images = record({"id": ints, "file_name": file_names, "width": ints, "height": ints},
                    {"license": ints, "coco_url": st.text(max_size=8), "date_captured": st.text(max_size=8)}, typed)
    annotations = record({"id": ints, "image_id": ints, "category_id": ints},
                         {"bbox": boxes if typed else json_values, "area": st.one_of(st.none(), ints, finite),
                          "iscrowd": st.sampled_from([0, 1]),
                          "segmentation": st.one_of(st.none(), rles, polygons)}, typed)
    categories = record({"id": ints, "name": st.text(max_size=8)}, {"supercategory": st.text(max_size=8)}, typed)
    return st.fixed_dictionaries(
        {"images": st.lists(images, max_size=4), "annotations": st.lists(annotations, max_size=5),
         "categories": st.lists(categories, max_size=3)},
        optional={"info": json_values, "licenses": json_values})


@st.composite
def documents(draw) -> bytes:
    """A COCO document, often wrong: hostile values with the right types (the usual case), wrong
    types and missing keys, another JSON value altogether, deep nesting, or broken bytes."""
    mode = draw(st.sampled_from(["values", "values", "values", "types", "not_coco", "deep", "bytes"]))
    doc = draw(json_values if mode == "not_coco" else coco(typed=mode != "types"))
    text = json.dumps(doc, ensure_ascii=draw(st.booleans()))
    if mode == "deep" and isinstance(doc, dict):  # a deep value where COCO keeps free-form metadata
        depth = draw(st.sampled_from([50, 500, 999, 1001, 5000, 100_000]))
        text = text[:-1] + ', "info": ' + "[" * depth + "]" * depth + "}"
    raw = text.encode("utf-8", "surrogatepass")
    if mode == "bytes":
        at = draw(st.integers(0, len(raw)))
        if draw(st.booleans()):
            raw = raw[:at]
        else:
            raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\x00"])) + raw[at:]
    return raw


def _record_count(raw: bytes) -> int:
    doc = json.loads(raw)
    return sum(len(doc[k]) for k in ("images", "annotations", "categories"))


_DETAIL = re.compile(r"^(images|annotations|categories)\[\d+\]\.[a-z_.]+: ")


@pytest.mark.timeout(300)
@HOSTILE
@given(raw=documents())
def test_hostile_documents_end_in_tables_quarantine_or_a_format_error(tmp_path_factory, raw):
    path = tmp_path_factory.getbasetemp() / "hostile.json"
    path.write_bytes(raw)
    try:
        t = read_coco(path)
    except CocoFormatError as exc:
        assert str(exc).startswith(f"{path}: ")  # names the file, then the JSON path or byte offset
        return
    rejected = t.rejected.to_pylist()
    assert {r["reason"] for r in rejected} <= {"invalid_value", "invalid_segmentation"} <= set(REASON_CODES)
    assert all(_DETAIL.match(r["detail"]) for r in rejected), rejected
    kept = t.images.num_rows + t.annotations.num_rows + t.categories.num_rows
    assert kept + len(rejected) == _record_count(raw)  # every record is kept or quarantined, once
    assert t.annotations.schema.field("segmentation").type == SEGMENTATION_TYPE
    assert t.annotations.schema.field("segmentation").type.field("polygons").type == POLYGONS_TYPE
    for seg in t.annotations.column("segmentation").to_pylist():
        if seg["rle_counts"] is not None:  # what training will hand pycocotools decodes to its size
            h, w = seg["rle_size"]
            counts = decode_counts(seg["rle_counts"])
            assert mask_utils.area({"counts": seg["rle_counts"].encode(), "size": [h, w]}) == sum(counts[1::2])


@HOSTILE
@given(size=st.one_of(st.lists(ints, max_size=3), st.tuples(st.integers(1, 300), st.integers(1, 300)).map(list)),
       counts=rle_counts)
def test_rle_check_accepts_only_what_pycocotools_decodes(size, counts):
    problem = rle_problem(size, counts)
    if problem is not None:
        assert problem[0] in ("size", "counts") and problem[1]
        return
    h, w = size
    if isinstance(counts, list):
        counts = mask_utils.frPyObjects({"counts": counts, "size": [h, w]}, h, w)["counts"].decode()
    mask = mask_utils.decode({"counts": counts.encode(), "size": [h, w]})
    assert mask.shape == (h, w) and int(mask.sum()) == sum(decode_counts(counts)[1::2])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """An image folder with a good image, in-folder and escaping symlinks, a FIFO and a directory,
    next to a secret image outside it whose bytes no check may ever read."""
    base = tmp_path_factory.mktemp("names")
    images = base / "images"
    (images / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(images / "a.jpg")
    Image.new("RGB", (8, 8), (255, 0, 0)).save(base / "secret.jpg")
    (images / "out.jpg").symlink_to(base / "secret.jpg")
    (images / "sub" / "up").symlink_to(base, target_is_directory=True)
    (images / "in.jpg").symlink_to("a.jpg")
    (images / "zero").symlink_to("/dev/zero")
    os.mkfifo(images / "pipe")
    return images, hashlib.sha256((base / "secret.jpg").read_bytes()).hexdigest()


names = st.one_of(
    file_names,
    st.lists(st.sampled_from(["..", ".", "sub", "up", "images", "a.jpg", "out.jpg", "in.jpg", "zero", "pipe",
                              "secret.jpg", "", "/"]), min_size=1, max_size=6).map("/".join),
)


@pytest.mark.timeout(300)
@HOSTILE
@given(name=names)
def test_no_file_name_reads_outside_the_folder_or_hangs(folder, name):
    images, secret = folder
    r = check_file(str(images), name)
    assert r["sha256"] != secret
    target = os.path.realpath(os.path.join(images, name)) if "\0" not in name else ""
    if r["sha256"] is not None:  # read: a regular file inside the folder
        assert target.startswith(str(images) + os.sep) and os.path.isfile(target)
    else:
        assert r["refused"] or not r["file_exists"] or r["decode_error"]
