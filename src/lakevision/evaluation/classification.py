"""Classification metrics as flat float dicts (loggable to MLflow as they are), via scikit-learn.

Averages over classes use every class 0..num_classes-1, including classes absent from a batch
(scikit-learn's ``labels=`` semantics, zero where a ratio is 0/0), so values are comparable between
evaluations of the same model. ROC-AUC is the one-vs-rest macro average over the classes for which
it is defined (present in ``y_true`` and not the only class), NaN when there is none.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    log_loss,
    precision_recall_fscore_support,
    roc_auc_score,
    top_k_accuracy_score,
)

from lakevision.evaluation._arrays import to_numpy
from lakevision.figures import new_figure

if TYPE_CHECKING:
    import torch

TOP_K = (1, 3, 5)
ECE_BINS = 15


def _first(bad: np.ndarray) -> int:
    return int(np.argmax(bad))


def _labels(values: Any, name: str, num_classes: int, length: Optional[int]) -> np.ndarray:
    arr = to_numpy(values)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if length is not None and len(arr) != length:
        raise ValueError(f"{name} has {len(arr)} entries but y_true has {length} "
                         f"(first unmatched index {min(len(arr), length)})")
    as_float = arr.astype(np.float64)
    bad = ~np.isfinite(as_float) | (as_float != np.round(as_float))
    if bad.any():
        raise ValueError(f"{name}[{_first(bad)}] = {arr[_first(bad)]} is not an integer class")
    bad = (as_float < 0) | (as_float >= num_classes)
    if bad.any():
        raise ValueError(f"{name}[{_first(bad)}] = {arr[_first(bad)]} is outside [0, {num_classes})")
    return as_float.astype(np.int64)


def _probabilities(values: Any, num_classes: int, length: int) -> np.ndarray:
    prob = to_numpy(values).astype(np.float64)
    if prob.shape != (length, num_classes):
        raise ValueError(f"y_prob has shape {prob.shape}, expected ({length}, {num_classes})")
    bad = ~np.isfinite(prob).all(axis=1)
    if bad.any():
        raise ValueError(f"y_prob[{_first(bad)}] contains NaN or infinite values")
    # scikit-learn's own tolerance for "rows sum to 1" (np.allclose defaults).
    bad = (prob < 0).any(axis=1) | (prob > 1).any(axis=1) | ~np.isclose(prob.sum(axis=1), 1.0)
    if bad.any():
        raise ValueError(f"y_prob[{_first(bad)}] is not a probability distribution "
                         f"(sums to {prob[_first(bad)].sum():.6g})")
    return prob


def expected_calibration_error(y_true: np.ndarray, prob: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE of the top-1 prediction over equal-width confidence bins (b/bins, (b+1)/bins]."""
    confidence = prob.max(axis=1)
    correct = (prob.argmax(axis=1) == y_true).astype(np.float64)
    bin_of = np.clip(np.ceil(confidence * bins).astype(np.int64) - 1, 0, bins - 1)
    # sum_b |B_b|/n * |acc_b - conf_b| == sum_b |sum_{i in B_b} (correct_i - conf_i)| / n
    return float(np.abs(np.bincount(bin_of, weights=correct - confidence, minlength=bins)).sum() / len(y_true))


def _roc_auc(y_true: np.ndarray, prob: np.ndarray) -> float:
    onehot = y_true[:, None] == np.arange(prob.shape[1])[None, :]
    defined = np.flatnonzero(onehot.any(axis=0) & ~onehot.all(axis=0))
    if defined.size == 0:
        return float("nan")
    return float(np.mean([roc_auc_score(onehot[:, k], prob[:, k]) for k in defined]))


class ClassificationMetrics:
    """Metrics for single-label classification into ``num_classes`` classes 0..num_classes-1."""

    def __init__(self, num_classes: int) -> None:
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.num_classes = num_classes
        self.labels = np.arange(num_classes)

    def compute_metrics(self, y_true: torch.Tensor | np.ndarray, y_pred: torch.Tensor | np.ndarray,
                        y_prob: Optional[torch.Tensor | np.ndarray] = None) -> dict[str, float]:
        """Accuracy, balanced accuracy, precision/recall/F1 (macro, micro, weighted, per class) and,
        with ``y_prob`` (N x num_classes probabilities), top-k accuracy, ROC-AUC, log loss and ECE."""
        true = _labels(y_true, "y_true", self.num_classes, None)
        pred = _labels(y_pred, "y_pred", self.num_classes, len(true))
        result = {
            "accuracy": float(accuracy_score(true, pred)),
            "balanced_accuracy": float(balanced_accuracy_score(true, pred)),
        }
        for average in ("macro", "micro", "weighted"):
            precision, recall, f1, _ = precision_recall_fscore_support(
                true, pred, labels=self.labels, average=average, zero_division=0
            )
            result.update({f"precision_{average}": float(precision), f"recall_{average}": float(recall),
                           f"f1_{average}": float(f1)})
        per_class = precision_recall_fscore_support(true, pred, labels=self.labels, average=None, zero_division=0)
        for name, values in zip(("precision", "recall", "f1"), per_class):
            result.update({f"{name}_class_{k}": float(v) for k, v in enumerate(values)})
        if y_prob is not None:
            result.update(self._probability_metrics(true, _probabilities(y_prob, self.num_classes, len(true))))
        return result

    def _probability_metrics(self, true: np.ndarray, prob: np.ndarray) -> dict[str, float]:
        # scikit-learn scores two classes from the positive column alone.
        score = prob[:, 1] if self.num_classes == 2 else prob
        result = {
            f"top_{k}_accuracy": float(top_k_accuracy_score(true, score, k=k, labels=self.labels))
            for k in TOP_K if k < self.num_classes
        }
        result["roc_auc"] = _roc_auc(true, prob)
        result["log_loss"] = float(log_loss(true, prob, labels=self.labels))
        result["ece"] = expected_calibration_error(true, prob)
        return result

    def plot_confusion_matrix(self, y_true: torch.Tensor | np.ndarray, y_pred: torch.Tensor | np.ndarray,
                              class_names: Optional[list[str]] = None) -> Figure:
        """Two panels: counts, and rows normalized to the true class (recall on the diagonal)."""
        true = _labels(y_true, "y_true", self.num_classes, None)
        pred = _labels(y_pred, "y_pred", self.num_classes, len(true))
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(class_names)} names, expected {self.num_classes}")
        names = class_names if class_names is not None else [str(k) for k in self.labels]
        counts = confusion_matrix(true, pred, labels=self.labels)
        support = counts.sum(axis=1, keepdims=True)
        normalized = np.divide(counts, support, out=np.zeros(counts.shape), where=support > 0)
        side = max(4.0, 0.45 * self.num_classes + 2)
        fig, axes = new_figure(1, 2, (2 * side + 1, side))
        for ax, matrix, title, fmt in ((axes[0, 0], counts, "counts", "d"),
                                       (axes[0, 1], normalized, "normalized by true class", ".2f")):
            ax.imshow(matrix, cmap="Blues", vmin=0)
            ax.set(title=title, xlabel="predicted", ylabel="true", xticks=self.labels, yticks=self.labels)
            ax.set_xticklabels(names, rotation=90)
            ax.set_yticklabels(names)
            if self.num_classes <= 20:  # beyond that the numbers are unreadable anyway
                threshold = matrix.max() / 2
                for (i, j), value in np.ndenumerate(matrix):
                    ax.text(j, i, format(value, fmt), ha="center", va="center", fontsize=8,
                            color="white" if value > threshold else "black")
        return fig
