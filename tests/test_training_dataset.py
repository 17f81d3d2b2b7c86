"""COCODataset targets per task, transforms moving boxes and masks, and records from the gold table."""

from __future__ import annotations

import albumentations as A
import numpy as np
import pytest
import torch
from PIL import Image

from lakevision.data.ingest import run_ingest
from lakevision.data.synthetic import generate_dataset
from lakevision.data.dataset import COCODataset, IGNORE_INDEX, collate_fn
from lakevision.data.images import ImageLoadError, annotation_mask, load_rgb
from lakevision.data.samples import load_split

SQUARE = {"id": 1, "category_id": 7, "bbox": [10.0, 20.0, 30.0, 40.0], "area": 1200.0, "iscrowd": 0,
          "segmentation": [[10, 20, 40, 20, 40, 60, 10, 60]]}
SMALL = {"id": 2, "category_id": 3, "bbox": [60.0, 5.0, 10.0, 10.0], "area": 100.0, "iscrowd": 0,
         "segmentation": {"polygons": [[60, 5, 70, 5, 70, 15, 60, 15]], "rle_counts": None, "rle_size": None}}


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "img.png"
    Image.new("L", (100, 80), 50).save(path)  # grayscale on purpose
    return str(path)


def _ds(image, task, anns=(SQUARE, SMALL), **kw):
    return COCODataset([image], [{"image_id": 5, "annotations": list(anns)}], task=task, **kw)


def test_detection_target_in_torchvision_format(image):
    ds = _ds(image, "detection")
    x, t = ds[0]
    assert x.shape == (3, 80, 100) and x.dtype == torch.uint8  # BaseModel scales to [0, 1]
    # category ids map to 1..K in sorted id order (3 -> 1, 7 -> 2); boxes become xyxy
    assert t["labels"].tolist() == [2, 1]
    assert t["boxes"].tolist() == [[10.0, 20.0, 40.0, 60.0], [60.0, 5.0, 70.0, 15.0]]
    assert t["image_id"].item() == 5 and t["iscrowd"].tolist() == [0, 0]
    assert ds.num_classes == 3


def test_boxes_and_masks_follow_a_flip(image):
    flip = A.Compose([A.HorizontalFlip(p=1.0)],
                     bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels", "ann_index"]))
    ds = _ds(image, "segmentation", transform=flip)
    x, t = ds[0]
    assert t["boxes"].tolist()[0] == pytest.approx([60.0, 20.0, 90.0, 60.0], abs=1e-4)  # x -> 100 - x
    mask = t["masks"][0].numpy()
    ys, xs = np.nonzero(mask)
    assert xs.min() >= 59 and xs.max() <= 90 and ys.min() >= 19 and ys.max() <= 60
    assert t["masks"].shape == (2, 80, 100)


def test_crowd_regions_are_left_out_of_instance_targets_and_ignored_in_semantic(image):
    crowd = dict(SMALL, id=3, iscrowd=1)
    _, t = _ds(image, "detection", anns=(SQUARE, crowd))[0]
    assert t["labels"].tolist() == [2]
    _, sem = _ds(image, "segmentation", anns=(SQUARE, crowd), semantic=True)[0]
    values = set(np.unique(sem["mask"].numpy()).tolist())
    assert values == {0, 2, IGNORE_INDEX}


@pytest.mark.parametrize("rule, expected", [("largest", 7), ("first", 7), ("most_common", 3)])
def test_classification_label_rule(image, rule, expected):
    anns = (SQUARE, SMALL, dict(SMALL, id=4))
    ds = _ds(image, "classification", anns=anns, label_rule=rule, category_ids=[3, 7])
    _, t = ds[0]
    assert t["label"].item() == [3, 7].index(expected)


def test_images_without_objects_are_dropped_for_classification(image):
    ds = COCODataset([image, image], [{"image_id": 1, "annotations": [SQUARE]}, {"image_id": 2, "annotations": []}],
                     task="classification")
    assert len(ds) == 1


def test_exif_and_rgba_become_upright_rgb(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20)).save(tmp_path / "e.jpg", exif=exif)
    Image.new("RGBA", (10, 12)).save(tmp_path / "a.png")
    assert load_rgb(str(tmp_path / "e.jpg")).shape == (40, 20, 3)
    assert load_rgb(str(tmp_path / "a.png")).shape == (12, 10, 3)


def test_unreadable_image_names_the_path(tmp_path):
    bad = tmp_path / "gone.jpg"
    bad.write_bytes(b"nope")
    ds = COCODataset([str(bad)], [{"image_id": 1, "annotations": [SQUARE]}])
    with pytest.raises(ImageLoadError, match="gone.jpg: cannot load image"):
        ds[0]


def test_rle_and_polygon_masks_agree():
    # a 4x4 square in the top-left corner of an 8x8 image, as COCO's column-major RLE and as a polygon
    square = np.zeros((8, 8), np.uint8)
    square[:4, :4] = 1
    rle_ann = {"bbox": [0, 0, 4, 4], "segmentation": {"counts": [0, 4, 4, 4, 4, 4, 4, 4, 36], "size": [8, 8]}}
    poly_ann = {"bbox": [0, 0, 4, 4], "segmentation": [[0, 0, 4, 0, 4, 4, 0, 4]]}
    np.testing.assert_array_equal(annotation_mask(rle_ann, 8, 8), square)
    poly = annotation_mask(poly_ann, 8, 8)
    # pycocotools rasterizes a polygon's edge pixels in: the square, and at most its one-pixel border
    assert (poly[:4, :4] == 1).all() and poly[5:, :].sum() == 0 and poly[:, 5:].sum() == 0


def test_collate_keeps_lists(image):
    ds = _ds(image, "detection")
    images, targets = collate_fn([ds[0], ds[0]])
    assert len(images) == 2 and len(targets) == 2


def test_wrong_inputs():
    with pytest.raises(ValueError, match="task must be one of"):
        COCODataset([], [], task="pose")
    with pytest.raises(ValueError, match="1 image paths but 0 annotation records"):
        COCODataset(["a"], [])


def test_records_from_the_gold_table(runtime, tmp_path):
    ds = generate_dataset(tmp_path / "d", num_images=30, seed=3)
    result = run_ingest(runtime, str(ds.annotation_file), str(ds.image_dir))
    train = load_split(runtime, "train")
    val = load_split(runtime, ["val", "test"], version=result.tables["samples"]["version"])
    assert len(train.image_paths) + len(val.image_paths) == 30
    assert train.category_ids == [1, 2, 3] and train.category_names == ["circle", "square", "triangle"]
    assert train.version == result.tables["samples"]["version"]
    dataset = COCODataset.from_samples(runtime, "train", result.tables["samples"]["version"], task="segmentation")
    assert len(dataset) == len(train.image_paths) and dataset.source.version == train.version
    x, t = dataset[0]
    assert t["masks"].shape[0] == len(t["labels"]) > 0 and t["masks"].shape[1:] == x.shape[1:]
    with pytest.raises(FileNotFoundError, match="no samples table"):
        load_split(type(runtime)(config=runtime.config, spark=runtime.spark, kind="local", root=tmp_path / "empty"), "train")
