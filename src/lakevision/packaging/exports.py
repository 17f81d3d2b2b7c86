"""TorchScript and ONNX exports of a trained model, each checked against the eager model.

An export is only logged with the result of running it and the eager model on the same sample
images: the largest absolute difference of each output and the tolerance it is held to. An
export that fails to build, or differs by more than the tolerance, is reported as failed and is
not logged as usable (the serving pyfunc itself always runs the eager model).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from lakevision.packaging.pyfunc import ServingSpec, preprocess, raw_outputs

log = logging.getLogger(__name__)

ONNX_OPSET = 17
# Absolute tolerances per output: probabilities and scores are in [0, 1], boxes in pixels,
# semantic logits unbounded but O(10). Float32 kernels of the three runtimes differ by ~1e-5.
TOLERANCE = {"probabilities": 1e-4, "logits": 1e-3, "boxes": 0.05, "scores": 1e-3, "masks": 1e-3}


@dataclass
class ExportCheck:
    format: str
    file: str | None
    passed: bool
    max_abs_diff: dict[str, float]
    tolerance: dict[str, float]
    images: int
    seconds: float
    error: str | None = None


def _compare_instances(ref: dict, cand: dict, spec: ServingSpec) -> dict[str, float]:
    """Detections come back sorted by score, and near-equal scores may swap places between
    runtimes, so each reference detection above the serving threshold is matched to the
    candidate detection of the same label with the closest box."""
    diffs = {k: 0.0 for k in ("boxes", "scores", "masks") if k in ref}
    keep = np.flatnonzero(ref["scores"] >= spec.score_threshold)
    for i in keep:
        same = np.flatnonzero(cand["labels"] == ref["labels"][i])
        if not len(same):
            return {k: float("inf") for k in diffs}
        dist = np.abs(cand["boxes"][same] - ref["boxes"][i]).max(axis=1)
        j = same[int(dist.argmin())]
        diffs["boxes"] = max(diffs["boxes"], float(dist.min()))
        diffs["scores"] = max(diffs["scores"], float(abs(cand["scores"][j] - ref["scores"][i])))
        if "masks" in ref:
            diffs["masks"] = max(diffs["masks"], float(np.abs(cand["masks"][j] - ref["masks"][i]).max()))
    return diffs


def compare_outputs(refs: list[dict], cands: list[dict], spec: ServingSpec) -> dict[str, float]:
    worst: dict[str, float] = {}
    for ref, cand in zip(refs, cands):
        if spec.instance:
            diffs = _compare_instances(ref, cand, spec)
        else:
            diffs = {k: float(np.abs(np.asarray(cand[k]) - ref[k]).max()) for k in ref}
        for k, v in diffs.items():
            worst[k] = max(worst.get(k, 0.0), v)
    return worst


# ---------------------------------------------------------------------- runners per format
def _torchscript(model: torch.nn.Module, spec: ServingSpec, path: Path):
    scripted = torch.jit.script(model)
    scripted.save(str(path))
    loaded = torch.jit.load(str(path))

    class Adapter(torch.nn.Module):
        """Scripted detection models return ``(losses, detections)``; eager ones ``detections``."""

        def forward(self, x):
            out = loaded(x)
            return out[1] if spec.instance else out

    return Adapter()


def _onnx(model: torch.nn.Module, spec: ServingSpec, path: Path, sample: np.ndarray):
    import onnxruntime as ort

    x = preprocess([sample], spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript-based exporter's tracer warnings
        if spec.instance:
            outputs = ["boxes", "labels", "scores"] + (["masks"] if spec.task == "segmentation" else [])
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["image"], output_names=outputs,
                              dynamic_axes={"image": {1: "height", 2: "width"}})
        else:
            outputs = ["out"]
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=ONNX_OPSET,
                              input_names=["images"], output_names=outputs, dynamic_axes={"images": {0: "batch"}})
    opts = ort.SessionOptions()
    opts.log_severity_level = 3  # per-node shape warnings of data-dependent detection outputs
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    class Runner:
        def __call__(self, x):
            if spec.instance:
                return [dict(zip(outputs, (torch.from_numpy(a) for a in session.run(None, {"image": im.numpy()}))))
                        for im in x]
            (out,) = session.run(None, {"images": x.numpy()})
            return {"out": torch.from_numpy(out)} if spec.semantic else torch.from_numpy(out)

    return Runner()


def export_and_check(model: torch.nn.Module, spec: ServingSpec, samples: list[np.ndarray], out_dir: Path,
                     formats: list[str]) -> list[ExportCheck]:
    """Export ``model`` to each format under ``out_dir`` and compare with the eager model on
    ``samples`` (upright RGB arrays)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    refs = raw_outputs(model, samples, spec)
    checks = []
    for fmt in formats:
        path = out_dir / ("model.torchscript.pt" if fmt == "torchscript" else "model.onnx")
        tol = {k: TOLERANCE[k] for k in refs[0] if k in TOLERANCE}
        t0 = time.monotonic()
        try:
            runner = _torchscript(model, spec, path) if fmt == "torchscript" else _onnx(model, spec, path, samples[0])
            diffs = compare_outputs(refs, raw_outputs(runner, samples, spec), spec)
            passed = all(diffs[k] <= tol[k] for k in tol if k in diffs)
            checks.append(ExportCheck(fmt, path.name, passed, diffs, tol, len(samples), time.monotonic() - t0))
        except Exception as exc:  # an export that cannot be built is reported, not fatal: serving runs eager
            log.warning("%s export of %s failed: %s", fmt, spec.architecture, exc)
            path.unlink(missing_ok=True)
            checks.append(ExportCheck(fmt, None, False, {}, tol, len(samples), time.monotonic() - t0,
                                      error=f"{type(exc).__name__}: {exc}"[:2000]))
    return checks


def log_exports(model: torch.nn.Module, spec: ServingSpec, samples: list[np.ndarray], formats: list[str],
                artifact_path: str = "exports") -> list[ExportCheck]:
    """Export, check, and log the files that passed plus ``exports/parity.json`` into the active run."""
    import tempfile

    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        checks = export_and_check(model, spec, samples, Path(tmp), formats)
        for c in checks:
            if c.passed and c.file:
                mlflow.log_artifact(str(Path(tmp) / c.file), artifact_path)
        report = [asdict(c) for c in checks]
        mlflow.log_text(json.dumps(report, indent=1), f"{artifact_path}/parity.json")
        mlflow.set_tags({f"export.{c.format}": "passed" if c.passed else "failed" for c in checks})
    return checks
