"""Per-block statistics: moments of the features a linear group sees, chunk by chunk.

Each chunk's Σ x xᵀ is one matrix product in `product_dtype` (float32 by default: half the time of
float64, the rate the forward pass runs at); the chunks are summed in float64, so rounding does not
grow with the token count.
"""
from __future__ import annotations

import numpy as np
import torch


class MomentAccumulator:
    """Running Σ x xᵀ, Σ x and the count, in float64, over any number of chunks of features."""

    def __init__(self, size: int, product_dtype: torch.dtype = torch.float32):
        self.size = size
        self.product_dtype = product_dtype
        self.sum_outer = torch.zeros(size, size, dtype=torch.float64)
        self.sum = torch.zeros(size, dtype=torch.float64)
        self.count = 0

    def add(self, features: torch.Tensor) -> None:
        rows = features.reshape(-1, self.size).to(self.product_dtype)
        self.sum_outer += rows.T @ rows
        self.sum += rows.sum(dim=0, dtype=torch.float64)
        self.count += rows.shape[0]

    def second_moment(self) -> np.ndarray:
        """E[x xᵀ] (uncentered)."""
        return (self.sum_outer / self.count).numpy()

    def mean(self) -> np.ndarray:
        return (self.sum / self.count).numpy()

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.sum_outer).all() and torch.isfinite(self.sum).all())
