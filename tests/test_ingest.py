"""Ingest on a real Sail server into real Delta tables (read back with Sail and delta-rs)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib

import pytest
from deltalake import DeltaTable
from PIL import Image

from lakevision import delta
from lakevision.data.coco_json import CocoFormatError
from lakevision.data.ingest import run_ingest
from lakevision.data.processor import COCOProcessor, REASON_CODES
from lakevision.data.synthetic import DEFECT_CODES, generate_dataset


@pytest.fixture
def dataset(tmp_path):
    return generate_dataset(tmp_path / "data", num_images=40, seed=11, crowd_fraction=0.2,
                            defects={c: 1 for c in DEFECT_CODES})


def _ingest(rt, ds):
    return run_ingest(rt, str(ds.annotation_file), str(ds.image_dir))


def _expected_split(splits, image_id):
    """The split rule written out again in Python, to check Spark's CRC32 bucketing against."""
    b = zlib.crc32(f"{splits.seed}:{image_id}".encode()) % 10_000
    return "train" if b < splits.train * 10_000 else "val" if b < (splits.train + splits.val) * 10_000 else "test"


def _rows(rt, name):
    return delta.read_table(rt.spark, rt.table(name)).count()


def test_every_reason_code_is_quarantined_and_good_records_kept(runtime, dataset):
    result = _ingest(runtime, dataset)
    assert set(REASON_CODES) == set(DEFECT_CODES)
    assert result.quarantine_by_reason == {code: 1 for code in DEFECT_CODES}
    q = delta.read_table(runtime.spark, runtime.table("quarantine")).toPandas()
    got = {f"{r.record_kind}:{r.record_id}": r.reason for r in q.itertuples()}
    want = {key: code for code, keys in dataset.defects.items() for key in keys}
    assert got == want
    assert q["detail"].notna().all() and (q["source_file"] == str(dataset.annotation_file.resolve())).all()
    assert q["ingest_run_id"].eq(result.run_id).all()

    raw = json.loads(dataset.annotation_file.read_text())
    bad_images = {int(k.split(":")[1]) for c in DEFECT_CODES for k in dataset.defects.get(c, []) if k.startswith("image:")}
    good_images = {im["id"] for im in raw["images"]} - bad_images
    images = delta.read_table(runtime.spark, runtime.table("images")).toPandas()
    assert set(images["id"]) == good_images
    # grayscale, RGBA and EXIF-rotated files are valid and keep their mode
    assert {"RGB", "L", "RGBA"} <= set(images["mode"]) and (images["exif_orientation"] == 6).any()
    assert (images["decoded_width"] == images["width"]).all()

    bad_anns = [k for c in DEFECT_CODES for k in dataset.defects.get(c, []) if k.startswith("annotation:")]
    # the duplicate shares its id with a good annotation, which is kept
    assert result.tables["annotations"]["rows"] == len(raw["annotations"]) - len(bad_anns)
    assert result.tables["categories"]["rows"] == 3


def test_gold_samples_nest_annotations_and_split_deterministically(runtime, dataset):
    result = _ingest(runtime, dataset)
    samples = delta.read_table(runtime.spark, runtime.table("samples")).toPandas()
    assert len(samples) == result.tables["images"]["rows"]
    anns = delta.read_table(runtime.spark, runtime.table("annotations")).toPandas()
    per_image = anns.groupby("image_id").size().to_dict()
    for row in samples.itertuples():
        assert row.num_annotations == per_image.get(row.image_id, 0) == len(row.annotations)
        assert {a["category_name"] for a in row.annotations} <= {"circle", "square", "triangle"}
    splits = runtime.config.data.splits
    assert all(row.split == _expected_split(splits, row.image_id) for row in samples.itertuples())
    assert set(samples["split"]) <= {"train", "val", "test"}


