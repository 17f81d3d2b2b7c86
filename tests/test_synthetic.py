"""The sample dataset generator: deterministic, real COCO, every defect on request."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image, ImageOps
from pycocotools.coco import COCO

from lakevision.data.synthetic import DEFECT_CODES, generate_dataset


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes(tmp_path):
    a = generate_dataset(tmp_path / "a", num_images=25, seed=5, defects={"undecodable": 1})
    b = generate_dataset(tmp_path / "b", num_images=25, seed=5, defects={"undecodable": 1})
    c = generate_dataset(tmp_path / "c", num_images=25, seed=6, defects={"undecodable": 1})
    assert _digest(a.root) == _digest(b.root)
    assert _digest(a.root) != _digest(c.root)


def test_output_is_coco_that_pycocotools_reads(tmp_path):
    ds = generate_dataset(tmp_path / "d", num_images=80, seed=1, crowd_fraction=0.3)
    doc = json.loads(ds.annotation_file.read_text())
    assert {"info", "licenses", "images", "annotations", "categories"} <= doc.keys()
    assert len(doc["categories"]) >= 3 and all(c["supercategory"] for c in doc["categories"])
    coco = COCO(str(ds.annotation_file))
    assert len(coco.getImgIds()) == 80 == ds.num_images
    crowd = [a for a in doc["annotations"] if a["iscrowd"] == 1]
    polys = [a for a in doc["annotations"] if a["iscrowd"] == 0]
    assert crowd and polys
    for a in crowd[:5] + polys[:20]:
        m = coco.annToMask(a)
        x, y, w, h = a["bbox"]
        ys, xs = np.nonzero(m)
        # the box encloses the mask (to rasterisation rounding) and the area matches it
        assert xs.min() >= x - 1 and xs.max() <= x + w + 1 and ys.min() >= y - 1 and ys.max() <= y + h + 1
        assert m.sum() == pytest.approx(a["area"], rel=0.15, abs=6)


def test_image_kinds_and_exif_orientation(tmp_path):
    ds = generate_dataset(tmp_path / "d", num_images=120, seed=2)
    doc = json.loads(ds.annotation_file.read_text())
    modes, rotated = set(), 0
    for rec in doc["images"]:
        with Image.open(ds.image_dir / rec["file_name"]) as im:
            modes.add(im.mode)
            if im.getexif().get(0x0112, 1) == 6:
                rotated += 1
                assert im.size == (rec["height"], rec["width"])
            shown = ImageOps.exif_transpose(im)
            assert shown.size == (rec["width"], rec["height"])
    assert {"RGB", "L", "RGBA"} <= modes
    assert rotated > 0


def test_defect_manifest(tmp_path):
    ds = generate_dataset(tmp_path / "d", num_images=10, defects={c: 2 for c in DEFECT_CODES})
    assert set(ds.defects) == set(DEFECT_CODES)
    assert all(len(set(keys)) == 2 for keys in ds.defects.values())
    assert not (ds.image_dir / f"{int(ds.defects['missing_file'][0].split(':')[1]):012d}.jpg").exists()


def test_rejects_unknown_defect(tmp_path):
    with pytest.raises(ValueError, match="unknown defect codes \\['nope'\\]"):
        generate_dataset(tmp_path / "d", num_images=2, defects={"nope": 1})


def test_metadata_only_writes_no_images(tmp_path):
    ds = generate_dataset(tmp_path / "d", num_images=50, metadata_only=True)
    assert not any(ds.image_dir.iterdir())
    assert len(json.loads(ds.annotation_file.read_text())["images"]) == 50
