"""The served model: one MLflow pyfunc for every task.

Callers send images as base64 strings in the ``image`` column of a DataFrame (never paths or
URLs: a serving container cannot read the caller's files). The model applies the training
preprocessing and returns, per image, class probabilities, or boxes/labels/scores, or masks as
COCO RLE. A bad request raises an ``MlflowException`` with ``INVALID_PARAMETER_VALUE``, which the
scoring server (``mlflow models serve``, Databricks Model Serving, the local workspace) answers
with HTTP 400 and this module's message.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import logging
import pickle
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

from lakevision.errors import LakevisionError
from lakevision.packaging.wire import EMBEDDING_KEY, FEATURES_COLUMN, IMAGE_COLUMN, encode_image

log = logging.getLogger(__name__)

MIN_IMAGE_SIDE = 3  # the image statistics' sharpness needs a 3x3 neighbourhood
# what the served model opens; PIL would try every format it knows (TIFF, ICO, PSD, EPS, ...)
SUPPORTED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
# tasks whose answer survives a reduced-scale decode: a label, or boxes scaled back; masks would not
REDUCED_DECODE_TASKS = ("classification", "detection")
EXIF_ORIENTATION = 0x0112
EXIF_TRANSPOSED = {5, 6, 7, 8}  # orientations that swap width and height
SPEC_FILE = "serving_spec.json"
MODEL_FILE = "model.pt"
WEIGHTS_FORMAT = 2  # {"format", "state_dict"}; 1 was a whole pickled module


@dataclass
class ServingSpec:
    """What the pyfunc needs besides the weights: the task, the training preprocessing, the
    categories and the request limits."""

    task: str
    semantic: bool
    image_size: int
    category_ids: list[int]
    category_names: list[str]
    score_threshold: float = 0.05
    mask_threshold: float = 0.5
    max_image_pixels: int = 4096 * 4096
    max_batch_size: int = 64
    # decoded pixels a whole request may hold (RGB: 3 bytes each), whatever its image count
    max_request_pixels: int = 8 * 4096 * 4096
    architecture: str = ""
    # a compact record per image (its statistics and embedding) in the response, so drift can be
    # measured from the inference table even when the request is too big to be logged
    feature_output: bool = True
    # the R-CNN's proposals per image and box head width, as trained (torchvision's for specs written before)
    rpn_proposals: int = 1000
    box_head_size: int = 1024

    @property
    def instance(self) -> bool:
        return self.task in ("detection", "segmentation") and not self.semantic

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ServingSpec:
        return cls(**json.loads(text))


def bad_request(message: str) -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _image_bytes(text: Any, row: int) -> bytes:
    if not isinstance(text, str) or not text:
        raise bad_request(f"row {row}: `{IMAGE_COLUMN}` must be a non-empty base64 string, got {type(text).__name__}")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"row {row}: `{IMAGE_COLUMN}` is not valid base64") from None


def _open(data: bytes, row: int, max_pixels: int):
    """The image opened from its header only (nothing decoded yet), its size checked."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # PIL warns, then raises, above its own bomb limit; ours is checked first from the header
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise bad_request(f"row {row}: `{IMAGE_COLUMN}` is not a {', '.join(SUPPORTED_FORMATS)} image") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise bad_request(f"row {row}: the image header does not read: {exc}") from None
    w, h = im.size
    if w * h > max_pixels:
        raise bad_request(f"row {row}: image is {w}x{h} = {w * h:,} pixels, more than the limit of {max_pixels:,}")
    if min(w, h) < MIN_IMAGE_SIDE:
        raise bad_request(f"row {row}: image is {w}x{h} pixels; each side needs at least {MIN_IMAGE_SIDE}")
    return im


@dataclass
class DecodedImage:
    """An upright RGB array, maybe decoded at a reduced scale, and the upright size of the file."""

    array: np.ndarray
    width: int
    height: int

    @property
    def scale(self) -> tuple[float, float]:
        """Original over decoded size, per axis (1.0 when decoded in full)."""
        return self.width / self.array.shape[1], self.height / self.array.shape[0]


def _decode(im, row: int, reduce_to: int | None) -> DecodedImage:
    from lakevision.data.images import upright_rgb

    try:
        w, h = im.size
        if im.getexif().get(EXIF_ORIENTATION) in EXIF_TRANSPOSED:
            w, h = h, w
        if reduce_to is not None and im.format == "JPEG":
            # JPEG decodes at 1/2, 1/4 or 1/8 scale for a fraction of the time and memory; PIL
            # keeps both sides at least reduce_to, so the model still downsamples what it gets
            im.draft("RGB", (reduce_to, reduce_to))
        return DecodedImage(upright_rgb(im), w, h)
    except (OSError, SyntaxError, ValueError) as exc:
        raise bad_request(f"row {row}: the image does not decode: {exc}") from None
    finally:
        im.close()


