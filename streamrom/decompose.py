"""The math of reduced order modelling, as functions of numpy arrays (no model, no I/O).

For a linear y = W x + b observed on calibration inputs, ROM keeps the top-r eigenvectors V of the
output features' second moment E[y yᵀ] and re-parameterises W ≈ V (Vᵀ W). With the *uncentered*
moment this is the best rank-r approximation of the outputs W X in Frobenius norm.
The centered variant uses the covariance and adds the mean correction (I − V Vᵀ) μ_y as a bias.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg

RANK_MULTIPLE = 8


def rank_for(ratio: float, out_features: int, in_features: int, multiple: int = RANK_MULTIPLE) -> int:
    """Rank at which two factors hold `ratio` of the dense parameters, rounded down to `multiple`."""
    exact = ratio * out_features * in_features / (out_features + in_features)
    return int(exact // multiple) * multiple


def saves_parameters(rank: int, out_features: int, in_features: int) -> bool:
    return 0 < rank and rank * (out_features + in_features) < out_features * in_features


@dataclass(frozen=True)
class Factors:
    """W x + b ≈ expand_weight (reduce_weight x + reduce_bias) + expand_bias."""

    reduce_weight: np.ndarray  # (rank, in) = Vᵀ W
    expand_weight: np.ndarray  # (out, rank) = V
    reduce_bias: np.ndarray | None = None  # Vᵀ b, when the linear has a bias
    expand_bias: np.ndarray | None = None  # (I − V Vᵀ) μ_y, centered variant only

    @property
    def rank(self) -> int:
        return self.reduce_weight.shape[0]


def damped(moment: np.ndarray, damping: float) -> np.ndarray:
    """moment + damping·mean(diag)·I: keeps the basis inside W's range when calibration is short."""
    if damping <= 0:
        return moment
    return moment + damping * float(np.mean(np.diag(moment))) * np.eye(moment.shape[0])


def top_eigenvectors(matrix: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-`rank` eigenpairs of a symmetric matrix, sorted descending, signs fixed deterministically."""
    # The full divide-and-conquer solver (evd) beats the subset solver (evr) several times over at
    # these sizes, even when only a fraction of the spectrum is kept.
    values, vectors = scipy.linalg.eigh(matrix, driver="evd", check_finite=True)
    values, vectors = values[::-1][:rank], vectors[:, ::-1][:, :rank]
    return values, fix_signs(np.ascontiguousarray(vectors))


def fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip each column so its largest-magnitude entry is positive (eigenvectors are sign-free).

    In place: the columns can be an (out x rank) float64 matrix of hundreds of MB at 7B shapes.
    """
    pivots = np.abs(vectors).argmax(axis=0)
    signs = np.sign(vectors[pivots, np.arange(vectors.shape[1])])
    signs[signs == 0] = 1.0
    vectors *= signs
    return vectors


def input_moment_matrix(second_moment: np.ndarray, mean: np.ndarray, centered: bool,
                        with_bias: bool) -> np.ndarray:
    """The input-side matrix C with E[y yᵀ] (or Cov y) = W̃ C W̃ᵀ.

    Uncentered with a bias, the input is augmented with a constant 1 (W̃ = [W b]); centered, the
    bias drops out of the covariance.
    """
    if centered:
        return second_moment - np.outer(mean, mean)
    if not with_bias:
        return second_moment
    size = second_moment.shape[0]
    augmented = np.empty((size + 1, size + 1))
    augmented[:size, :size] = second_moment
    augmented[:size, size] = mean
    augmented[size, :size] = mean
    augmented[size, size] = 1.0
    return augmented


def rom_basis_from_inputs(weight: np.ndarray, bias: np.ndarray | None, second_moment: np.ndarray,
                          mean: np.ndarray, rank: int, centered: bool = False,
                          damping: float = 0.0) -> np.ndarray:
    """Top-r eigenvectors of the output moment W Cx Wᵀ, from the input moment Cx (in x in).

    Where out <= in the out x out matrix is formed and solved directly. Where out > in (gate/up
    projections) it never is: with C = L Lᵀ and A = W̃ L, the eigenvectors of A Aᵀ come from the
    small in x in problem Aᵀ A = Q Λ Qᵀ as A Q Λ^{-1/2}.
    """
    with_bias = bias is not None and not centered
    moment = damped(input_moment_matrix(second_moment, mean, centered, with_bias), damping)
    w_tilde = np.hstack([weight, bias[:, None]]) if with_bias else weight
    out_features, in_features = w_tilde.shape
    if out_features <= in_features:
        output_moment = w_tilde @ moment @ w_tilde.T
        return top_eigenvectors((output_moment + output_moment.T) / 2, rank)[1]
    values, vectors = scipy.linalg.eigh((moment + moment.T) / 2)
    vectors *= np.sqrt(np.clip(values, 0.0, None))  # now L with C = L Lᵀ
    a = w_tilde @ vectors
    del vectors, moment  # the out x in problem is the large one: keep few copies alive at once
    small_values, small_vectors = top_eigenvectors(a.T @ a, rank)
    if small_values[-1] <= small_values[0] * 1e-12:
        # Rank-deficient statistics: an SVD still gives `rank` orthonormal columns.
        left = np.linalg.svd(a, full_matrices=False)[0][:, :rank]
        return fix_signs(np.ascontiguousarray(left))
    basis = a @ small_vectors
    del a
    basis /= np.sqrt(small_values)
    return fix_signs(basis)


def rom_basis_from_outputs(second_moment: np.ndarray, mean: np.ndarray, rank: int,
                           centered: bool = False, damping: float = 0.0) -> np.ndarray:
    """Top-r eigenvectors of an output moment accumulated directly (out x out)."""
    moment = second_moment - np.outer(mean, mean) if centered else second_moment
    return top_eigenvectors(damped((moment + moment.T) / 2, damping), rank)[1]


def factorise(weight: np.ndarray, bias: np.ndarray | None, basis: np.ndarray,
              output_mean: np.ndarray | None = None) -> Factors:
    """W ≈ V (Vᵀ W); with `output_mean`, the centered variant's bias (I − V Vᵀ) μ_y."""
    reduce_weight = basis.T @ weight
    reduce_bias = basis.T @ bias if bias is not None else None
    expand_bias = None
    if output_mean is not None:
        expand_bias = output_mean - basis @ (basis.T @ output_mean)
    return Factors(reduce_weight, basis, reduce_bias, expand_bias)


def output_mean_from_inputs(weight: np.ndarray, bias: np.ndarray | None, input_mean: np.ndarray) -> np.ndarray:
    mean = weight @ input_mean
    return mean + bias if bias is not None else mean
