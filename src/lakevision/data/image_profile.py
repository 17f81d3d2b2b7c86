"""Image statistics profiles: what a model's images looked like, to compare later traffic against.

A profile keeps raw per-image samples (capped, subsampled with a fixed seed) and not only
histograms, so two profiles can be compared with any two-sample test; it round-trips through
JSON, so the train job can log the training images' profile as an artifact next to the model.
"""

from __future__ import annotations

import base64
import functools
import math
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Union

import numpy as np
from PIL import Image

from lakevision.errors import DataError

if TYPE_CHECKING:
    import torch
    from torch import nn

ImageLike = Union[Image.Image, np.ndarray]

FEATURES = ("width", "height", "aspect_ratio", "brightness", "contrast", "sharpness", "mean_r", "mean_g", "mean_b")
QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)
MAX_SAMPLES = 5000
# The kernel test in drift.py is quadratic in rows: a thousand rows keep it ~1 s.
MAX_EMBEDDING_ROWS = 1000
EMBEDDING_DIM = 32
# 2: embeddings recorded in the serving forward pass and projected to EMBEDDING_DIM
FORMAT_VERSION = 2

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as PIL's "L" mode


def rgb_array(image: ImageLike) -> np.ndarray:
    """``image`` as a uint8 (H, W, 3) array; anything else is an error, not a silent conversion,
    since the serving path hands over upright RGB and a profile must see what the model sees."""
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise DataError(f"image mode is {image.mode!r}, expected 'RGB' (convert it with image.convert('RGB'))")
        image = np.asarray(image)
    if not isinstance(image, np.ndarray):
        raise DataError(f"expected a PIL image or a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise DataError(f"image must be a uint8 array of shape (H, W, 3), got {image.dtype} of shape {image.shape}")
    if image.shape[0] < 3 or image.shape[1] < 3:
        raise DataError(f"image is {image.shape[1]}x{image.shape[0]} pixels; sharpness needs at least 3x3")
    return image


def image_features(image: ImageLike) -> dict[str, float]:
    """Size, exposure, sharpness and colour of one RGB image (luma on 0-255)."""
    rgb = rgb_array(image)
    height, width = rgb.shape[:2]
    pixels = rgb.astype(np.float32).reshape(-1, 3)
    luma = (pixels @ _LUMA).reshape(height, width)
    # 4-neighbour Laplacian: its variance falls with blur and rises with noise
    lap = luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4 * luma[1:-1, 1:-1]
    # a matrix product, not mean(axis=0): the served model computes this for every image, and a
    # reduction across the interleaved channels is ten times slower
    r, g, b = np.ones(len(pixels), dtype=np.float32) @ pixels / len(pixels)
    return {"width": float(width), "height": float(height), "aspect_ratio": width / height,
            "brightness": float(luma.mean()), "contrast": float(luma.std()), "sharpness": float(lap.var()),
            "mean_r": float(r), "mean_g": float(g), "mean_b": float(b)}


def _summary(values: np.ndarray) -> dict[str, float]:
    quantiles = np.quantile(values, QUANTILES)
    return {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min()),
            "max": float(values.max()), **{f"p{round(q * 100):02d}": float(v) for q, v in zip(QUANTILES, quantiles)}}


def _checked_samples(samples: Mapping[str, Any]) -> tuple[dict[str, np.ndarray], int]:
    """Float arrays of one length, at least one value each, all finite; and that length."""
    if not samples:
        raise DataError("a profile needs at least one feature")
    arrays = {name: np.asarray(v, dtype=np.float64) for name, v in samples.items()}
    shapes = {name: v.shape for name, v in arrays.items()}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 1:
        raise DataError(f"feature samples must be 1-D arrays of one length, got shapes {shapes}")
    count = len(next(iter(arrays.values())))
    if count == 0:
        raise DataError(f"feature arrays are empty: {sorted(arrays)}")
    for name, values in arrays.items():
        if not np.isfinite(values).all():
            raise DataError(f"feature {name!r} has non-finite values")
    return arrays, count


def _rows(count: int, cap: int, rng: np.random.Generator) -> np.ndarray | None:
    """Sorted indices of ``cap`` of ``count`` rows, or None when all fit."""
    return None if count <= cap else np.sort(rng.choice(count, cap, replace=False))


