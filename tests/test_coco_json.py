"""Structural validation of annotation files: a bad file fails naming the file and the field."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from lakevision.data.coco_json import CocoFormatError, read_coco
from lakevision.data.synthetic import generate_dataset

GOOD = {
    "images": [{"id": 1, "file_name": "a.jpg", "width": 200, "height": 150}],
    "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 2, 30, 40], "area": 1200.0,
                     "iscrowd": 0, "segmentation": [[1, 2, 31, 2, 31, 42]]}],
    "categories": [{"id": 1, "name": "circle", "supercategory": "round"}],
}


def _write(tmp_path, doc, raw: str | None = None):
    p = tmp_path / "instances.json"
    p.write_text(raw if raw is not None else json.dumps(doc))
    return p


def _mutate(**changes):
    doc = json.loads(json.dumps(GOOD))
    for dotted, value in changes.items():
        section, idx, key = dotted.split("__")
        doc[section][int(idx)][key] = value
    return doc


def test_good_file_parses(tmp_path):
    t = read_coco(_write(tmp_path, GOOD))
    assert t.images.num_rows == 1 and t.annotations.num_rows == 1 and t.categories.num_rows == 1
    assert t.annotations.column("bbox").to_pylist() == [[1.0, 2.0, 30.0, 40.0]]
    assert t.source_file.endswith("instances.json") and len(t.sha256) == 64


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("{not json", r"instances.json: not valid JSON"),
        ("[1, 2]", r"instances.json: <top level>: Expected `object`, got `array`"),
        ('{"images": [], "annotations": []}', r"instances.json: <top level>: Object missing required field `categories`"),
        ('{"images": {}, "annotations": [], "categories": []}', r"instances.json: images: Expected `array`, got `object`"),
        ('{"images": [3], "annotations": [], "categories": []}', r"instances.json: images\[0\]: Expected `object`, got `int`"),
    ],
)
def test_malformed_structure(tmp_path, raw, expected):
    with pytest.raises(CocoFormatError, match=expected):
        read_coco(_write(tmp_path, None, raw))


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"images__0__id": "one"}, r"images\[0\].id: Expected `int`, got `str`"),
        ({"images__0__id": True}, r"images\[0\].id: Expected `int`, got `bool`"),
        ({"images__0__file_name": None}, r"images\[0\].file_name: Expected `str`, got `null`"),
        ({"images__0__width": 20.5}, r"images\[0\].width: Expected `int`, got `float`"),
        ({"annotations__0__image_id": [1]}, r"annotations\[0\].image_id: Expected `int`, got `array`"),
        ({"annotations__0__category_id": None}, r"annotations\[0\].category_id: Expected `int`, got `null`"),
        ({"annotations__0__iscrowd": 2}, r"annotations\[0\].iscrowd: Invalid enum value 2"),
        ({"annotations__0__area": "big"}, r"annotations\[0\].area: Expected `float \| null`, got `str`"),
        ({"annotations__0__segmentation": "poly"}, r"annotations\[0\].segmentation: Expected `object \| array \| null`, got `str`"),
        ({"annotations__0__segmentation": [["x", 1]]}, r"annotations\[0\].segmentation\[0\]\[0\]: Expected `float`, got `str`"),
        ({"categories__0__name": 5}, r"categories\[0\].name: Expected `str`, got `int`"),
    ],
)
def test_wrong_types_name_the_field(tmp_path, changes, expected):
    path = _write(tmp_path, _mutate(**changes))
    with pytest.raises(CocoFormatError, match=str(path).replace(".", r"\.") + ": " + expected):
        read_coco(path)


def test_missing_required_field_in_a_record(tmp_path):
    doc = json.loads(json.dumps(GOOD))
    del doc["images"][0]["height"]
    with pytest.raises(CocoFormatError, match=r"instances.json: images\[0\]: Object missing required field `height`"):
        read_coco(_write(tmp_path, doc))


def test_missing_file_is_a_format_error(tmp_path):
    with pytest.raises(CocoFormatError, match=r"nope.json: cannot read annotation file"):
        read_coco(tmp_path / "nope.json")


def test_bad_bbox_is_left_for_quarantine(tmp_path):
    doc = _mutate(annotations__0__bbox=["a", 2, 3, 4])
    t = read_coco(_write(tmp_path, doc))
    assert t.annotations.column("bbox").to_pylist() == [None]


def test_uncompressed_rle_becomes_coco_compressed_string(tmp_path):
    ds = generate_dataset(tmp_path / "d", num_images=40, crowd_fraction=0.5, seed=3)
    raw = json.loads(ds.annotation_file.read_text())
    crowd = [a for a in raw["annotations"] if a["iscrowd"]]
    assert crowd, "the generator made no crowd region"
    t = read_coco(ds.annotation_file)
    by_id = {r["id"]: r for r in t.annotations.select(["id", "segmentation"]).to_pylist()}
    for a in crowd:
        seg = by_id[a["id"]]["segmentation"]
        h, w = a["segmentation"]["size"]
        ours = {"counts": seg["rle_counts"].encode(), "size": seg["rle_size"]}
        expected = mask_utils.decode(mask_utils.frPyObjects(a["segmentation"], h, w))
        assert np.array_equal(mask_utils.decode(ours), expected)
        assert mask_utils.area(ours) == a["area"]


# --------------------------------------------------------------------------- hostile values: one record's problem
@pytest.mark.parametrize(
    "changes, kind, record_id, detail",
    [
        ({"images__0__id": 2**63}, "image", -1, "images[0].id: 9223372036854775808 does not fit in a 64-bit integer"),
        ({"images__0__width": 2**64}, "image", 1, "images[0].width: 18446744073709551616 does not fit"),
        ({"images__0__license": -(2**63) - 1}, "image", 1, "images[0].license: -9223372036854775809 does not fit"),
        ({"annotations__0__id": 2**64}, "annotation", -1, "annotations[0].id: 18446744073709551616 does not fit"),
        ({"annotations__0__image_id": 2**63}, "annotation", 7, "annotations[0].image_id: 9223372036854775808"),
        ({"annotations__0__category_id": 10**1000}, "annotation", 7,
         "annotations[0].category_id: a 3322-bit integer does not fit in a 64-bit integer"),
        ({"categories__0__id": 2**63}, "category", -1, "categories[0].id: 9223372036854775808 does not fit"),
    ],
)
def test_integer_outside_int64_quarantines_the_record(tmp_path, changes, kind, record_id, detail):
    doc = _mutate(**changes)
    doc["images"].append({"id": 2, "file_name": "b.jpg", "width": 20, "height": 10})
    t = read_coco(_write(tmp_path, doc))
    [row] = t.rejected.to_pylist()
    assert (row["record_kind"], row["record_id"], row["reason"]) == (kind, record_id, "invalid_value")
    assert row["detail"].startswith(detail)
    section = {"image": t.images, "annotation": t.annotations, "category": t.categories}[kind]
    assert section.num_rows == {"image": 1, "annotation": 0, "category": 0}[kind]  # the others are kept
    assert t.images.num_rows + t.annotations.num_rows + t.categories.num_rows == 3


@pytest.mark.parametrize("box, expected", [
    ([2**63, 2, 30, 40], [9.223372036854776e18, 2.0, 30.0, 40.0]),  # a float holds it: out of bounds later
    ([10**400, 2, 30, 40], None),  # no float holds it: invalid_bbox later
])
def test_huge_bbox_integers_are_left_to_the_box_checks(tmp_path, box, expected):
    t = read_coco(_write(tmp_path, _mutate(annotations__0__bbox=box)))
    assert t.annotations.column("bbox").to_pylist() == [expected] and t.rejected.num_rows == 0


def _crowd(counts, size):
    return _mutate(annotations__0__iscrowd=1, annotations__0__segmentation={"counts": counts, "size": size})


@pytest.mark.parametrize(
    "counts, size, detail",
    [
        ([1, 2], [-1, 3], "segmentation.size: -1x3 is not a mask size"),
        ([0, 5], [2**40, 2**40], "segmentation.size: 1099511627776x1099511627776 is not a mask size"),
        ([2**64], [2**64, 1], "segmentation.size: 18446744073709551616x1 is not a mask size"),
        ([1, 2], [150, 200, 3], "segmentation.size: expected [height, width], got 3 numbers"),
        ([-5, 30005], [150, 200], "segmentation.counts: a negative run length (-5)"),
        ([100, 200], [150, 200], "segmentation.counts: the runs cover 300 pixels, the 150x200 mask has 30000"),
        ("\u00ff\u0001", [150, 200], "segmentation.counts: character 0 ('ÿ') is not in the RLE alphabet"),
        ("0`", [150, 200], "segmentation.counts: ends inside a run length (character 2)"),
        ("0ooooooo", [150, 200], "segmentation.counts: a run length longer than 6 characters"),
        ("02", [150, 200], "segmentation.counts: the runs cover 2 pixels"),
    ],
)
def test_crowd_rle_that_does_not_decode_is_quarantined(tmp_path, counts, size, detail):
    t = read_coco(_write(tmp_path, _crowd(counts, size)))
    assert [(r["record_kind"], r["record_id"], r["reason"]) for r in t.rejected.to_pylist()] == [
        ("annotation", 7, "invalid_segmentation")]
    assert t.rejected.column("detail")[0].as_py().startswith("annotations[0]." + detail)
    assert t.annotations.num_rows == 0 and t.images.num_rows == 1


def test_crowd_rle_that_decodes_is_kept_either_way(tmp_path):
    mask = np.eye(150, 200, dtype=np.uint8)
    runs = [0] + [len(list(run)) for _, run in itertools.groupby(mask.flatten(order="F"))]  # starts with ones
    for counts in (mask_utils.encode(np.asfortranarray(mask))["counts"].decode(), runs):
        t = read_coco(_write(tmp_path, _crowd(counts, [150, 200])))
        seg = t.annotations.column("segmentation")[0].as_py()
        assert t.rejected.num_rows == 0 and seg["rle_size"] == [150, 200]
        assert np.array_equal(mask_utils.decode({"counts": seg["rle_counts"].encode(), "size": [150, 200]}),
                              np.eye(150, 200, dtype=np.uint8))


# --------------------------------------------------------------------------- files that cannot be parsed
def test_invalid_utf8_names_the_byte(tmp_path):
    raw = b'{"images": [{"id": 1, "file_name": "\xff.jpg", "width": 1, "height": 1}], "annotations": [], "categories": []}'
    p = tmp_path / "instances.json"
    p.write_bytes(raw)
    with pytest.raises(CocoFormatError, match=rf"instances.json: byte {raw.index(0xFF)}: not valid UTF-8"):
        read_coco(p)


def test_deep_nesting_names_the_byte_even_with_a_raised_recursion_limit(tmp_path):
    """A deep ``info`` (or any deep value) is a format error, and a recursion limit raised by another
    library must not let the decoder overflow the C stack (a crash, so it runs in a child)."""
    head = '{"images": [], "annotations": [], "categories": [], "info": {"a": '
    _write(tmp_path, None, head + "[" * 200_000 + "]" * 200_000 + "}}")
    code = ("import sys; sys.setrecursionlimit(1_000_000)\n"
            "from lakevision.data.coco_json import CocoFormatError, read_coco\n"
            "try:\n    read_coco(sys.argv[1])\nexcept CocoFormatError as exc:\n    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "instances.json")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith(f"instances.json: byte {len(head) + 199_999}: nested 200002 levels deep, "
                                       "too deep to read")
