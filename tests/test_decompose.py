"""Known-answer tests of the ROM math on small random matrices (no model)."""
from __future__ import annotations

import numpy as np
import scipy.linalg
import pytest

from streamrom.linalg import decompose


def correlated_inputs(rng, size: int, count: int, shift: float = 0.0) -> np.ndarray:
    mixing = rng.standard_normal((size, size)) * np.logspace(0, -2, size)
    return mixing @ rng.standard_normal((size, count)) + shift


def moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x @ x.T / x.shape[1], x.mean(axis=1)


def best_error(y: np.ndarray, rank: int) -> float:
    """‖Y − Y_r‖_F for the best rank-r approximation Y_r (Eckart–Young, truncated SVD)."""
    singular = np.linalg.svd(y, compute_uv=False)
    return float(np.sqrt(np.sum(singular[rank:] ** 2)))


def reconstruct(factors: decompose.Factors, x: np.ndarray) -> np.ndarray:
    hidden = factors.reduce_weight @ x
    if factors.reduce_bias is not None:
        hidden = hidden + factors.reduce_bias[:, None]
    y = factors.expand_weight @ hidden
    if factors.expand_bias is not None:
        y = y + factors.expand_bias[:, None]
    return y


def test_rank_for_rounds_down_to_multiple_of_8_and_meets_budget():
    assert decompose.rank_for(0.8, 576, 576) == 224  # 0.8*288 = 230.4 -> 224
    assert decompose.rank_for(0.5, 4096, 11008) == 1488  # 0.5*2985.3 -> 1488
    for ratio in (0.1, 0.37, 0.8, 1.0):
        for out_f, in_f in ((192, 576), (1536, 576), (576, 1536), (4096, 4096)):
            rank = decompose.rank_for(ratio, out_f, in_f)
            assert rank % 8 == 0
            assert rank * (out_f + in_f) <= ratio * out_f * in_f + 1e-9
            assert (rank + 8) * (out_f + in_f) > ratio * out_f * in_f
    assert not decompose.saves_parameters(288, 576, 576)  # exactly break-even
    assert decompose.saves_parameters(280, 576, 576)
    assert not decompose.saves_parameters(0, 576, 576)