def test_rerun_is_idempotent(runtime, dataset):
    first = _ingest(runtime, dataset)
    second = _ingest(runtime, dataset)
    assert second.tables == first.tables  # same rows and the same Delta versions: nothing committed
    assert second.quarantine_by_reason == first.quarantine_by_reason
    assert all(n == 0 for name, n in second.written.items()), second.written
    assert DeltaTable(runtime.table("images").path).version() == first.tables["images"]["version"]
    lineage = delta.read_table(runtime.spark, runtime.table("ingest_runs")).toPandas()
    assert set(lineage["run_id"]) == {first.run_id, second.run_id}
    assert set(lineage["table_name"]) == {"images", "annotations", "categories", "quarantine", "samples"}


def test_adding_images_later_adds_only_those(runtime, tmp_path):
    base = generate_dataset(tmp_path / "d", num_images=20, seed=1)
    first = _ingest(runtime, base)
    more = generate_dataset(tmp_path / "more", num_images=8, seed=2, first_image_id=1000)
    # one annotation file with old and new records, one image folder with all files
    doc = json.loads(base.annotation_file.read_text())
    extra = json.loads(more.annotation_file.read_text())
    offset = max(a["id"] for a in doc["annotations"])
    for a in extra["annotations"]:
        a["id"] += offset
    doc["images"] += extra["images"]
    doc["annotations"] += extra["annotations"]
    base.annotation_file.write_text(json.dumps(doc))
    for f in more.image_dir.iterdir():
        f.rename(base.image_dir / f.name)

    proc = COCOProcessor(runtime.spark, staging_dir=runtime.staging_dir)
    proc.load_coco_annotations(str(base.annotation_file))
    proc.set_known(delta.read_table(runtime.spark, runtime.table("images")), None)
    assert proc.check_images(str(base.image_dir)).count() == 8  # only the new files are opened
    proc.cleanup()

    second = _ingest(runtime, base)
    assert second.tables["images"]["rows"] == 28
    assert second.tables["annotations"]["rows"] == first.tables["annotations"]["rows"] + len(extra["annotations"])
    assert second.written["images"] == 8
    assert second.tables["categories"]["version"] == first.tables["categories"]["version"]
    assert second.tables["samples"]["rows"] == 28


def test_changed_record_is_updated_not_duplicated(runtime, tmp_path):
    ds = generate_dataset(tmp_path / "d", num_images=10, seed=4)
    first = _ingest(runtime, ds)
    doc = json.loads(ds.annotation_file.read_text())
    doc["categories"][0]["name"] = "disc"
    ds.annotation_file.write_text(json.dumps(doc))
    second = _ingest(runtime, ds)
    assert second.written["categories"] == 1
    assert second.tables["categories"]["rows"] == 3
    assert second.tables["categories"]["version"] == first.tables["categories"]["version"] + 1
    names = {r["name"] for r in delta.read_table(runtime.spark, runtime.table("categories")).collect()}
    assert "disc" in names and "circle" not in names
    samples = delta.read_table(runtime.spark, runtime.table("samples")).toPandas()
    assert any(a["category_name"] == "disc" for anns in samples["annotations"] for a in anns)


def test_malformed_file_writes_nothing(runtime, dataset, tmp_path):
    before = _ingest(runtime, dataset)
    bad = tmp_path / "bad.json"
    bad.write_text('{"images": [{"id": "x", "file_name": "a.jpg", "width": 1, "height": 1}], '
                   '"annotations": [], "categories": []}')
    with pytest.raises(CocoFormatError, match=r"bad.json: images\[0\].id: Expected `int`, got `str`"):
        run_ingest(runtime, str(bad), str(dataset.image_dir))
    head = b'{"images": [], "annotations": [], "categories": [], "info": '
    for raw, expected in [  # a file that cannot be parsed names the byte
        (head + b'{"a": "\xff"}}', rf"bad.json: byte {len(head) + 7}: not valid UTF-8"),
        (head + b"[" * 50_000 + b"]" * 50_000 + b"}", rf"bad.json: byte {len(head) + 49_999}: nested 50001 levels deep"),
    ]:
        bad.write_bytes(raw)
        with pytest.raises(CocoFormatError, match=expected):
            run_ingest(runtime, str(bad), str(dataset.image_dir))
    for name, t in before.tables.items():
        assert delta.table_version(runtime.spark, runtime.table(name)) == t["version"]
        assert _rows(runtime, name) == t["rows"]


