"""Why a model predicted what it did: Grad-CAM for classifiers and semantic segmentation, input
saliency for each detected box, and heatmap overlays to look at them.

Both methods differentiate one score of the model's ordinary forward pass, so they explain the
model exactly as it is served (eval mode, nothing patched). Gradients are taken with
``torch.autograd.grad``, which leaves the parameters' ``.grad`` untouched: explaining a model in the
middle of training or evaluation has no side effects on it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lakevision.errors import LakevisionError

if TYPE_CHECKING:
    from lakevision.packaging.pyfunc import ImageModel, ServingSpec

OVERLAY_ALPHA = 0.45
MAX_EXPLAINED_BOXES = 4  # one panel each: more would not be legible in one figure


class ExplainError(LakevisionError, ValueError):
    """An explanation that cannot be made for this input: a missing image, box or class."""


# ---------------------------------------------------------------------- Grad-CAM
def default_layer(model: nn.Module) -> nn.Module:
    """The last convolutional stage: the finest feature maps that already see whole objects."""
    if hasattr(model, "layer4"):  # ResNet
        return model.layer4
    if isinstance(getattr(model, "features", None), nn.Sequential):  # MobileNetV3, ConvNeXt, EfficientNet
        return model.features[-1]
    backbone = getattr(model, "backbone", None)
    if backbone is not None and hasattr(model, "classifier"):
        # DeepLabV3: torchvision cuts the backbone right after the stage it feeds to the head
        return list(backbone.children())[-1]
    raise ExplainError(f"{type(model).__name__}: no default Grad-CAM layer for this architecture; pass `layer`")


def _one_image_batch(image_tensor: torch.Tensor) -> torch.Tensor:
    x = image_tensor[None] if image_tensor.dim() == 3 else image_tensor
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image as (3, H, W) or (1, 3, H, W), got shape {tuple(image_tensor.shape)}")
    return x


def _target_score(output: torch.Tensor | dict[str, torch.Tensor],
                  target_class: int | None) -> tuple[torch.Tensor, int]:
    """The scalar to explain and its class index (the model's, not a COCO category id).

    Semantic segmentation (DeepLabV3 returns a dict with ``out``) explains the mean logit of the
    class over the pixels predicted as it, by default the largest predicted object class: the
    evidence for that region, rather than for every pixel that has some logit for the class."""
    logits = output["out"] if isinstance(output, dict) else output
    n = logits.shape[1]
    if target_class is not None and not 0 <= target_class < n:
        raise ExplainError(f"target_class {target_class}: the model has {n} classes (0-{n - 1})")
    if logits.dim() == 2:
        target = int(logits[0].argmax()) if target_class is None else target_class
        return logits[0, target], target
    predicted = logits[0].argmax(0)
    if target_class is None:
        counts = torch.bincount(predicted.flatten(), minlength=n)
        target = int(counts[1:].argmax()) + 1 if counts[1:].any() else 0  # background only when nothing else
    else:
        target = target_class
    region = predicted == target
    if not region.any():  # a class predicted nowhere: what in the whole image speaks for it
        region = torch.ones_like(region)
    return logits[0, target][region].mean(), target


def _unit_range(a: torch.Tensor) -> np.ndarray:
    lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(tuple(a.shape), np.float32)
    return ((a - lo) / (hi - lo)).clamp(0, 1).float().numpy()


def _detached(output: torch.Tensor | dict[str, torch.Tensor]) -> torch.Tensor | dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in output.items()} if isinstance(output, dict) else output.detach()


def _grad_cam(model: nn.Module, image_tensor: torch.Tensor, target_class: int | None, layer: nn.Module | None
              ) -> tuple[np.ndarray, torch.Tensor | dict[str, torch.Tensor], int]:
    """Grad-CAM plus what explain_image reports with it: the model's output and the explained class."""
    layer = layer if layer is not None else default_layer(model)
    x = _one_image_batch(image_tensor)
    captured: list[Any] = []
    handle = layer.register_forward_hook(lambda _module, _inputs, out: captured.append(out))
    try:
        # inference_mode(False): a caller inside inference mode (as serving code is) still gets a graph
        with torch.inference_mode(False), torch.enable_grad():
            # an input that requires grad puts the activations in the graph even when every weight is frozen
            x = x.detach().clone().requires_grad_(True)
            output = model(x)
            score, target = _target_score(output, target_class)
            acts = captured[-1] if captured else None
            if not isinstance(acts, torch.Tensor) or acts.dim() != 4:
                raise ValueError(f"Grad-CAM layer {type(layer).__name__} must output an (N, C, H, W) feature map "
                                 f"in the forward pass, got {type(acts).__name__}")
            (grads,) = torch.autograd.grad(score, acts)
    finally:
        handle.remove()
    weights = grads.mean(dim=(2, 3), keepdim=True)  # each channel's average pull on the score
    cam = torch.relu((weights * acts.detach()).sum(1, keepdim=True))  # only the evidence for the class
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    return _unit_range(cam), _detached(output), target


def grad_cam(model: nn.Module, image_tensor: torch.Tensor, target_class: int | None = None,
             layer: nn.Module | None = None) -> np.ndarray:
    """Grad-CAM of one preprocessed image, as an (H, W) float32 map in [0, 1] at the tensor's size.

    ``model`` is a classifier (in eval mode) returning logits, or a semantic segmenter returning
    ``{"out": logits}``. ``target_class`` is the model's class index (default: the top class, or
    the largest predicted object class for segmentation); ``layer`` defaults to
    :func:`default_layer`."""
    return _grad_cam(model, image_tensor, target_class, layer)[0]


# ---------------------------------------------------------------------- detection saliency
def _smoothed(saliency: torch.Tensor) -> np.ndarray:
    """Raw pixel gradients are speckled (the strided convolutions' grid shows through); a Gaussian
    about 1.5% of the image wide turns them into regions, which is what the overlay should show."""
    from torchvision.transforms.functional import gaussian_blur

    h, w = saliency.shape
    sigma = max(1.0, max(h, w) / 64)
    k = min(2 * math.ceil(3 * sigma) + 1, 2 * min(h, w) - 1)  # reflect padding needs k // 2 < each side
    return _unit_range(gaussian_blur(saliency[None], [k, k], [sigma, sigma])[0])


def box_saliencies(model: nn.Module, image_tensor: torch.Tensor, boxes: Sequence[int] | None = None,
                   min_score: float = 0.0, top: int = MAX_EXPLAINED_BOXES
                   ) -> tuple[dict[str, np.ndarray], dict[int, np.ndarray]]:
    """The detections of a torchvision detector (Faster/Mask R-CNN, RetinaNet; eval mode) on one
    image (3, H, W) in [0, 1], and an (H, W) saliency map in [0, 1] for each of ``boxes`` (indices
    into the detections), by default the ``top`` best scoring at least ``min_score``.

    The saliency is the smoothed magnitude of the gradient of the box's score with respect to the
    input pixels. That score is differentiable in eval mode: torchvision detaches only the RPN's
    proposals and objectness, not the box head, and ``scores`` is the softmax (R-CNN) or sigmoid
    (RetinaNet) of the class logits of the kept box, indexed by NMS. So the gradient reaches the
    pixels through the features pooled for that box, and shows which pixels its confidence rests
    on. (The box's position comes from detached proposals: this explains the score, not the extent.)
    """
    if image_tensor.dim() != 3:
        raise ValueError(f"expected one image as (3, H, W), got shape {tuple(image_tensor.shape)}")
    with torch.inference_mode(False), torch.enable_grad():
        x = image_tensor.detach().clone().requires_grad_(True)
        detections = model([x])[0]
        scores = detections["scores"]
        # torchvision returns detections sorted by score (NMS order), so the eligible ones come first
        n = int((scores >= min_score).sum())
        picks = list(range(min(top, n))) if boxes is None else [int(b) for b in boxes]
        for i in picks:
            if not 0 <= i < n:
                found = f"{n} boxes" + (f" scoring >= {min_score:g}" if min_score > 0 else "")
                raise ExplainError(f"box {i}: the model found {found}" + (f" (indices 0-{n - 1})" if n else ""))
        maps: dict[int, np.ndarray] = {}
        for i in picks:
            if scores[i].grad_fn is None:
                raise ExplainError(f"{type(model).__name__}: its detection scores carry no gradient, so they "
                                   "cannot be explained (is it a traced or scripted model?)")
            (grad,) = torch.autograd.grad(scores[i], x, retain_graph=True)
            maps[i] = _smoothed(grad.abs().amax(0))  # a pixel matters as much as its most sensitive channel
    return {k: v.detach().numpy() for k, v in detections.items()}, maps


def box_saliency(model: nn.Module, image_tensor: torch.Tensor, box_index: int) -> np.ndarray:
    """The (H, W) saliency map in [0, 1] of detection ``box_index`` (see :func:`box_saliencies`)."""
    return box_saliencies(model, image_tensor, [box_index])[1][box_index]


# ---------------------------------------------------------------------- pictures
def overlay(image_rgb_uint8: np.ndarray, heatmap: np.ndarray, boxes: Sequence[Sequence[float]] | None = None,
            labels: Sequence[str] | None = None) -> Image.Image:
    """``heatmap`` (values in [0, 1], resized to the image when it is not at its size) in the jet
    colormap over the image, with ``boxes`` (x0, y0, x1, y1 in image pixels) and their ``labels``."""
    from matplotlib import colormaps
    from PIL import ImageDraw

    image = np.asarray(image_rgb_uint8)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 image (H, W, 3), got {image.dtype} {image.shape}")
    if labels is not None and (boxes is None or len(labels) != len(boxes)):
        raise ValueError(f"{len(labels)} labels for {0 if boxes is None else len(boxes)} boxes")
    heat = torch.as_tensor(np.asarray(heatmap, np.float32))
    if heat.dim() != 2:
        raise ValueError(f"expected an (H, W) heatmap, got shape {tuple(heat.shape)}")
    h, w = image.shape[:2]
    if tuple(heat.shape) != (h, w):  # a classifier's Grad-CAM is at the model's input size
        heat = F.interpolate(heat[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
    colors = colormaps["jet"](heat.clamp(0, 1).numpy())[..., :3] * 255
    out = Image.fromarray(((1 - OVERLAY_ALPHA) * image + OVERLAY_ALPHA * colors).round().astype(np.uint8))
    draw = ImageDraw.Draw(out)
    for k, box in enumerate(boxes or []):
        x0, y0, x1, y1 = (float(c) for c in box)
        draw.rectangle([x0, y0, x1, y1], outline=(255, 255, 255), width=2)
        if labels is not None:
            # white on black: legible over any colour of the map
            draw.rectangle(draw.textbbox((x0 + 2, y0 + 2), labels[k]), fill=(0, 0, 0))
            draw.text((x0 + 2, y0 + 2), labels[k], fill=(255, 255, 255))
    return out


def panels_figure(rows: list[list[tuple[str, np.ndarray | Image.Image]]]):
    """A grid of titled pictures, one row per explained image."""
    from lakevision.figures import new_figure

    cols = max(len(r) for r in rows)
    fig, axes = new_figure(len(rows), cols, (3.6 * cols, 3.8 * len(rows)))
    for ax in axes.flat:
        ax.set_axis_off()
    for r, row in enumerate(rows):
        for c, (title, picture) in enumerate(row):
            axes[r, c].imshow(np.asarray(picture))
            axes[r, c].set_title(title, fontsize=8)
    return fig


def _save_panels(panels: list[tuple[str, np.ndarray | Image.Image]], out_path: str) -> None:
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    panels_figure([panels]).savefig(out_path, format="png", dpi=120)


# ---------------------------------------------------------------------- a logged model on an image file
def _explain_dense(model: nn.Module, image: np.ndarray, x: torch.Tensor, spec: ServingSpec) -> tuple[dict, list]:
    from lakevision.packaging.pyfunc import to_response

    cam, output, target = _grad_cam(model, x, None, None)
    if spec.semantic:
        share = float((output["out"][0].argmax(0) == target).float().mean())
        category = spec.category_names[target - 1] if target else "background"
        result = {"label": spec.category_ids[target - 1] if target else None, "category": category,
                  "pixel_share": share}
        title = f"Grad-CAM: {category} ({share:.0%} of the pixels)"
    else:
        # the serving response itself (float64 softmax, COCO ids), so the two always agree
        result = to_response({"probabilities": output.double().softmax(1)[0].numpy()}, spec)
        title = f"Grad-CAM: {result['category']} (p={result['score']:.2f})"
    return result, [("input", image), (title, overlay(image, cam))]


def _explain_boxes(model: nn.Module, image: np.ndarray, x: torch.Tensor, spec: ServingSpec,
                   box: int | None, top: int) -> tuple[dict, list]:
    from lakevision.packaging.pyfunc import to_response

    detections, maps = box_saliencies(model, x, None if box is None else [box], min_score=spec.score_threshold,
                                      top=top)
    # the serving response's boxes, in the model's order: box i here is box i of a served answer
    result = to_response({k: detections[k] for k in ("boxes", "labels", "scores")}, spec)
    panels: list = []
    for i, heat in maps.items():
        text = f"{result['categories'][i]} {result['scores'][i]:.2f}"
        panels.append((f"box {i}: {text}", overlay(image, heat, [result["boxes"][i]], [text])))
    if not panels:
        panels.append((f"no box scores >= {spec.score_threshold:g}", image))
    return {**result, "explained": list(maps)}, panels


def explain_image(model_uri: str, image_path: str, out_path: str, box: int | None = None) -> dict[str, Any]:
    """Explain a logged lakevision model's prediction on one image file, as a PNG at ``out_path``.

    The image is preprocessed as serving does. Classification: Grad-CAM of the top class
    (``label``, ``category``, ``score``, ``probabilities`` as served). Semantic segmentation:
    Grad-CAM of the largest predicted class region (``label``, ``category``, ``pixel_share``).
    Detection and instance segmentation: a saliency panel for each of the best boxes above the
    serving score threshold (up to four), or only for ``box``, an index into the served boxes
    (``boxes``, ``labels``, ``categories``, ``scores`` as served, and ``explained``: the indices shown).
    """
    from lakevision.data.images import load_rgb

    if not Path(image_path).is_file():
        raise ExplainError(f"{image_path}: no such image file")
    image = load_rgb(image_path)  # raises naming the file when PIL cannot read it
    from lakevision.packaging.pyfunc import load_image_model

    image_model = load_image_model(model_uri)
    try:
        result, panels = explain_array(image_model, image, box)
    except ExplainError as exc:
        raise ExplainError(f"{image_path}: {exc}") from None
    _save_panels(panels, out_path)
    return {"task": image_model.spec.task, **result, "out_path": str(out_path)}


def explain_array(image_model: ImageModel, image: np.ndarray, box: int | None = None,
                  top: int = MAX_EXPLAINED_BOXES) -> tuple[dict, list]:
    """The prediction on one upright RGB image and its explanation panels (the input first for
    dense tasks, one panel per explained box for instance tasks: ``box``, else the ``top`` best)."""
    from lakevision.packaging.pyfunc import preprocess

    spec = image_model.spec
    x = preprocess([image], spec)
    if not spec.instance:
        if box is not None:
            raise ExplainError(f"box {box}: a {spec.task} model has no boxes; leave `box` out")
        return _explain_dense(image_model.model, image, x, spec)
    return _explain_boxes(image_model.model, image, x[0], spec, box, top)
