"""The math of reduced order modelling, as functions of numpy arrays (no model, no I/O).

For a linear y = W x + b observed on calibration inputs, ROM keeps the top-r eigenvectors V of the
output features' second moment E[y yᵀ] and re-parameterises W ≈ V (Vᵀ W). With the *uncentered*
moment this is the best rank-r approximation of the outputs W X in Frobenius norm.
The centered variant uses the covariance and adds the mean correction (I − V Vᵀ) μ_y as a bias.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.linalg
import scipy.linalg.blas

RANK_MULTIPLE = 8


def rank_for(ratio: float, out_features: int, in_features: int, multiple: int = RANK_MULTIPLE) -> int:
    """Rank at which two factors hold `ratio` of the dense parameters, rounded down to `multiple`."""
    exact = ratio * out_features * in_features / (out_features + in_features)
    return int(exact // multiple) * multiple


def saves_parameters(rank: int, out_features: int, in_features: int, at_least: float = 0.0) -> bool:
    """Whether rank-`rank` factors hold fewer parameters than the dense matrix, by more than the
    fraction `at_least` of them."""
    return 0 < rank and rank * (out_features + in_features) < (1.0 - at_least) * out_features * in_features


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


CHOLESKY_JITTERS = (1e-6, 1e-4)  # InputMoments.cholesky: tried in turn where C itself fails ...
JITTER_FROM = 1024  # ... from this width up; narrower, the eigen root costs little and is exact


def damped(moment: np.ndarray, damping: float) -> np.ndarray:
    """(moment + momentᵀ)/2 + damping·mean(diag)·I, as a new array in the moment's dtype.

    The damping keeps the basis inside W's range when calibration is short; symmetrising removes
    the rounding asymmetry the eigen-solver would otherwise see.
    """
    result = moment + moment.T
    result *= 0.5
    if damping > 0:
        result[np.diag_indices_from(result)] += damping * float(np.mean(np.diag(moment)))
    return result


def top_eigenvectors(matrix: np.ndarray, rank: int, lower: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Top-`rank` eigenpairs of a symmetric matrix, sorted descending, signs fixed deterministically;
    `lower`: the triangle that holds the matrix (a Gram product from `gram` fills only the upper one).

    Computed in the matrix's dtype: float32 halves the time and memory of the 4096-wide problems
    of a 7B model, and its rounding (~1e-7 of the largest eigenvalue) is far below the sampling
    noise of a covariance estimated from some ten thousand tokens.
    """
    # The full divide-and-conquer solver (evd) beats the subset solver (evr) several times over at
    # these sizes, even when only a fraction of the spectrum is kept.
    values, vectors = scipy.linalg.eigh(matrix, lower=lower, driver="evd", check_finite=True, overwrite_a=False)
    values, vectors = values[::-1][:rank], vectors[:, ::-1][:, :rank]
    return values, fix_signs(np.ascontiguousarray(vectors))


