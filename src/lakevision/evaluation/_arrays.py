"""Turn metric inputs (torch tensors on any device, NumPy arrays, nested lists) into NumPy arrays."""

from __future__ import annotations

from typing import Any

import numpy as np


def to_numpy(value: Any) -> np.ndarray:
    # Duck-typed so that this package does not import torch just to convert its tensors.
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)
