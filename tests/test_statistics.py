"""Known-answer tests of the moment sums (no model): half-triangle products equal the full moments."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from streamrom.compression import statistics
from streamrom.compression.statistics import MomentAccumulator


@pytest.mark.parametrize("wide", [False, True])
@pytest.mark.parametrize("product_dtype,sum_dtype", [(torch.float32, torch.float64), (torch.float64, torch.float64),
                                                     (torch.float32, torch.float32)])
def test_moment_sums_equal_the_full_products(monkeypatch, wide, product_dtype, sum_dtype):
    """Only the lower triangle is summed per chunk (syrk, or banded lower block rows when wide); the
    moment handed over is the full symmetric E[x xᵀ] of all chunks, bands of uneven size included."""
    if wide:  # the banded path of the MLP's 11008-wide moment, at a size a test can afford
        monkeypatch.setattr(statistics, "WIDE", 8)
        monkeypatch.setattr(statistics, "BAND", 5)
    rng = np.random.default_rng(3)
    size = 23
    chunks = [rng.standard_normal((2, count, size)) * np.linspace(0.1, 3, size) + 0.5 for count in (7, 11, 4)]
    accumulator = MomentAccumulator(size, product_dtype, sum_dtype=sum_dtype)
    for chunk in chunks:
        accumulator.add(torch.from_numpy(chunk).float())
    x = np.concatenate([chunk.reshape(-1, size).astype(np.float32).astype(np.float64) for chunk in chunks])
    expected = x.T @ x / x.shape[0]
    tolerance = 1e-12 if product_dtype == torch.float64 else 2e-6
    assert accumulator.is_finite()
    moment = accumulator.second_moment_as(np.float64 if sum_dtype == torch.float64 else np.float32)
    np.testing.assert_array_equal(moment, moment.T)
    np.testing.assert_allclose(moment, expected, rtol=tolerance, atol=tolerance * np.abs(expected).max())
    np.testing.assert_allclose(accumulator.mean(), x.mean(axis=0), rtol=1e-6)


def test_a_moment_taken_twice_and_summed_on_is_still_whole():
    """Reading the moment fills in the upper triangle; chunks added afterwards are summed on top."""
    rng = np.random.default_rng(4)
    first, second = rng.standard_normal((30, 9)), rng.standard_normal((20, 9))
    accumulator = MomentAccumulator(9, torch.float64)
    accumulator.add(torch.from_numpy(first))
    np.testing.assert_allclose(accumulator.second_moment(), first.T @ first / 30, rtol=1e-12)
    accumulator.add(torch.from_numpy(second))
    both = np.concatenate([first, second])
    np.testing.assert_allclose(accumulator.second_moment(), both.T @ both / 50, rtol=1e-12)
