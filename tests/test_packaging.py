"""The serving pyfunc and its exports, on real logged MLflow models."""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from lakevision.packaging.exports import compare_outputs, export_and_check
from lakevision.packaging.pyfunc import (EMBEDDING_KEY, FEATURES_COLUMN, IMAGE_COLUMN, ServingSpec, encode_image,
                                        load_image_model)
from lakevision.data.images import load_rgb
from lakevision.packaging.architectures import build_model

from .models import log_trained_model

pytestmark = pytest.mark.slow  # models logged and exported

CATS = ([1, 2, 3], ["circle", "square", "triangle"])


@pytest.fixture(scope="module")
def sample_images(tmp_path_factory):
    rng = np.random.default_rng(3)
    out = []
    for i, (h, w) in enumerate([(96, 128), (120, 100)]):
        path = tmp_path_factory.mktemp("img") / f"{i}.jpg"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(path)
        out.append(path)
    return out


def _image_bytes(h: int, w: int, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (90, 120, 150)).save(buf, fmt)
    return buf.getvalue()


def _jpeg(h: int, w: int) -> bytes:
    return _image_bytes(h, w, "JPEG")


def test_a_big_jpeg_decodes_at_reduced_scale_and_answers_at_its_own(sample_images):
    """A detector with a 128 px input gets a 1024x768 JPEG decoded at 1/4 scale; its boxes and
    feature record are still in the file's own pixels."""
    from lakevision.packaging.pyfunc import DecodedImage, ImageModel, decode_images

    torch.manual_seed(0)
    spec = ServingSpec("detection", False, 128, *CATS, score_threshold=0.0, architecture="fasterrcnn_resnet18_fpn")
    model = ImageModel(build_model("detection", "fasterrcnn_resnet18_fpn", 4, "none", 128), spec)
    big = Image.fromarray(load_rgb(str(sample_images[0]))).resize((1024, 768))
    buf = io.BytesIO()
    big.save(buf, "JPEG", quality=95)
    (reduced,) = decode_images([encode_image(buf.getvalue())], spec)
    assert reduced.array.shape == (192, 256, 3) and (reduced.width, reduced.height) == (1024, 768)
    full = DecodedImage(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")), 1024, 768)
    small_answer = model.predict_images([reduced]).iloc[0]
    assert small_answer["features"]["width"] == 1024 and small_answer["features"]["aspect_ratio"] == pytest.approx(4 / 3, rel=1e-5)
    boxes = np.asarray(small_answer["boxes"]).reshape(-1, 4)
    assert len(boxes) and boxes[:, [0, 2]].max() > 256  # in the file's coordinates, not the decoded ones
    assert (boxes[:, [0, 2]] <= 1024 + 1e-3).all() and (boxes[:, [1, 3]] <= 768 + 1e-3).all()
    # decoding at 1/4 scale costs a fraction of the full decode, and the statistics stay close
    full_answer = model.predict_images([full]).iloc[0]
    assert small_answer["features"]["brightness"] == pytest.approx(full_answer["features"]["brightness"], rel=0.02)


def test_logged_pyfunc_answers_base64_images_per_task(ingested_runtime, sample_images):
    runtime = ingested_runtime
    mlflow.set_tracking_uri(runtime.tracking_uri)
    frame = pd.DataFrame({IMAGE_COLUMN: [encode_image(p.read_bytes()) for p in sample_images]})
    for task, arch in [("classification", "resnet18"), ("detection", "fasterrcnn_resnet18_fpn")]:
        uri, _ = log_trained_model(runtime, seed=1, task=task, arch=arch)
        info = mlflow.models.get_model_info(uri)
        assert info.signature.inputs.input_names() == [IMAGE_COLUMN]
        assert info.saved_input_example_info is not None
        reqs = (Path(mlflow.artifacts.download_artifacts(uri)) / "requirements.txt").read_text()
        assert "torch==" in reqs and "torchvision==" in reqs and "pycocotools==" in reqs
        out = mlflow.pyfunc.load_model(uri).predict(frame)
        assert len(out) == 2
        image_model = load_image_model(uri)
        cats = image_model.spec.category_ids
        if task == "classification":
            row = out.iloc[0]
            assert row["label"] in cats and row["category"] in image_model.spec.category_names
            assert sum(row["probabilities"]) == pytest.approx(1.0, abs=1e-6)
            assert row["score"] == pytest.approx(max(row["probabilities"]))
        else:
            for row, path in zip(out.itertuples(), sample_images):
                h, w = load_rgb(str(path)).shape[:2]
                boxes = np.asarray(row.boxes).reshape(-1, 4)
                assert len(boxes) == len(row.labels) == len(row.scores) == len(row.categories)
                assert set(row.labels) <= set(cats)
                assert all(s >= image_model.spec.score_threshold for s in row.scores)
                assert (boxes[:, [0, 2]] <= w + 1e-3).all() and (boxes[:, [1, 3]] <= h + 1e-3).all()
        # one image alone gets the same answer as inside a batch (to float32 rounding of batched kernels)
        alone = mlflow.pyfunc.load_model(uri).predict(frame.iloc[1:]).iloc[0]
        for key, value in out.iloc[1].items():
            if key in ("probabilities", "score", "boxes", "scores"):
                assert np.allclose(np.asarray(alone[key]), np.asarray(value), atol=1e-5), key
            elif key == FEATURES_COLUMN:  # statistics exact, the embedding to float32 rounding
                assert {k: v for k, v in alone[key].items() if k != EMBEDDING_KEY} == \
                    {k: v for k, v in value.items() if k != EMBEDDING_KEY}
                assert np.allclose(alone[key][EMBEDDING_KEY], value[EMBEDDING_KEY], rtol=1e-3, atol=1e-4)
            else:
                assert alone[key] == value, key


def test_instance_masks_come_back_as_rle(sample_images):
    from pycocotools import mask as mask_utils

    from lakevision.packaging.pyfunc import ImageModel

    torch.manual_seed(0)
    model = build_model("segmentation", "maskrcnn_resnet18_fpn", 4, "none", 128, 64, 100)
    spec = ServingSpec("segmentation", False, 128, *CATS, score_threshold=0.0)
    out = ImageModel(model, spec).predict_images([load_rgb(str(sample_images[0]))])
    row = out.iloc[0]
    assert len(row["masks"]) == len(row["boxes"]) > 0
    decoded = mask_utils.decode({"size": row["masks"][0]["size"], "counts": row["masks"][0]["counts"].encode()})
    assert decoded.shape == (96, 128)


@pytest.mark.parametrize("payload, message", [
    ({IMAGE_COLUMN: ["%%% not base64 %%%"]}, "row 0: `image` is not valid base64"),
    ({IMAGE_COLUMN: [encode_image(b"GIF89a but not really an image")]}, "row 0: `image` is not a JPEG, PNG, WEBP, BMP"),
    # a real image in a format the model does not accept (PIL alone would open it)
    ({IMAGE_COLUMN: [encode_image(_image_bytes(20, 20, "GIF"))]}, "row 0: `image` is not a JPEG, PNG, WEBP, BMP"),
    ({IMAGE_COLUMN: [encode_image(_image_bytes(20, 20, "TIFF"))]}, "row 0: `image` is not a JPEG, PNG, WEBP, BMP"),
    # each image within its own limit, the request over its total: refused before any is decoded
    ({IMAGE_COLUMN: [encode_image(_jpeg(200, 200))] * 3},
     "rows 0-2: the request's images have 120,000 pixels so far, more than the limit of 100,000 per request"),
    ({IMAGE_COLUMN: [encode_image(_jpeg(10, 10)), encode_image(_jpeg(300, 300))]},
     "row 1: image is 300x300 = 90,000 pixels, more than the limit of 40,000"),
    ({IMAGE_COLUMN: []}, "empty batch"),
    ({IMAGE_COLUMN: [encode_image(_jpeg(10, 10))] * 9}, "9 images in one request; the limit is 8"),
])
def test_bad_requests_raise_invalid_parameter(ingested_runtime, payload, message):
    from .models import spec_for
    from lakevision.packaging.pyfunc import ImageModel
    from lakevision.data.samples import load_split

    spec = spec_for(load_split(ingested_runtime, "test"))
    spec.max_request_pixels = 100_000
    model = ImageModel(build_model("classification", "resnet18", 3, "none"), spec)
    with pytest.raises(MlflowException, match=message) as err:
        model.predict_frame(pd.DataFrame(payload))
    assert err.value.get_http_status_code() == 400


@pytest.mark.parametrize("task, arch", [("classification", "resnet18"), ("detection", "fasterrcnn_resnet18_fpn"),
                                        ("segmentation", "deeplabv3_mobilenet_v3_large")])
def test_exports_match_the_eager_model(tmp_path, sample_images, task, arch):
    torch.manual_seed(0)
    n = 3 if task == "classification" else 4
    model = build_model(task, arch, n, "none", 128, 64, 100)
    spec = ServingSpec(task, arch.startswith("deeplab"), 128, *CATS, architecture=arch)
    samples = [load_rgb(str(p)) for p in sample_images]
    checks = export_and_check(model, spec, samples, tmp_path, ["torchscript", "onnx"])
    assert [c.format for c in checks] == ["torchscript", "onnx"]
    for c in checks:
        assert c.passed, c
        assert (tmp_path / c.file).stat().st_size > 0
        assert all(c.max_abs_diff[k] <= c.tolerance[k] for k in c.tolerance)


def test_parity_check_catches_a_different_model():
    spec = ServingSpec("detection", False, 128, *CATS, score_threshold=0.0)
    ref = [{"boxes": np.array([[1.0, 2.0, 30.0, 40.0]]), "labels": np.array([1]), "scores": np.array([0.9])}]
    moved = [{"boxes": np.array([[1.0, 2.0, 30.5, 40.0]]), "labels": np.array([1]), "scores": np.array([0.9])}]
    relabeled = [{"boxes": ref[0]["boxes"], "labels": np.array([2]), "scores": np.array([0.9])}]
    assert compare_outputs(ref, ref, spec) == {"boxes": 0.0, "scores": 0.0}
    assert compare_outputs(ref, moved, spec)["boxes"] == pytest.approx(0.5)
    assert compare_outputs(ref, relabeled, spec)["boxes"] == float("inf")


class _Payload:
    """What an attacker who can write a model artifact would store: code that runs on unpickling."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path(self.marker).touch, ())


def test_weights_load_without_running_pickled_code(tmp_path):
    from lakevision.packaging.pyfunc import ModelLoadError, load_weights, save_weights

    spec = ServingSpec("classification", False, 64, *CATS, architecture="resnet18")
    torch.manual_seed(0)
    model = build_model("classification", "resnet18", 3, "none").eval()
    save_weights(model, tmp_path / "model.pt")
    again = load_weights(tmp_path / "model.pt", spec)
    x = torch.rand(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(again(x), model(x))
    marker = tmp_path / "pwned"
    torch.save({"format": 2, "state_dict": _Payload(str(marker))}, tmp_path / "evil.pt")
    with pytest.raises(ModelLoadError, match="evil.pt cannot be read as a weights-only tensor file"):
        load_weights(tmp_path / "evil.pt", spec)
    assert not marker.exists()
    torch.save(model, tmp_path / "whole.pt")  # the old format: a whole pickled module
    with pytest.raises(ModelLoadError, match="weights-only"):
        load_weights(tmp_path / "whole.pt", spec)
    save_weights(build_model("classification", "resnet18", 5, "none"), tmp_path / "other.pt")
    with pytest.raises(ModelLoadError, match="do not fit resnet18 with 3 classes: .*fc.bias"):
        load_weights(tmp_path / "other.pt", spec)


def test_a_detector_predicts_with_the_proposal_budget_and_box_head_it_was_trained_with(tmp_path):
    from lakevision.packaging.pyfunc import ModelLoadError, load_weights, save_weights

    trained = build_model("detection", "fasterrcnn_resnet18_fpn", 4, "none", 128, rpn_proposals=200,
                          box_head_size=256)
    assert trained.rpn._post_nms_top_n == {"training": 200, "testing": 200}
    assert trained.roi_heads.box_head.fc7.out_features == 256
    save_weights(trained, tmp_path / "model.pt")
    spec = ServingSpec("detection", False, 128, *CATS, architecture="fasterrcnn_resnet18_fpn", rpn_proposals=200,
                       box_head_size=256)
    served = load_weights(tmp_path / "model.pt", ServingSpec.from_json(spec.to_json()))
    assert served.rpn._post_nms_top_n["testing"] == 200 and served.rpn._pre_nms_top_n["testing"] == 400
    x = [torch.rand(3, 96, 128)]
    with torch.inference_mode():
        assert torch.equal(served.eval()(x)[0]["boxes"], trained.eval()(x)[0]["boxes"])
    # a spec written before these were recorded builds torchvision's: a 256-wide head does not fit it
    old = json.loads(spec.to_json())
    del old["rpn_proposals"], old["box_head_size"]
    with pytest.raises(ModelLoadError, match="do not fit fasterrcnn_resnet18_fpn"):
        load_weights(tmp_path / "model.pt", ServingSpec(**old))
    save_weights(build_model("detection", "fasterrcnn_resnet18_fpn", 4, "none", 128), tmp_path / "wide.pt")
    assert load_weights(tmp_path / "wide.pt", ServingSpec(**old)).rpn._post_nms_top_n["testing"] == 1000


def test_box_head_size_refuses_a_head_it_cannot_resize():
    with pytest.raises(ValueError, match="fasterrcnn_resnet50_fpn_v2's box head is a FastRCNNConvFCHead"):
        build_model("detection", "fasterrcnn_resnet50_fpn_v2", 4, "none", 128, box_head_size=256)
    segmenter = build_model("segmentation", "maskrcnn_resnet18_fpn", 4, "none", 128, box_head_size=128)
    assert segmenter.roi_heads.box_predictor.cls_score.in_features == 128


def test_a_client_query_imports_neither_torch_nor_mlflow():
    # importing them made the demo's first query take 1.8 s where the endpoint answered in 0.1 s
    import subprocess
    import sys

    code = """
import sys, types
from lakevision.serving.model_server import ModelServer
import lakevision.demo
answer = types.SimpleNamespace(predictions=[{}], served_model_name="m-1")
sdk = types.SimpleNamespace(serving_endpoints=types.SimpleNamespace(query=lambda name, dataframe_records: answer))
server = ModelServer.__new__(ModelServer)
server.client = sdk  # the SDK call itself is HTTP; what matters is what the query path imports
assert server.query("ep", ["aGk="]) == ([{}], "m-1")
print(sorted(m for m in ('torch', 'mlflow', 'pyspark') if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
