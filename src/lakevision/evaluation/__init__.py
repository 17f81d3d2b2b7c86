"""Evaluation metrics: classification (scikit-learn), COCO detection and segmentation (faster-coco-eval)."""

from lakevision.evaluation.classification import ClassificationMetrics
from lakevision.evaluation.detection import DetectionMetrics
from lakevision.evaluation.segmentation import SegmentationMetrics

__all__ = ["ClassificationMetrics", "DetectionMetrics", "SegmentationMetrics"]
