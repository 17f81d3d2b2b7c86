"""ClassificationMetrics against scikit-learn on random predictions, bad inputs, and the figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    log_loss,
    precision_score,
    recall_score,
    roc_auc_score,
    top_k_accuracy_score,
)

from lakevision.evaluation import ClassificationMetrics

TOL = 1e-9


def _sample(num_classes: int, n: int = 500, seed: int = 0):
    rng = np.random.default_rng(seed)
    y_true = rng.integers(0, num_classes, n)
    logits = rng.normal(size=(n, num_classes)) + 2.0 * np.eye(num_classes)[y_true]
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y_true, prob.argmax(axis=1), prob


def _ece_reference(y_true, prob, bins=15):
    """Guo et al. (2017): bins (lower, upper] over the top-1 confidence."""
    confidence, correct = prob.max(axis=1), prob.argmax(axis=1) == y_true
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lower, upper in zip(edges[:-1], edges[1:]):
        in_bin = (confidence > lower) & (confidence <= upper)
        if in_bin.any():
            total += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return total


@pytest.mark.parametrize("num_classes", [2, 4, 7])
def test_metrics_equal_sklearn(num_classes):
    y_true, y_pred, prob = _sample(num_classes)
    result = ClassificationMetrics(num_classes).compute_metrics(
        torch.from_numpy(y_true), torch.from_numpy(y_pred), torch.from_numpy(prob)
    )
    labels = list(range(num_classes))
    expected = {
        "accuracy": accuracy_score(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy_score(y_true, y_pred),
        "roc_auc": roc_auc_score(y_true, prob[:, 1] if num_classes == 2 else prob, multi_class="ovr",
                                 average="macro"),
        "log_loss": log_loss(y_true, prob, labels=labels),
        "ece": _ece_reference(y_true, prob),
    }
    for average in ("macro", "micro", "weighted"):
        for name, fn in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
            expected[f"{name}_{average}"] = fn(y_true, y_pred, labels=labels, average=average, zero_division=0)
    for name, fn in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
        for k, value in enumerate(fn(y_true, y_pred, labels=labels, average=None, zero_division=0)):
            expected[f"{name}_class_{k}"] = value
    for k in (1, 3, 5):
        if k < num_classes:
            score = prob[:, 1] if num_classes == 2 else prob
            expected[f"top_{k}_accuracy"] = top_k_accuracy_score(y_true, score, k=k, labels=labels)
    assert result.keys() == expected.keys()
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=TOL), key
    assert all(isinstance(v, float) for v in result.values())


def test_without_probabilities_only_label_metrics():
    y_true, y_pred, _ = _sample(4)
    result = ClassificationMetrics(4).compute_metrics(y_true.tolist(), y_pred.tolist())
    assert "accuracy" in result and not {"roc_auc", "log_loss", "ece", "top_1_accuracy"} & result.keys()


def test_absent_classes_count_as_zero_and_auc_skips_them():
    y_true, y_pred, prob = _sample(3)
    prob = np.c_[prob * 0.9, np.full(len(prob), 0.1)]  # class 3 never occurs
    result = ClassificationMetrics(4).compute_metrics(y_true, y_pred, prob)
    assert result["precision_class_3"] == result["recall_class_3"] == 0.0
    assert result["roc_auc"] == pytest.approx(
        np.mean([roc_auc_score(y_true == k, prob[:, k]) for k in range(3)]), abs=TOL
    )


@pytest.mark.parametrize("args, message", [
    ((np.array([0, 1, 2]), np.array([0, 1])), r"y_pred has 2 entries but y_true has 3 \(first unmatched index 2\)"),
    ((np.array([0, 5, 2]), np.array([0, 1, 2])), r"y_true\[1\] = 5 is outside \[0, 3\)"),
    ((np.array([0, 1, 2]), np.array([0, 1, -1])), r"y_pred\[2\] = -1 is outside \[0, 3\)"),
    ((np.array([0, 1.5, 2]), np.array([0, 1, 2])), r"y_true\[1\] = 1.5 is not an integer class"),
    ((np.array([[0, 1]]), np.array([0, 1])), r"y_true must be 1-D, got shape \(1, 2\)"),
    ((np.array([0, 1]), np.array([0, 1]), np.full((2, 2), 0.5)), r"y_prob has shape \(2, 2\), expected \(2, 3\)"),
    ((np.array([0, 1]), np.array([0, 1]), np.array([[1.0, 0, 0], [np.nan, 0.5, 0.5]])),
     r"y_prob\[1\] contains NaN or infinite values"),
    ((np.array([0, 1]), np.array([0, 1]), np.array([[1.0, 0, 0], [2.0, 1.0, 0.5]])),
     r"y_prob\[1\] is not a probability distribution \(sums to 3.5\)"),
])
def test_bad_input_names_argument_and_index(args, message):
    with pytest.raises(ValueError, match=message):
        ClassificationMetrics(3).compute_metrics(*args)


def test_confusion_matrix_figure():
    y_true, y_pred, _ = _sample(4)
    names = ["cat", "dog", "fox", "owl"]
    fig = ClassificationMetrics(4).plot_confusion_matrix(y_true, y_pred, class_names=names)
    assert isinstance(fig, Figure) and len(fig.axes) == 2
    counts, normalized = (ax.images[0].get_array() for ax in fig.axes)
    assert counts.sum() == len(y_true) and counts[1, 2] == np.sum((y_true == 1) & (y_pred == 2))
    np.testing.assert_allclose(normalized.sum(axis=1), 1.0)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == names
    with pytest.raises(ValueError, match=r"class_names has 2 names, expected 4"):
        ClassificationMetrics(4).plot_confusion_matrix(y_true, y_pred, class_names=names[:2])
