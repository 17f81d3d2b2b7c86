"""Explanations on real torchvision models: Grad-CAM, per-box saliency, and explain_image on models
logged through the serving packaging."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torch import nn

from lakevision.errors import LakevisionError
from lakevision.packaging.pyfunc import ModelLoadError
from lakevision.evaluation.explain import (
    ExplainError,
    box_saliencies,
    box_saliency,
    default_layer,
    explain_image,
    grad_cam,
    overlay,
)
from lakevision.packaging.pyfunc import ServingSpec, load_image_model, log_image_model
from lakevision.data.images import load_rgb
from lakevision.packaging.architectures import build_model

from . import processes

pytestmark = pytest.mark.slow  # training a toy model

CATS = ([1, 2, 3], ["circle", "square", "triangle"])


@pytest.fixture(scope="module")
def scene(tmp_path_factory) -> Path:
    """A 128x160 image: two bright shapes on a dark, slightly noisy background."""
    rng = np.random.default_rng(5)
    pixels = (rng.normal(40, 8, (128, 160, 3))).clip(0, 255).astype(np.uint8)
    im = Image.fromarray(pixels)
    draw = ImageDraw.Draw(im)
    draw.rectangle([20, 30, 60, 70], fill=(230, 40, 40))
    draw.ellipse([100, 70, 140, 110], fill=(240, 220, 60))
    path = tmp_path_factory.mktemp("scene") / "scene.png"
    im.save(path)
    return path


def _tensor(path: Path) -> torch.Tensor:
    return torch.from_numpy(load_rgb(str(path))).permute(2, 0, 1).float().div(255)


# ---------------------------------------------------------------------- Grad-CAM
@pytest.mark.parametrize("task, arch", [("classification", "resnet18"), ("classification", "mobilenet_v3_small"),
                                        ("classification", "convnext_tiny"),
                                        ("segmentation", "deeplabv3_mobilenet_v3_large")])
def test_grad_cam_is_a_unit_map_at_image_size_from_the_last_stage(task, arch):
    torch.manual_seed(0)
    model = build_model(task, arch, 3 if task == "classification" else 4).eval()
    layer = default_layer(model)
    expected = {"resnet18": lambda: model.layer4, "mobilenet_v3_small": lambda: model.features[-1],
                "convnext_tiny": lambda: model.features[-1],
                "deeplabv3_mobilenet_v3_large": lambda: list(model.backbone.children())[-1]}[arch]()
    assert layer is expected
    cam = grad_cam(model, torch.randn(3, 96, 128))
    assert cam.shape == (96, 128) and cam.dtype == np.float32
    assert np.isfinite(cam).all() and cam.min() >= 0 and cam.max() <= 1
    if arch == "resnet18":
        # behind a linear head Grad-CAM is the class activation map: seeded random weights give one that varies
        assert cam.max() == pytest.approx(1.0) and cam.std() > 0.05
    # no hook left behind, no gradient written into the model
    assert not layer._forward_hooks
    assert all(p.grad is None for p in model.parameters())


def _squares(rng: np.random.Generator, n: int, size: int = 64, side: int = 16):
    """Black images with one red (class 0) or green (class 1) square in the left or right half;
    returns the images, the labels and each square's top-left corner (y, x)."""
    x = rng.normal(0, 0.02, (n, 3, size, size)).astype(np.float32)
    labels = rng.integers(0, 2, n)
    corners = []
    for i in range(n):
        y0 = int(rng.integers(0, size - side))
        x0 = int(rng.integers(4, size // 2 - side - 4 + 1)) + size // 2 * int(rng.integers(0, 2))  # clear of the midline
        x[i, :, y0:y0 + side, x0:x0 + side] = 0
        x[i, labels[i], y0:y0 + side, x0:x0 + side] = 1
        corners.append((y0, x0))
    return torch.from_numpy(x), torch.from_numpy(labels), corners


def test_grad_cam_points_at_the_evidence_of_a_trained_classifier():
    """Where the answer is known: the class is the colour of the only object, so its evidence is
    that object, and the Grad-CAM mass must lie in the half of the image that holds it."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 2),
    )
    # a zero head stays antisymmetric (two-class softmax gradients sum to zero), so each class's
    # weights carry only what tells the classes apart, not a shared offset on the background
    nn.init.zeros_(model[-1].weight)
    nn.init.zeros_(model[-1].bias)
    opt = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(80):
        x, y, _ = _squares(rng, 16)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    x, y, corners = _squares(rng, 12)
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() >= 0.95  # it learned the task
    for image, (y0, x0) in zip(x, corners):
        cam = grad_cam(model, image, layer=model[7])
        assert cam.shape == (64, 64)
        share = (cam[:, 32:] if x0 >= 32 else cam[:, :32]).sum() / cam.sum()
        assert share > 0.6, (y0, x0, share)
        # the hottest pixel is on the square, give or take one feature-map cell (4 px) and the blur
        peak_y, peak_x = np.unravel_index(cam.argmax(), cam.shape)
        assert y0 - 6 <= peak_y < y0 + 16 + 6 and x0 - 6 <= peak_x < x0 + 16 + 6, (y0, x0, peak_y, peak_x)


# ---------------------------------------------------------------------- detection saliency
@pytest.mark.parametrize("task, arch", [("detection", "fasterrcnn_resnet18_fpn"),
                                        ("segmentation", "maskrcnn_resnet18_fpn")])
def test_box_saliency_is_a_unit_map_that_favours_the_box(scene, task, arch):
    torch.manual_seed(0)
    model = build_model(task, arch, 4, "none", 128, 64, 100).eval()
    model.roi_heads.detections_per_img = 20  # not 100: Mask R-CNN's mask head runs on every detection
    x = _tensor(scene)
    detections, maps = box_saliencies(model, x, boxes=[])
    assert maps == {}
    boxes = detections["boxes"]
    assert len(boxes) > 0  # untrained, but a 4-class softmax is near 0.25: above the 0.05 threshold
    # a box that leaves most of the image outside it, so inside and outside can be compared
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]) / (128 * 160)
    k = int(np.flatnonzero((area > 0.02) & (area < 0.4))[0])
    heat = box_saliency(model, x, k)
    assert heat.shape == (128, 160) and heat.dtype == np.float32
    assert heat.min() == 0 and heat.max() == pytest.approx(1.0) and heat.std() > 0.01
    x0, y0, x1, y1 = boxes[k]
    inside = np.zeros(heat.shape, bool)
    inside[int(y0):int(np.ceil(y1)), int(x0):int(np.ceil(x1))] = True
    # the score is pooled from the box's features: its pixels weigh more than the rest
    assert heat[inside].mean() > heat[~inside].mean()
    assert all(p.grad is None for p in model.parameters())
    n = len(boxes)
    with pytest.raises(ExplainError, match=rf"^box {n}: the model found {n} boxes"):
        box_saliency(model, x, n)


def test_overlay_blends_at_image_size_and_draws_boxes():
    image = np.full((40, 50, 3), 100, np.uint8)
    heat = np.zeros((10, 10), np.float32)
    heat[:, 5:] = 1.0  # hot on the right, resized to the image
    out = np.asarray(overlay(image, heat, boxes=[[2, 2, 20, 20]], labels=["square 0.90"]))
    assert out.shape == (40, 50, 3)
    left, right = out[30, 5].astype(int), out[30, 45].astype(int)
    assert right[0] > right[2] and left[2] > left[0]  # jet: red where hot, blue where cold
    assert (out[10, 2] == 255).all()  # the white box outline
    with pytest.raises(ValueError, match="1 labels for 0 boxes"):
        overlay(image, heat, labels=["x"])


# ---------------------------------------------------------------------- explain_image on logged models
@pytest.fixture(scope="module")
def logged(tmp_path_factory, scene) -> dict[str, str]:
    """A classifier and a detector logged as the serving pyfunc, as the train job logs them."""
    from lakevision.tracking import ExperimentTracker, local_tracking_uri

    root = tmp_path_factory.mktemp("mlflow")
    tracker = ExperimentTracker("explain-test", tracking_uri=local_tracking_uri(root))
    uris = {"root": str(root)}  # a local data root: `lakevision explain --root` reads this store
    with tracker:
        for task, arch, n in (("classification", "resnet18", 3), ("detection", "fasterrcnn_resnet18_fpn", 4)):
            torch.manual_seed(0)
            model = build_model(task, arch, n, "none", 64, 64, 100).eval()
            spec = ServingSpec(task, False, 64, *CATS, architecture=arch)
            uris[task] = log_image_model(model, spec, scene.read_bytes(), name=task).model_uri
    return uris


def _is_png(path: Path) -> bool:
    with Image.open(path) as im:
        return im.format == "PNG" and im.width > 0 and im.height > 0


def test_explain_image_classification_reports_the_served_prediction(logged, scene, tmp_path):
    uri = logged["classification"]
    out = tmp_path / "figures" / "classification.png"
    result = explain_image(uri, str(scene), str(out))
    served = load_image_model(uri).predict_images([load_rgb(str(scene))]).iloc[0]
    assert result["task"] == "classification" and result["out_path"] == str(out) and _is_png(out)
    assert (result["label"], result["category"]) == (served["label"], served["category"])
    assert result["score"] == pytest.approx(served["score"], abs=1e-5)


def test_explain_image_detection_explains_the_served_boxes(logged, scene, tmp_path):
    uri = logged["detection"]
    served = load_image_model(uri).predict_images([load_rgb(str(scene))]).iloc[0]
    n = len(served["boxes"])
    assert n > 0
    result = explain_image(uri, str(scene), str(tmp_path / "top.png"))
    assert result["task"] == "detection" and _is_png(tmp_path / "top.png")
    assert np.allclose(result["boxes"], served["boxes"], atol=1e-3)
    assert result["categories"] == served["categories"]
    assert np.allclose(result["scores"], served["scores"], atol=1e-5)
    assert result["explained"] == list(range(min(4, n)))

    one = explain_image(uri, str(scene), str(tmp_path / "last.png"), box=n - 1)
    assert one["explained"] == [n - 1] and _is_png(tmp_path / "last.png")
    with pytest.raises(ExplainError, match=rf"^{re.escape(str(scene))}: box {n}: the model found {n} boxes"):
        explain_image(uri, str(scene), str(tmp_path / "missing.png"), box=n)
    assert not (tmp_path / "missing.png").exists()


def test_explain_image_names_what_is_wrong(logged, scene, tmp_path):
    uri = logged["classification"]
    out = str(tmp_path / "out.png")
    missing = tmp_path / "no-such.jpg"
    with pytest.raises(ExplainError, match=re.escape(f"{missing}: no such image file")):
        explain_image(uri, str(missing), out)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(LakevisionError, match=re.escape(f"{text}: cannot load image")):
        explain_image(uri, str(text), out)
    with pytest.raises(ExplainError, match="box 0: a classification model has no boxes"):
        explain_image(uri, str(scene), out, box=0)
    with pytest.raises(ModelLoadError, match="models:/m-0123456789abcdef"):
        explain_image("models:/m-0123456789abcdef", str(scene), out)
    assert not Path(out).exists()


def test_explain_command_writes_the_png(logged, scene, tmp_path):
    import json as _json
    import sys

    out = tmp_path / "cli.png"
    cmd = [sys.executable, "-m", "lakevision.cli", "explain", "--model-uri", logged["detection"],
           "--root", logged["root"], "--out", str(out)]
    proc = processes.run([*cmd, "--image", str(scene), "--json"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = _json.loads(proc.stdout)
    assert printed["task"] == "detection" and printed["out_path"] == str(out) and _is_png(out)
    proc = processes.run([*cmd, "--image", str(tmp_path / "nope.jpg")], timeout=300)
    assert proc.returncode == 2 and "nope.jpg: no such image file" in proc.stderr
