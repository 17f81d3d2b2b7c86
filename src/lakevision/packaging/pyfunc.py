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

IMAGE_COLUMN = "image"
FEATURES_COLUMN = "features"  # the per-image feature record of a response (ServingSpec.feature_output)
EMBEDDING_KEY = "embedding"
MIN_IMAGE_SIDE = 3  # the image statistics' sharpness needs a 3x3 neighbourhood
SPEC_FILE = "serving_spec.json"
MODEL_FILE = "model.pt"


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
    architecture: str = ""
    # a compact record per image (its statistics and embedding) in the response, so drift can be
    # measured from the inference table even when the request is too big to be logged
    feature_output: bool = True

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


def encode_image(data: bytes) -> str:
    """What a client sends: the file's bytes, base64-encoded."""
    return base64.b64encode(data).decode("ascii")


def decode_image(text: Any, row: int, max_pixels: int) -> np.ndarray:
    """One request image as an upright RGB array; every failure is a 400 naming the row."""
    from PIL import Image, UnidentifiedImageError

    from lakevision.data.images import upright_rgb

    if not isinstance(text, str) or not text:
        raise bad_request(f"row {row}: `{IMAGE_COLUMN}` must be a non-empty base64 string, got {type(text).__name__}")
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"row {row}: `{IMAGE_COLUMN}` is not valid base64") from None
    try:
        with warnings.catch_warnings():
            # PIL warns, then raises, above its own bomb limit; ours is checked first from the header
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise bad_request(f"row {row}: image is {w}x{h} = {w * h:,} pixels, "
                                      f"more than the limit of {max_pixels:,}")
                if min(w, h) < MIN_IMAGE_SIDE:
                    raise bad_request(f"row {row}: image is {w}x{h} pixels; each side needs at least "
                                      f"{MIN_IMAGE_SIDE}")
                return upright_rgb(im)
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise bad_request(f"row {row}: `{IMAGE_COLUMN}` is not an image PIL can read") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise bad_request(f"row {row}: the image does not decode: {exc}") from None


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
    if spec.instance:
        # one image per call: torchvision pads a batch to its largest image, which shifts the
        # features at the borders, and an answer must not depend on what else was in the request
        with torch.inference_mode():
            out = [model(preprocess([im], spec))[0] for im in images]
        return [{k: v.float().numpy() if k != "labels" else v.numpy() for k, v in o.items()} for o in out]
    x = preprocess(images, spec)
    with torch.inference_mode():
        out = model(x)
    if spec.semantic:
        import torch.nn.functional as F

        logits = out["out"] if isinstance(out, dict) else out
        return [{"logits": F.interpolate(lg[None], size=im.shape[:2], mode="bilinear", align_corners=False)[0].numpy()}
                for lg, im in zip(logits, images)]
    return [{"probabilities": p.numpy()} for p in out.double().softmax(1)]


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


def feature_record(image: np.ndarray, embedding: np.ndarray) -> dict[str, Any]:
    """One image's statistics and embedding, rounded: a few hundred bytes of JSON."""
    from lakevision.data.image_profile import image_features

    record: dict[str, Any] = {k: float(f"{v:.6g}") for k, v in image_features(image).items()}
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

    def predict_images(self, images: list[np.ndarray]):
        import pandas as pd

        if not self.spec.feature_output:
            rows = [to_response(r, self.spec) for r in raw_outputs(self.model, images, self.spec)]
            return pd.DataFrame(rows, columns=response_columns(self.spec))
        raw, records = self.predict_with_features(images)
        rows = [{**to_response(r, self.spec), FEATURES_COLUMN: f} for r, f in zip(raw, records)]
        return pd.DataFrame(rows, columns=response_columns(self.spec))

    def predict_with_features(self, images: list[np.ndarray]) -> tuple[list[dict[str, np.ndarray]], list[dict]]:
        """The raw outputs and each image's feature record, from one forward pass."""
        from lakevision.data.image_profile import EmbeddingRecorder

        with EmbeddingRecorder(self.model) as recorder:
            raw = raw_outputs(self.model, images, self.spec)
        return raw, [feature_record(im, e) for im, e in zip(images, recorder.rows)]

    def profile(self, images: list[np.ndarray], batch_size: int = 16):
        """The reference profile of ``images``: the records the served model returns for them."""
        records = [r for i in range(0, len(images), batch_size)
                   for r in self.predict_with_features(images[i:i + batch_size])[1]]
        return profile_from_records(records)

    def predict_frame(self, frame):
        import pandas as pd

        if not isinstance(frame, pd.DataFrame) or IMAGE_COLUMN not in frame.columns:
            got = list(frame.columns) if isinstance(frame, pd.DataFrame) else type(frame).__name__
            raise bad_request(f"expected a DataFrame with a `{IMAGE_COLUMN}` column of base64 images, got {got}")
        if len(frame) == 0:
            raise bad_request("empty batch: send at least one image")
        if len(frame) > self.spec.max_batch_size:
            raise bad_request(f"{len(frame)} images in one request; the limit is {self.spec.max_batch_size}")
        images = [decode_image(v, i, self.spec.max_image_pixels) for i, v in enumerate(frame[IMAGE_COLUMN])]
        return self.predict_images(images)


class LakevisionImageModel(mlflow.pyfunc.PythonModel):
    """The MLflow face of :class:`ImageModel`: weights and spec come from the model's artifacts."""

    def load_context(self, context):
        spec = ServingSpec.from_json(Path(context.artifacts["spec"]).read_text())
        model = torch.load(context.artifacts["model"], map_location="cpu", weights_only=False)
        self.image_model = ImageModel(model, spec)

    def predict(self, context, model_input, params=None):
        return self.image_model.predict_frame(model_input)


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

    image_model = ImageModel(model, spec)
    signature, example = signature_and_example(image_model, example_image)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        torch.save(model, Path(tmp) / MODEL_FILE)
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


def load_image_model(model_uri: str) -> ImageModel:
    """The logged pyfunc's :class:`ImageModel` (the torch module and its spec)."""
    from mlflow.exceptions import MlflowException

    try:
        return load_pyfunc(model_uri)[0].unwrap_python_model().image_model
    # torch.load of damaged weights raises UnpicklingError, EOFError or RuntimeError
    except (MlflowException, OSError, AttributeError, pickle.UnpicklingError, EOFError, RuntimeError) as exc:
        raise ModelLoadError(f"{model_uri}: cannot load the model: {exc}") from None
