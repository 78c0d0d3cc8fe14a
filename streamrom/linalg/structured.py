"""The math of structured ROM, as functions of numpy arrays (no model, no I/O): joint decompositions
that leave narrower *dense* matrices instead of two factors per linear.

MLP. With z = act(gate·x) ⊙ (up·x) the intermediate activation and C = E[z zᵀ], keeping the neurons S
leaves gate and up their rows S unchanged (the nonlinearity stays exact for kept neurons) and refits
down to W·C[:,S]·C[S,S]⁻¹, the least-squares optimum of W z from z_S. The neurons are chosen either
by ridge leverage, diag(C (C + λI)⁻¹) (MoDeGPT's Nyström), or by greedy removal with the structured
OBS cost ‖w_j‖² / [C⁻¹]_jj and its compensation of the kept columns (ZipLM, SlimGPT), removed in
batches so the work is matrix products.

Values and o_proj. Per KV head g the attention output is Σ_{h∈g} W_o,h·a_h with a_h = A_h·V_g mixed
values, linear in the values. A map R_g (head_dim × width) shared by the query heads of the group
narrows the values to Rᵀ v (v_proj's rows become R_gᵀ W_v,g); o_proj is then refitted in closed form
on the narrowed mixed values, all heads at once: W_o·C·B (Bᵀ C B)⁻¹, B the block diagonal of the
heads' R, C the moment of the attention output (before o_proj). R_g spans the top eigenvectors of
C_g^½ (Σ_h W_o,hᵀ W_o,h) C_g^½ mapped back by C_g^-½ (C_g: the group's mean head moment), which is
the exact reduced-rank optimum for one query head per group.

Queries and keys. Rotary turns each pair of dimensions (j, j + head_dim/2) of a head by its own
angle, so whole pairs can go and the rotation of the others stays exact. Per KV head the pairs kept
are shared by its query heads and ranked by Σ_h E‖q_h,j‖²·E‖k_j‖² (the expected squared part of the
scores the pair carries, for independent q and k: MoDeGPT's column–row products), read from the
input's moment and q/k's weights; the kept rows stay as they are (no refit: the scores are bilinear).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.linalg.blas
import scipy.linalg.lapack

from ..errors import NumericalError
from .decompose import Anchor, damped, least_squares, least_squares_in_place, top_eigenvectors

# pass1: the greedy removal's order from pass 1 (on the dense model's inputs, in loss units), kept in
# pass 2 as it is; only down is refitted there (no second removal on the compressed inputs)
NEURON_SELECTIONS = ("obs", "leverage", "pass1")
LEVERAGE_RIDGE = 1e-2  # λ of the ridge leverage, relative to the mean diagonal of C
# The greedy removal's inverse is damped by this fraction of C's mean diagonal (SparseGPT's and
# ZipLM's 1 %): it is taken in float32 at 7B shape, and a nearly singular C would give costs of noise.
# The final refit is solved apart, in float64, with the run's own damping.
SELECTION_DAMPING = 1e-2
IN_PLACE_FROM = 4096  # obs_removal: wider moments are updated in place (see there)
COMPACT_AT = 7 / 8  # ... and their live rows and columns compacted in place when this share of them is left


def refit_columns(weight: np.ndarray, moment: np.ndarray, kept: np.ndarray, damping: float,
                  anchor: Anchor | None = None, overwrite_moment: bool = False) -> np.ndarray:
    """W·C[:,S]·(C[S,S] + δ)⁻¹: the least-squares fit of W z from the kept features z_S (out x |S|),
    S ascending. In the moment's dtype, one copy of C[S,S] factored in place (310 MB at 7B shape,
    80 % kept); with `overwrite_moment` a wide moment's own buffer holds C[S,S] instead (its contents
    are lost), so that no second n x n array is alive. With `anchor` (cross = E[y zᵀ], y what W z
    should reproduce, from the dense stream), the target W z moves to y by its strength: W·C[:,S]
    becomes (1 − α)·W·C[:,S] + α·E[y z_Sᵀ]. The anchor's cross moment is taken (Anchor.take_cross) and
    freed before C[S,S] is formed (copied, or compacted into C's own buffer)."""
    cross = anchor.take_cross() if anchor is not None else None
    if moment.shape[0] <= IN_PLACE_FROM:
        cross_t = np.ascontiguousarray((weight @ moment)[:, kept].T)  # = (W C[:, S])ᵀ
        if cross is not None:
            cross_t *= 1.0 - anchor.strength
            cross_t += anchor.strength * cross[:, kept].T
        del cross
        return least_squares(lambda: moment[np.ix_(kept, kept)], cross_t, damping)
    # C is symmetric: (W C[:, S])ᵀ = C[S, :] Wᵀ, built band by band (no out x n product), Fortran-ordered
    # like C[S,S]ᵀ below, so that LAPACK factors and solves in place, no copies
    cross_t = np.empty((kept.size, weight.shape[0]), dtype=moment.dtype, order="F")
    for start in range(0, kept.size, 1024):
        band = kept[start:start + 1024]
        cross_t[start:start + 1024] = moment[band] @ weight.T
        if cross is not None:
            cross_t[start:start + 1024] *= 1.0 - anchor.strength
            cross_t[start:start + 1024] += anchor.strength * cross[:, band].T
    del cross  # (the 7B MLP's: 180 MB, not beside the copy of C[S,S])
    if overwrite_moment and moment.flags.c_contiguous:
        if np.any(np.diff(kept) <= 0):
            raise ValueError("refit_columns compacts the moment in place for ascending kept features only")
        return least_squares_in_place(_compact(moment, kept, kept).T, cross_t, damping)
    return least_squares(lambda: moment[np.ix_(kept, kept)].T, cross_t, damping)


def leverage_order(moment: np.ndarray, ridge: float = LEVERAGE_RIDGE) -> np.ndarray:
    """Feature indices, most important first, by ridge leverage diag(C (C + λI)⁻¹)."""
    values, vectors = scipy.linalg.eigh(damped(moment, 0.0), driver="evd")
    values = np.clip(values, 0.0, None)
    shrink = values / (values + ridge * max(float(np.mean(np.diag(moment))), 1e-30))
    scores = (vectors ** 2) @ shrink
    return np.argsort(-scores, kind="stable")


@dataclass(frozen=True)
class Removal:
    """A greedy removal: `order` lists every feature, the most important first (the last removed
    first); `costs[i]` is what removing order[i] cost, given the features after it already removed
    (inf where it was never removed). Keeping order[:k] costs costs[k:].sum()."""

    order: np.ndarray
    costs: np.ndarray


def obs_removal(moment: np.ndarray, weight: np.ndarray, keep: int, damping: float,
                order: np.ndarray | None = None, overwrite_moment: bool = False) -> Removal:
    """Greedy structured-OBS removal of features until `keep` are left.

    Removing the set R from the live set, with the live columns of W refitted, costs
    tr(W_R (H_RR)⁻¹ W_Rᵀ), H the inverse of C on the live set; then W and H are updated in closed
    form (W_A −= W_R H_RR⁻¹ H_RA, H_AA −= H_AR H_RR⁻¹ H_RA). Each round removes the cheapest batch
    (about 1/64 of the live set), its joint cost shared among its features by their single costs.
    With `order` (most important first) the features go in that order instead, and only the costs
    are computed (to price another selection by the same measure). With `overwrite_moment`, a wide
    moment's own buffer becomes the inverse (its contents are lost: the caller keeps a copy where it
    needs C again), so that no second n x n array is alive during the removal.
    """
    size = moment.shape[0]
    keep = max(0, min(keep, size))
    work_dtype = moment.dtype
    # Up to IN_PLACE_FROM features the live set is compacted every round (later rounds are cheaper);
    # wider (the MLP at 7B shape: 11008, 485 MB per float32 copy) H and W are updated in place, and
    # compacted in their own buffers whenever an eighth of their rows has died (_compact_in_place), so
    # no round copies H and the rank-k updates work on the live rows only.
    in_place = size > IN_PLACE_FROM
    if in_place and overwrite_moment and moment.flags.c_contiguous:
        damped_moment = moment  # damped in place (a sum of x xᵀ is symmetric to its rounding; LU needs no symmetry)
        damped_moment[np.diag_indices_from(damped_moment)] += damping * float(np.mean(np.diag(damped_moment)))
    else:
        damped_moment = damped(moment, damping)
    inverse = (_lower_inverse_in_place(damped_moment) if in_place
               else scipy.linalg.inv(damped_moment, overwrite_a=True, check_finite=False))
    del damped_moment
    columns = np.array(weight, dtype=work_dtype, copy=True)
    live = np.arange(size)  # original indices of the live features (compacted: of inverse's rows too)
    place = np.arange(size)  # in place: where the live features sit in inverse's rows and columns' columns
    removed: list[np.ndarray] = []
    costs: list[np.ndarray] = []
    planned = None if order is None else list(order[::-1])  # least important first
    while live.size > keep:
        batch = min(live.size - keep, max(1, live.size // 64))
        at = place if in_place else slice(None)  # where the live features sit in inverse and columns
        diagonal = np.clip(np.diag(inverse)[at], 1e-30, None)
        single = _column_energy(columns, place if in_place else None) / diagonal
        if planned is None:
            chosen = np.argsort(single, kind="stable")[:batch]
        else:
            position = {index: where for where, index in enumerate(live)}
            chosen = np.array([position[index] for index in planned[:batch]])
            del planned[:batch]
        rest = np.setdiff1d(np.arange(live.size), chosen, assume_unique=True)
        rows = place[chosen] if in_place else chosen  # the chosen ones' rows in inverse and columns
        if in_place:  # H's rows R whole, from the lower triangle that holds H (see below)
            h_r = _symmetric_rows(inverse, rows)
            block = h_r[:, rows].astype(np.float64)
            factor = _pinv_factor(0.5 * (block + block.T))
            block_inv = factor @ factor.T
        else:
            block = inverse[np.ix_(rows, rows)].astype(np.float64)
            block_inv = np.linalg.pinv(0.5 * (block + block.T), hermitian=True)
        w_r = columns[:, rows].astype(np.float64)
        joint = float(np.sum((w_r @ block_inv) * w_r))  # tr(W_R H_RR⁻¹ W_Rᵀ), by a GEMM
        share = single[chosen] / max(float(single[chosen].sum()), 1e-300)
        removed.append(live[chosen])
        costs.append(max(joint, 0.0) * share)
        if in_place:
            correction = (block_inv @ h_r.astype(np.float64)).astype(work_dtype)
            columns = _subtract_product(columns, columns[:, rows], correction)
            # H −= H_AR H_RR⁻¹ H_RA is symmetric: with H_RR⁻¹ = F Fᵀ it is (H_AR F)(H_AR F)ᵀ, a syrk on
            # one triangle (half the work of the product); H is held by its lower triangle from here on
            del correction
            _subtract_gram(inverse, np.ascontiguousarray(h_r.T) @ factor.astype(work_dtype))
            del h_r, factor
        else:
            correction = (block_inv @ inverse[np.ix_(chosen, rest)].astype(np.float64)).astype(work_dtype)
            columns = columns[:, rest] - columns[:, chosen] @ correction
            inverse = _subtract_product(inverse[np.ix_(rest, rest)], inverse[np.ix_(rest, chosen)], correction)
        live = live[rest]
        if in_place:
            place = place[rest]
            # the dead rows and columns would cost flops in the rounds still to come: worth a copy when
            # those rounds remove another eighth or more
            if live.size <= COMPACT_AT * inverse.shape[0] and live.size - keep >= (1 - COMPACT_AT) * live.size:
                inverse, columns = _compact_in_place(inverse, columns, place)
                place = np.arange(live.size)
    # the order kept: the live ones (never removed) first, then the removed, the last removed first
    if order is not None:
        still = set(live.tolist())
        tail = np.array([index for index in order if index in still], dtype=np.int64)
    elif live.size:  # by their single cost at the end (in place: read where they sit, no copy)
        at = place if in_place else slice(None)
        diagonal = np.clip(np.diag(inverse)[at], 1e-30, None)
        tail = live[np.argsort(-(_column_energy(columns, place if in_place else None) / diagonal), kind="stable")]
    else:
        tail = live
    removed_order = [batch[::-1] for batch in removed[::-1]]
    removed_costs = [cost[::-1] for cost in costs[::-1]]
    return Removal(np.concatenate([tail, *removed_order]).astype(np.int64),
                   np.concatenate([np.full(tail.size, np.inf), *removed_costs]))


def _lower_inverse_in_place(matrix: np.ndarray) -> np.ndarray:
    """The inverse of a C-ordered symmetric positive definite matrix, in its own buffer, held by its
    lower triangle (what the in-place removal reads): LAPACK's Cholesky factor and inverse (potrf,
    potri) on the transpose, the Fortran-ordered matrix whose upper triangle is this one's lower. The
    same bits as scipy.linalg.inv's Cholesky path, without its structure checks and the copy that
    fills the other triangle."""
    potrf, potri = scipy.linalg.lapack.get_lapack_funcs(("potrf", "potri"), (matrix,))
    factor, info = potrf(matrix.T, lower=0, overwrite_a=1, clean=0)
    if info == 0:
        inverse, info = potri(factor, lower=0, overwrite_c=1)
    if info != 0 or not np.shares_memory(factor, matrix):
        # (a damped sum of outer products is positive definite: only a moment already broken gets here)
        raise NumericalError(f"the damped moment of {matrix.shape[0]} neurons is not positive definite (LAPACK "
                             f"info {info}): its activations overflowed upstream")
    return inverse.T


def _compact_in_place(inverse: np.ndarray, columns: np.ndarray, place: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """inverse[place][:, place] and columns[:, place], each moved to the front of its own buffer and
    returned as a C-ordered array of the smaller size: no second n x n array."""
    return _compact(inverse, place, place), _compact(columns, np.arange(columns.shape[0]), place)


def _compact(matrix: np.ndarray, rows: np.ndarray, place: np.ndarray, rows_at_once: int = 256) -> np.ndarray:
    """matrix[rows][:, place] written over the front of matrix's own buffer. Safe in place because
    rows and place are ascending, so every element moves to a flat index at or before its own, and a
    band of rows is read whole before it is written."""
    if not matrix.flags.c_contiguous:  # (never: both matrices are C-ordered here) a copy, but a correct one
        matrix = np.ascontiguousarray(matrix)
    flat, kept = matrix.reshape(-1), place.size
    for start in range(0, rows.size, rows_at_once):
        stop = min(start + rows_at_once, rows.size)
        flat[start * kept:stop * kept] = matrix[rows[start:stop]][:, place].reshape(-1)
    return flat[:rows.size * kept].reshape(rows.size, kept)


def _column_energy(columns: np.ndarray, live: np.ndarray | None) -> np.ndarray:
    """‖w_j‖² of every column (compacted), or of the live ones, read in place (no copy of W)."""
    if live is None:
        return (columns ** 2).sum(axis=0)
    return np.einsum("ij,ij->j", columns, columns)[live]


def _symmetric_rows(lower: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """Rows `rows` of the symmetric matrix whose lower triangle `lower` holds (row >= column): each
    row's part left of the diagonal from its row, the rest from its column."""
    whole = lower[rows]
    below = np.arange(lower.shape[0])[None, :] > rows[:, None]
    return np.where(below, lower[:, rows].T, whole)


def _pinv_factor(symmetric: np.ndarray) -> np.ndarray:
    """F with F Fᵀ the pseudo-inverse of a symmetric positive semi-definite matrix (its eigenvectors
    over the roots of the eigenvalues numpy.linalg.pinv keeps by default)."""
    values, vectors = np.linalg.eigh(symmetric)
    cutoff = max(symmetric.shape) * np.finfo(values.dtype).eps * max(float(np.abs(values).max(initial=0.0)), 1e-300)
    kept = values > cutoff
    return vectors[:, kept] / np.sqrt(values[kept])


def _subtract_gram(target: np.ndarray, left: np.ndarray) -> None:
    """The lower triangle of target (C-ordered, square) −= left·leftᵀ, in place by BLAS syrk."""
    syrk = scipy.linalg.blas.get_blas_funcs("syrk", (target,))
    # target's transpose is the Fortran-ordered matrix BLAS sees; its upper triangle is target's lower
    result = syrk(-1.0, left.T, beta=1.0, c=target.T, trans=1, lower=0, overwrite_c=True)
    if not np.shares_memory(result, target):  # (never with a C-ordered target of BLAS's dtype) a copy back
        target[...] = result.T


def _subtract_product(target: np.ndarray, left: np.ndarray, right: np.ndarray) -> np.ndarray:
    """target − left·right, written into target (C-ordered) by BLAS gemm: no temporary of its size."""
    gemm = scipy.linalg.blas.get_blas_funcs("gemm", (target,))
    result = gemm(-1.0, right.T, left.T, beta=1.0, c=target.T, overwrite_c=True)  # (target − l·r)ᵀ
    return result.T


def select_neurons(moment: np.ndarray, weight: np.ndarray, keep: int, selection: str | np.ndarray, damping: float,
                   overwrite_moment: bool = False) -> np.ndarray:
    """The `keep` features to keep, sorted by index (`overwrite_moment`: see obs_removal). `selection`
    is a method's name, or an order found before (most important first: pass 1's), whose first `keep`
    are kept."""
    if not isinstance(selection, str):
        kept = np.asarray(selection)[:keep]
    elif selection == "leverage":
        kept = leverage_order(moment)[:keep]
    elif selection == "obs":
        kept = obs_removal(moment, weight, keep, max(damping, SELECTION_DAMPING),
                           overwrite_moment=overwrite_moment).order[:keep]
    else:
        raise ValueError(f"unknown neuron selection {selection!r}")
    return np.sort(kept)


def neuron_costs(moment: np.ndarray, weight: np.ndarray, selection: str, damping: float, smallest: int,
                 overwrite_moment: bool = False) -> Removal:
    """What keeping each neuron is worth, in the order `selection` keeps them (pass1: obs's): the
    refit error ‖ΔW z‖² (in `weight`'s output metric) of removing it after those behind it. The
    `smallest` always kept are never removed: they get the largest cost found. `overwrite_moment`: see
    obs_removal."""
    order = leverage_order(moment) if selection == "leverage" else None
    removal = obs_removal(moment, weight, smallest, max(damping, SELECTION_DAMPING), order,
                          overwrite_moment=overwrite_moment)
    costs = removal.costs
    finite = costs[np.isfinite(costs)]
    return Removal(removal.order, np.where(np.isfinite(costs), costs, finite.max() if finite.size else 0.0))


# -- values and o_proj ------------------------------------------------------------------------------

def _head_blocks(moment: np.ndarray, heads: int, head_dim: int) -> list[np.ndarray]:
    return [moment[h * head_dim:(h + 1) * head_dim, h * head_dim:(h + 1) * head_dim] for h in range(heads)]


def value_maps(attention_moment: np.ndarray, o_weight: np.ndarray, num_heads: int, num_kv_heads: int,
               head_dim: int, width: int, damping: float) -> tuple[list[np.ndarray], np.ndarray]:
    """Per KV head the map R_g (head_dim x width) and, per value dimension in the order kept, its
    worth summed over the KV heads (the eigenvalues: what dropping it costs in o_proj's output,
    in o_weight's output metric)."""
    group = num_heads // num_kv_heads
    blocks = _head_blocks(attention_moment, num_heads, head_dim)
    maps, worth = [], np.zeros(head_dim)
    for g in range(num_kv_heads):
        heads = range(g * group, (g + 1) * group)
        mean = damped(sum(blocks[h] for h in heads) / group, damping).astype(np.float64)
        values, vectors = scipy.linalg.eigh(mean)
        values = np.clip(values, 1e-12 * max(float(values.max()), 1e-30), None)
        root, inverse_root = (vectors * np.sqrt(values)) @ vectors.T, (vectors / np.sqrt(values)) @ vectors.T
        reads = sum(o_weight[:, h * head_dim:(h + 1) * head_dim].T.astype(np.float64)
                    @ o_weight[:, h * head_dim:(h + 1) * head_dim].astype(np.float64) for h in heads)
        energy, directions = top_eigenvectors(root @ reads @ root, head_dim)
        worth += np.clip(energy, 0.0, None)
        # only the span matters (o_proj is refitted on it): an orthonormal basis keeps the values' scale
        span = np.linalg.qr(inverse_root @ directions[:, :width])[0]
        maps.append(span.astype(attention_moment.dtype))
    return maps, worth


def refit_output(o_weight: np.ndarray, attention_moment: np.ndarray, maps: list[np.ndarray], num_heads: int,
                 head_dim: int, damping: float, anchor: Anchor | None = None) -> np.ndarray:
    """o_proj refitted on the narrowed values: W_o C B (Bᵀ C B)⁻¹ (hidden x heads·width). With `anchor`
    (cross = E[y ãᵀ], hidden x heads·head_dim, y what o_proj should give, from the dense stream), W_o C
    becomes (1 − α) W_o C + α E[y ãᵀ]: the fit's target moves from W_o ã to y by the strength α."""
    group = num_heads // len(maps)
    width = maps[0].shape[1]
    selection = np.zeros((num_heads * head_dim, num_heads * width), dtype=attention_moment.dtype)
    for h in range(num_heads):
        selection[h * head_dim:(h + 1) * head_dim, h * width:(h + 1) * width] = maps[h // group]
    projected = attention_moment @ selection
    target = o_weight @ projected
    if anchor is not None:
        target = (1.0 - anchor.strength) * target + anchor.strength * (anchor.cross @ selection)
    return least_squares(lambda: selection.T @ projected, np.ascontiguousarray(target.T), damping)


# -- queries and keys: rotary pairs ------------------------------------------------------------------

def output_energies(weight: np.ndarray, bias: np.ndarray | None, second_moment: np.ndarray,
                    mean: np.ndarray) -> np.ndarray:
    """E[y_r²] of each output of y = W x + b, from the input's uncentered moment and mean."""
    rows = np.einsum("ij,ij->i", weight @ second_moment, weight)
    if bias is not None:
        rows = rows + 2.0 * bias * (weight @ mean) + bias ** 2
    return np.clip(rows, 0.0, None)


def per_pair(rows: np.ndarray, heads: int, head_dim: int) -> np.ndarray:
    """Per-output values summed per head and rotary pair (j, j + head_dim/2): heads x head_dim/2."""
    return rows.reshape(heads, 2, head_dim // 2).sum(axis=1)


def pair_energies(weight: np.ndarray, bias: np.ndarray | None, second_moment: np.ndarray, mean: np.ndarray,
                  heads: int, head_dim: int) -> np.ndarray:
    """E[y_j² + y_{j+half}²] of y = W x + b per head and rotary pair j (heads x head_dim/2). Rotary
    turns each pair by an angle, so the pair's energy is the same before and after it."""
    return per_pair(output_energies(weight, bias, second_moment, mean), heads, head_dim)


def rotary_pair_order(query_energy: np.ndarray, key_energy: np.ndarray) -> np.ndarray:
    """Per KV head, its pairs most important first (kv_heads x head_dim/2): by Σ_h E‖q_h,j‖²·E‖k_j‖²
    over the group's query heads, the expected squared score the pair adds when q and k are
    independent (the column–row norm products of MoDeGPT's CR decomposition, squared)."""
    kv_heads = key_energy.shape[0]
    group = query_energy.reshape(kv_heads, -1, key_energy.shape[1]).sum(axis=1)
    return np.argsort(-(group * key_energy), axis=1, kind="stable")


def kept_pair_dims(pairs: np.ndarray, head_dim: int, heads: int) -> np.ndarray:
    """The layout of narrowed queries and keys, once for every reader of it: (heads x 2m) dimensions of
    each head that keep `pairs` (kv_heads x m, ascending), its pairs' first halves then their partners
    (as rotate_half pairs them); a query head takes its KV head's pairs."""
    dims = np.concatenate([pairs, pairs + head_dim // 2], axis=1)
    return np.repeat(dims, heads // pairs.shape[0], axis=0)


def kept_pair_rows(pairs: np.ndarray, head_dim: int, heads: int) -> np.ndarray:
    """Row indices of a q_proj (heads query heads) or k_proj (heads = KV heads) that keep `pairs`:
    kept_pair_dims, head by head."""
    return (kept_pair_dims(pairs, head_dim, heads) + head_dim * np.arange(heads)[:, None]).reshape(-1)


def pair_costs(query_cost: np.ndarray, key_cost: np.ndarray, order: np.ndarray) -> np.ndarray:
    """What keeping each pair is worth, in the order `order` keeps them, summed over the KV heads:
    per pair the mean of its query-side cost (summed over the group's heads) and its key-side cost.
    Dropping either side takes the pair's part of the scores away, so the two estimate one loss."""
    kv_heads = key_cost.shape[0]
    per_pair = 0.5 * (query_cost.reshape(kv_heads, -1, key_cost.shape[1]).sum(axis=1) + key_cost)
    return np.take_along_axis(per_pair, order, axis=1).sum(axis=0)
