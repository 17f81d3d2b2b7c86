"""Drift detection and retrain triggers, on real images and a real (randomly initialized) backbone."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter
from pydantic import ValidationError

from lakevision.monitoring.drift import (
    DriftSettings,
    ModelMonitor,
    compute_drift,
    embedding_drift,
    ks_test,
    psi,
)
from lakevision.data.image_profile import EMBEDDING_DIM, FEATURES, EmbeddingRecorder, ImageProfile, image_features
from lakevision.packaging.pyfunc import EMBEDDING_KEY, FEATURES_COLUMN, ImageModel, ServingSpec
from lakevision.packaging.architectures import build_model

REFERENCE_IMAGES = 1000
STREAM_IMAGES = 200


def _image(rng: np.random.Generator, shift: float = 0.0, noise: float = 0.0) -> np.ndarray:
    """A small scene: varying size, colour, horizontal gradient, one patch, sensor noise."""
    h, w = int(rng.integers(44, 53)), int(rng.integers(56, 73))
    row = rng.uniform(50, 170, size=3) + np.linspace(-1, 1, w)[:, None] * rng.uniform(-40, 40, size=3)
    img = np.broadcast_to(row, (h, w, 3)).copy()
    y, x = int(rng.integers(0, h // 2)), int(rng.integers(0, w // 2))
    img[y:y + h // 3, x:x + w // 3] += rng.uniform(-60, 60, size=3)
    img += rng.normal(0, rng.uniform(2, 6) + noise, size=img.shape) + shift
    return np.clip(img, 0, 255).astype(np.uint8)


def _stream(seed: int, count: int, shift: float = 0.0, noise: float = 0.0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [_image(rng, shift, noise) for _ in range(count)]


@pytest.fixture(scope="module")
def reference() -> ImageProfile:
    return ImageProfile.from_images(_stream(0, REFERENCE_IMAGES))


@pytest.fixture(scope="module")
def resnet() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model("classification", "resnet18", 3)


# ---------------------------------------------------------------- features
def test_features_of_a_known_image():
    img = np.zeros((40, 60, 3), dtype=np.uint8)
    img[:20], img[20:] = 100, 200  # grey: luma equals the channel value
    f = image_features(img)
    assert (f["width"], f["height"], f["aspect_ratio"]) == (60.0, 40.0, 1.5)
    assert f["brightness"] == pytest.approx(150, abs=1e-3)
    assert f["contrast"] == pytest.approx(50, abs=1e-3)
    assert f["mean_r"] == f["mean_g"] == f["mean_b"] == pytest.approx(150)
    assert f["sharpness"] > 0
    assert image_features(np.full((10, 10, 3), 77, dtype=np.uint8))["sharpness"] == 0
    assert image_features(Image.fromarray(img)) == f
    assert set(f) == set(FEATURES)


def test_blur_lowers_sharpness():
    sharp = Image.fromarray(_image(np.random.default_rng(3)))
    blurred = sharp.filter(ImageFilter.GaussianBlur(2))
    assert image_features(blurred)["sharpness"] < image_features(sharp)["sharpness"] / 4


def test_non_rgb_input_is_rejected_with_what_is_wrong():
    with pytest.raises(ValueError, match="mode is 'L'"):
        image_features(Image.new("L", (8, 8)))
    with pytest.raises(ValueError, match=r"uint8 array of shape \(H, W, 3\), got uint8 of shape \(8, 8, 4\)"):
        image_features(np.zeros((8, 8, 4), dtype=np.uint8))
    with pytest.raises(ValueError, match="got float64"):
        image_features(np.zeros((8, 8, 3)))
    with pytest.raises(ValueError, match="at least 3x3"):
        image_features(np.zeros((2, 8, 3), dtype=np.uint8))


# ---------------------------------------------------------------- tests on samples
def test_psi_handles_ties_and_constant_features():
    rng = np.random.default_rng(1)
    assert psi(np.full(100, 5.0), np.full(50, 5.0)) == 0
    assert psi(np.full(100, 5.0), np.full(50, 6.0)) > 10
    assert psi(np.full(100, 5.0), np.full(50, 4.0)) > 10
    sizes = np.r_[np.full(900, 640.0), rng.integers(300, 640, 100)]  # most images share one width
    assert psi(sizes, np.full(200, 800.0)) > 10
    assert psi(rng.normal(size=1000), rng.normal(size=200)) < 0.1
    assert psi(rng.normal(size=1000), rng.normal(size=200) + 0.5) > 0.2


def test_ks_test_is_scipys():
    from scipy.stats import ks_2samp

    rng = np.random.default_rng(2)
    a, b, c = rng.normal(size=500), rng.normal(size=500), rng.normal(size=500) + 1
    for reference, current in ((a, b), (a, c)):
        ours, theirs = ks_test(reference, current), ks_2samp(reference, current)
        assert (ours.statistic, ours.p_value) == pytest.approx((theirs.statistic, theirs.pvalue), abs=1e-12)
    assert ks_test(a, b).p_value > 0.01 and ks_test(a, c).p_value < 1e-10


# ---------------------------------------------------------------- retrain triggers on real image streams
def test_brightness_shift_triggers_retrain(reference):
    decision = ModelMonitor(reference).should_retrain(current_profile=ImageProfile.from_images(
        _stream(1, STREAM_IMAGES, shift=30)))
    assert decision.retrain
    assert "brightness" in decision.drift.drifted_features
    assert any(r.startswith("brightness drifted") for r in decision.reasons)
    assert {"width", "height", "aspect_ratio", "sharpness"}.isdisjoint(decision.drift.drifted_features)


def test_noise_triggers_retrain(reference):
    decision = ModelMonitor(reference).should_retrain(current_profile=ImageProfile.from_images(
        _stream(2, STREAM_IMAGES, noise=20)))
    assert decision.retrain
    assert {"sharpness", "contrast"} <= set(decision.drift.drifted_features)
    assert "brightness" not in decision.drift.drifted_features


def test_same_distribution_false_alarm_rate_is_at_most_5_percent(reference):
    """50 independent same-distribution streams, images through image_features, plus embeddings
    (the embedding test's own level is checked on real embeddings below; here it adds its share
    of false alarms to the features')."""
    rng = np.random.default_rng(7)
    # 300 reference rows: the kernel test is quadratic in rows, and the test runs 50 times
    ref = ImageProfile(reference.samples, reference.n, reference.summary, rng.normal(size=(300, 8)))
    monitor = ModelMonitor(ref)
    alarms = []
    for trial in range(50):
        current = ImageProfile.from_images(_stream(100 + trial, STREAM_IMAGES),
                                           embeddings=rng.normal(size=(STREAM_IMAGES, 8)))
        alarms.append(monitor.should_retrain(current_profile=current).retrain)
    print(f"same-distribution false alarms: {sum(alarms)} of {len(alarms)}")
    assert sum(alarms) / len(alarms) <= 0.05


# ---------------------------------------------------------------- embeddings
def _served(model: torch.nn.Module, task: str = "classification", semantic: bool = False) -> ImageModel:
    spec = ServingSpec(task, semantic, 64, [1, 2, 3], ["a", "b", "c"])
    return ImageModel(model, spec)


def _embeddings(served: ImageModel, images: list[np.ndarray]) -> np.ndarray:
    return np.array([r[EMBEDDING_KEY] for r in served.predict_with_features(images)[1]], dtype=np.float32)


def test_embedding_shift_is_detected_and_same_distribution_is_not(resnet):
    served = _served(resnet)
    ref, same = _embeddings(served, _stream(11, 60)), _embeddings(served, _stream(12, 60))
    brighter = _embeddings(served, _stream(13, 60, shift=30))
    assert ref.shape == (60, EMBEDDING_DIM)
    shifted_test, same_test = embedding_drift(ref, brighter), embedding_drift(ref, same)
    print(f"embedding p-values: shifted {shifted_test.p_value:.3g}, same {same_test.p_value:.3g}")
    assert shifted_test.p_value < 0.01
    assert same_test.p_value > 0.05
    profile = served.profile(_stream(11, 60))
    assert profile.embeddings.shape == (60, EMBEDDING_DIM)
    report = compute_drift(profile, served.profile(_stream(13, 60, shift=30)))
    assert report.embedding_drifted and report.drifted
    assert not compute_drift(profile, served.profile(_stream(12, 60))).embedding_drifted


def test_feature_records_come_with_predictions_and_do_not_depend_on_the_batch(resnet):
    served = _served(resnet)
    images = _stream(14, 5)
    frame = served.predict_images(images)
    assert list(frame.columns)[-1] == FEATURES_COLUMN
    record = frame[FEATURES_COLUMN].iloc[2]
    assert set(record) == {*FEATURES, EMBEDDING_KEY} and len(record[EMBEDDING_KEY]) == EMBEDDING_DIM
    assert record["brightness"] == pytest.approx(image_features(images[2])["brightness"], rel=1e-5)
    alone = served.predict_with_features(images[2:3])[1][0]
    assert np.allclose(record[EMBEDDING_KEY], alone[EMBEDDING_KEY], rtol=1e-3, atol=1e-4)
    # a record is a few hundred bytes of JSON: 64 of them stay far below the 1 MB logging limit
    assert len(json.dumps(record)) < 1000
    served.spec.feature_output = False
    assert FEATURES_COLUMN not in served.predict_images(images[:1]).columns


@pytest.mark.parametrize(("task", "arch", "semantic"), [
    ("classification", "mobilenet_v3_small", False),
    ("detection", "fasterrcnn_resnet18_fpn", False),
    ("segmentation", "deeplabv3_mobilenet_v3_large", True),
])
def test_embeddings_of_other_architectures(task, arch, semantic):
    torch.manual_seed(0)
    emb = _embeddings(_served(build_model(task, arch, 3).eval(), task, semantic), _stream(15, 3))
    assert emb.shape == (3, EMBEDDING_DIM) and np.isfinite(emb).all() and np.abs(emb).sum() > 0


def test_unsupported_model_is_named():
    with pytest.raises(TypeError, match="cannot take embeddings from a Linear"):
        EmbeddingRecorder(torch.nn.Linear(3, 3))


# ---------------------------------------------------------------- the decision's other rules
def test_too_few_images_give_no_drift_verdict(reference):
    decision = ModelMonitor(reference).should_retrain(current_profile=ImageProfile.from_images(
        _stream(3, 12, shift=60)))
    assert not decision.retrain and decision.drift is None
    assert decision.reasons == ["only 12 of 100 images: no drift verdict"]


def test_no_model_yet_retrains(reference):
    assert ModelMonitor(reference).should_retrain(no_model_yet=True).retrain


def test_metric_drop_beyond_tolerance_retrains(reference):
    monitor = ModelMonitor(reference, baseline_metric=0.70)
    decision = monitor.should_retrain(current_metric=0.60)
    assert decision.retrain and decision.reasons[0].startswith("map_50 0.6 is 0.1 worse than the baseline 0.7")
    assert not monitor.should_retrain(current_metric=0.68).retrain
    assert not monitor.should_retrain(current_metric=0.90).retrain


def test_lower_is_better_metric_and_latest_recorded_value(reference):
    monitor = ModelMonitor(reference, DriftSettings(max_metric_drop=0.02), baseline_metric=0.10,
                           metric_name="error_rate", higher_is_better=False)
    now = datetime.now(timezone.utc)
    monitor.record_metrics({"error_rate": 0.11}, at=now)
    monitor.record_metrics({"error_rate": 0.30}, at=now - timedelta(days=1))  # a late backfill: older
    assert monitor.latest_metric() == 0.11
    assert not monitor.should_retrain().retrain
    monitor.record_metrics({"error_rate": 0.13})
    assert monitor.should_retrain().retrain
    assert not monitor.should_retrain(current_metric=0.05).retrain  # an improvement
    with pytest.raises(ValueError, match="no timezone"):
        monitor.record_metrics({"error_rate": 0.1}, at=datetime(2026, 1, 1))


# ---------------------------------------------------------------- bad input
def test_mismatched_profiles_and_empty_samples_are_named(reference):
    partial = ImageProfile.from_features({"brightness": [1.0, 2.0], "width": [3.0, 4.0]})
    with pytest.raises(ValueError, match=r"only in the reference \['aspect_ratio', 'contrast'"):
        compute_drift(reference, partial)
    with pytest.raises(ValueError, match=r"feature arrays are empty: \['brightness'\]"):
        ImageProfile.from_features({"brightness": []})
    with pytest.raises(ValueError, match="1-D arrays of one length"):
        ImageProfile.from_features({"brightness": [1.0, 2.0], "width": [3.0]})
    with pytest.raises(ValueError, match="'width' has non-finite values"):
        ImageProfile.from_features({"width": [1.0, float("nan")]})
    with pytest.raises(ValueError, match="2 embedding rows for 3 images"):
        ImageProfile.from_features({"width": [1.0, 2.0, 3.0]}, embeddings=np.zeros((2, 4)))
    with pytest.raises(ValueError, match="no images to profile"):
        ImageProfile.from_images([])
    with pytest.raises(ValueError, match="current must be a non-empty 1-D array"):
        psi([1.0, 2.0], [])
    with pytest.raises(ValueError, match="4 dimensions, current ones 3"):
        embedding_drift(np.zeros((5, 4)), np.zeros((5, 3)))


@pytest.mark.parametrize(("field", "value"), [
    ("psi_threshold", -0.1), ("ks_alpha", 0.0), ("ks_alpha", 1.5), ("embedding_alpha", 1.0), ("min_samples", 0),
    ("max_metric_drop", -1), ("max_reference_samples", 0), ("permutations", 0),
])
def test_settings_reject_bad_values_by_name(field, value):
    with pytest.raises(ValidationError, match=field):
        DriftSettings(**{field: value})


def test_settings_reject_unknown_keys_and_too_few_permutations():
    with pytest.raises(ValidationError, match="psi_treshold"):
        DriftSettings(psi_treshold=0.1)
    with pytest.raises(ValidationError, match=r"permutations \(50\) cannot give a p-value below embedding_alpha"):
        DriftSettings(permutations=50)
    with pytest.raises(ValidationError, match="use at least 100"):
        DriftSettings(permutations=99)  # its smallest p-value, 1/100, is not below 0.01
    assert DriftSettings(permutations=100, embedding_alpha=0.01).permutations == 100


# ---------------------------------------------------------------- serialization
def test_profile_round_trips_through_json():
    images = _stream(4, 30)
    emb = np.random.default_rng(5).normal(size=(30, 16)).astype(np.float32)
    profile = ImageProfile.from_images(images, embeddings=emb, max_samples=20, seed=3)
    assert profile.n == 30 and len(profile.samples["brightness"]) == 20 and profile.embeddings.shape == (20, 16)
    full = [image_features(im)["brightness"] for im in images]
    assert profile.summary["brightness"]["max"] == max(full)  # the summary describes all 30
    back = ImageProfile.from_dict(json.loads(json.dumps(profile.to_dict())))
    assert back.n == profile.n and back.summary == profile.summary
    assert all(np.array_equal(back.samples[k], profile.samples[k]) for k in FEATURES)
    assert np.array_equal(back.embeddings, profile.embeddings)
    again = ImageProfile.from_images(images, embeddings=emb, max_samples=20, seed=3)
    assert np.array_equal(again.samples["width"], profile.samples["width"])  # seeded subsample
    with pytest.raises(ValueError, match="lacks the key 'n'"):
        ImageProfile.from_dict({k: v for k, v in profile.to_dict().items() if k != "n"})


def test_drift_report_is_json(reference):
    report = compute_drift(reference, ImageProfile.from_images(_stream(6, 120, shift=30)))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["drifted"] and "brightness" in data["drifted_features"] and data["embedding"] is None
    assert set(data["features"]["brightness"]) == {"psi", "ks_statistic", "ks_p_value", "p_adjusted", "drifted"}


@pytest.mark.parametrize(("task", "arch"), [("detection", "fasterrcnn_resnet18_fpn"),
                                            ("segmentation", "maskrcnn_resnet18_fpn")])
def test_a_detectors_reference_records_equal_its_served_ones(task, arch):
    """The reference profile skips the box heads; its records must be the ones serving returns."""
    torch.manual_seed(0)
    served = _served(build_model(task, arch, 3, "none", 64).eval(), task)
    images = _stream(17, 3)
    reference, answered = served.feature_records(images), served.predict_with_features(images)[1]
    for ref, ans in zip(reference, answered):
        assert {k: v for k, v in ref.items() if k != EMBEDDING_KEY} == {k: v for k, v in ans.items() if k != EMBEDDING_KEY}
        assert np.allclose(ref[EMBEDDING_KEY], ans[EMBEDDING_KEY], rtol=1e-4, atol=1e-5)
