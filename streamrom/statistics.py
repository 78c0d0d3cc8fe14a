"""Per-block statistics: float64 moments of the features a linear group sees, chunk by chunk."""
from __future__ import annotations

import numpy as np
import torch


class MomentAccumulator:
    """Running Σ x xᵀ, Σ x and the count, in float64, over any number of chunks of features."""

    def __init__(self, size: int):
        self.size = size
        self.sum_outer = torch.zeros(size, size, dtype=torch.float64)
        self.sum = torch.zeros(size, dtype=torch.float64)
        self.count = 0

    def add(self, features: torch.Tensor) -> None:
        rows = features.reshape(-1, self.size).to(torch.float64)
        self.sum_outer.addmm_(rows.T, rows)
        self.sum += rows.sum(dim=0)
        self.count += rows.shape[0]

    def second_moment(self) -> np.ndarray:
        """E[x xᵀ] (uncentered)."""
        return (self.sum_outer / self.count).numpy()

    def mean(self) -> np.ndarray:
        return (self.sum / self.count).numpy()

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.sum_outer).all() and torch.isfinite(self.sum).all())
