"""The head-weighted low-rank embedding (linalg/embedding.py): known-answer math on small matrices."""
from __future__ import annotations

import numpy as np
import pytest

from streamrom.errors import NumericalError, UsageError
from streamrom.linalg.embedding import head_weighted_factors, moment_roots, weighted_error

RNG = np.random.default_rng(4)


def a_moment(width: int) -> np.ndarray:
    root = RNG.standard_normal((width, 3 * width)) * np.linspace(0.1, 3.0, width)[:, None]
    return root @ root.T / root.shape[1]


def test_full_rank_gives_the_embedding_back():
    embedding, moment = RNG.standard_normal((50, 8)), a_moment(8)
    codes, expand = head_weighted_factors(embedding, moment, 8)
    assert codes.shape == (50, 8) and expand.shape == (8, 8)
    np.testing.assert_allclose(codes @ expand, embedding, atol=1e-10)


def test_the_fit_reaches_eckart_youngs_minimum_and_beats_other_rank_r_maps():
    embedding, moment, rank = RNG.standard_normal((60, 10)), a_moment(10), 4
    codes, expand = head_weighted_factors(embedding, moment, rank)
    error = weighted_error(embedding, codes @ expand, moment)
    root, _ = moment_roots(moment)
    singular = np.linalg.svd(embedding @ root, compute_uv=False)
    assert error == pytest.approx(float(np.sum(singular[rank:] ** 2)), rel=1e-9)
    # the unweighted truncated SVD and random rank-r projections of the rows do worse
    _, _, right = np.linalg.svd(embedding, full_matrices=False)
    assert weighted_error(embedding, embedding @ right[:rank].T @ right[:rank], moment) > error
    for _ in range(20):
        basis = np.linalg.qr(RNG.standard_normal((10, rank)))[0]
        assert weighted_error(embedding, embedding @ basis @ basis.T, moment) >= error


def test_an_identity_moment_is_the_plain_truncated_svd():
    embedding, rank = RNG.standard_normal((40, 6)), 3
    codes, expand = head_weighted_factors(embedding, np.eye(6), rank)
    _, _, right = np.linalg.svd(embedding, full_matrices=False)
    np.testing.assert_allclose(codes @ expand, embedding @ right[:rank].T @ right[:rank], atol=1e-10)


def test_bad_ranks_and_a_zero_moment_are_refused():
    embedding = RNG.standard_normal((20, 5))
    for rank in (0, 6):
        with pytest.raises(UsageError, match="give 1..5"):
            head_weighted_factors(embedding, np.eye(5), rank)
    with pytest.raises(NumericalError):
        head_weighted_factors(embedding, np.zeros((5, 5)), 2)