def decode_images(texts: list[Any], spec: ServingSpec) -> list[DecodedImage]:
    """A request's images, every failure a 400 naming the row. All headers are read before any
    pixel is decoded, so the request's total pixels are capped (``max_request_pixels``) before
    memory is spent on them; images larger than the model's input decode at reduced scale
    where the task's answer does not depend on pixel positions or maps them back (boxes)."""
    headers, total = [], 0
    for row, text in enumerate(texts):
        im = _open(_image_bytes(text, row), row, spec.max_image_pixels)
        headers.append(im)
        total += im.size[0] * im.size[1]
        if total > spec.max_request_pixels:
            for opened in headers:
                opened.close()
            raise bad_request(f"rows 0-{row}: the request's images have {total:,} pixels so far, more than the "
                              f"limit of {spec.max_request_pixels:,} per request")
    return [_decode(im, row, _reduce_to(spec)) for row, im in enumerate(headers)]


def _reduce_to(spec: ServingSpec) -> int | None:
    return spec.image_size if spec.task in REDUCED_DECODE_TASKS and not spec.semantic else None


def decode_file(data: bytes, spec: ServingSpec) -> DecodedImage:
    """An image file's bytes decoded exactly as a request's image is (same formats, limits and
    reduced-scale decode), for batch scoring; a failure raises the 400 the server would send."""
    return _decode(_open(data, 0, spec.max_image_pixels), 0, _reduce_to(spec))


def decode_image(text: Any, row: int, max_pixels: int) -> np.ndarray:
    """One image as an upright RGB array, in full; every failure is a 400 naming the row."""
    return _decode(_open(_image_bytes(text, row), row, max_pixels), row, None).array


# ---------------------------------------------------------------------- inference
def preprocess(images: list[np.ndarray], spec: ServingSpec) -> torch.Tensor | list[torch.Tensor]:
    """Classification and DeepLabV3: the evaluation transform at the training size, stacked.
    Detection models resize and normalize inside, so they get the image scaled to [0, 1]."""
    if spec.instance:
        return [torch.from_numpy(im).permute(2, 0, 1).float().div_(255) for im in images]
    from lakevision.data.transforms import build_transform

    tf = build_transform(spec.task, spec.image_size, train=False, semantic=spec.semantic)
    return torch.stack([torch.from_numpy(tf(image=im)["image"]).permute(2, 0, 1) for im in images])


def raw_outputs(model, images: list[np.ndarray], spec: ServingSpec) -> list[dict[str, np.ndarray]]:
    """The model's own outputs per image as numpy (the form exports are compared in):
    ``probabilities`` (classification), ``logits`` at the original size (semantic), or
    ``boxes``/``labels``/``scores``(/``masks`` as probabilities) (instances)."""
    device = model_device(model)
    if spec.instance:
        # one image per call: torchvision pads a batch to its largest image, which shifts the
        # features at the borders, and an answer must not depend on what else was in the request
        with torch.inference_mode():
            out = [model([x.to(device) for x in preprocess([im], spec)])[0] for im in images]
        return [{k: (v.float() if k != "labels" else v).cpu().numpy() for k, v in o.items()} for o in out]
    x = preprocess(images, spec).to(device)
    with torch.inference_mode():
        out = model(x)
    if spec.semantic:
        import torch.nn.functional as F

        logits = out["out"] if isinstance(out, dict) else out
        return [{"logits": F.interpolate(lg[None], size=im.shape[:2], mode="bilinear",
                                         align_corners=False)[0].cpu().numpy()}
                for lg, im in zip(logits, images)]
    return [{"probabilities": p.numpy()} for p in out.double().softmax(1).cpu()]


def model_device(model: torch.nn.Module) -> torch.device:
    """Where the model's weights are (inputs go there, outputs come back to the CPU)."""
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):  # no weights, or an export's runner that is no torch module
        return torch.device("cpu")


