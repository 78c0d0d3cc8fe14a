"""Task-targeted compression: a target text's moments mixed with a general text's, per linear."""
from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch

import streamrom
from streamrom import CalibrationConfig, CompressConfig
from streamrom.linalg import decompose
from streamrom.stream.activations import chunk_ranges
from streamrom.stream.calibration import held_out
from streamrom.storage.checkpoint import CheckpointReader
from streamrom.cli import main as cli_main

from conftest import REPO


def test_mixture_weights_normalise_each_part_by_its_energy():
    assert decompose.mixture_weights(2.0, 5.0, 1.0) == (1.0, 0.0)
    assert decompose.mixture_weights(2.0, 5.0, 0.0) == (0.0, 1.0)
    # α/E_t = 0.5, (1−α)/E_g = 0.5/3: weights 3:1
    assert decompose.mixture_weights(1.0, 3.0, 0.5) == pytest.approx((0.75, 0.25))
    with pytest.raises(ValueError):
        decompose.mixture_weights(1.0, 1.0, 1.5)


@pytest.mark.parametrize("centered", [False, True])
def test_mixed_output_moment_is_the_trace_normalised_mix(centered):
    """W·C_mix·Wᵀ ∝ α·C_t/tr C_t + (1−α)·C_g/tr C_g, C the output moments (covariances, centered), here
    with a target whose activations are 10x larger: normalisation keeps it from dominating."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((12, 20))
    general = rng.standard_normal((20, 500)) + 0.3
    target = 10 * rng.standard_normal((20, 300)) @ np.diag(np.linspace(0.1, 2, 300)) - 0.5

    def moments(x):
        return decompose.InputMoments(x @ x.T / x.shape[1], x.mean(axis=1), centered)

    def output_moment(x):
        y = weight @ x
        if centered:
            y = y - y.mean(axis=1, keepdims=True)
        return y @ y.T / y.shape[1]

    alpha = 0.3
    parts = moments(target), moments(general)
    energies = [decompose.output_energy(p, weight, None) for p in parts]
    np.testing.assert_allclose(energies, [np.trace(output_moment(target)), np.trace(output_moment(general))])
    mixed = decompose.mix_moments(*parts, decompose.mixture_weights(*energies, alpha))
    expected = (alpha * output_moment(target) / energies[0] + (1 - alpha) * output_moment(general) / energies[1])
    got = weight @ mixed.matrix(False) @ weight.T
    if not centered:  # centered: the mixture's covariance also holds the scatter between the two means
        np.testing.assert_allclose(got / np.trace(got), expected / np.trace(expected), rtol=1e-10, atol=1e-12)
    else:
        means = [weight @ x.mean(axis=1) for x in (target, general)]
        w_t, w_g = decompose.mixture_weights(*energies, alpha)
        between = w_t * w_g * np.outer(means[0] - means[1], means[0] - means[1])
        np.testing.assert_allclose(got, w_t * output_moment(target) + w_g * output_moment(general) + between,
                                   rtol=1e-10, atol=1e-10)


def test_chunks_never_straddle_the_boundary_between_texts():
    assert list(chunk_ranges(10, 4, 6)) == [(0, 4), (4, 6), (6, 10)]
    assert list(chunk_ranges(10, 4)) == [(0, 4), (4, 8), (8, 10)]
    assert list(chunk_ranges(5, 8, 3)) == [(0, 3), (3, 5)]


def _tensors(folder):
    reader = CheckpointReader(folder)
    return {name: reader.tensor(name) for name in reader.weight_map}


@pytest.mark.pipeline
@pytest.mark.parametrize("alpha", [1.0, 0.0])
def test_target_weight_at_its_ends_equals_one_text_alone(tiny_models, tiny_tokens, tmp_path, alpha):
    """α = 1 is compression calibrated on the target text alone, α = 0 on the general text alone:
    the written tensors are identical (the other text's sequences still flow through the blocks)."""
    source = tiny_models["qwen2"]
    general = CalibrationConfig(token_file=tiny_tokens, sequences=6, seqlen=64, seed=0)
    target = CalibrationConfig(token_file=tiny_tokens, sequences=5, seqlen=64, seed=7)
    mixed = streamrom.compress(source, tmp_path / "mixed", CompressConfig(
        ratio=0.5, calibration=general, target_calibration=target, target_weight=alpha, chunk_tokens=128))
    streamrom.compress(source, tmp_path / "alone", CompressConfig(
        ratio=0.5, calibration=target if alpha == 1.0 else general, chunk_tokens=128))
    assert mixed.settings["target"]["sequences"] == 5 and mixed.settings["target"]["general_sequences"] == 6
    a, b = _tensors(tmp_path / "mixed"), _tensors(tmp_path / "alone")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_half_mix_differs_from_the_general_text_alone(tiny_models, tiny_tokens, smollm2_dir, tmp_path, capsys):
    source = tiny_models["llama"]
    target_file = tmp_path / "target.npy"
    np.save(target_file, (np.load(tiny_tokens)[::-1] * 7) % 256)  # another "text": other tokens entirely
    general_only = streamrom.compress(source, tmp_path / "general", CompressConfig(
        ratio=0.5, calibration=CalibrationConfig(token_file=tiny_tokens, sequences=4, seqlen=64)))
    assert general_only.settings["target"] is None
    # --target-text takes text files, through the model's tokenizer (the tiny models have none)
    assert cli_main(["compress", str(smollm2_dir), str(tmp_path / "x"), "--target-text", str(tmp_path / "missing.txt")]) != 0
    assert "missing.txt" in capsys.readouterr().err and not (tmp_path / "x").exists()
    mixed = streamrom.compress(source, tmp_path / "mixed", CompressConfig(
        ratio=0.5, calibration=CalibrationConfig(token_file=tiny_tokens, sequences=4, seqlen=64),
        target_calibration=CalibrationConfig(token_file=target_file, sequences=4, seqlen=64)))
    assert mixed.settings["target"]["target_weight"] == 0.5
    a, b = _tensors(tmp_path / "mixed"), _tensors(tmp_path / "general")
    assert any(not torch.equal(a[n], b[n]) for n in a if n.endswith("expand.weight"))
    with pytest.raises(streamrom.UsageError, match="target-weight"):
        CompressConfig(target_weight=1.5)


@pytest.mark.pipeline
def test_spectrum_allocation_follows_the_target(tiny_models, tiny_tokens, tmp_path):
    """With a target text, pass 1 prices directions on the target's statistics and loss alone: the
    ranks are those of a spectrum run calibrated on the target text only."""
    source = tiny_models["llama"]
    general = CalibrationConfig(token_file=tiny_tokens, sequences=4, seqlen=64, seed=0)
    target = CalibrationConfig(token_file=tiny_tokens, sequences=4, seqlen=64, seed=5)
    mixed = streamrom.compress(source, tmp_path / "mixed", CompressConfig(
        allocate="spectrum", target_params=0.7, calibration=general, target_calibration=target))
    alone = streamrom.compress(source, tmp_path / "alone", CompressConfig(
        allocate="spectrum", target_params=0.7, calibration=target))
    by_general = streamrom.compress(source, tmp_path / "general", CompressConfig(
        allocate="spectrum", target_params=0.7, calibration=general))
    assert mixed.ranks == alone.ranks != by_general.ranks


def test_selection_orders_orthonormal_candidates_by_target_energy():
    rng = np.random.default_rng(1)
    candidates = np.linalg.qr(rng.standard_normal((10, 6)))[0]
    factor = rng.standard_normal((10, 4))
    energy = ((factor.T @ candidates) ** 2).sum(axis=0)
    basis = decompose.select_basis(candidates, factor, 3)
    expected = candidates[:, np.argsort(energy)[::-1][:3]]
    np.testing.assert_allclose(np.abs(basis.T @ expected), np.eye(3), atol=1e-10)


def test_selection_adds_the_target_direction_the_general_basis_misses():
    """The general basis spans e0..e3; the target lives on e6 (strongly) and e1 (weakly). At rank 2
    the selection keeps e6, which no general direction has, and e1 — and drops e0, e2, e3, which the
    target never uses."""
    eye = np.eye(8)
    general_basis = eye[:, :4]
    target_factor = np.stack([3 * eye[:, 6], eye[:, 1]], axis=1)
    target_top = eye[:, [6, 1]]
    basis = decompose.select_basis(general_basis, target_factor, 2, extra=target_top)
    np.testing.assert_allclose(np.abs(basis), eye[:, [6, 1]], atol=1e-12)
    # without the extra candidates only e1 of the target is reachable
    without = decompose.select_basis(general_basis, target_factor, 2)
    assert abs(without[1, 0]) == pytest.approx(1.0) and np.abs(without[6]).max() < 1e-12


def test_selection_of_the_targets_own_eigenvectors_is_target_rom():
    rng = np.random.default_rng(2)
    weight, x = rng.standard_normal((12, 9)), rng.standard_normal((9, 200))
    moments = decompose.InputMoments(x @ x.T / 200, x.mean(axis=1))
    values, vectors = moments.rom_eigenpairs(weight, None, 9)
    factor = weight @ moments.root(False)
    basis = decompose.select_basis(vectors, factor, 4)
    np.testing.assert_allclose(np.abs(basis.T @ vectors[:, :4]), np.eye(4), atol=1e-8)


@pytest.mark.pipeline
def test_selected_basis_at_full_target_weight_is_target_rom(tiny_models, tiny_tokens, tmp_path):
    """With α = 1 the mix is the target, whose eigenvectors the selection keeps in their own order:
    the factored weights match the target-only compression. In float64: in float32 the random tiny
    model's nearly equal eigenvalues at the cut swap places under rounding."""
    source = tiny_models["llama"]
    general = CalibrationConfig(token_file=tiny_tokens, sequences=4, seqlen=64, seed=0)
    target = CalibrationConfig(token_file=tiny_tokens, sequences=4, seqlen=64, seed=9)
    streamrom.compress(source, tmp_path / "select", CompressConfig(
        ratio=0.5, calibration=general, target_calibration=target, target_weight=1.0, target_basis="select",
        precision="float64"))
    streamrom.compress(source, tmp_path / "alone", CompressConfig(ratio=0.5, calibration=target, precision="float64"))
    half = streamrom.compress(source, tmp_path / "half", CompressConfig(
        ratio=0.5, calibration=general, target_calibration=target, target_basis="select"))
    a, b, c = (_tensors(tmp_path / name) for name in ("select", "alone", "half"))
    for name in (n for n in a if n.endswith("expand.weight")):
        reduce_name = name.replace("expand", "reduce")
        selected, alone = a[name] @ a[reduce_name], b[name] @ b[reduce_name]
        torch.testing.assert_close(selected, alone, rtol=1e-5, atol=1e-5 * alone.abs().max().item())
    assert any(not torch.allclose(a[n], c[n], atol=1e-3) for n in a if n.endswith("expand.weight"))
    assert half.settings["target"]["target_weight"] == 0.5
    with pytest.raises(streamrom.UsageError, match="needs --target-text"):
        CompressConfig(target_basis="select")


def test_code_benchmark_split_is_disjoint_by_module_and_stable():
    """benchmarks/quality/targeted.py calibrates on some stdlib modules and evaluates on the others: no file,
    and no module, is on both sides; the held-out set does not depend on order or on the run."""
    from benchmarks.quality.targeted import stdlib_split

    split, held = stdlib_split()
    calibration, evaluation = set(split["calibration"]), set(split["evaluation"])
    assert calibration and evaluation and not calibration & evaluation
    root = Path(sysconfig.get_paths()["stdlib"])

    def module(path):
        return path.relative_to(root).parts[0].removesuffix(".py")

    assert not {module(p) for p in calibration} & {module(p) for p in evaluation}
    assert {module(p) for p in evaluation} == held
    names = [f"m{i}" for i in range(2000)]
    chosen = held_out(names, 0.2, salt="x")
    assert chosen == held_out(reversed(names), 0.2, salt="x") and 300 < len(chosen) < 500