def test_missing_image_folder_is_an_error(runtime, dataset, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere: image folder does not exist"):
        run_ingest(runtime, str(dataset.annotation_file), str(tmp_path / "nowhere"))
    assert not (runtime.root / "tables").exists()


def test_api_reference_flow_with_pandas_results(spark, dataset, tmp_path):
    proc = COCOProcessor(spark, staging_dir=tmp_path / "stage")
    proc.load_coco_annotations(str(dataset.annotation_file))
    pdf = proc.process_images(str(dataset.image_dir))
    assert len(pdf) == dataset.num_images  # every image file is opened once
    found = proc.validate_data(spark.createDataFrame(pdf))
    assert {k: sorted(v) for k, v in found.items()} == {k: sorted(set(v)) for k, v in dataset.defects.items()}
    out = str(tmp_path / "images_table")
    assert proc.save_to_delta(proc.valid_images, out) == proc.valid_images.count()
    assert proc.save_to_delta(proc.valid_images, out) == 0  # second save commits nothing
    assert DeltaTable(out).version() == 0


def test_duplicate_image_and_category_ids_keep_the_first(runtime, tmp_path):
    ds = generate_dataset(tmp_path / "d", num_images=6, seed=8)
    doc = json.loads(ds.annotation_file.read_text())
    doc["images"].append(dict(doc["images"][2], file_name=doc["images"][3]["file_name"]))
    doc["categories"].append({"id": 2, "name": "box", "supercategory": "polygon"})
    doc["categories"].append({"id": 2, "name": "cube", "supercategory": "polygon"})
    ds.annotation_file.write_text(json.dumps(doc))
    result = _ingest(runtime, ds)
    q = delta.read_table(runtime.spark, runtime.table("quarantine")).toPandas()
    assert sorted(zip(q.record_kind, q.record_id, q.reason)) == [
        ("category", 2, "duplicate_id"), ("image", doc["images"][2]["id"], "duplicate_id")]
    assert result.tables["images"]["rows"] == 6
    cats = {r["id"]: r["name"] for r in delta.read_table(runtime.spark, runtime.table("categories")).collect()}
    assert cats[2] == "square"


def test_category_counts_and_data_sufficiency(runtime, tmp_path):
    clean = generate_dataset(tmp_path / "clean", num_images=40, seed=11, crowd_fraction=0.2)
    result = _ingest(runtime, clean)
    # expected from the raw JSON, not from the tables the same ingest wrote
    raw = json.loads(clean.annotation_file.read_text())
    names = {c["id"]: c["name"] for c in raw["categories"]}
    expected: dict = {name: {"train": 0, "val": 0, "test": 0} for name in names.values()}
    for a in raw["annotations"]:
        if not a["iscrowd"]:
            expected[names[a["category_id"]]][_expected_split(runtime.config.data.splits, a["image_id"])] += 1
    assert result.category_counts == expected and set(expected) == {"circle", "square", "triangle"}
    minimum = runtime.config.data.min_samples_per_category
    short = sorted(name for name, c in expected.items() if c["train"] < minimum)
    assert [w.split(":")[0] for w in result.insufficient] == short
    assert all(f"fewer than min_samples_per_category ({minimum})" in w for w in result.insufficient)
    assert result.to_json()["category_counts"] == expected


def _exif_orientation_long(value: int) -> bytes:
    ifd = struct.pack("<H", 1) + struct.pack("<HHII", 0x0112, 4, 1, value) + struct.pack("<I", 0)
    return b"Exif\x00\x00II*\x00" + struct.pack("<I", 8) + ifd


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_hostile_records_are_quarantined_and_nothing_outside_is_read(runtime, tmp_path):
    ds = generate_dataset(tmp_path / "d", num_images=6, seed=5)
    folder = ds.image_dir
    secret = tmp_path / "secret.jpg"  # a good image outside the image folder: no name may reach it
    Image.new("RGB", (200, 200), (250, 0, 0)).save(secret)
    (folder / "link.jpg").symlink_to(secret)
    (folder / "zero.jpg").symlink_to("/dev/zero")
    os.mkfifo(folder / "pipe.jpg")
    Image.new("RGB", (200, 200)).save(folder / "exif.jpg", exif=_exif_orientation_long(0xFFFFFFFF))
    Image.new("L", (12000, 12000)).save(folder / "huge.png")  # 140 KB
    doc = json.loads(ds.annotation_file.read_text())
    img = doc["images"][0]
    h, w = img["height"], img["width"]

    def image(image_id, name, width=200, height=200):
        doc["images"].append({"id": image_id, "file_name": name, "width": width, "height": height})

    for image_id, name in [(901, "../../secret.jpg"), (902, str(secret)), (903, "link.jpg"), (904, "pipe.jpg"),
                           (905, "zero.jpg"), (906, "exif.jpg")]:
        image(image_id, name)
    image(907, "huge.png", 12000, 12000)
    image(2**64, "x.jpg")
    image(908, "x.jpg", width=2**63)

    def ann(ann_id, **kw):
        doc["annotations"].append({"id": ann_id, "image_id": img["id"], "category_id": 1, "bbox": [1, 1, 5, 5],
                                   "iscrowd": 0, **kw})

    def crowd(counts, size):
        return {"iscrowd": 1, "segmentation": {"counts": counts, "size": size}}

    ann(2**64)
    ann(801, category_id=2**63)
    ann(802, bbox=[2**63, 1, 5, 5])
    ann(803, bbox=[10**400, 1, 5, 5])
    ann(804, **crowd([1, 2], [-1, 3]))
    ann(805, **crowd([-5, 2], [h, w]))
    ann(806, **crowd([0, 5], [2**40, 2**40]))
    ann(807, **crowd([(h + 1) * w], [h + 1, w]))  # decodes, but not to its image's size
    ann(808, **crowd([h * w - 10, 10], [h, w]))  # good
    ds.annotation_file.write_text(json.dumps(doc))

    result = _ingest(runtime, ds)  # one run, no traceback: each record is its own problem
    q = delta.read_table(runtime.spark, runtime.table("quarantine")).toPandas()
    got = {(r.record_kind, r.record_id): r.reason for r in q.itertuples()}
    assert got == {
        **{("image", i): "unsafe_file" for i in (901, 902, 903, 904, 905)},
        ("image", 906): "undecodable", ("image", 907): "too_large",
        ("image", -(len(doc["images"]) - 1)): "invalid_value",  # its own id does not fit: keyed by -(index + 1)
        ("image", 908): "invalid_value",
        ("annotation", -(len(doc["annotations"]) - 8)): "invalid_value",
        ("annotation", 801): "invalid_value",
        ("annotation", 802): "bbox_out_of_bounds", ("annotation", 803): "invalid_bbox",
        **{("annotation", i): "invalid_segmentation" for i in (804, 805, 806, 807)},
    }
    details = dict(zip(zip(q.record_kind, q.record_id), q.detail))
    assert "EXIF Orientation 4294967295" in details[("image", 906)]
    assert "18446744073709551616 does not fit in a 64-bit integer" in details[("image", -(len(doc["images"]) - 1))]
    assert details[("annotation", 801)].startswith("annotations[")
    assert ".category_id: 9223372036854775808" in details[("annotation", 801)]
    assert details[("annotation", 807)] == f"segmentation.size [{h + 1}, {w}] is not the image's [height, width] [{h}, {w}]"
    images = delta.read_table(runtime.spark, runtime.table("images")).toPandas()
    assert hashlib.sha256(secret.read_bytes()).hexdigest() not in set(images["sha256"])
    assert set(images["id"]) == {i["id"] for i in doc["images"][:6]}
    anns = delta.read_table(runtime.spark, runtime.table("annotations")).toPandas()
    assert 808 in set(anns["id"]) and result.tables["annotations"]["rows"] == len(anns)

    again = _ingest(runtime, ds)  # the quarantine keys are stable: a re-run writes nothing
    assert all(n == 0 for n in again.written.values()), again.written
    assert again.tables == result.tables