@pytest.mark.parametrize("out_f,in_f", [(24, 40), (64, 40), (40, 40)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_uncentered_rom_is_the_best_rank_r_fit_of_outputs(out_f, in_f, with_bias):
    rng = np.random.default_rng(out_f + in_f + with_bias)
    x = correlated_inputs(rng, in_f, 500, shift=0.3)
    weight = rng.standard_normal((out_f, in_f))
    bias = rng.standard_normal(out_f) if with_bias else None
    y = weight @ x + (bias[:, None] if with_bias else 0)
    second, mean = moments(x)
    for rank in (4, 12, 20):
        basis = decompose.rom_basis_from_inputs(weight, bias, second, mean, rank)
        factors = decompose.factorise(weight, bias, basis)
        error = np.linalg.norm(y - reconstruct(factors, x))
        assert error == pytest.approx(best_error(y, rank), rel=1e-7)
        np.testing.assert_allclose(basis.T @ basis, np.eye(rank), atol=1e-10)


def test_wide_output_route_matches_the_direct_eigenproblem():
    """out > in goes through the small in x in problem; it must give the same subspace."""
    rng = np.random.default_rng(1)
    x = correlated_inputs(rng, 30, 400)
    weight = rng.standard_normal((90, 30))
    second, mean = moments(x)
    rank = 16
    basis = decompose.rom_basis_from_inputs(weight, None, second, mean, rank)
    direct = decompose.top_eigenvectors(weight @ second @ weight.T, rank)[1]
    np.testing.assert_allclose(basis, direct, atol=1e-8)  # same signs: both go through fix_signs


def test_output_accumulation_equals_input_route():
    rng = np.random.default_rng(2)
    x = correlated_inputs(rng, 50, 300)
    weight = rng.standard_normal((20, 50))
    y = weight @ x
    from_inputs = decompose.rom_basis_from_inputs(weight, None, *moments(x), rank=8)
    from_outputs = decompose.rom_basis_from_outputs(*moments(y), rank=8)
    np.testing.assert_allclose(from_inputs, from_outputs, atol=1e-8)


def test_centered_rom_with_mean_correction_is_best_affine_fit():
    rng = np.random.default_rng(3)
    x = correlated_inputs(rng, 40, 600, shift=2.0)
    weight = rng.standard_normal((32, 40))
    bias = rng.standard_normal(32)
    y = weight @ x + bias[:, None]
    second, mean = moments(x)
    rank = 8
    basis = decompose.rom_basis_from_inputs(weight, bias, second, mean, rank, centered=True)
    output_mean = decompose.output_mean_from_inputs(weight, bias, mean)
    np.testing.assert_allclose(output_mean, y.mean(axis=1), atol=1e-10)
    factors = decompose.factorise(weight, bias, basis, output_mean)
    # The best rank-r affine fit: the rank-r PCA of the centered outputs, plus the mean.
    centered = y - y.mean(axis=1, keepdims=True)
    assert np.linalg.norm(y - reconstruct(factors, x)) == pytest.approx(best_error(centered, rank), rel=1e-7)
    # Without the mean correction it is worse: the bias is what makes the centered basis work.
    no_bias = decompose.factorise(weight, bias, basis)
    assert np.linalg.norm(y - reconstruct(no_bias, x)) > 1.5 * best_error(centered, rank)


@pytest.mark.parametrize("out_f,in_f", [(24, 40), (64, 40)])
def test_full_rank_reproduces_the_weight(out_f, in_f):
    rng = np.random.default_rng(4)
    x = correlated_inputs(rng, in_f, 20)  # fewer samples than inputs: damping keeps W's range
    weight = rng.standard_normal((out_f, in_f))
    basis = decompose.rom_basis_from_inputs(weight, None, *moments(x), rank=min(out_f, in_f), damping=1e-6)
    factors = decompose.factorise(weight, None, basis)
    np.testing.assert_allclose(factors.expand_weight @ factors.reduce_weight, weight, atol=1e-8)


def test_top_eigenvectors_sorted_descending_with_fixed_signs():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((12, 12))
    values, vectors = decompose.top_eigenvectors(a @ a.T, 5)
    assert np.all(np.diff(values) <= 0)
    full = np.linalg.eigvalsh(a @ a.T)[::-1][:5]
    np.testing.assert_allclose(values, full, rtol=1e-10)
    pivots = np.abs(vectors).argmax(axis=0)
    assert np.all(vectors[pivots, range(5)] > 0)
    again = decompose.top_eigenvectors(a @ a.T, 5)[1]
    np.testing.assert_array_equal(vectors, again)


def test_wide_linears_of_one_group_share_one_input_root():
    """gate and up see the same inputs: the root of their input moment is computed once, and each
    basis equals the one computed on its own."""
    rng = np.random.default_rng(6)
    x = correlated_inputs(rng, 30, 400)
    gate, up = rng.standard_normal((90, 30)), rng.standard_normal((80, 30))
    group = decompose.InputMoments(*moments(x))
    together = [group.rom_basis(gate, None, 16), group.rom_basis(up, None, 16)]
    assert len(group._cholesky) == 1 and not group._roots  # one factor, and no eigen-solve for it
    root = group.root(False)
    assert group.root(False) is root
    np.testing.assert_array_equal(root, np.tril(root))
    np.testing.assert_allclose(root @ root.T, group.matrix(False), rtol=1e-12, atol=1e-12)
    for weight, basis in zip((gate, up), together):
        np.testing.assert_array_equal(basis, decompose.rom_basis_from_inputs(weight, None, *moments(x), 16))


@pytest.mark.parametrize("out_f,in_f", [(24, 40), (90, 30)])
def test_float32_work_keeps_the_float64_optimum(out_f, in_f):
    """In float32 the basis is computed in float32 and is as good a rank-r fit, to float32 rounding."""
    rng = np.random.default_rng(7)
    x = correlated_inputs(rng, in_f, 500, shift=0.3)
    weight = rng.standard_normal((out_f, in_f))
    y = weight @ x
    second, mean = moments(x)
    rank = 12
    basis = decompose.rom_basis_from_inputs(weight.astype(np.float32), None, second.astype(np.float32),
                                            mean.astype(np.float32), rank)
    assert basis.dtype == np.float32
    factors = decompose.factorise(weight, None, basis.astype(np.float64))
    error = np.linalg.norm(y - reconstruct(factors, x))
    assert error == pytest.approx(best_error(y, rank), rel=1e-4)
    np.testing.assert_allclose(basis.T @ basis, np.eye(rank), atol=1e-5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_orthonormalize_keeps_leading_spans(dtype):
    rng = np.random.default_rng(8)
    q = np.linalg.qr(rng.standard_normal((200, 30)))[0]
    skewed = (q + 1e-3 * rng.standard_normal((200, 30))).astype(dtype)  # nearly orthonormal
    result = decompose.orthonormalize(skewed.copy())
    tolerance = 50 * np.finfo(dtype).eps
    np.testing.assert_allclose(result.T @ result, np.eye(30), atol=tolerance)
    for k in (1, 10, 30):  # the span of the first k columns is the input's
        lead = skewed[:, :k] / np.linalg.norm(skewed[:, :k], axis=0)
        residual = lead - result[:, :k] @ (result[:, :k].T @ lead)
        assert np.abs(residual).max() < 100 * tolerance
    dependent = skewed.copy()
    dependent[:, -1] = dependent[:, 0]  # too dependent for Cholesky: Householder takes over
    fallback = decompose.orthonormalize(dependent)
    np.testing.assert_allclose(fallback.T @ fallback, np.eye(30), atol=tolerance)


@pytest.mark.parametrize("out_f,in_f", [(24, 40), (64, 40)])
def test_weight_svd_basis_is_the_truncated_svd(out_f, in_f):
    rng = np.random.default_rng(9)
    weight = rng.standard_normal((out_f, in_f)) * np.logspace(0, -1, in_f)
    rank = 12
    factors = decompose.factorise(weight, None, decompose.weight_svd_basis(weight, rank))
    singular = np.linalg.svd(weight, compute_uv=False)
    error = np.linalg.norm(weight - factors.expand_weight @ factors.reduce_weight)
    assert error == pytest.approx(np.sqrt(np.sum(singular[rank:] ** 2)), rel=1e-9)


@pytest.mark.parametrize("out_f,in_f,with_bias", [(24, 40, False), (64, 40, False), (24, 40, True)])
def test_output_eigenpairs_are_those_of_the_output_moment(out_f, in_f, with_bias):
    rng = np.random.default_rng(10)
    x = correlated_inputs(rng, in_f, 300, shift=0.2)
    weight = rng.standard_normal((out_f, in_f))
    bias = rng.standard_normal(out_f) if with_bias else None
    y = weight @ x + (bias[:, None] if with_bias else 0)
    values, vectors = decompose.output_eigenpairs(decompose.InputMoments(*moments(x)), weight, bias)
    output_moment = y @ y.T / y.shape[1]
    expected = np.linalg.eigvalsh(output_moment)[::-1][:len(values)]
    assert len(values) == min(out_f, in_f + with_bias) and vectors.shape == (out_f, len(values))
    np.testing.assert_allclose(values, expected, rtol=1e-8, atol=1e-8 * expected[0])
    np.testing.assert_allclose(output_moment @ vectors, vectors * values, atol=1e-7 * expected[0])
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(len(values)), atol=1e-8)


@pytest.mark.parametrize("out_f,in_f,with_bias,centered", [(24, 40, False, False), (96, 40, False, False),
                                                           (96, 40, True, False), (96, 40, True, True)])
def test_direction_costs_equal_the_output_moments_priced_directions(out_f, in_f, with_bias, centered):
    """λ_k · v_kᵀ S v_k of every direction of the output moment, in descending λ: where out > in the
    costs come from in x in products only (no out-wide basis); they must equal the direct pricing."""
    rng = np.random.default_rng(11)
    x = correlated_inputs(rng, in_f, 400, shift=0.3)
    weight = rng.standard_normal((out_f, in_f))
    bias = rng.standard_normal(out_f) if with_bias else None
    sensitivity = rng.uniform(0.1, 3.0, out_f)
    y = weight @ x + (bias[:, None] if with_bias else 0)
    if centered:
        y = y - y.mean(axis=1, keepdims=True)
    output_moment = y @ y.T / y.shape[1]
    values, vectors = np.linalg.eigh(output_moment)
    count = min(out_f, in_f + (with_bias and not centered))
    values, vectors = values[::-1][:count], vectors[:, ::-1][:, :count]
    expected = values * ((vectors ** 2).T @ sensitivity)
    costs = decompose.direction_costs(decompose.InputMoments(*moments(x), centered=centered), weight, bias, sensitivity)
    assert costs.shape == (count,)
    np.testing.assert_allclose(costs, expected, rtol=1e-7, atol=1e-9 * expected.max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(7, 19), (19, 7), (12, 12)])
def test_gram_and_triangular_products_equal_the_plain_ones(dtype, shape):
    """The BLAS syrk/trmm shortcuts: the upper triangle of M Mᵀ and Mᵀ M, and M L for the Cholesky
    factor, equal the plain products (C-ordered and strided inputs); the weight is left untouched."""
    rng = np.random.default_rng(11)
    tolerance = 1e-5 if dtype == np.float32 else 1e-12
    for matrix in (rng.standard_normal(shape).astype(dtype), rng.standard_normal((shape[0], 2 * shape[1])).astype(dtype)[:, ::2]):
        for rows, plain in ((True, matrix @ matrix.T), (False, matrix.T @ matrix)):
            upper = decompose.gram(matrix, rows=rows)
            np.testing.assert_allclose(np.triu(upper), np.triu(plain), rtol=tolerance, atol=tolerance)
            np.testing.assert_array_equal(np.tril(upper, -1), 0)  # as gram's docstring says
        x = correlated_inputs(rng, shape[1], 200).astype(dtype)
        group = decompose.InputMoments(*moments(x))
        kept = matrix.copy()
        product = group.times_root(matrix, False)
        np.testing.assert_array_equal(matrix, kept)
        assert product.flags.c_contiguous and product.dtype == dtype
        np.testing.assert_allclose(product, matrix @ group.root(False), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("out_f,in_f", [(24, 40), (64, 40), (40, 40)])
def test_singular_input_moment_falls_back_to_the_eigen_root_and_stays_optimal(out_f, in_f):
    """An input feature that never fires (a zero row and column in C, no damping), narrower than
    JITTER_FROM: no Cholesky factor exists, the square root from C's eigendecomposition is taken, and
    the basis is still the best rank-r fit of the outputs."""
    rng = np.random.default_rng(out_f * in_f)
    x = correlated_inputs(rng, in_f, 500)
    x[3] = 0.0
    weight = rng.standard_normal((out_f, in_f))
    second, mean = moments(x)
    group = decompose.InputMoments(second, mean)
    assert group.cholesky(False) is None
    np.testing.assert_allclose(group.root(False) @ group.root(False).T, second, atol=1e-10)
    for rank in (4, 12):
        basis = group.rom_basis(weight, None, rank)
        error = np.linalg.norm(weight @ x - reconstruct(decompose.factorise(weight, None, basis), x))
        assert error == pytest.approx(best_error(weight @ x, rank), rel=1e-7)


@pytest.mark.parametrize("out_f,in_f", [(24, 40), (64, 40), (40, 40)])
def test_singular_input_moment_is_factored_with_a_jitter_and_stays_optimal(out_f, in_f, monkeypatch):
    """The same from JITTER_FROM features up (here lowered to the test's width): C has no Cholesky
    factor, C + εI does (ε the first of CHOLESKY_JITTERS that succeeds, relative to C's mean
    diagonal), and the basis is still the best rank-r fit of the outputs to that order."""
    monkeypatch.setattr(decompose, "JITTER_FROM", in_f)
    rng = np.random.default_rng(out_f * in_f)
    x = correlated_inputs(rng, in_f, 500)
    x[3] = 0.0
    weight = rng.standard_normal((out_f, in_f))
    second, mean = moments(x)
    with pytest.raises(np.linalg.LinAlgError):
        scipy.linalg.cholesky(second, lower=True)
    group = decompose.InputMoments(second, mean)
    factor = group.cholesky(False)
    assert factor is not None
    jitter = factor @ factor.T - second
    scale = np.mean(np.diag(second))
    np.testing.assert_allclose(np.diag(jitter), decompose.CHOLESKY_JITTERS[0] * scale, rtol=1e-6)
    np.testing.assert_allclose(jitter - np.diag(np.diag(jitter)), 0, atol=1e-12 * scale)
    for rank in (4, 12):
        basis = group.rom_basis(weight, None, rank)
        error = np.linalg.norm(weight @ x - reconstruct(decompose.factorise(weight, None, basis), x))
        assert error == pytest.approx(best_error(weight @ x, rank), rel=1e-5)


def test_indefinite_input_moment_falls_back_to_the_clipped_eigen_root(monkeypatch):
    """A moment with a negative eigenvalue beyond every jitter (no real moment has one, but rounding
    can give a small one): no factor, and the square root from C's eigendecomposition, negative
    eigenvalues clipped to zero, serves instead."""
    monkeypatch.setattr(decompose, "JITTER_FROM", 12)
    rng = np.random.default_rng(7)
    vectors = np.linalg.qr(rng.standard_normal((12, 12)))[0]
    values = np.linspace(1.0, 2.0, 12)
    values[0] = -0.5
    second = (vectors * values) @ vectors.T
    group = decompose.InputMoments(second, np.zeros(12))
    assert group.cholesky(False) is None
    root = group.root(False)
    np.testing.assert_allclose(root @ root.T, (vectors * np.clip(values, 0, None)) @ vectors.T, atol=1e-12)


@pytest.mark.parametrize("shape", [(20, 30), (30, 20)])
def test_error_correction_is_the_input_weighted_truncated_svd(shape):
    """Either side (out ≤ in: from E C Eᵀ; out > in: from Lᵀ Eᵀ E L) gives A·B = U_r U_rᵀ E with U the
    left singular vectors of E·L (C = L Lᵀ), the eigenvalues their squared singular values; at full
    rank the correction is the whole error."""
    from streamrom.linalg.decompose import error_correction

    rng = np.random.default_rng(0)
    error = rng.standard_normal(shape)
    inputs = rng.standard_normal((shape[1], 400)) * np.linspace(0.1, 3.0, shape[1])[:, None]
    moment = inputs @ inputs.T / 400
    left, singular, _ = np.linalg.svd(error @ np.linalg.cholesky(moment))
    for rank in (3, 10):
        expand, reduce, values, total = error_correction(error, moment, rank, damping=0.0)
        assert expand.shape == (shape[0], rank) and reduce.shape == (rank, shape[1])
        np.testing.assert_allclose(expand @ reduce, left[:, :rank] @ left[:, :rank].T @ error, atol=1e-10)
        np.testing.assert_allclose(values, singular[:rank] ** 2, rtol=1e-10)
        np.testing.assert_allclose(total, np.sum(singular ** 2), rtol=1e-10)
        same = error_correction(error, moment, rank, damping=None)  # taken as given: the same at 0 damping
        np.testing.assert_allclose(same[0] @ same[1], expand @ reduce, atol=1e-12)
    expand, reduce, _, _ = error_correction(error, moment, 1000, damping=0.0)
    np.testing.assert_allclose(expand @ reduce, error, atol=1e-10)


def test_error_correction_of_a_singular_moment_needs_no_cholesky_factor():
    """A moment from fewer tokens than columns, in float32 (rounding makes it indefinite, so Cholesky fails):
    the tall side still gives A·B = U_r U_rᵀ E, U the left singular vectors of E·F for any F Fᵀ = C, and the
    prices of its directions still sum to the whole weighted error."""
    from streamrom.gguf.correction import error_prices
    from streamrom.linalg.decompose import error_correction, moment_root

    rng = np.random.default_rng(1)
    error = rng.standard_normal((60, 40)).astype(np.float32)
    inputs = rng.standard_normal((40, 12)).astype(np.float32)  # 12 tokens, 40 columns: rank 12
    moment = (inputs @ inputs.T / 12).astype(np.float32)
    moment[np.diag_indices_from(moment)] -= 1e-6 * float(np.mean(np.diag(moment)))  # just indefinite
    with pytest.raises(np.linalg.LinAlgError):
        np.linalg.cholesky(moment.astype(np.float64))
    root, triangular = moment_root(moment)
    assert not triangular
    exact = inputs.astype(np.float64) / np.sqrt(12)
    left, singular, _ = np.linalg.svd(error.astype(np.float64) @ exact)
    expand, reduce, values, total = error_correction(error, moment, 5, damping=None)
    np.testing.assert_allclose(expand @ reduce, left[:, :5] @ left[:, :5].T @ error, atol=2e-3)
    np.testing.assert_allclose(values, singular[:5] ** 2, rtol=1e-3)
    sensitivity = np.ones(60, dtype=np.float32)
    np.testing.assert_allclose(np.sum(error_prices(error, moment, sensitivity, 0.0)), np.sum(singular ** 2), rtol=1e-3)


@pytest.mark.parametrize("shape", [(20, 30), (30, 20)])
def test_error_prices_weigh_each_correction_direction_by_the_loss_gradient(shape):
    """Direction k of the correction (u_k, σ_k² = its energy) saves σ_k² Σ_j u_jk² E[g_j²], on either side
    of the solve."""
    from streamrom.gguf.correction import error_prices

    rng = np.random.default_rng(1)
    error = rng.standard_normal(shape)
    inputs = rng.standard_normal((shape[1], 400)) * np.linspace(0.1, 3.0, shape[1])[:, None]
    moment = inputs @ inputs.T / 400
    sensitivity = rng.random(shape[0])
    left, singular, _ = np.linalg.svd(error @ np.linalg.cholesky(moment), full_matrices=False)
    expected = singular ** 2 * ((left ** 2).T @ sensitivity)
    np.testing.assert_allclose(error_prices(error, moment, sensitivity, 0.0)[:len(expected)], expected, rtol=1e-8)


def test_correction_ranks_buy_the_most_loss_per_parameter_within_the_budget():
    from streamrom.gguf.correction import correction_ranks

    prices = {"a": np.array([10.0, 9.0, 1.0, 1.0]), "b": np.array([5.0, 5.0, 5.0, 5.0]), "c": np.array([8.0, 0.0])}
    shapes = {"a": (4, 4), "b": (4, 4), "c": (2, 2)}  # a step costs 8, 8 and 4 parameters
    # c's 8/4, then a's 10/8; a's 9/8 and b's 5/8 no longer fit, c's second step saves nothing
    assert correction_ranks(prices, shapes, 16, step=1) == {"a": 1, "b": 0, "c": 1}
    assert correction_ranks(prices, shapes, 20, step=1) == {"a": 2, "b": 0, "c": 1}
    assert correction_ranks(prices, shapes, 1000, step=3) == {"a": 4, "b": 4, "c": 2}  # capped at min(out, in)
    assert correction_ranks(prices, shapes, 3, step=1) == {"a": 0, "b": 0, "c": 0}


@pytest.mark.parametrize("shape,bias", [((40, 60), False), ((90, 30), False), ((30, 30), True), ("output", False)])
def test_the_pricing_bound_is_the_weighted_spectrum_and_below_every_tail_of_the_costs(shape, bias):
    """cost_lower_bound: the eigenvalues of S½ W̃ C W̃ᵀ S½ (Eckart–Young's best weighted rank-r error),
    lowered by its rounding slack; each tail sum at most the costs' (ROM's unweighted basis)."""
    rng = np.random.default_rng(5)
    inputs = 60 if shape == "output" else shape[1]
    features = rng.standard_normal((800, inputs)) @ rng.standard_normal((inputs, inputs))
    moments = decompose.InputMoments(features.T @ features / 800, features.mean(0), False)
    if shape == "output":  # a moment of outputs accumulated directly (down_proj at its output)
        outputs = features[:, :40] * rng.random(40)
        sensitivity = rng.random(40) ** 3
        problem = decompose.output_pricing_problem(outputs.T @ outputs / 800, outputs.mean(0), False, sensitivity)
        output_moment = outputs.T @ outputs / 800
    else:
        weight = rng.standard_normal(shape)
        bias_vector = rng.standard_normal(shape[0]) if bias else None
        sensitivity = rng.random(shape[0]) ** 3
        problem = decompose.pricing_problem(moments, weight, bias_vector, sensitivity)
        assert np.array_equal(problem.costs(), decompose.direction_costs(moments, weight, bias_vector, sensitivity))
        w_tilde = np.hstack([weight, bias_vector[:, None]]) if bias else weight
        c = moments.matrix(bias)
        output_moment = w_tilde @ c @ w_tilde.T
    root = np.sqrt(sensitivity)
    expected = np.linalg.eigvalsh(root[:, None] * output_moment * root[None, :])[::-1]
    bound, costs = problem.cost_lower_bound(), problem.costs()
    rank = min(len(costs), len(bound))
    np.testing.assert_allclose(bound[:rank], expected[:rank], rtol=1e-8, atol=1e-10 * expected[0])
    tail = lambda values: np.cumsum(values[::-1])[::-1]  # noqa: E731
    assert np.all(tail(bound)[:rank] <= tail(costs)[:rank])
    assert tail(bound)[1] > 0.5 * tail(costs)[1]  # a bound worth having: not far below


def test_no_pricing_bound_where_a_bias_column_widens_the_product():
    rng = np.random.default_rng(6)
    features = rng.standard_normal((500, 20))
    moments = decompose.InputMoments(features.T @ features / 500, features.mean(0), False)
    problem = decompose.pricing_problem(moments, rng.standard_normal((50, 20)), rng.standard_normal(50), rng.random(50))
    assert problem.cost_lower_bound() is None
    assert problem.costs().shape == (21,)
