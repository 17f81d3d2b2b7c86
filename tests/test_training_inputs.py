"""What training reads before it starts Ray: the gold version it is pointed at, with that
version's categories, and a clear refusal when a split is empty or the version does not exist."""

from __future__ import annotations

import json

import pytest

from lakevision.data.ingest import run_ingest
from lakevision.data.samples import load_split
from lakevision.data.synthetic import generate_dataset
from lakevision.errors import DataError
from lakevision.training.train import run_training

pytestmark = pytest.mark.slow  # Sail ingests


def _ingest(rt, ds):
    return run_ingest(rt, str(ds.annotation_file), str(ds.image_dir))


def _with_new_category(ds, out):
    """The dataset's file plus a fourth category used by one annotation of every image."""
    doc = json.loads(ds.annotation_file.read_text())
    doc["categories"].append({"id": 99, "name": "hexagon", "supercategory": "shape"})
    next_id = max(a["id"] for a in doc["annotations"]) + 1
    for i, image in enumerate(doc["images"]):
        doc["annotations"].append({"id": next_id + i, "image_id": image["id"], "category_id": 99,
                                   "bbox": [1, 1, 8, 8], "area": 64, "iscrowd": 0})
    out.write_text(json.dumps(doc))
    return out


def test_an_older_gold_version_is_read_with_its_own_categories(runtime, tmp_path):
    ds = generate_dataset(tmp_path / "data", num_images=12, seed=3)
    first = _ingest(runtime, ds)
    grown = _with_new_category(ds, tmp_path / "grown.json")
    second = run_ingest(runtime, str(grown), str(ds.image_dir))
    v0, v1 = first.tables["samples"]["version"], second.tables["samples"]["version"]
    assert v1 > v0

    raw = json.loads(ds.annotation_file.read_text())
    old = load_split(runtime, ["train", "val", "test"], v0)
    assert old.version == v0 and old.category_names == [c["name"] for c in sorted(raw["categories"], key=lambda c: c["id"])]
    assert sum(len(r["annotations"]) for r in old.annotations) == len(raw["annotations"])
    new = load_split(runtime, ["train", "val", "test"])
    assert new.version == v1 and new.category_names == old.category_names + ["hexagon"]
    assert sum(len(r["annotations"]) for r in new.annotations) == len(json.loads(grown.read_text())["annotations"])

    with pytest.raises(DataError, match=rf"samples: no version {v1 + 1}; the table has versions 0 to {v1}$"):
        load_split(runtime, "train", v1 + 1)
    with pytest.raises(DataError, match=rf"no version -1; the table has versions 0 to {v1}$"):
        run_training(runtime, "classification", data_version=-1)


def test_an_empty_split_is_refused_before_training_starts(runtime, tmp_path):
    ds = generate_dataset(tmp_path / "data", num_images=1, seed=4)
    _ingest(runtime, ds)
    (record,) = load_split(runtime, ["train", "val", "test"]).annotations
    train, val = (len(load_split(runtime, s).image_paths) for s in ("train", "val"))
    assert train + val <= 1  # one image: at most one of the two splits has it
    with pytest.raises(DataError, match=rf"the train and val splits need images \(have {train} and {val}\)"):
        run_training(runtime, "classification")
    assert record["image_id"] == json.loads(ds.annotation_file.read_text())["images"][0]["id"]