@dataclass
class ImageProfile:
    """Per-image feature samples (the same images for every feature) and optional embeddings.

    ``n`` counts the images profiled; when that was more than the cap, ``samples`` hold a seeded
    random subset and ``summary`` still describes all ``n``.
    """

    samples: dict[str, np.ndarray]
    n: int
    summary: dict[str, dict[str, float]]
    embeddings: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.samples, kept = _checked_samples(self.samples)
        if self.n < kept:
            raise DataError(f"n ({self.n}) is less than the {kept} samples kept")
        if missing := set(self.samples) - set(self.summary):
            raise DataError(f"summary lacks features {sorted(missing)}")
        if self.embeddings is not None:
            self.embeddings = np.asarray(self.embeddings, dtype=np.float32)
            if self.embeddings.ndim != 2 or len(self.embeddings) == 0 or not np.isfinite(self.embeddings).all():
                raise DataError(f"embeddings must be a finite (rows, dim) matrix with rows, "
                                f"got shape {self.embeddings.shape}")

    @classmethod
    def from_features(cls, features: Mapping[str, Sequence[float] | np.ndarray], embeddings: np.ndarray | None = None,
                      max_samples: int = MAX_SAMPLES, seed: int = 0) -> ImageProfile:
        """A profile from per-image feature values (one array per feature, one value per image) and
        optionally one embedding row per image."""
        arrays, count = _checked_samples(features)
        if embeddings is not None and len(embeddings) != count:
            raise DataError(f"{len(embeddings)} embedding rows for {count} images")
        rng = np.random.default_rng(seed)
        rows = _rows(count, max_samples, rng)
        emb_rows = None if embeddings is None else _rows(count, min(max_samples, MAX_EMBEDDING_ROWS), rng)
        return cls(samples={name: v if rows is None else v[rows] for name, v in arrays.items()}, n=count,
                   summary={name: _summary(v) for name, v in arrays.items()},
                   embeddings=embeddings if emb_rows is None else np.asarray(embeddings)[emb_rows])

    @classmethod
    def from_images(cls, images: Iterable[ImageLike], embeddings: np.ndarray | None = None,
                    max_samples: int = MAX_SAMPLES, seed: int = 0) -> ImageProfile:
        """A profile of :func:`image_features` over ``images`` (any iterable; none is kept)."""
        rows = [image_features(im) for im in images]
        if not rows:
            raise DataError("no images to profile")
        return cls.from_features({name: [r[name] for r in rows] for name in FEATURES}, embeddings, max_samples, seed)

    def subsample(self, max_samples: int, seed: int = 0) -> ImageProfile:
        """This profile with at most ``max_samples`` feature samples (``n`` and summary unchanged)."""
        rows = _rows(len(next(iter(self.samples.values()))), max_samples, np.random.default_rng(seed))
        if rows is None:
            return self
        return ImageProfile({name: v[rows] for name, v in self.samples.items()}, self.n, self.summary, self.embeddings)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: feature samples as lists, embeddings as base64 little-endian float32."""
        emb = None
        if self.embeddings is not None:
            emb = {"shape": list(self.embeddings.shape),
                   "float32_base64": base64.b64encode(self.embeddings.astype("<f4").tobytes()).decode("ascii")}
        return {"version": FORMAT_VERSION, "n": self.n,
                "features": {name: {"samples": v.tolist(), "summary": self.summary[name]}
                             for name, v in self.samples.items()},
                "embeddings": emb}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ImageProfile:
        if data.get("version") != FORMAT_VERSION:
            raise DataError(f"profile format version {data.get('version')!r} is not {FORMAT_VERSION}")
        try:
            features = data["features"]
            emb = data["embeddings"]
            embeddings = None if emb is None else np.frombuffer(
                base64.b64decode(emb["float32_base64"]), dtype="<f4").reshape(emb["shape"])
            return cls(samples={name: f["samples"] for name, f in features.items()}, n=int(data["n"]),
                       summary={name: dict(f["summary"]) for name, f in features.items()}, embeddings=embeddings)
        except KeyError as exc:
            raise DataError(f"profile dict lacks the key {exc}") from None
        except DataError:
            raise
        except (TypeError, ValueError, AttributeError) as exc:
            raise DataError(f"malformed profile dict: {exc}") from None


# ---------------------------------------------------------------------- embeddings
def _feature_module(model: nn.Module) -> tuple[nn.Module, Callable[[Any], torch.Tensor]]:
    """The submodule whose output is ``model``'s last (N, C, H, W) feature maps, and how to take
    the maps from that output: a forward hook there sees what the model itself computed."""
    from torchvision.models import ConvNeXt, MobileNetV3, ResNet
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
    from torchvision.models.segmentation import DeepLabV3

    if isinstance(model, (GeneralizedRCNN, RetinaNet)):
        # the CNN under the FPN; its last level is the most semantic
        return model.backbone.body, lambda out: list(out.values())[-1]
    if isinstance(model, DeepLabV3):
        return model.backbone, lambda out: out["out"]
    if isinstance(model, ResNet):
        return model.layer4, lambda out: out
    if isinstance(model, (MobileNetV3, ConvNeXt)):
        return model.features, lambda out: out
    raise TypeError(f"cannot take embeddings from a {type(model).__name__}: expected a torchvision ResNet, "
                    "MobileNetV3, ConvNeXt, Faster/Mask R-CNN, RetinaNet or DeepLabV3")


@functools.lru_cache(maxsize=8)
def _projection(channels: int) -> np.ndarray:
    """A fixed random projection from ``channels`` to :data:`EMBEDDING_DIM` dimensions: distances
    between rows survive it (Johnson-Lindenstrauss), so the kernel test still sees a shift, and
    a row is small enough to return with every prediction."""
    rng = np.random.default_rng(channels)
    return (rng.standard_normal((channels, EMBEDDING_DIM)) / math.sqrt(EMBEDDING_DIM)).astype(np.float32)


class EmbeddingRecorder:
    """Records one embedding row per image while the model predicts: its last feature maps
    averaged over space and projected to :data:`EMBEDDING_DIM` values. The maps are the ones the
    prediction computes anyway, so an embedding costs no second pass over the image; the
    reference profile and the served model record them the same way, through the serving path.

    Only the creating thread's forward passes are recorded: threads that share one model (a
    server's request threads, Sail's UDF threads in batch scoring) each see their own images."""

    def __init__(self, model: nn.Module):
        self._module, self._maps = _feature_module(model)
        self.rows: list[np.ndarray] = []
        self._handle = None
        self._thread = threading.get_ident()

    def _hook(self, module, inputs, output) -> None:
        if threading.get_ident() != self._thread:
            return
        fmap = self._maps(output).detach().float()
        pooled = fmap.mean(dim=(2, 3)).cpu().numpy()
        self.rows.extend(pooled @ _projection(pooled.shape[1]))

    def __enter__(self) -> EmbeddingRecorder:
        self._handle = self._module.register_forward_hook(self._hook)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._handle.remove()
