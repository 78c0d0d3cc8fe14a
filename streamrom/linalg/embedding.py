"""A low-rank token embedding fitted to what the output head reads (issue 31's Gemma 3 study).

A tied embedding E (vocab x hidden) is both the input table and the head: logits = E h. Replacing E by a
rank-r E' changes the logits by (E − E') h, whose mean square over hidden states of second moment C is
‖(E − E') C½‖_F². Its minimum over rank-r E' (Eckart–Young on E C½) is E C½ B Bᵀ C^-½, B the top r right
singular vectors of E C½, i.e. the top r eigenvectors of C½ EᵀE C½ (hidden x hidden: the vocabulary
enters once, through the Gram product EᵀE). Stored as two factors: codes = E C½ B (vocab x r), the
rows a token's embedding is made of, and expand = Bᵀ C^-½ (r x hidden).

Pure functions on arrays; float64 throughout (the hidden width of a small model is a few hundred).
"""
from __future__ import annotations

import numpy as np
import scipy.linalg

from ..errors import NumericalError, UsageError

# Eigenvalues of C below this fraction of its largest are lifted to it before C^-½ is formed: directions
# the hidden states never take would otherwise be divided by rounding noise.
EIGEN_FLOOR = 1e-12


def moment_roots(moment: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(C½, C^-½), symmetric, from C's eigendecomposition (eigenvalues floored at EIGEN_FLOOR of the largest)."""
    values, vectors = scipy.linalg.eigh(np.asarray(moment, dtype=np.float64))
    values = np.maximum(values, max(float(values[-1]), 0.0) * EIGEN_FLOOR)
    if values[-1] <= 0:
        raise NumericalError("the hidden states' second moment is zero: nothing to weight the embedding's fit by")
    return (vectors * np.sqrt(values)) @ vectors.T, (vectors / np.sqrt(values)) @ vectors.T


def head_weighted_factors(embedding: np.ndarray, moment: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """(codes, expand) with codes @ expand the rank-`rank` embedding whose logits best match E h over
    hidden states of second moment `moment` (see the module's docstring)."""
    embedding = np.asarray(embedding, dtype=np.float64)
    hidden = embedding.shape[1]
    if not 0 < rank <= hidden:
        raise UsageError(f"rank {rank} of a {hidden}-wide embedding: give 1..{hidden}")
    root, inverse_root = moment_roots(moment)
    weighted_gram = root @ (embedding.T @ embedding) @ root
    _, vectors = scipy.linalg.eigh(weighted_gram, subset_by_index=(hidden - rank, hidden - 1))
    basis = vectors[:, ::-1]  # B, hidden x rank, the largest first
    return embedding @ (root @ basis), basis.T @ inverse_root


def weighted_error(embedding: np.ndarray, approximation: np.ndarray, moment: np.ndarray) -> float:
    """Mean squared logit change ‖(E − E') C½‖_F² = tr((E − E') C (E − E')ᵀ)."""
    difference = np.asarray(embedding, dtype=np.float64) - np.asarray(approximation, dtype=np.float64)
    return float(np.einsum("ij,ij->", difference @ np.asarray(moment, dtype=np.float64), difference))
