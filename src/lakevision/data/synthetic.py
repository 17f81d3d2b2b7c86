"""A deterministic COCO-format dataset of simple shapes, with bad records on request.

The images are real JPEG/PNG files (RGB, grayscale, RGBA and EXIF-rotated among them) and the
instances JSON has everything COCO has: ``info``, ``licenses``, ``images``, ``annotations``
(polygons, ``area``, ``bbox``, ``iscrowd`` with uncompressed RLE for crowd regions) and
``categories`` with supercategories. ``defects`` adds records that ingest must quarantine, and the
returned manifest says which record carries which reason code, so tests can check ingest exactly.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
from PIL import Image, ImageDraw

from lakevision.data.processor import REASON_CODES

CATEGORIES = [
    {"id": 1, "name": "circle", "supercategory": "round"},
    {"id": 2, "name": "square", "supercategory": "polygon"},
    {"id": 3, "name": "triangle", "supercategory": "polygon"},
]
DEFECT_CODES = REASON_CODES  # one synthetic defect per quarantine reason
IMAGE_DEFECTS = {"missing_file", "undecodable", "too_small", "too_large", "size_mismatch", "unsafe_file"}
_EXIF_ORIENTATION = 0x0112


@dataclass
class SyntheticDataset:
    root: Path
    annotation_file: Path
    image_dir: Path
    num_images: int
    num_annotations: int
    # reason code -> record keys ("image:12", "annotation:40") that must be quarantined with it
    defects: dict[str, list[str]] = field(default_factory=dict)


def _shape_polygon(rng: np.random.Generator, cat: int, cx: float, cy: float, r: float, n_circle: int) -> np.ndarray:
    angle = rng.uniform(0, 2 * math.pi)
    n = {1: n_circle, 2: 4, 3: 3}[cat]
    t = angle + np.arange(n) * (2 * math.pi / n)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], axis=1)


def _bbox(poly: np.ndarray) -> list[float]:
    x0, y0 = poly.min(axis=0)
    x1, y1 = poly.max(axis=0)
    return [round(float(x0), 2), round(float(y0), 2), round(float(x1 - x0), 2), round(float(y1 - y0), 2)]


def _area(poly: np.ndarray) -> float:
    x, y = poly[:, 0], poly[:, 1]
    cross = x[:-1] @ y[1:] - y[:-1] @ x[1:] + x[-1] * y[0] - y[-1] * x[0]  # shoelace
    return round(float(0.5 * abs(cross)), 2)


def _place(rng: np.random.Generator, w: int, h: int, k: int, scale: tuple[float, float]) -> list[tuple[float, float, float]]:
    """Up to ``k`` non-overlapping circles (cx, cy, r) inside the image, so every mask is whole."""
    placed: list[tuple[float, float, float]] = []
    for _ in range(k * 20):
        if len(placed) == k:
            break
        r = rng.uniform(*scale) * min(w, h)
        cx, cy = rng.uniform(r + 1, w - r - 1), rng.uniform(r + 1, h - r - 1)
        if all((cx - px) ** 2 + (cy - py) ** 2 > (r + pr + 2) ** 2 for px, py, pr in placed):
            placed.append((cx, cy, r))
    return placed


def _rle_uncompressed(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE: run lengths over the column-major mask, starting with zeros."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _encode(img: Image.Image, fmt: str, exif: Image.Exif | None = None) -> bytes:
    buf = io.BytesIO()
    kwargs = {"quality": 90} if fmt == "JPEG" else {}
    if exif is not None:
        kwargs["exif"] = exif
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _pick_style(rng: np.random.Generator) -> str:
    return str(rng.choice(["rgb_jpeg", "rgb_png", "gray_jpeg", "rgba_png", "exif_jpeg"], p=[0.7, 0.1, 0.07, 0.07, 0.06]))


def _render(display: Image.Image, style: str) -> tuple[bytes, str]:
    """Encode the display image in ``style``; an EXIF-rotated file displays as ``display``."""
    if style == "rgb_png":
        return _encode(display, "PNG"), "png"
    if style == "gray_jpeg":
        return _encode(display.convert("L"), "JPEG"), "jpg"
    if style == "rgba_png":
        rgba = display.convert("RGBA")
        rgba.putalpha(230)
        return _encode(rgba, "PNG"), "png"
    if style == "exif_jpeg":
        # Orientation 6 means "rotate 90 degrees clockwise to display": store it rotated back.
        exif = Image.Exif()
        exif[_EXIF_ORIENTATION] = 6
        return _encode(display.transpose(Image.Transpose.ROTATE_90), "JPEG", exif), "jpg"
    return _encode(display, "JPEG"), "jpg"


class _Builder:
    def __init__(self, rng: np.random.Generator, image_dir: Path | None, object_scale: tuple[float, float]):
        self.rng = rng
        self.object_scale = object_scale
        self.image_dir = image_dir
        self.images: list[dict] = []
        self.annotations: list[dict] = []
        self.next_ann_id = 1

    def add_annotation(self, image_id: int, cat: int, poly: np.ndarray, /, **override) -> dict:
        ann = {
            "id": self.next_ann_id,
            "image_id": image_id,
            "category_id": cat,
            "segmentation": [np.round(poly, 2).ravel().tolist()],
            "area": _area(poly),
            "bbox": _bbox(poly),
            "iscrowd": 0,
        }
        ann.update(override)
        self.next_ann_id += 1
        self.annotations.append(ann)
        return ann

    def add_image(self, image_id: int, w: int, h: int, max_objects: int, crowd: bool, n_circle: int) -> None:
        rng = self.rng
        spots = _place(rng, w, h, int(rng.integers(1, max_objects + 1)) + (1 if crowd else 0), self.object_scale)
        objects = [(int(rng.integers(1, 4)), spot) for spot in spots]
        fname = f"{image_id:012d}"
        style = _pick_style(rng)
        display = None
        if self.image_dir is not None:
            # Sensor-like noise on a dark background: real-photo decode cost, and no trivial pixel shortcut.
            bg = rng.integers(20, 90, 3)
            pixels = np.clip(bg + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
            display = Image.fromarray(pixels, "RGB")
            draw = ImageDraw.Draw(display)
        for i, (cat, (cx, cy, r)) in enumerate(objects):
            color = tuple(int(v) for v in rng.integers(140, 256, 3))
            if crowd and i == len(objects) - 1:
                self._add_crowd(image_id, cat, cx, cy, r, w, h, draw if display else None, color)
                continue
            poly = _shape_polygon(rng, cat, cx, cy, r, n_circle)
            if display is not None:
                draw.polygon([tuple(p) for p in poly], fill=color)
            self.add_annotation(image_id, cat, poly)
        if display is not None:
            data, ext = _render(display, style)
            fname += f".{ext}"
            (self.image_dir / fname).write_bytes(data)
        else:
            fname += ".jpg"
        self.images.append({"id": image_id, "file_name": fname, "width": w, "height": h, "license": 1})

    def _add_crowd(self, image_id, cat, cx, cy, r, w, h, draw, color) -> None:
        """A cluster of small shapes of one category, annotated as one iscrowd=1 RLE region."""
        mask_img = Image.new("L", (w, h), 0)
        mdraw = ImageDraw.Draw(mask_img)
        for _ in range(int(self.rng.integers(3, 6))):
            ox, oy = self.rng.uniform(-0.5, 0.5, 2) * r
            small = _shape_polygon(self.rng, cat, cx + ox, cy + oy, r * 0.35, 12)
            mdraw.polygon([tuple(p) for p in small], fill=1)
            if draw is not None:
                draw.polygon([tuple(p) for p in small], fill=color)
        mask = np.asarray(mask_img, dtype=np.uint8)
        ys, xs = np.nonzero(mask)
        bbox = [float(xs.min()), float(ys.min()), float(xs.max() - xs.min() + 1), float(ys.max() - ys.min() + 1)]
        self.add_annotation(
            image_id, cat, np.zeros((3, 2)),
            segmentation=_rle_uncompressed(mask), area=float(mask.sum()), bbox=bbox, iscrowd=1,
        )


def _inject(b: _Builder, defects: Mapping[str, int], next_image_id: int, min_size: int, max_size: int) -> dict[str, list[str]]:
    """Append records that carry exactly one reason code each; return code -> record keys."""
    unknown = set(defects) - set(DEFECT_CODES)
    if unknown:
        raise ValueError(f"unknown defect codes {sorted(unknown)}; known: {list(DEFECT_CODES)}")
    if b.image_dir is None and set(defects) & IMAGE_DEFECTS:
        raise ValueError("image defects need image files (metadata_only=False)")
    manifest: dict[str, list[str]] = {}
    good_image = b.images[0]
    gw, gh = good_image["width"], good_image["height"]
    image_id = next_image_id
    mid = max(min_size + 20, 128)

    for code in DEFECT_CODES:
        for _ in range(int(defects.get(code, 0))):
            if code in IMAGE_DEFECTS:
                w, h = {"too_small": (min_size - 30, min_size - 10), "too_large": (max_size + 50, mid)}.get(code, (mid, mid))
                display = Image.new("RGB", (w, h), (40, 40, 40))
                fname = f"{image_id:012d}.jpg"
                data = _encode(display, "JPEG")
                json_w = w + 17 if code == "size_mismatch" else w
                if code == "undecodable":
                    data = data[: len(data) // 3]  # a truncated JPEG: the header parses, the pixels do not
                if code == "unsafe_file":  # a good image, but outside the image folder: ingest must not read it
                    (b.image_dir.parent / fname).write_bytes(data)
                    fname = f"../{fname}"
                elif code != "missing_file":
                    (b.image_dir / fname).write_bytes(data)
                b.images.append({"id": image_id, "file_name": fname, "width": json_w, "height": h, "license": 1})
                manifest.setdefault(code, []).append(f"image:{image_id}")
                image_id += 1
                continue
            square = np.array([[10, 10], [30, 10], [30, 30], [10, 30]], dtype=float)
            if code == "duplicate_id":
                # The later of two records sharing an id is quarantined; the first one is kept.
                ann = b.add_annotation(good_image["id"], 1, square)
                ann["id"] = b.annotations[len(manifest.get(code, []))]["id"]
                manifest.setdefault(code, []).append(f"annotation:{ann['id']}")
                continue
            override = {
                "unknown_image": {"image_id": 10**9 + image_id},
                "unknown_category": {"category_id": 99},
                "bbox_out_of_bounds": {"bbox": [gw - 10.0, 5.0, 40.0, 20.0]},
                "invalid_bbox": {"bbox": [5.0, 5.0, 0.0, 12.0]},
                "invalid_value": {"category_id": 2**63},  # valid JSON, but no int64 holds it
                # a crowd region that decodes, to a mask one row taller than its image
                "invalid_segmentation": {"iscrowd": 1, "segmentation": {"counts": [(gh + 1) * gw], "size": [gh + 1, gw]}},
            }[code]
            ann = b.add_annotation(good_image["id"], 1, square, **override)
            manifest.setdefault(code, []).append(f"annotation:{ann['id']}")
            image_id += 1
    return manifest


def generate_dataset(
    out_dir: str | Path,
    num_images: int = 200,
    seed: int = 0,
    defects: Mapping[str, int] | None = None,
    image_size: tuple[int, int] = (160, 320),
    max_objects: int = 3,
    crowd_fraction: float = 0.05,
    metadata_only: bool = False,
    circle_points: tuple[int, int] = (12, 32),
    object_scale: tuple[float, float] = (0.08, 0.2),
    first_image_id: int = 1,
    min_image_size: int = 100,
    max_image_size: int = 2000,
) -> SyntheticDataset:
    """Write ``out_dir/images/*`` and ``out_dir/annotations/instances.json`` (and, for an
    ``unsafe_file`` defect, the image its ``../`` file name reaches in ``out_dir``).

    The same arguments give byte-identical output. ``metadata_only`` writes the JSON alone (for
    benchmarks at COCO scale); ``first_image_id`` lets a second call make a disjoint batch to add
    later. Size defects are made relative to ``min_image_size``/``max_image_size``; object radii
    are ``object_scale`` times the shorter image side.
    """
    if num_images < 1:
        raise ValueError("num_images must be at least 1")
    out = Path(out_dir)
    image_dir = out / "images"
    ann_dir = out / "annotations"
    ann_dir.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    b = _Builder(rng, None if metadata_only else image_dir, object_scale)
    lo, hi = image_size
    for image_id in range(first_image_id, first_image_id + num_images):
        w, h = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
        n_circle = int(rng.integers(circle_points[0], circle_points[1] + 1))
        b.add_image(image_id, w, h, max_objects, bool(rng.random() < crowd_fraction), n_circle)
    manifest = _inject(b, defects or {}, first_image_id + num_images, min_image_size, max_image_size)
    doc = {
        "info": {"description": "lakevision synthetic shapes", "version": "1.0", "year": 2026, "contributor": "lakevision"},
        "licenses": [{"id": 1, "name": "CC0-1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": b.images,
        "annotations": b.annotations,
        "categories": CATEGORIES,
    }
    ann_file = ann_dir / "instances.json"
    ann_file.write_bytes(orjson.dumps(doc))
    return SyntheticDataset(
        root=out,
        annotation_file=ann_file,
        image_dir=image_dir,
        num_images=len(b.images),
        num_annotations=len(b.annotations),
        defects=manifest,
    )
