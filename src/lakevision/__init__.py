"""lakevision: a Databricks-native MLOps bundle for computer vision.

The public classes are importable from here; heavy dependencies (Spark, torch) load only when a
class that needs them is first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "COCOProcessor": "lakevision.data.processor",
    "COCODataset": "lakevision.data.dataset",
    "BaseModel": "lakevision.training.module",
    "RayTrainer": "lakevision.training.ray_trainer",
    "ExperimentTracker": "lakevision.tracking",
    "ClassificationMetrics": "lakevision.evaluation",
    "DetectionMetrics": "lakevision.evaluation",
    "SegmentationMetrics": "lakevision.evaluation",
    "load_config": "lakevision.config",
    "LakevisionConfig": "lakevision.config",
    "ConfigError": "lakevision.config",
    "CocoFormatError": "lakevision.data.coco_json",
    "generate_dataset": "lakevision.data.synthetic",
    "get_runtime": "lakevision.runtime",
    "MetricGate": "lakevision.registry.gate",
    "ModelRegistry": "lakevision.registry.model_registry",
    "ModelServer": "lakevision.serving.model_server",
    "DeploymentPipeline": "lakevision.serving.pipeline",
    "ModelMonitor": "lakevision.monitoring.drift",
    "LocalWorkspace": "lakevision.local.workspace.endpoints",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lakevision' has no attribute {name!r}")
