"""One fast CPU step per task (Lightning fast_dev_run), model factories, and the LR schedule."""

from __future__ import annotations

import socket
import time

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from lakevision.data.synthetic import generate_dataset
from lakevision.data.dataset import COCODataset, collate_fn
from lakevision.data.transforms import build_transform
from lakevision.packaging.architectures import WeightsUnavailableError, build_model
from lakevision.training.module import BaseModel, warmup_cosine

pytestmark = pytest.mark.slow  # every architecture trained for a step


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    import json

    ds = generate_dataset(tmp_path_factory.mktemp("shapes"), num_images=6, seed=9, image_size=(64, 96))
    doc = json.loads(ds.annotation_file.read_text())
    by_image = {im["id"]: [] for im in doc["images"]}
    for a in doc["annotations"]:
        by_image[a["image_id"]].append(a)
    paths = [str(ds.image_dir / im["file_name"]) for im in doc["images"]]
    records = [{"image_id": i, "annotations": anns} for i, anns in by_image.items()]
    return paths, records


CASES = [
    ("classification", "resnet18", False),
    ("detection", "fasterrcnn_mobilenet_v3_large_320_fpn", False),
    ("detection", "fasterrcnn_resnet18_fpn", False),
    ("segmentation", "maskrcnn_resnet18_fpn", False),
    ("segmentation", "maskrcnn_resnet50_fpn", False),
    ("segmentation", "deeplabv3_mobilenet_v3_large", True),
]


@pytest.mark.parametrize("task, arch, semantic", CASES, ids=[c[1] for c in CASES])
def test_fast_dev_run_per_task(shapes, task, arch, semantic):
    paths, records = shapes
    size = 64
    train = COCODataset(paths, records, build_transform(task, size, True, semantic=semantic), task, semantic=semantic)
    val = COCODataset(paths, records, build_transform(task, size, False, semantic=semantic), task,
                      category_ids=train.category_ids, semantic=semantic)
    collate = None if task == "classification" or semantic else collate_fn
    model = build_model(task, arch, train.num_classes, "none", size, rois_per_image=32, rpn_proposals=50)
    module = BaseModel(model, 1e-3, 1e-5, task, num_classes=train.num_classes, semantic=semantic)
    trainer = pl.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_model_summary=False)
    before = [p.detach().clone() for p in module.parameters() if p.requires_grad][:5]
    trainer.fit(module, DataLoader(train, batch_size=2, collate_fn=collate), DataLoader(val, batch_size=2, collate_fn=collate))
    after = [p.detach() for p in module.parameters() if p.requires_grad][:5]
    assert any(not torch.equal(a, b) for a, b in zip(before, after)), "no parameter moved"
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["train_loss"]) and torch.isfinite(metrics["val_loss"])
    if task == "classification":
        assert "val_acc" in metrics and "val_f1" in metrics
    elif semantic:
        assert "val_miou" in metrics
    else:
        assert "val_map_50" in metrics and 0.0 <= float(metrics["val_map_50"]) <= 1.0
    module.eval()
    with torch.no_grad():
        out = module(torch.rand(1, 3, size, size))
    if task == "classification":
        assert out.shape == (1, train.num_classes)
    elif semantic:
        assert out.shape == (1, train.num_classes, size, size)
    else:
        assert {"boxes", "labels", "scores"} <= set(out[0])


def test_classification_heads_and_num_classes():
    for arch in ("resnet18", "mobilenet_v3_small"):
        model = build_model("classification", arch, 5)
        assert model(torch.rand(2, 3, 64, 64)).shape == (2, 5)


def test_pretrained_weights_that_cannot_be_fetched_fail_fast(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache: the weights must be downloaded
    # a proxy that refuses connections: the download fails here whether or not the machine has a network
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}"
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, closed)
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    t = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match="cannot fetch pretrained weights for resnet18.*weights: none"):
        build_model("classification", "resnet18", 3, weights="DEFAULT")
    assert time.monotonic() - t < 30


def test_warmup_then_cosine():
    f = warmup_cosine(total_steps=100, warmup_steps=10, min_ratio=0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 100))


def test_unknown_task_is_rejected():
    with pytest.raises(ValueError, match="task must be one of"):
        BaseModel(torch.nn.Linear(2, 2), task="pose")
    with pytest.raises(ValueError, match="num_classes is required"):
        BaseModel(torch.nn.Linear(2, 2), task="classification")