def _rle(mask: np.ndarray) -> dict:
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def to_response(raw: dict[str, np.ndarray], spec: ServingSpec) -> dict[str, Any]:
    """One image's JSON-able answer with COCO category ids and names."""
    names = dict(zip(spec.category_ids, spec.category_names))
    if "probabilities" in raw:
        p = raw["probabilities"]
        k = int(p.argmax())
        return {"label": spec.category_ids[k], "category": spec.category_names[k], "score": float(p[k]),
                "probabilities": [float(v) for v in p]}
    if "logits" in raw:
        classes = raw["logits"].argmax(0)
        present = [int(c) for c in np.unique(classes) if c > 0]
        labels = [spec.category_ids[c - 1] for c in present]
        return {"labels": labels, "categories": [names[c] for c in labels],
                "masks": [_rle(classes == c) for c in present]}
    keep = raw["scores"] >= spec.score_threshold
    labels = [spec.category_ids[int(v) - 1] for v in raw["labels"][keep]]
    out = {"boxes": [[float(c) for c in b] for b in raw["boxes"][keep]], "labels": labels,
           "categories": [names[c] for c in labels], "scores": [float(s) for s in raw["scores"][keep]]}
    if "masks" in raw:
        out["masks"] = [_rle(m[0] > spec.mask_threshold) for m in raw["masks"][keep]]
    return out


def response_columns(spec: ServingSpec) -> list[str]:
    if spec.task == "classification":
        columns = ["label", "category", "score", "probabilities"]
    elif spec.semantic:
        columns = ["labels", "categories", "masks"]
    else:
        columns = ["boxes", "labels", "categories", "scores"] + (["masks"] if spec.task == "segmentation" else [])
    return columns + ([FEATURES_COLUMN] if spec.feature_output else [])


def _at_scale(image: np.ndarray, side: int) -> np.ndarray:
    """``image`` box-filtered down so its shorter side is ``side`` (unchanged when it is smaller).
    Sharpness depends on scale: measured at one scale, a JPEG decoded at 1/4 and the same picture
    sent as a PNG give the same statistics, and the reference matches the traffic."""
    from PIL import Image

    h, w = image.shape[:2]
    if min(h, w) <= side:
        return image
    scale = side / min(h, w)
    size = (max(MIN_IMAGE_SIDE, round(w * scale)), max(MIN_IMAGE_SIDE, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BOX))


def feature_record(image: np.ndarray, embedding: np.ndarray, size: tuple[int, int] | None = None,
                   side: int | None = None) -> dict[str, Any]:
    """One image's statistics and embedding, rounded: a few hundred bytes of JSON. ``size`` is
    the file's own (width, height) when ``image`` was decoded at a reduced scale; ``side`` the
    scale the statistics are measured at (the model's input size)."""
    from lakevision.data.image_profile import image_features

    features = image_features(image if side is None else _at_scale(image, side))
    if size is not None:
        features.update(width=float(size[0]), height=float(size[1]), aspect_ratio=size[0] / size[1])
    record: dict[str, Any] = {k: float(f"{v:.6g}") for k, v in features.items()}
    record[EMBEDDING_KEY] = [float(f"{v:.5g}") for v in embedding]
    return record


def profile_from_records(records: list[dict[str, Any]]):
    """The :class:`~lakevision.data.image_profile.ImageProfile` of feature records."""
    from lakevision.data.image_profile import FEATURES, ImageProfile

    return ImageProfile.from_features({name: [r[name] for r in records] for name in FEATURES},
                                      embeddings=np.array([r[EMBEDDING_KEY] for r in records], dtype=np.float32))


