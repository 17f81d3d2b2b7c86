"""Drift between a model's reference profile and what it sees now, and whether to retrain.

A feature counts as drifted only when two things hold: its KS p-value, Bonferroni-corrected for
the number of features, is below ``ks_alpha``, and its PSI is above ``psi_threshold``. The first
bounds the false alarms of a same-distribution stream (all features together at most
``ks_alpha``, the embedding test at most ``embedding_alpha`` more); the second keeps a large
sample from flagging shifts too small to matter.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple

import numpy as np
from scipy.stats import ks_2samp

from lakevision.config import DriftSettings
from lakevision.errors import DataError
from lakevision.data.image_profile import MAX_EMBEDDING_ROWS, ImageProfile

PSI_BINS = 10
# a bin empty on one side would make PSI infinite; this share stands in for "almost never"
_PSI_EPSILON = 1e-4


class TwoSampleTest(NamedTuple):
    statistic: float
    p_value: float


def _sample(values: Any, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise DataError(f"{what} must be a non-empty 1-D array, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DataError(f"{what} has non-finite values")
    return x


def psi(reference: Any, current: Any, bins: int = PSI_BINS) -> float:
    """Population stability index of ``current`` against ``reference``, on the reference's quantile bins.

    A value that holds a bin's share of the reference by itself (an image size most images share,
    a constant feature) gets a bin of its own, so a move to either side of it shows.
    """
    if bins < 2:
        raise ValueError(f"psi needs at least 2 bins, got {bins}")
    ref, cur = _sample(reference, "reference"), _sample(current, "current")
    values, counts = np.unique(ref, return_counts=True)
    heavy = values[counts >= len(ref) / bins]
    edges = np.unique(np.concatenate([np.quantile(ref, np.linspace(0, 1, bins + 1)[1:-1]), heavy]))
    own_bin = np.append(np.isin(edges, heavy), False)  # padded: `left` below may be len(edges)

    def shares(x: np.ndarray) -> np.ndarray:
        # even index: between two edges; odd: on an edge, kept only for heavy values, the others
        # start the interval above them
        left, right = np.searchsorted(edges, x, "left"), np.searchsorted(edges, x, "right")
        index = left + right + ((right > left) & ~own_bin[left])
        return np.maximum(np.bincount(index, minlength=2 * len(edges) + 1) / len(x), _PSI_EPSILON)

    p, q = shares(ref), shares(cur)
    return float(np.sum((q - p) * np.log(q / p)))


def ks_test(reference: Any, current: Any) -> TwoSampleTest:
    """Two-sample Kolmogorov-Smirnov statistic and p-value."""
    result = ks_2samp(_sample(reference, "reference"), _sample(current, "current"))
    return TwoSampleTest(float(result.statistic), float(result.pvalue))


def _matrix(values: Any, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float32)
    if x.ndim != 2 or len(x) < 2:
        raise DataError(f"{what} must be a (rows, dim) matrix with at least 2 rows, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise DataError(f"{what} has non-finite values")
    return x


def embedding_drift(reference_emb: Any, current_emb: Any, permutations: int = 200, seed: int = 0) -> TwoSampleTest:
    """Kernel two-sample test on embeddings: unbiased MMD² with an RBF kernel (bandwidth: the
    median squared distance of the pooled rows) and a permutation p-value.

    Each side is subsampled (seeded) to at most ``MAX_EMBEDDING_ROWS`` rows: the kernel matrix is
    quadratic in rows.
    """
    x, y = _matrix(reference_emb, "reference embeddings"), _matrix(current_emb, "current embeddings")
    if x.shape[1] != y.shape[1]:
        raise DataError(f"reference embeddings have {x.shape[1]} dimensions, current ones {y.shape[1]}")
    rng = np.random.default_rng(seed)
    x, y = (v if len(v) <= MAX_EMBEDDING_ROWS else v[rng.choice(len(v), MAX_EMBEDDING_ROWS, replace=False)]
            for v in (x, y))
    n, m = len(x), len(y)
    z = np.concatenate([x, y])
    z -= z.mean(axis=0)  # distances are unchanged; float32 cancellation is smaller near the origin
    sq = np.einsum("ij,ij->i", z, z)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2 * (z @ z.T), 0).astype(np.float64)
    bandwidth = np.median(d2[np.triu_indices(n + m, 1)])
    if bandwidth == 0:  # (nearly) all rows identical: nothing to tell apart
        return TwoSampleTest(0.0, 1.0)
    k = np.exp(-d2 / bandwidth)
    # row 0: the observed split (current rows last); the rest: the same labels shuffled
    labels = np.zeros((permutations + 1, n + m))
    labels[:, n:] = 1.0
    labels[1:] = rng.permuted(labels[1:], axis=1)
    k_labels = labels @ k
    yy = np.einsum("ij,ij->i", k_labels, labels)
    xy = np.einsum("ij,ij->i", k_labels, 1 - labels)
    xx = k.sum() - 2 * xy - yy
    # the diagonal (k(z, z) = 1) is left out of the within-sample means: that makes MMD² unbiased
    mmd2 = (xx - n) / (n * (n - 1)) + (yy - m) / (m * (m - 1)) - 2 * xy / (n * m)
    p_value = (1 + np.count_nonzero(mmd2[1:] >= mmd2[0])) / (permutations + 1)
    return TwoSampleTest(float(mmd2[0]), float(p_value))


@dataclass
class FeatureDrift:
    psi: float
    ks_statistic: float
    ks_p_value: float
    p_adjusted: float  # Bonferroni over the features tested
    drifted: bool


@dataclass
class DriftReport:
    features: dict[str, FeatureDrift]
    embedding: TwoSampleTest | None  # None when either profile has no embeddings
    embedding_drifted: bool
    n_reference: int
    n_current: int

    @property
    def drifted_features(self) -> list[str]:
        return [name for name, f in self.features.items() if f.drifted]

    @property
    def drifted(self) -> bool:
        return self.embedding_drifted or bool(self.drifted_features)

    def reasons(self) -> list[str]:
        """One line per drifted feature, and one for the embeddings."""
        lines = [f"{name} drifted: PSI {f.psi:.3f}, KS {f.ks_statistic:.3f} (corrected p {f.p_adjusted:.2g})"
                 for name, f in self.features.items() if f.drifted]
        if self.embedding_drifted:
            lines.append(f"embeddings drifted: MMD² {self.embedding.statistic:.4g} (p {self.embedding.p_value:.3g})")
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {"drifted": self.drifted, "drifted_features": self.drifted_features,
                "n_reference": self.n_reference, "n_current": self.n_current,
                "features": {name: asdict(f) for name, f in self.features.items()},
                "embedding": None if self.embedding is None else {**self.embedding._asdict(),
                                                                  "drifted": self.embedding_drifted}}


def compute_drift(reference: ImageProfile, current: ImageProfile, settings: DriftSettings | None = None) -> DriftReport:
    """Per-feature PSI and KS, and the embedding test when both profiles have embeddings."""
    s = settings or DriftSettings()
    if set(reference.samples) != set(current.samples):
        raise DataError(f"the profiles have different features: only in the reference "
                        f"{sorted(set(reference.samples) - set(current.samples))}, only in the current "
                        f"{sorted(set(current.samples) - set(reference.samples))}")
    reference = reference.subsample(s.max_reference_samples)
    features = {}
    for name, ref in reference.samples.items():
        ks = ks_test(ref, current.samples[name])
        p_adjusted = min(1.0, ks.p_value * len(reference.samples))
        value = psi(ref, current.samples[name])
        features[name] = FeatureDrift(value, ks.statistic, ks.p_value, p_adjusted,
                                      p_adjusted < s.ks_alpha and value > s.psi_threshold)
    embedding = None
    if reference.embeddings is not None and current.embeddings is not None:
        embedding = embedding_drift(reference.embeddings, current.embeddings, s.permutations)
    return DriftReport(features, embedding, embedding is not None and embedding.p_value < s.embedding_alpha,
                       reference.n, current.n)


@dataclass
class MetricRecord:
    at: datetime
    metrics: dict[str, float]


@dataclass
class RetrainDecision:
    retrain: bool
    reasons: list[str]  # what triggered a retrain, and what could not be judged
    drift: DriftReport | None = None


@dataclass
class ModelMonitor:
    """Retrain triggers for one deployed model: drift of its inputs from ``reference`` (the training
    images' profile) and loss of ``metric_name`` from ``baseline_metric``."""

    reference: ImageProfile
    settings: DriftSettings = field(default_factory=DriftSettings)
    baseline_metric: float | None = None
    metric_name: str = "map_50"
    higher_is_better: bool = True
    history: list[MetricRecord] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.baseline_metric is not None and not math.isfinite(self.baseline_metric):
            raise DataError(f"baseline {self.metric_name} is {self.baseline_metric}; it must be a finite number")

    def record_metrics(self, metrics: Mapping[str, float], at: datetime | None = None) -> None:
        """Keep ``metrics`` measured ``at`` (default: now); times must be timezone-aware."""
        if at is not None and at.tzinfo is None:
            raise DataError(f"metric time {at.isoformat()} has no timezone")
        self.history.append(MetricRecord(at or datetime.now(timezone.utc), {k: float(v) for k, v in metrics.items()}))

    def latest_metric(self) -> float | None:
        """The most recent recorded value of ``metric_name``."""
        records = [r for r in self.history if self.metric_name in r.metrics]
        return max(records, key=lambda r: r.at).metrics[self.metric_name] if records else None

    def compute_drift(self, current: ImageProfile) -> DriftReport:
        return compute_drift(self.reference, current, self.settings)

    def should_retrain(self, current_metric: float | None = None, current_profile: ImageProfile | None = None,
                       no_model_yet: bool = False) -> RetrainDecision:
        """Retrain when there is no model, when the inputs drifted, or when the metric (``current_metric``,
        else the latest recorded one) is more than ``max_metric_drop`` worse than the baseline."""
        if no_model_yet:
            return RetrainDecision(True, ["no model has been trained yet"])
        s = self.settings
        retrain, reasons, report = False, [], None
        if current_profile is not None:
            if current_profile.n < s.min_samples:
                reasons.append(f"only {current_profile.n} of {s.min_samples} images: no drift verdict")
            else:
                report = self.compute_drift(current_profile)
                retrain = report.drifted
                reasons += report.reasons()
        metric = self.latest_metric() if current_metric is None else float(current_metric)
        if metric is not None:
            if self.baseline_metric is None:
                reasons.append(f"no baseline {self.metric_name} to compare {metric:.4g} with")
            elif not math.isfinite(metric):
                reasons.append(f"{self.metric_name} is {metric}: not judged")
            else:
                loss = (self.baseline_metric - metric) * (1 if self.higher_is_better else -1)
                if loss > s.max_metric_drop:
                    retrain = True
                    reasons.append(f"{self.metric_name} {metric:.4g} is {loss:.4g} worse than the baseline "
                                   f"{self.baseline_metric:.4g} (tolerance {s.max_metric_drop:g})")
        return RetrainDecision(retrain, reasons, report)
