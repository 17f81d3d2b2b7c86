"""The training report in each train run: loss and metric curves per epoch, the epoch the
headline metric converged, and a warning when validation loss turns up while training loss
keeps falling (overfitting)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

# relative distance from the best value that counts as converged
CONVERGED_WITHIN = 0.02
# validation loss this far above its minimum, for this many epochs after it, is overfitting
OVERFIT_MARGIN = 0.05
OVERFIT_EPOCHS = 2


def _finite(values: Sequence[float | None]) -> np.ndarray:
    return np.array([np.nan if v is None else float(v) for v in values], dtype=float)


def convergence_epoch(values: Sequence[float | None], higher_is_better: bool = True,
                      within: float = CONVERGED_WITHIN) -> int | None:
    """The first epoch (1-based) whose value is within ``within`` (relative) of the best one."""
    v = _finite(values)
    if not np.isfinite(v).any():
        return None
    best = np.nanmax(v) if higher_is_better else np.nanmin(v)
    tol = within * max(abs(best), 1e-12)
    close = np.abs(v - best) <= tol
    return int(np.argmax(close)) + 1


def overfitting_warning(train_loss: Sequence[float | None], val_loss: Sequence[float | None],
                        margin: float = OVERFIT_MARGIN, epochs: int = OVERFIT_EPOCHS) -> str | None:
    """A sentence when validation loss stayed more than ``margin`` above its minimum for the last
    ``epochs`` epochs or more while training loss went on falling; None otherwise."""
    t, v = _finite(train_loss), _finite(val_loss)
    n = min(len(t), len(v))
    if n < epochs + 1 or not np.isfinite(v[:n]).any():
        return None
    t, v = t[:n], v[:n]
    best = int(np.nanargmin(v))
    after = v[best + 1:]
    if len(after) < epochs or not np.all(after[-epochs:] > v[best] * (1 + margin)):
        return None
    if not t[-1] < t[best]:
        return None
    return (f"overfitting: validation loss rose from {v[best]:.4g} (epoch {best + 1}) to {v[-1]:.4g} "
            f"(epoch {n}) while training loss fell from {t[best]:.4g} to {t[-1]:.4g}; the checkpoint "
            f"kept is the best epoch's, and more data, augmentation or early stopping would help")


def training_report(history: dict[str, list[float]], metric: str, higher_is_better: bool = True):
    """``(markdown, figure, summary)`` for a run's per-epoch ``history`` (metric name -> values)."""
    from lakevision.figures import new_figure

    train_loss, val_loss = history.get("train_loss", []), history.get("val_loss", [])
    epochs = max((len(v) for v in history.values()), default=0)
    converged = convergence_epoch(history.get(metric, []), higher_is_better)
    warning = overfitting_warning(train_loss, val_loss)
    fig, axes = new_figure(1, 2, (11, 4))
    for name in ("train_loss", "val_loss"):
        if history.get(name):
            axes[0, 0].plot(range(1, len(history[name]) + 1), _finite(history[name]), marker="o", label=name)
    axes[0, 0].set(xlabel="epoch", ylabel="loss", title="losses")
    axes[0, 0].legend()
    if history.get(metric):
        axes[0, 1].plot(range(1, len(history[metric]) + 1), _finite(history[metric]), marker="o", label=metric)
        if converged:
            axes[0, 1].axvline(converged, color="grey", linestyle="--", label=f"converged (epoch {converged})")
        axes[0, 1].legend()
    axes[0, 1].set(xlabel="epoch", ylabel=metric, title=metric)
    if warning:
        fig.suptitle("WARNING: " + warning.split(":")[0], color="red")
    summary: dict[str, Any] = {"epochs": epochs, "metric": metric, "convergence_epoch": converged,
                               "overfitting": warning is not None, "warning": warning}
    best = _finite(history.get(metric, []))
    lines = ["# Training report", "", f"- epochs run: {epochs}",
             f"- {metric}: best {np.nanmax(best) if higher_is_better else np.nanmin(best):.4f}"
             if np.isfinite(best).any() else f"- {metric}: not measured",
             f"- converged at epoch {converged} (within {CONVERGED_WITHIN:.0%} of the best)" if converged
             else "- convergence: unknown"]
    lines.append(f"- **{warning}**" if warning else "- no sign of overfitting (validation loss follows training loss)")
    return "\n".join(lines) + "\n", fig, summary