class ImageModel:
    """The pyfunc's logic, separate from MLflow's base class so evaluation and tests can use it
    on a model in memory."""

    def __init__(self, model: torch.nn.Module, spec: ServingSpec):
        self.model = model.eval()
        self.spec = spec

    def predict_images(self, images: list[np.ndarray] | list[DecodedImage]):
        """Answers for upright RGB arrays, or for decoded request images (whose boxes and sizes
        are mapped back to the file's own scale)."""
        import pandas as pd

        decoded = [im if isinstance(im, DecodedImage) else DecodedImage(im, im.shape[1], im.shape[0]) for im in images]
        if not self.spec.feature_output:
            raw = raw_outputs(self.model, [d.array for d in decoded], self.spec)
            records = None
        else:
            raw, records = self.predict_with_features(decoded)
        for r, d in zip(raw, decoded):
            if "boxes" in r and d.scale != (1.0, 1.0):
                r["boxes"] = r["boxes"] * np.array([*d.scale, *d.scale], dtype=r["boxes"].dtype)
        rows = [to_response(r, self.spec) for r in raw]
        if records is not None:
            rows = [{**row, FEATURES_COLUMN: f} for row, f in zip(rows, records)]
        return pd.DataFrame(rows, columns=response_columns(self.spec))

    def predict_with_features(self, images: list[np.ndarray] | list[DecodedImage]
                              ) -> tuple[list[dict[str, np.ndarray]], list[dict]]:
        """The raw outputs and each image's feature record, from one forward pass."""
        from lakevision.data.image_profile import EmbeddingRecorder

        decoded = [im if isinstance(im, DecodedImage) else DecodedImage(im, im.shape[1], im.shape[0]) for im in images]
        with EmbeddingRecorder(self.model) as recorder:
            raw = raw_outputs(self.model, [d.array for d in decoded], self.spec)
        return raw, [feature_record(d.array, e, (d.width, d.height), self.spec.image_size)
                     for d, e in zip(decoded, recorder.rows)]

    def profile(self, images: list[bytes] | list[np.ndarray], batch_size: int = 16):
        """The reference profile of images: the records the served model returns for them. Image
        files (bytes) are decoded as a request's images are; one the served model would refuse
        is left out (and logged), since no request could bring it."""
        from mlflow.exceptions import MlflowException

        decoded: list[DecodedImage | np.ndarray] = []
        for i, im in enumerate(images):
            if isinstance(im, np.ndarray):
                decoded.append(im)
                continue
            try:
                decoded += decode_images([encode_image(im)], self.spec)
            except MlflowException as exc:
                log.warning("reference image %d left out: %s", i, exc.message)
        records = [r for i in range(0, len(decoded), batch_size)
                   for r in self.feature_records(decoded[i:i + batch_size])]
        return profile_from_records(records)

    def feature_records(self, images: list[np.ndarray] | list[DecodedImage]) -> list[dict]:
        """The feature records :meth:`predict_with_features` returns, without the prediction: a
        detector's embedding is its backbone's output on its own transform of the image, so the
        region proposals and box heads (most of its time) can be skipped."""
        from lakevision.data.image_profile import EmbeddingRecorder

        decoded = [im if isinstance(im, DecodedImage) else DecodedImage(im, im.shape[1], im.shape[0]) for im in images]
        if not (self.spec.instance and hasattr(self.model, "transform") and hasattr(self.model, "backbone")):
            return self.predict_with_features(decoded)[1]
        device = model_device(self.model)
        with EmbeddingRecorder(self.model) as recorder, torch.inference_mode():
            for x in preprocess([d.array for d in decoded], self.spec):  # one at a time, as served
                batch, _ = self.model.transform([x.to(device)])
                self.model.backbone.body(batch.tensors)
        return [feature_record(d.array, e, (d.width, d.height), self.spec.image_size)
                for d, e in zip(decoded, recorder.rows)]

    def predict_frame(self, frame):
        import pandas as pd

        if not isinstance(frame, pd.DataFrame) or IMAGE_COLUMN not in frame.columns:
            got = list(frame.columns) if isinstance(frame, pd.DataFrame) else type(frame).__name__
            raise bad_request(f"expected a DataFrame with a `{IMAGE_COLUMN}` column of base64 images, got {got}")
        if len(frame) == 0:
            raise bad_request("empty batch: send at least one image")
        if len(frame) > self.spec.max_batch_size:
            raise bad_request(f"{len(frame)} images in one request; the limit is {self.spec.max_batch_size}")
        return self.predict_images(decode_images(list(frame[IMAGE_COLUMN]), self.spec))


class LakevisionImageModel(mlflow.pyfunc.PythonModel):
    """The MLflow face of :class:`ImageModel`: weights and spec come from the model's artifacts."""

    def load_context(self, context):
        spec = ServingSpec.from_json(Path(context.artifacts["spec"]).read_text())
        self.image_model = ImageModel(load_weights(context.artifacts["model"], spec), spec)

    def predict(self, context, model_input, params=None):
        return self.image_model.predict_frame(model_input)


def _num_classes(spec: ServingSpec) -> int:
    return len(spec.category_ids) + (0 if spec.task == "classification" else 1)  # + background


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """Tensors only: the architecture is rebuilt from the spec, so loading runs no pickled code."""
    torch.save({"format": WEIGHTS_FORMAT, "state_dict": model.state_dict()}, path)


