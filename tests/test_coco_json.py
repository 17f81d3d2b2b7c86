"""Structural validation of annotation files: a bad file fails naming the file and the field."""

from __future__ import annotations

import json

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
