"""Anchored fits (a dense stream beside the compressed one): known-answer math on small random matrices,
and the streamed pipeline on tiny random-weight models (control flow and exactness, not accuracy)."""
from __future__ import annotations

import signal

import numpy as np
import pytest
import torch

import streamrom
from streamrom import CalibrationConfig, CompressConfig
from streamrom.linalg import decompose, structured
from streamrom.storage.checkpoint import CheckpointReader

from helpers import cli_command, model_files, run


def streams(rng, size: int, count: int, noise: float):
    """Dense-stream inputs x and compressed-stream inputs x̃ = x + a correlated error."""
    mixing = rng.standard_normal((size, size)) * np.logspace(0, -1.5, size)
    x = mixing @ rng.standard_normal((size, count)) + 0.3
    error = noise * (rng.standard_normal((size, size)) / np.sqrt(size)) @ x + noise * rng.standard_normal((size, count))
    return x, x + error


def rank_r_regression_error(y: np.ndarray, x_tilde: np.ndarray, rank: int) -> float:
    """min over rank-r M of ‖Y − M X̃‖_F, the textbook way: the rank-r truncation of the least-squares
    fitted values Ŷ = Y X̃⁺ X̃ (Eckart–Young on Ŷ; Ŷ ⟂ Y − Ŷ row-wise)."""
    fitted = y @ np.linalg.pinv(x_tilde) @ x_tilde
    u, s, vt = np.linalg.svd(fitted, full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vt[:rank]
    return float(np.linalg.norm(y - best))


def predict(factors: decompose.Factors, x: np.ndarray) -> np.ndarray:
    hidden = factors.reduce_weight @ x
    if factors.reduce_bias is not None:
        hidden = hidden + factors.reduce_bias[:, None]
    y = factors.expand_weight @ hidden
    return y if factors.expand_bias is None else y + factors.expand_bias[:, None]


@pytest.mark.parametrize("out_f,in_f", [(12, 20), (30, 16)])
def test_anchored_rom_is_the_reduced_rank_regression_optimum(out_f, in_f):
    """Uncentered, no bias: ROM of the anchored map on the compressed moments reaches the rank-r
    regression optimum of the dense outputs W x on x̃, which plain ROM (fitting W x̃) does not."""
    rng = np.random.default_rng(0)
    x, x_tilde = streams(rng, in_f, 400, noise=0.3)
    weight = rng.standard_normal((out_f, in_f))
    y = weight @ x
    count, rank = x.shape[1], 6
    moments = decompose.InputMoments(x_tilde @ x_tilde.T / count, x_tilde.mean(axis=1))
    anchor = decompose.Anchor(x @ x_tilde.T / count, x.mean(axis=1), 1.0)
    mapped, intercept, _ = decompose.anchored_map(moments, anchor, weight, None, ridge=1e-14)
    assert intercept is None
    factors = decompose.factorise(mapped, None, moments.rom_basis(mapped, None, rank))
    error = float(np.linalg.norm(y - predict(factors, x_tilde)))
    assert error == pytest.approx(rank_r_regression_error(y, x_tilde, rank), rel=1e-6)
    plain = decompose.factorise(weight, None, moments.rom_basis(weight, None, rank))
    assert error < 0.95 * float(np.linalg.norm(y - predict(plain, x_tilde)))


@pytest.mark.parametrize("centered", [False, True])
def test_an_output_space_target_gives_the_map_of_that_target(centered):
    """target_is_output: the anchor holds t itself (what the linear's outputs should be), not the dense
    inputs: with t = W x the map is the one the input-space anchor gives, and with t = W x + d (a
    residual-stream target: the outputs plus an upstream error d) it is the least-squares map of t on
    x̃, its intercept giving t's mean."""
    rng = np.random.default_rng(5)
    x, x_tilde = streams(rng, 12, 500, noise=0.3)
    weight = rng.standard_normal((9, 12))
    count = x.shape[1]
    moments = decompose.InputMoments(x_tilde @ x_tilde.T / count, x_tilde.mean(axis=1), centered=centered)
    through_inputs = decompose.anchored_map(moments, decompose.Anchor(x @ x_tilde.T / count, x.mean(axis=1), 1.0),
                                            weight, None, ridge=1e-14)
    y = weight @ x
    as_output = decompose.anchored_map(moments, decompose.Anchor(y @ x_tilde.T / count, y.mean(axis=1), 1.0, True),
                                       weight, None, ridge=1e-14)
    np.testing.assert_allclose(as_output[0], through_inputs[0], rtol=1e-8, atol=1e-10)
    target = y + rng.standard_normal((9, 12)) @ (x_tilde - x) + 0.5
    mapped, intercept, target_mean = decompose.anchored_map(
        moments, decompose.Anchor(target @ x_tilde.T / count, target.mean(axis=1), 1.0, True), weight, None,
        ridge=1e-14)
    design = np.vstack([x_tilde, np.ones(count)]) if centered else x_tilde
    solution = np.linalg.lstsq(design.T, target.T, rcond=None)[0].T
    np.testing.assert_allclose(mapped, solution[:, :12], rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(target_mean, target.mean(axis=1), rtol=1e-10)
    if centered:
        np.testing.assert_allclose(intercept, solution[:, 12], rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("with_bias", [False, True])
def test_centered_anchored_fit_is_the_affine_optimum_and_keeps_the_parameter_count(with_bias, monkeypatch):
    """Centered (rom-centered): the affine rank-r regression optimum (center both sides, then the
    rank-r regression), with the intercept carried by the bias slots the plain fit has."""
    monkeypatch.setattr(decompose, "ANCHOR_RIDGE", 1e-14)  # the optimum itself, undamped
    rng = np.random.default_rng(1)
    out_f, in_f, rank = 14, 18, 5
    x, x_tilde = streams(rng, in_f, 500, noise=0.4)
    weight = rng.standard_normal((out_f, in_f))
    bias = rng.standard_normal(out_f) if with_bias else None
    y = weight @ x + (bias[:, None] if with_bias else 0.0)
    count = x.shape[1]
    moments = decompose.InputMoments(x_tilde @ x_tilde.T / count, x_tilde.mean(axis=1), centered=True)
    anchor = decompose.Anchor(x @ x_tilde.T / count, x.mean(axis=1), 1.0)
    method = streamrom.compression.methods.METHODS["rom-centered"]
    factors = method._anchored_factors(weight, bias, rank, moments, False, anchor)
    error = float(np.linalg.norm(y - predict(factors, x_tilde)))
    centered_y = y - y.mean(axis=1, keepdims=True)
    centered_x = x_tilde - x_tilde.mean(axis=1, keepdims=True)
    assert error == pytest.approx(rank_r_regression_error(centered_y, centered_x, rank), rel=1e-6)
    assert (factors.reduce_bias is not None) == with_bias and factors.expand_bias is not None


def test_anchor_strength_zero_is_the_plain_fit_and_between_is_a_blend():
    rng = np.random.default_rng(2)
    x, x_tilde = streams(rng, 10, 300, noise=0.5)
    weight = rng.standard_normal((8, 10))
    moments = decompose.InputMoments(x_tilde @ x_tilde.T / 300, x_tilde.mean(axis=1))
    maps = [decompose.anchored_map(moments, decompose.Anchor(x @ x_tilde.T / 300, x.mean(axis=1), s), weight, None)[0]
            for s in (0.0, 0.25, 1.0)]
    np.testing.assert_array_equal(maps[0], weight)
    np.testing.assert_allclose(maps[1], 0.75 * weight + 0.25 * maps[2], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("centered", [False, True])
def test_anchored_output_projection_is_the_nearest_projection_of_the_outputs(centered):
    """A lone linear whose moments are its outputs' (down_proj): of all rank-r projections V Vᵀ of the
    compressed stream's outputs ỹ, the anchored basis leaves the least error to the dense outputs y
    (beats plain ROM's basis and every random one; for equal streams it is ROM's span)."""
    rng = np.random.default_rng(3)
    out_f, rank, count = 12, 4, 400
    y, y_tilde = streams(rng, out_f, count, noise=0.6)
    moments = decompose.InputMoments(y_tilde @ y_tilde.T / count, y_tilde.mean(axis=1), centered=centered)
    anchor = decompose.Anchor(y @ y_tilde.T / count, y.mean(axis=1), 1.0)
    basis = decompose.anchored_output_basis(moments, anchor, rank)

    def error(v):
        shift_y = y.mean(axis=1, keepdims=True) if centered else 0.0
        shift_t = y_tilde.mean(axis=1, keepdims=True) if centered else 0.0
        return float(np.linalg.norm((y - shift_y) - v @ (v.T @ (y_tilde - shift_t))))

    plain = decompose.rom_basis_from_outputs(moments.second_moment, moments.mean, rank, centered)
    assert error(basis) < error(plain)
    for _ in range(50):
        random = np.linalg.qr(basis + 0.1 * rng.standard_normal(basis.shape))[0]
        assert error(basis) <= error(random) + 1e-9
    same = decompose.anchored_output_basis(moments, decompose.Anchor(moments.second_moment, moments.mean, 1.0), rank)
    np.testing.assert_allclose(same @ same.T, plain @ plain.T, atol=1e-8)


def test_anchored_structured_refits_are_least_squares_fits_of_the_dense_outputs():
    """down refitted on the kept neurons of the compressed stream toward a target y in its output space
    (the pipeline's: the dense sum less the compressed residual stream): the least-squares optimum of
    Y from Z̃_S; o_proj's refit likewise on the narrowed values, and a strength between blends."""
    rng = np.random.default_rng(4)
    z, z_tilde = streams(rng, 24, 600, noise=0.3)
    weight = rng.standard_normal((10, 24))
    y = weight @ z
    kept = np.sort(rng.choice(24, 15, replace=False))
    moment = z_tilde @ z_tilde.T / 600
    anchor = decompose.Anchor(y @ z_tilde.T / 600, y.mean(axis=1), 1.0)
    refitted = structured.refit_columns(weight, moment, kept, 1e-14, anchor)
    expected = np.linalg.lstsq(z_tilde[kept].T, y.T, rcond=None)[0].T
    np.testing.assert_allclose(refitted, expected, rtol=1e-6, atol=1e-8)

    heads, head_dim, width = 2, 4, 2
    a, a_tilde = streams(rng, heads * head_dim, 600, noise=0.3)
    o_weight = rng.standard_normal((6, heads * head_dim))
    maps = [np.linalg.qr(rng.standard_normal((head_dim, width)))[0] for _ in range(heads)]
    selection = np.zeros((heads * head_dim, heads * width))
    for h in range(heads):
        selection[h * head_dim:(h + 1) * head_dim, h * width:(h + 1) * width] = maps[h]
    y = o_weight @ a  # the target, in o_proj's output space
    anchor = decompose.Anchor(y @ a_tilde.T / 600, y.mean(axis=1), 1.0)
    o_new = structured.refit_output(o_weight, a_tilde @ a_tilde.T / 600, maps, heads, head_dim, 1e-14, anchor)
    narrowed = selection.T @ a_tilde
    expected = np.linalg.lstsq(narrowed.T, y.T, rcond=None)[0].T
    np.testing.assert_allclose(o_new, expected, rtol=1e-6, atol=1e-8)
    half = structured.refit_output(o_weight, a_tilde @ a_tilde.T / 600, maps, heads, head_dim, 1e-14,
                                   decompose.Anchor(anchor.cross, anchor.mean, 0.5))
    plain = structured.refit_output(o_weight, a_tilde @ a_tilde.T / 600, maps, heads, head_dim, 1e-14)
    np.testing.assert_allclose(half, 0.5 * (plain + expected), rtol=1e-6, atol=1e-8)  # linear in the target
    assert np.abs(plain - expected).max() > 1e-2


def tiny_config(tokens, **settings) -> CompressConfig:
    return CompressConfig(calibration=CalibrationConfig(token_file=tokens, sequences=8, seqlen=64), **settings)


def tensors(folder) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(folder)
    return {name: reader.tensor(name) for name in reader.weight_map}


@pytest.mark.pipeline
@pytest.mark.parametrize("method", ["rom-centered", "structured"])
def test_with_nothing_compressed_upstream_anchored_equals_plain_bit_for_bit(tiny_models, tiny_tokens, tmp_path,
                                                                           method):
    """One group of one block compressed (the first thing the streams differ after): the dense and the
    compressed stream agree up to it, so the anchored run is the plain one, bit for bit; with every
    block compressed they differ (so the comparison can fail)."""
    source = tiny_models["llama"]
    modules = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"] if method == "structured" else ["mlp.gate_proj",
                                                                                               "mlp.up_proj"]
    outputs = {}
    for anchor in (0.0, 1.0):
        outputs[anchor] = tmp_path / f"one-{anchor}"
        streamrom.compress(source, outputs[anchor], tiny_config(tiny_tokens, method=method, ratio=0.5, layers="1",
                                                               modules=modules, anchor=anchor))
    plain, anchored = tensors(outputs[0.0]), tensors(outputs[1.0])
    assert plain.keys() == anchored.keys()
    assert all(torch.equal(plain[name], anchored[name]) for name in plain)
    for anchor in (0.0, 1.0):
        streamrom.compress(source, tmp_path / f"all-{anchor}", tiny_config(tiny_tokens, method=method, ratio=0.5,
                                                                          anchor=anchor))
    plain, anchored = tensors(tmp_path / "all-0.0"), tensors(tmp_path / "all-1.0")
    assert not all(torch.equal(plain[name], anchored[name]) for name in plain)


@pytest.mark.pipeline
def test_anchored_run_killed_then_rerun_resumes_to_identical_files(deep_tiny, tiny_tokens, tmp_path):
    """Both streams' activation files are what a rerun resumes from."""
    reference = tmp_path / "reference"
    assert run(cli_command(deep_tiny, reference, tiny_tokens, "--anchor", "1")).returncode == 0
    output = tmp_path / "out"
    killed = run(cli_command(deep_tiny, output, tiny_tokens, "--anchor", "1"), fault="after-block-2")
    assert killed.returncode == -signal.SIGKILL
    dense_files = sorted((output / ".streamrom-work").glob("dense-*.f32"))
    assert [p.name for p in dense_files] == ["dense-a.f32", "dense-b.f32"]
    # the report gives the second stream's disk (its two files and one block's anchored values) and time
    import json
    report = json.loads((reference / "streamrom-report.json").read_text())
    spec = CheckpointReader(deep_tiny).spec
    tokens = 8 * 64
    values = tokens * (3 * spec.hidden_size + spec.num_heads * spec.head_dim) * 4
    assert report["disk"]["dense_stream_bytes"] == sum(p.stat().st_size for p in dense_files) + values
    assert report["stage_seconds"]["dense stream"] > 0
    resumed = run(cli_command(deep_tiny, output, tiny_tokens, "--anchor", "1"))
    assert resumed.returncode == 0, resumed.stderr
    assert model_files(output) == model_files(reference)
    plain = tmp_path / "plain"
    assert run(cli_command(deep_tiny, plain, tiny_tokens)).returncode == 0
    assert model_files(plain) != model_files(reference)


@pytest.mark.parametrize("settings,message", [
    ({"anchor": 1.5}, "--anchor must be in"),
    ({"anchor": 1.0, "method": "svd"}, "nothing to anchor"),
])
def test_bad_anchor_settings_are_refused(tiny_tokens, settings, message):
    with pytest.raises(streamrom.UsageError, match=message):
        tiny_config(tiny_tokens, **settings)


def test_anchor_alone_takes_the_measured_strength():
    """`--anchor` without a value is the blend measured best (README); the default is plain."""
    from streamrom.cli import MEASURED_ANCHOR_STRENGTH, build_parser

    parsed = build_parser().parse_args(["compress", "src", "dst", "--anchor"])
    assert parsed.anchor == MEASURED_ANCHOR_STRENGTH == 0.5
    assert build_parser().parse_args(["compress", "src", "dst"]).anchor == 0.0


@pytest.mark.pipeline
@pytest.mark.parametrize("unit", ["mlp.neurons", "self_attn.value_dims"])
def test_anchored_unit_refit_reproduces_the_dense_residual_stream(tiny_models, tiny_tokens, tmp_path, unit):
    """Structured, one unit, two blocks: in block 1 (its input already differs from the dense model's)
    the refitted linear (down on the kept neurons, o_proj on the narrowed values) is the least-squares
    fit, from its compressed-stream input z̃, of the dense residual-stream sum it adds to less the
    compressed stream's value: E[t z̃ᵀ] (E[z̃ z̃ᵀ] + δ)⁻¹, t = output_dense − residual̃ (down) or
    residual_dense − x̃ (o_proj), recomputed here from the two models; the plain refit is not that fit
    (so the check can fail)."""
    from streamrom.stream.calibration import calibration_tokens

    source = tiny_models["llama"]
    linear = {"mlp.neurons": "mlp.down_proj", "self_attn.value_dims": "self_attn.o_proj"}[unit]
    modules = {"mlp.neurons": ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
               "self_attn.value_dims": ("self_attn.v_proj", "self_attn.o_proj")}[unit]
    outputs = {}
    for strength in (0.0, 1.0):
        outputs[strength] = tmp_path / f"s{strength:g}"
        streamrom.compress(source, outputs[strength], tiny_config(tiny_tokens, method="structured", ratio=0.6,
                                                                  layers="0-1", modules=modules, anchor=strength,
                                                                  precision="float64"))
    dense, compressed = streamrom.load(source), streamrom.load(outputs[1.0])
    ids = torch.from_numpy(calibration_tokens(tiny_config(tiny_tokens).calibration, source, dense.spec.vocab_size))
    seen: dict[str, dict[str, torch.Tensor]] = {"dense": {}, "compressed": {}}
    for label, model in (("dense", dense), ("compressed", compressed)):
        values = seen[label]
        model.layers[1].register_forward_pre_hook(lambda m, i, values=values: values.__setitem__("x", i[0]))
        model.layers[1].register_forward_hook(lambda m, i, o, values=values: values.__setitem__("output", o))
        model.layers[1].get_submodule(linear).register_forward_hook(
            lambda m, i, o, values=values: values.update(z=i[0], y=o))
        model(ids)

    def rows(tensor: torch.Tensor) -> np.ndarray:
        return tensor.reshape(-1, tensor.shape[-1]).double().numpy()

    d, c = seen["dense"], seen["compressed"]
    if linear == "mlp.down_proj":  # the sum is the block's output, added to the residual after attention
        target = rows(d["output"]) - (rows(c["output"]) - rows(c["y"]))
    else:  # the sum is the residual after attention, added to the block's input
        target = rows(d["x"]) + rows(d["y"]) - rows(c["x"])
    z = rows(c["z"])
    assert z.shape[1] < dense.layers[1].get_submodule(linear).weight.shape[1]  # the unit was narrowed
    gram = z.T @ z / len(z)  # damped as the refit damps it (CompressConfig.damping of its mean diagonal)
    gram[np.diag_indices_from(gram)] += CompressConfig.damping * np.mean(np.diag(gram))
    expected = np.linalg.solve(gram, z.T @ target / len(z)).T

    def distance(folder) -> float:
        weight = CheckpointReader(folder).tensor(f"model.layers.1.{linear}.weight").double().numpy()
        return float(np.linalg.norm(weight - expected) / np.linalg.norm(expected))

    assert distance(outputs[1.0]) < 1e-4
    assert distance(outputs[0.0]) > 1e-2


@pytest.mark.pipeline
def test_gemma3_mlp_refit_stays_plain_under_anchor(tiny_tokens, tmp_path):
    """Gemma 3 norms the MLP's output before its residual add: the block-output target is not a linear
    function of down's output, so its unit refit stays plain and the anchored run equals the plain one."""
    from conftest import make_tiny

    source = make_tiny(tmp_path / "gemma3", "gemma3_text")
    modules = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # only the MLP: narrowed, never factored
    files = {}
    for strength in (0.0, 1.0):
        output = tmp_path / f"s{strength:g}"
        streamrom.compress(source, output, tiny_config(tiny_tokens, method="structured", ratio=0.6,
                                                       modules=modules, anchor=strength))
        files[strength] = model_files(output)
    assert files[0.0] == files[1.0]


@pytest.mark.pipeline
def test_factored_o_proj_is_anchored_to_the_dense_residual_stream(tiny_models, tiny_tokens, tmp_path, monkeypatch):
    """rom-centered o_proj, two blocks: in block 1 its anchored fit is handed E[t z̃ᵀ] and E[t] with
    t = residual_dense − x̃ (the dense sum it adds to, less the compressed block input), recomputed here
    from the two loaded models, as an output-space target."""
    from streamrom.stream.calibration import calibration_tokens

    source, output = tiny_models["llama"], tmp_path / "anchored"
    handed = []
    real_map = decompose.anchored_map
    monkeypatch.setattr(decompose, "anchored_map",
                        lambda moments, anchor, *rest, **named: handed.append(
                            (anchor.cross.copy(), anchor.mean.copy(), anchor.target_is_output))
                        or real_map(moments, anchor, *rest, **named))
    config = tiny_config(tiny_tokens, method="rom-centered", ratio=0.6, layers="0-1", modules=("self_attn.o_proj",),
                         anchor=1.0, precision="float64")
    streamrom.compress(source, output, config)
    assert len(handed) == 1  # block 0's fit runs plain (the streams are still equal there)
    cross, mean, target_is_output = handed[0]
    dense, compressed = streamrom.load(source), streamrom.load(output)
    ids = torch.from_numpy(calibration_tokens(config.calibration, source, dense.spec.vocab_size))
    seen: dict[str, dict[str, torch.Tensor]] = {"dense": {}, "compressed": {}}
    for label, model in (("dense", dense), ("compressed", compressed)):
        values = seen[label]
        model.layers[1].register_forward_pre_hook(lambda m, i, values=values: values.__setitem__("x", i[0]))
        model.layers[1].self_attn.o_proj.register_forward_hook(lambda m, i, o, values=values: values.update(z=i[0], y=o))
        model(ids)

    def rows(tensor: torch.Tensor) -> np.ndarray:
        return tensor.reshape(-1, tensor.shape[-1]).double().numpy()

    d, c = seen["dense"], seen["compressed"]
    target = rows(d["x"]) + rows(d["y"]) - rows(c["x"])
    z = rows(c["z"])
    assert target_is_output
    np.testing.assert_allclose(cross, target.T @ z / len(z), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(mean, target.mean(axis=0), rtol=1e-6, atol=1e-9)
    assert np.linalg.norm(target - rows(d["y"])) > 1e-2 * np.linalg.norm(target)  # upstream error is there