def load_weights(path: str | Path, spec: ServingSpec) -> torch.nn.Module:
    """The model of ``spec.architecture`` with the weights at ``path``, read with
    ``weights_only=True``: a model artifact someone could write cannot run code on load."""
    from lakevision.packaging.architectures import build_model

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError) as exc:
        # torch's own message advises weights_only=False, the very thing this refuses
        raise ModelLoadError(f"{Path(path).name} cannot be read as a weights-only tensor file "
                             f"({type(exc).__name__})") from None
    if not isinstance(state, dict) or state.get("format") != WEIGHTS_FORMAT:
        raise ModelLoadError(f"{path}: not a lakevision weights file (format {WEIGHTS_FORMAT}); a model logged "
                             "before weights-only files must be logged again")
    model = build_model(spec.task, spec.architecture, _num_classes(spec), "none", spec.image_size,
                        rpn_proposals=spec.rpn_proposals, box_head_size=spec.box_head_size)
    try:
        missing, unexpected = model.load_state_dict(state["state_dict"], strict=False)
    except (RuntimeError, TypeError, AttributeError) as exc:  # shapes that differ, or not a state dict
        raise ModelLoadError(f"{Path(path).name}: the weights do not fit {spec.architecture} with "
                             f"{_num_classes(spec)} classes: {str(exc).splitlines()[-1].strip()[:300]}") from None
    # batch-norm counters exist in plain BatchNorm2d and not in the frozen one pretrained
    # backbones use: neither changes an answer in eval mode
    wrong = [k for k in [*missing, *unexpected] if not k.endswith("num_batches_tracked")]
    if wrong:
        raise ModelLoadError(f"{Path(path).name}: the weights do not fit {spec.architecture} with "
                             f"{_num_classes(spec)} classes: {', '.join(wrong[:5])}")
    return model.eval()


def signature_and_example(image_model: ImageModel, example_image: bytes):
    import pandas as pd
    from mlflow.models import infer_signature

    frame = pd.DataFrame({IMAGE_COLUMN: [encode_image(example_image)]})
    return infer_signature(frame, image_model.predict_frame(frame)), frame


def serving_requirements(spec: ServingSpec) -> list[str]:
    from lakevision.tracking import pinned_requirements

    pkgs = ["torch", "torchvision", "numpy", "pandas", "pillow", "pycocotools"]
    if not spec.instance:
        pkgs.append("albumentations")
    return pinned_requirements(*pkgs)


def log_image_model(model: torch.nn.Module, spec: ServingSpec, example_image: bytes, name: str = "model",
                    workdir: str | Path | None = None):
    """Log ``model`` as the serving pyfunc into the active MLflow run; returns the ModelInfo.

    The package's own code travels with the model (``code_paths``), so a serving container
    needs only the pinned requirements."""

    import lakevision

    if not spec.architecture:
        raise ValueError("spec.architecture is required: the served model is rebuilt from it")
    image_model = ImageModel(model, spec)
    signature, example = signature_and_example(image_model, example_image)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        save_weights(model, Path(tmp) / MODEL_FILE)
        (Path(tmp) / SPEC_FILE).write_text(spec.to_json())
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(Path(__file__).with_name("model_code.py")),
            artifacts={"model": str(Path(tmp) / MODEL_FILE), "spec": str(Path(tmp) / SPEC_FILE)},
            code_paths=[str(Path(lakevision.__file__).parent)],
            signature=signature,
            input_example=example,
            pip_requirements=serving_requirements(spec),
        )


class ModelLoadError(LakevisionError, RuntimeError):
    """A model URI that does not lead to a loadable model."""


def load_pyfunc(model_uri: str) -> tuple[mlflow.pyfunc.PyFuncModel, list[str]]:
    """The model and its requirements.txt lines, from one download that is removed afterwards.

    MLflow downloads a model into a fresh temp folder on every load and never removes it; the
    model keeps nothing on disk (``load_context`` reads the weights into memory)."""
    with tempfile.TemporaryDirectory(prefix="lakevision-model-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        requirements = local / "requirements.txt"
        lines = requirements.read_text().splitlines() if requirements.exists() else []
        return mlflow.pyfunc.load_model(str(local)), lines


def load_local_image_model(model_dir: str | Path, device: str = "cpu") -> ImageModel:
    """The :class:`ImageModel` of a pyfunc already on this machine (a staged copy, see
    :func:`lakevision.packaging.batch.stage_model`), on ``device``; nothing is downloaded."""
    from mlflow.exceptions import MlflowException

    try:
        image_model = mlflow.pyfunc.load_model(str(model_dir)).unwrap_python_model().image_model
    except (MlflowException, OSError, AttributeError, pickle.UnpicklingError, EOFError, RuntimeError) as exc:
        raise ModelLoadError(f"{model_dir}: cannot load the model: {exc}") from None
    image_model.model.to(device)
    return image_model


def load_image_model(model_uri: str) -> ImageModel:
    """The logged pyfunc's :class:`ImageModel` (the torch module and its spec)."""
    from mlflow.exceptions import MlflowException

    try:
        return load_pyfunc(model_uri)[0].unwrap_python_model().image_model
    # torch.load of damaged weights raises UnpicklingError, EOFError or RuntimeError
    except (MlflowException, OSError, AttributeError, pickle.UnpicklingError, EOFError, RuntimeError) as exc:
        raise ModelLoadError(f"{model_uri}: cannot load the model: {exc}") from None