def fix_signs(vectors: np.ndarray) -> np.ndarray:
    """Flip each column so its largest-magnitude entry is positive (eigenvectors are sign-free).

    In place: the columns can be an (out x rank) matrix of hundreds of MB at 7B shapes.
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
    augmented = np.empty((size + 1, size + 1), dtype=second_moment.dtype)
    augmented[:size, :size] = second_moment
    augmented[:size, size] = mean
    augmented[size, :size] = mean
    augmented[size, size] = 1.0
    return augmented


@dataclass
class InputMoments:
    """The moments of the inputs one group of linears shares (q/k/v, o, or gate/up).

    `rom_basis` gives each linear's basis; the square root of the input moment that wide linears
    need (gate and up) is computed once per group and reused.
    """

    second_moment: np.ndarray  # E[x xᵀ], in x in
    mean: np.ndarray  # E[x]
    centered: bool = False
    damping: float = 0.0
    _roots: dict = field(default_factory=dict, repr=False)
    _cholesky: dict = field(default_factory=dict, repr=False)

    def matrix(self, with_bias: bool) -> np.ndarray:
        """C, damped, with E[y yᵀ] (or Cov y) = W̃ C W̃ᵀ."""
        return damped(input_moment_matrix(self.second_moment, self.mean, self.centered, with_bias), self.damping)

    def cholesky(self, with_bias: bool) -> np.ndarray | None:
        """C's lower Cholesky factor, once per group (a twelfth of an eigen-solve's work). Where C is
        not numerically positive (a centered moment from no more tokens than its width, or float32
        rounding of a nearly singular one) the factor of C + εI, ε the first of CHOLESKY_JITTERS
        (of C's mean diagonal) that succeeds: a change below the sampling noise of a moment from so few
        tokens, where the eigen-solve of a square root would cost as much as the eigen-solve the
        factor serves (from JITTER_FROM features up; narrower, `root` takes the exact eigen root).
        None where no factor was found."""
        if with_bias not in self._cholesky:
            matrix = self.matrix(with_bias)
            scale, previous = max(float(np.mean(np.diag(matrix))), 1e-30), 0.0
            self._cholesky[with_bias] = None
            for jitter in (0.0, *(CHOLESKY_JITTERS if matrix.shape[0] >= JITTER_FROM else ())):
                if jitter:  # (the diagonal gains the difference from the previous try)
                    matrix[np.diag_indices_from(matrix)] += (jitter - previous) * scale
                previous = jitter
                try:
                    self._cholesky[with_bias] = scipy.linalg.cholesky(matrix, lower=True, check_finite=False)
                    break
                except np.linalg.LinAlgError:
                    continue
        return self._cholesky[with_bias]

    def root(self, with_bias: bool) -> np.ndarray:
        """L with L Lᵀ = C (every use needs only that): the Cholesky factor, else a square root from C's
        eigendecomposition, negative rounding noise clipped."""
        factor = self.cholesky(with_bias)
        if factor is not None:
            return factor
        if with_bias not in self._roots:
            values, vectors = scipy.linalg.eigh(self.matrix(with_bias), driver="evd", overwrite_a=True)
            vectors *= np.sqrt(np.clip(values, 0.0, None))
            self._roots[with_bias] = vectors
        return self._roots[with_bias]

    def times_root(self, matrix: np.ndarray, with_bias: bool) -> np.ndarray:
        """matrix · L, a new C-ordered array: with the triangular factor by BLAS trmm, half a GEMM's work."""
        factor = self.cholesky(with_bias)
        if factor is None:
            return matrix @ self.root(with_bias)
        # (M L)ᵀ = Lᵀ Mᵀ: a C-ordered M is the F-ordered Mᵀ that trmm overwrites (in a copy: M is a weight)
        trmm = scipy.linalg.blas.get_blas_funcs("trmm", (factor,))
        product = trmm(1.0, factor, np.array(matrix.T, order="F", dtype=factor.dtype), side=0, lower=1,
                       trans_a=1, overwrite_b=1)
        return product.T

    def augmented_weight(self, weight: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, bool]:
        """(W̃, with_bias) in the moments' dtype: [W b] where the uncentered moment sees the bias."""
        with_bias = bias is not None and not self.centered
        w_tilde = np.hstack([weight, bias[:, None]]) if with_bias else weight
        return w_tilde.astype(self.second_moment.dtype, copy=False), with_bias

    def output_gram(self, w_tilde: np.ndarray, with_bias: bool) -> tuple[np.ndarray, bool]:
        """(W̃ C W̃ᵀ, lower): with C's Cholesky factor one triangle of A Aᵀ (A = W̃ L, BLAS syrk: half the
        products), the upper (lower=False); without it the full product, symmetrised."""
        if self.cholesky(with_bias) is not None:
            return gram(self.times_root(w_tilde, with_bias), rows=True), False
        return damped(w_tilde @ self.matrix(with_bias) @ w_tilde.T, 0.0), True

    def rom_basis(self, weight: np.ndarray, bias: np.ndarray | None, rank: int) -> np.ndarray:
        """Top-r eigenvectors of the output moment W̃ C W̃ᵀ, computed in the moments' dtype."""
        return self.rom_eigenpairs(weight, bias, rank)[1]

    def rom_eigenpairs(self, weight: np.ndarray, bias: np.ndarray | None, rank: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-r eigenvalues (descending, clipped at 0) and eigenvectors of the output moment W̃ C W̃ᵀ.

        With C = L Lᵀ and A = W̃ L: where out <= in the out x out matrix A Aᵀ is formed (BLAS syrk, one
        triangle) and solved directly. Where out > in (gate/up projections) it never is: the
        eigenvectors of A Aᵀ come from the small in x in problem Aᵀ A = Q Λ Qᵀ as A Q Λ^{-1/2}.
        """
        dtype = self.second_moment.dtype
        w_tilde, with_bias = self.augmented_weight(weight, bias)
        out_features, in_features = w_tilde.shape
        if out_features <= in_features:
            matrix, lower = self.output_gram(w_tilde, with_bias)
            values, vectors = top_eigenvectors(matrix, rank, lower=lower)
            return np.clip(values, 0.0, None), vectors
        a = self.times_root(w_tilde, with_bias)
        small_values, small_vectors = top_eigenvectors(gram(a, rows=False), rank, lower=False)
        basis = a @ small_vectors
        del a  # the out x in product is the large one: keep few of them alive at once
        # Columns of tiny eigenvalue (short calibration, or float32 rounding at 1e-7 of the top
        # one) are not accurately orthogonal after the division: re-orthonormalise them.
        floor = small_values[0] * np.finfo(dtype).eps
        basis /= np.sqrt(np.maximum(small_values, floor))
        if small_values[-1] < small_values[0] * np.sqrt(np.finfo(dtype).eps):
            basis = orthonormalize(basis)
        return np.clip(small_values, 0.0, None), fix_signs(basis)


def gram(matrix: np.ndarray, rows: bool) -> np.ndarray:
    """The upper triangle of M Mᵀ (`rows`) or Mᵀ M, by BLAS syrk: half the work of the product,
    whose other triangle would only repeat it. The lower triangle is left unset (zeros)."""
    syrk = scipy.linalg.blas.get_blas_funcs("syrk", (matrix,))
    # a C-ordered M is the F-ordered Mᵀ = T: M Mᵀ = Tᵀ T (trans=1), Mᵀ M = T Tᵀ (trans=0)
    return syrk(1.0, matrix.T, trans=1 if rows else 0, lower=0)


def orthonormalize(basis: np.ndarray) -> np.ndarray:
    """Orthonormal columns with the same leading spans (column k's direction depends only on
    columns 1..k), in place where it can be.

    CholeskyQR2 (two passes of B ← B R⁻¹ with RᵀR = BᵀB) costs two Gram products, a quarter of
    Householder QR at 7B shapes; for columns too dependent for it, Householder QR.
    """
    for _ in range(2):
        try:
            upper = scipy.linalg.cholesky(basis.T @ basis, lower=False)
        except np.linalg.LinAlgError:
            q, triangle = np.linalg.qr(basis)
            return q * np.where(np.diag(triangle) < 0, -1.0, 1.0).astype(basis.dtype)
        # Rᵀ Xᵀ = Bᵀ: the transposed view of a C-ordered B is Fortran-ordered, solved in place.
        basis = scipy.linalg.solve_triangular(upper, basis.T, trans="T", overwrite_b=True, check_finite=False).T
    return basis


def output_eigenpairs(moments: InputMoments, weight: np.ndarray, bias: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The top min(out, in) eigenvalues (descending) and eigenvectors (out x k) of W̃ C W̃ᵀ: the
    directions ROM keeps, in the order it keeps them."""
    w_tilde, _ = moments.augmented_weight(weight, bias)
    return moments.rom_eigenpairs(weight, bias, min(w_tilde.shape))


@dataclass
class PricingProblem:
    """One linear's direction-cost problem in pass 1, its products formed once: from it either the
    costs themselves (`costs`) or, for less work, a lower bound on every tail sum of them
    (`cost_lower_bound`, eigenvalues without vectors).

    `plain` is the symmetric matrix whose eigenvectors ROM keeps (W̃ C W̃ᵀ = A Aᵀ, or an output moment
    accumulated directly), held by the triangle `lower` says; where out > in (gate/up) it is the in x in
    Aᵀ A instead, and `weighted` = Aᵀ S A beside it (S the per-feature loss sensitivity)."""

    plain: np.ndarray
    lower: bool
    sensitivity: np.ndarray
    weighted: np.ndarray | None = None
    exact_tails_only: bool = False  # a bias column makes Aᵀ A wider than the directions priced: no bound

    def costs(self) -> np.ndarray:
        """sensitivity_weighted over the directions in the order ROM keeps them (direction_costs)."""
        if self.weighted is None:
            values, vectors = top_eigenvectors(self.plain, len(self.plain), lower=self.lower)
            return sensitivity_weighted(np.clip(values, 0.0, None), vectors,
                                        self.sensitivity.astype(vectors.dtype, copy=False))
        _, rotations = top_eigenvectors(self.plain, len(self.plain), lower=False)
        weighted = self.weighted + np.triu(self.weighted, 1).T  # both triangles for the product
        return np.einsum("ik,ik->k", rotations, weighted @ rotations)

    def total_cost(self) -> float:
        """The costs' sum, tr(S W̃ C W̃ᵀ) (what dropping every direction costs), from the products alone: an
        upper bound on every tail sum of the costs."""
        if self.weighted is not None:
            return float(np.trace(self.weighted, dtype=np.float64))
        return float(np.dot(np.diag(self.plain).astype(np.float64), np.clip(self.sensitivity, 0.0, None)))

    def cost_lower_bound(self) -> np.ndarray | None:
        """Values b (descending) whose every tail sum b[r:].sum() is at most the costs' (costs()[r:].sum()),
        up to float rounding: ROM's loss at rank r is ‖S½ (I − P_r) A‖², at least the best rank-r
        approximation's error of S½ A (Eckart–Young), the tail of the eigenvalues of Aᵀ S A or
        S½ A Aᵀ S½. Eigenvalues only (no vectors): a fraction of the full solve. Each value is lowered
        by a few units of rounding of the largest, so that the solver's own rounding cannot lift a tail
        above the costs'. None where the directions priced are fewer than those eigenvalues (a bias
        column in a wide product)."""
        if self.exact_tails_only:
            return None
        if self.weighted is None:
            root = np.sqrt(np.clip(self.sensitivity, 0.0, None)).astype(self.plain.dtype, copy=False)
            matrix = self.plain * root[:, None]
            matrix *= root[None, :]
            lower = self.lower
        else:
            matrix, lower = self.weighted, False
        values = scipy.linalg.eigh(matrix, lower=lower, eigvals_only=True, driver="evd", check_finite=True,
                                   overwrite_a=matrix is not self.weighted)[::-1].astype(np.float64)
        slack = 16 * np.finfo(self.plain.dtype).eps * max(float(values[0]) if values.size else 0.0, 0.0)
        return np.clip(values - slack, 0.0, None)


def pricing_problem(moments: InputMoments, weight: np.ndarray, bias: np.ndarray | None,
                    feature_sensitivity: np.ndarray) -> PricingProblem:
    """The products one linear's direction costs come from (see direction_costs).

    Where out > in (gate/up) no out-wide eigenproblem is solved: with A = W̃ L (C = L Lᵀ) and
    Aᵀ A = Q Λ Qᵀ, direction k is v_k = A q_k / √λ_k, so λ_k · v_kᵀ S v_k = q_kᵀ (Aᵀ S A) q_k, and both
    Aᵀ A and Aᵀ S A are in x in Gram products of A: one triangular product W̃ L, then two syrk on it
    (the second on S½ A, scaled in place), a third of the work of forming W̃ᵀ S W̃ and multiplying it
    by L from both sides.
    """
    w_tilde, with_bias = moments.augmented_weight(weight, bias)
    out_features, in_features = w_tilde.shape
    if out_features <= in_features:
        return PricingProblem(*moments.output_gram(w_tilde, with_bias), feature_sensitivity)
    a = moments.times_root(w_tilde, with_bias)  # a new array: scaled in place below
    del w_tilde
    plain = gram(a, rows=False)  # the upper triangle, as top_eigenvectors reads it
    a *= np.sqrt(np.clip(feature_sensitivity, 0.0, None)).astype(a.dtype, copy=False)[:, None]
    weighted = gram(a, rows=False)
    return PricingProblem(plain, False, feature_sensitivity, weighted, exact_tails_only=with_bias)


def output_pricing_problem(second_moment: np.ndarray, mean: np.ndarray, centered: bool,
                           feature_sensitivity: np.ndarray) -> PricingProblem:
    """The pricing problem of a linear whose output moment was accumulated directly (out x out)."""
    return PricingProblem(output_moment(second_moment, mean, centered), True, feature_sensitivity)


def direction_costs(moments: InputMoments, weight: np.ndarray, bias: np.ndarray | None,
                    feature_sensitivity: np.ndarray) -> np.ndarray:
    """sensitivity_weighted over the top min(out, in) directions of W̃ C W̃ᵀ (descending): what
    dropping each direction ROM keeps would cost, in the order ROM keeps them (pricing_problem)."""
    return pricing_problem(moments, weight, bias, feature_sensitivity).costs()


def sensitivity_weighted(values: np.ndarray, vectors: np.ndarray, feature_sensitivity: np.ndarray) -> np.ndarray:
    """Expected loss increase (to first order, up to a factor 1/2) of dropping each output direction.

    Direction k carries energy λ_k; an error e in the output costs about E[(g·e)²], g the loss
    gradient there. Treating g as independent of the dropped features, dropping direction v_k costs
    λ_k · v_kᵀ E[g gᵀ] v_k, of which the diagonal of E[g gᵀ] (`feature_sensitivity`, per output
    feature) gives λ_k · Σ_j v_jk² E[g_j²].
    """
    return values * ((vectors ** 2).T @ feature_sensitivity)


def output_energy(moments: InputMoments, weight: np.ndarray, bias: np.ndarray | None) -> float:
    """tr(W̃ C W̃ᵀ): the linear's mean squared output (its total output variance, centered)."""
    w_tilde, with_bias = moments.augmented_weight(weight, bias)
    return float(((w_tilde @ moments.matrix(with_bias)) * w_tilde).sum())


def mixture_weights(target_energy: float, general_energy: float, target_weight: float) -> tuple[float, float]:
    """(w_target, w_general), summing to 1, with w_t·C_t + w_g·C_g ∝ α·C_t/E_t + (1−α)·C_g/E_g.

    Each part is first normalised to unit output energy E (its trace), so a text whose activations
    are simply larger does not dominate, then weighted by α. Scaling to sum 1 makes the mix the moment
    of a mixture of the two calibration distributions, so mean and second moment stay consistent
    (and eigenvectors are unchanged by the scale).
    """
    if not 0.0 <= target_weight <= 1.0:
        raise ValueError(f"target weight must be in [0, 1], got {target_weight}")
    target = target_weight / target_energy if target_weight > 0 else 0.0
    general = (1.0 - target_weight) / general_energy if target_weight < 1 else 0.0
    total = target + general
    if not np.isfinite(total) or total <= 0:  # a part with no energy at all: the other alone
        return (1.0, 0.0) if target_weight >= 0.5 else (0.0, 1.0)
    return target / total, general / total


def mix_moments(target: InputMoments, general: InputMoments, weights: tuple[float, float]) -> InputMoments:
    """The input moments of the mixture w_t·target + w_g·general (centered: the mixture's covariance,
    which also holds the scatter between the two parts' means)."""
    w_target, w_general = weights
    dtype = target.second_moment.dtype
    return InputMoments((w_target * target.second_moment + w_general * general.second_moment).astype(dtype, copy=False),
                        (w_target * target.mean + w_general * general.mean).astype(dtype, copy=False),
                        target.centered, target.damping)


def select_basis(candidates: np.ndarray, target_factor: np.ndarray, rank: int,
                 extra: np.ndarray | None = None) -> np.ndarray:
    """The `rank` orthonormal directions, from `candidates` (orthonormal columns, e.g. the mix's
    eigenvectors) and optionally `extra` (e.g. the target's own top eigenvectors), that keep the most
    target output energy uᵀ C_t u, chosen greedily; C_t = A Aᵀ with A = `target_factor` (out × m, e.g.
    W̃ L for an input moment L Lᵀ), so no out × out matrix is needed.

    Each step takes the candidate whose part orthogonal to the directions already chosen keeps the
    most target energy, and projects it out of the rest; C_t times the remaining candidates is kept
    up to date rather than recomputed, so a step costs O(out × candidates). With orthonormal
    candidates alone this is the candidates sorted by target energy; `extra` adds target directions
    the candidates miss (the basis-selection idea of arXiv 2405.15877: keep what the target needs,
    drop what it never uses).
    """
    pool = candidates if extra is None else np.hstack([candidates, extra])
    pool = pool.astype(target_factor.dtype, copy=True)
    norms = np.linalg.norm(pool, axis=0)
    pool /= np.where(norms > 0, norms, 1.0)
    moment_pool = target_factor @ (target_factor.T @ pool)
    live = np.ones(pool.shape[1], dtype=bool)
    chosen = []
    tiny = np.finfo(pool.dtype).eps * 1e3
    for _ in range(min(rank, pool.shape[0])):
        squared = (pool * pool).sum(axis=0)
        energy = np.where(live & (squared > tiny), (pool * moment_pool).sum(axis=0) / np.maximum(squared, tiny), -np.inf)
        best = int(np.argmax(energy))
        if not np.isfinite(energy[best]):
            break  # the pool spans fewer than `rank` directions
        direction = pool[:, best] / np.sqrt(squared[best])
        moment_direction = moment_pool[:, best] / np.sqrt(squared[best])
        chosen.append(direction)
        live[best] = False
        overlap = direction @ pool  # project the chosen direction out of every candidate
        pool -= np.outer(direction, overlap)
        moment_pool -= np.outer(moment_direction, overlap)
    if len(chosen) < rank:
        raise ValueError(f"the candidates span only {len(chosen)} directions, {rank} asked")
    return fix_signs(orthonormalize(np.stack(chosen, axis=1)))


def weight_svd_basis(weight: np.ndarray, rank: int) -> np.ndarray:
    """Top-r left singular vectors of W: weight-space truncated SVD (the SFSD comparison baseline),
    which is ROM with the identity for the input moment, so it shares ROM's factor format."""
    dtype = weight.dtype
    return InputMoments(np.eye(weight.shape[1], dtype=dtype), np.zeros(weight.shape[1], dtype=dtype)).rom_basis(
        weight, None, rank)


def rom_basis_from_inputs(weight: np.ndarray, bias: np.ndarray | None, second_moment: np.ndarray,
                          mean: np.ndarray, rank: int, centered: bool = False,
                          damping: float = 0.0) -> np.ndarray:
    """Top-r eigenvectors of the output moment W Cx Wᵀ, from the input moment Cx (in x in)."""
    return InputMoments(second_moment, mean, centered, damping).rom_basis(weight, bias, rank)


def output_moment(second_moment: np.ndarray, mean: np.ndarray, centered: bool, damping: float = 0.0) -> np.ndarray:
    """An output moment accumulated directly (out x out), centered if asked, symmetrised, damped."""
    return damped(second_moment - np.outer(mean, mean) if centered else second_moment, damping)


def rom_basis_from_outputs(second_moment: np.ndarray, mean: np.ndarray, rank: int,
                           centered: bool = False, damping: float = 0.0) -> np.ndarray:
    """Top-r eigenvectors of an output moment accumulated directly (out x out)."""
    return top_eigenvectors(output_moment(second_moment, mean, centered, damping), rank)[1]


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


# -- anchored fits: the dense model's outputs as the target ------------------------------------------

# The anchored least squares is damped by this fraction of the compressed input's mean variance: the
# unconstrained map W·P·C̃⁻¹ would otherwise follow directions the calibration barely excites.
ANCHOR_RIDGE = 1e-2


@dataclass
class Anchor:
    """The dense model's side of one fit. `cross` = E[t x̃ᵀ] and `mean` = E[t], x̃ the compressed stream's
    features the moments are taken of, t the dense stream's value of those same features (the
    group's input, or the lone linear's output where its moments are taken there) or, with
    `target_is_output`, what the linear's output should be (a residual-stream target: the dense sum
    less the compressed stream's value it is added to); `strength` in [0, 1] moves the target from
    what the dense weights make of the compressed stream's inputs (0: plain ROM) to t's (1)."""

    cross: np.ndarray | None
    mean: np.ndarray
    strength: float
    target_is_output: bool = False

    def take_cross(self) -> np.ndarray:
        """The cross moment, handed over: the anchor holds it no more, so that the fit that takes it can
        free it when done (a 7B MLP's is 180 MB). An anchor serves one fit."""
        cross, self.cross = self.cross, None
        if cross is None:
            raise ValueError("this anchor's cross moment was already taken by a fit")
        return cross


def least_squares(gram_copy, cross_t: np.ndarray, damping: float) -> np.ndarray:
    """X with X (G + δ) = crossᵀ's transpose, i.e. crossᵀ solved by a Cholesky factor of a fresh copy
    of G (`gram_copy()`), in place; where the damped G is not numerically positive (float32, nearly
    dependent features) the damping grows tenfold until it is. `cross_t`: (features x out); an
    F-ordered one is solved in place."""
    def damped_copy(growth: float) -> np.ndarray:
        gram = gram_copy()
        scale = max(float(np.mean(np.diag(gram))), 1e-30)
        # (a C-ordered gram is copied by LAPACK's wrapper; the wide paths hand its transpose)
        gram[np.diag_indices_from(gram)] += max(damping, 1e-12) * growth * scale
        return gram
    return _solve_damped(damped_copy, cross_t)


def least_squares_in_place(gram: np.ndarray, cross_t: np.ndarray, damping: float) -> np.ndarray:
    """least_squares with G given (symmetric, F-ordered) and factored in its own buffer: its contents
    are lost, and no copy of G is made. LAPACK's Cholesky (upper) reads and writes G's upper triangle
    only, so an attempt that fails is undone from the strictly lower triangle and the diagonal kept
    aside; the result is the same, bit for bit, as least_squares on a copy of G."""
    if not gram.flags.f_contiguous:
        raise ValueError("least_squares_in_place factors an F-ordered gram (a C-ordered one's transpose)")
    scale = max(float(np.mean(np.diag(gram))), 1e-30)
    diagonal = np.diag(gram).copy()

    def damped_in_place(growth: float) -> np.ndarray:
        if growth > 1.0:  # a failed attempt overwrote part of the upper triangle
            _mirror_lower(gram)
        gram[np.diag_indices_from(gram)] = diagonal + max(damping, 1e-12) * growth * scale
        return gram
    return _solve_damped(damped_in_place, cross_t)


def _solve_damped(damped_gram, cross_t: np.ndarray) -> np.ndarray:
    """crossᵀ solved by the Cholesky factor of `damped_gram(growth)`, the damping grown tenfold after
    each attempt whose gram is not numerically positive."""
    for attempt in range(8):
        gram = damped_gram(10.0 ** attempt)
        try:
            factor = scipy.linalg.cho_factor(gram, lower=False, overwrite_a=True, check_finite=False)
        except np.linalg.LinAlgError:
            continue
        return scipy.linalg.cho_solve(factor, cross_t, overwrite_b=cross_t.flags.f_contiguous,
                                      check_finite=False).T
    raise np.linalg.LinAlgError("the moment stays singular under damping")


def _mirror_lower(matrix: np.ndarray, rows_at_once: int = 512) -> None:
    """The strictly upper triangle of a square matrix rewritten from its strictly lower one, in place
    (a band of rows at a time: no second matrix)."""
    size = matrix.shape[0]
    for start in range(0, size, rows_at_once):
        stop = min(start + rows_at_once, size)
        matrix[start:stop, stop:] = matrix[stop:, start:stop].T  # no overlap: below the band's diagonal block
        square = matrix[start:stop, start:stop]
        upper = np.triu_indices(stop - start, 1)
        square[upper] = square.T[upper]  # (fancy indexing reads a copy before it writes)


def anchored_map(moments: InputMoments, anchor: Anchor, weight: np.ndarray, bias: np.ndarray | None,
                 ridge: float | None = None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """(M, c, μ_t): the map of the compressed stream's input x̃ that best reproduces the dense outputs
    W x + b (least squares over the calibration tokens, ridge-damped), blended with (W, b) by
    1 − strength, and the mean output it is fitted to. Affine (intercept c) where the fit has a bias
    slot (centered, or a linear with a bias): M = W Cov(x, x̃) Cov(x̃)⁻¹, c = μ_t − M μ̃; else linear:
    M = W E[x x̃ᵀ] E[x̃ x̃ᵀ]⁻¹, c None. With `anchor.target_is_output` the target is the anchor's t
    itself instead of W x + b: M = Cov(t, x̃) Cov(x̃)⁻¹. ROM of M on the moments of x̃ is then the
    reduced-rank regression of the target on x̃ (its optimum, for the uncentered moments)."""
    alpha = anchor.strength
    mean = moments.mean
    affine = moments.centered or bias is not None
    if affine:
        covariance = moments.second_moment - np.outer(mean, mean)
        cross = anchor.cross - np.outer(anchor.mean, mean)
    else:
        covariance, cross = moments.second_moment, anchor.cross
    target = np.asfortranarray((cross if anchor.target_is_output else weight @ cross).T)  # (in x out): solved in place
    fitted = least_squares(lambda: damped(covariance, 0.0), target, ANCHOR_RIDGE if ridge is None else ridge)
    del target
    fitted *= alpha
    fitted += (1.0 - alpha) * weight
    own_mean = output_mean_from_inputs(weight, bias, mean)
    dense_mean = anchor.mean if anchor.target_is_output else output_mean_from_inputs(weight, bias, anchor.mean)
    output_mean = (1.0 - alpha) * own_mean + alpha * dense_mean
    intercept = output_mean - fitted @ mean if affine else None
    return fitted, intercept, output_mean


def anchored_output_basis(moments: InputMoments, anchor: Anchor, rank: int) -> np.ndarray:
    """For a lone linear whose outputs' moments are taken directly (ỹ = W x̃, the compressed stream's):
    the rank-r projection V Vᵀ ỹ nearest the dense outputs y maximises tr Vᵀ (2 sym E[y ỹᵀ] − E[ỹ ỹᵀ]) V
    (covariances when centered): its top eigenvectors, the second term weighted 1 − 2·strength so that
    strength 0 is plain ROM."""
    alpha = anchor.strength
    own = output_moment(moments.second_moment, moments.mean, moments.centered)
    cross = anchor.cross - np.outer(anchor.mean, moments.mean) if moments.centered else anchor.cross
    matrix = own * (1.0 - 2.0 * alpha)
    matrix += alpha * (cross + cross.T)
    return top_eigenvectors(matrix, rank)[1]


def with_output_mean(factors: Factors, input_mean: np.ndarray, output_mean: np.ndarray) -> Factors:
    """The factors with the expand bias that makes their mean output `output_mean` on inputs of mean
    `input_mean` (the centered variant's bias, for a fit whose target mean is not its own)."""
    reduced = factors.reduce_weight @ input_mean
    if factors.reduce_bias is not None:
        reduced = reduced + factors.reduce_bias
    return Factors(factors.reduce_weight, factors.expand_weight, factors.reduce_bias,
                   output_mean - factors.expand_weight @ reduced)


def error_correction(error: np.ndarray, second_moment: np.ndarray, rank: int,
                     damping: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """The rank-`rank` A (out x r), B (r x in) minimising E‖(error − A·B) x‖² for inputs x of second
    moment C: the activation-weighted truncated SVD of the error (LQER/QERA). With C = L Lᵀ, A·B·L is
    the best rank-r approximation of error·L, so A·B = U Uᵀ·error with U the top left singular vectors
    of error·L. Solved on the smaller side: from error·C·errorᵀ (out x out) where out ≤ in, else from
    Lᵀ errorᵀ error L (in x in), whose top eigenvectors V give A = error·L·V, B = Vᵀ L⁻¹.
    Also returns the r eigenvalues (the weighted error energy each direction removes) and their
    total, trace(error·C·errorᵀ). `damping` None: C is taken as given (symmetric, already damped: no
    copy of it, which at a 7B MLP's width is 485 MB)."""
    out_features, in_features = error.shape
    rank = min(rank, out_features, in_features)
    moment = second_moment if damping is None else damped(second_moment, damping)
    if out_features <= in_features:
        energy = (error @ moment) @ error.T
        total = float(np.trace(energy))
        values, vectors = top_eigenvectors(energy, rank)
        return vectors, np.ascontiguousarray(vectors.T @ error), values, total
    factor, triangular = moment_root(moment)
    weighted = error @ factor
    gram = weighted.T @ weighted
    total = float(np.trace(gram))
    values, vectors = top_eigenvectors(gram, rank)
    del gram
    expand = weighted @ vectors
    if triangular:  # B = Vᵀ L⁻¹: solve Lᵀ Bᵀ = V
        reduce = scipy.linalg.solve_triangular(factor, vectors, lower=True, trans="T", check_finite=False).T
    else:  # error·F = U Σ Wᵀ, A = U_r Σ_r: B = Σ_r⁻¹ U_rᵀ error = Σ_r⁻² Aᵀ error (no F⁻¹; a zero σ gives B 0)
        scale = np.divide(1.0, values, out=np.zeros_like(values), where=values > 0)
        reduce = scale[:, None] * (expand.T @ error)
    return np.ascontiguousarray(expand), np.ascontiguousarray(reduce), values, total


def moment_root(moment: np.ndarray) -> tuple[np.ndarray, bool]:
    """F with F·Fᵀ = C, and whether it is triangular: the lower Cholesky factor or, where that fails (a
    moment of fewer tokens than columns is singular, and its damping can fall below float32's rounding),
    Q·Λ^½ from its eigen-decomposition, negative rounding clipped to zero."""
    try:
        return scipy.linalg.cholesky(moment, lower=True, check_finite=True), True
    except np.linalg.LinAlgError:
        values, vectors = scipy.linalg.eigh(moment, check_finite=True)
        return vectors * np.sqrt(np.clip(values, 0.0, None)), False
