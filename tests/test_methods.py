"""Methods (rom, rom-centered, svd) and rank allocation (uniform, last-n, spectrum) end to end."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import streamrom
from streamrom import CalibrationConfig, CompressConfig
from streamrom.linalg.allocation import STEP
from streamrom.storage.checkpoint import CheckpointReader
from streamrom.cli import main as cli_main
from streamrom.model.modeling import BLOCK_LINEARS

from conftest import EVAL_TEXT


def tiny_calibration(tokens):
    return CalibrationConfig(token_file=tokens, sequences=8, seqlen=64)


def largest_step(spec) -> int:
    return max(STEP * sum(spec.linear_shape(name)) for name in BLOCK_LINEARS)


@pytest.mark.pipeline
@pytest.mark.parametrize("allocate", ["uniform", "last-n", "spectrum"])
@pytest.mark.parametrize("fraction", [0.6, 0.8])
def test_target_params_met_within_one_rank_step(tiny_models, tiny_tokens, tmp_path, allocate, fraction):
    source = tiny_models["llama"]
    config = CompressConfig(allocate=allocate, target_params=fraction, calibration=tiny_calibration(tiny_tokens))
    report = streamrom.compress(source, tmp_path / "out", config)
    before = CheckpointReader(source).parameter_count()
    after = CheckpointReader(tmp_path / "out").parameter_count()
    target = int(fraction * before)
    assert after <= target
    assert target - after < largest_step(CheckpointReader(source).spec)
    assert report.parameters_after == after
    if allocate == "last-n":  # only a suffix of the blocks is factored
        factored = sorted({int(k.split(".")[2]) for k, r in report.ranks.items() if r is not None})
        assert factored == list(range(factored[0], report.num_layers))


@pytest.mark.pipeline
def test_target_size_in_gb(tiny_models, tiny_tokens, tmp_path):
    source = tiny_models["llama"]
    before_bytes = CheckpointReader(source).parameter_count() * 4
    target_gb = 0.7 * before_bytes / 1e9
    streamrom.compress(source, tmp_path / "out", CompressConfig(target_size_gb=target_gb,
                                                                calibration=tiny_calibration(tiny_tokens)))
    written = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    assert written <= target_gb * 1e9
    assert target_gb * 1e9 - written < 4 * largest_step(CheckpointReader(source).spec)


@pytest.mark.pipeline
def test_two_pass_spectrum_run_equals_its_ranks_applied_by_hand(tiny_models, tiny_tokens, tmp_path):
    """Pass 2 of the spectrum allocation is an ordinary compression with those ranks: giving the
    same ranks explicitly (--ranks-from the first run's report) writes the same tensors."""
    source = tiny_models["qwen2"]
    two_pass = streamrom.compress(source, tmp_path / "spectrum", CompressConfig(
        allocate="spectrum", target_params=0.7, calibration=tiny_calibration(tiny_tokens)))
    ranks = {k: r for k, r in two_pass.ranks.items()}
    assert len({r for r in ranks.values()}) > 2  # the allocation is not uniform
    code = cli_main(["--quiet", "compress", str(source), str(tmp_path / "by-hand"), "--ranks-from",
                     str(tmp_path / "spectrum" / "streamrom-report.json"), "--calib-tokens", str(tiny_tokens),
                     "--calib-sequences", "8", "--calib-seqlen", "64"])
    assert code == 0
    a, b = CheckpointReader(tmp_path / "spectrum"), CheckpointReader(tmp_path / "by-hand")
    assert sorted(a.weight_map) == sorted(b.weight_map)
    for name in a.weight_map:
        assert torch.equal(a.tensor(name), b.tensor(name)), name


@pytest.mark.pipeline
def test_saved_first_pass_is_reused_for_other_sizes_and_refused_for_other_inputs(tiny_models, tiny_tokens, tmp_path):
    source, saved = tiny_models["llama"], tmp_path / "pass1.npz"
    calibration = tiny_calibration(tiny_tokens)
    first = streamrom.compress(source, tmp_path / "a", CompressConfig(
        allocate="spectrum", target_params=0.7, calibration=calibration, spectra_file=saved))
    assert saved.is_file() and "backward" in first.stage_seconds
    reused = streamrom.compress(source, tmp_path / "b", CompressConfig(
        allocate="spectrum", target_params=0.6, calibration=calibration, spectra_file=saved))
    assert "backward" not in reused.stage_seconds  # no second pass 1
    # the memory estimate covers pass 1 (autograd, four moments, head) only where pass 1 runs
    assert "pass1_autograd" in first.memory["estimate"] and "pass1_autograd" not in reused.memory["estimate"]
    # (pass 1's backward chunk is half a forward chunk and its pricing runs without the block: on this
    # tiny model it need not raise the peak above the compression's own)
    beyond_runtime = [r.memory["estimated_peak_bytes"] - r.memory["estimate"]["runtime"] for r in (first, reused)]
    assert beyond_runtime[0] >= beyond_runtime[1]
    fresh = streamrom.compress(source, tmp_path / "c", CompressConfig(
        allocate="spectrum", target_params=0.6, calibration=calibration))
    assert reused.ranks == fresh.ranks and reused.ranks != first.ranks
    other_seed = CalibrationConfig(token_file=tiny_tokens, sequences=8, seqlen=64, seed=1)
    with pytest.raises(streamrom.UsageError, match="made for another"):
        streamrom.compress(source, tmp_path / "d", CompressConfig(
            allocate="spectrum", target_params=0.6, calibration=other_seed, spectra_file=saved))


@pytest.mark.pipeline
def test_svd_method_is_the_truncated_svd_of_each_weight(tiny_models, tiny_tokens, tmp_path):
    source = tiny_models["llama"]
    report = streamrom.compress(source, tmp_path / "svd", CompressConfig(
        method="svd", ratio=0.5, calibration=tiny_calibration(tiny_tokens)))
    src, out = CheckpointReader(source), CheckpointReader(tmp_path / "svd")
    for key, rank in report.ranks.items():
        if rank is None:
            continue
        weight = src.tensor(f"{key}.weight").double().numpy()
        approx = (out.tensor(f"{key}.expand.weight").double() @ out.tensor(f"{key}.reduce.weight").double()).numpy()
        u, s, vt = np.linalg.svd(weight, full_matrices=False)
        best = (u[:, :rank] * s[:rank]) @ vt[:rank]
        np.testing.assert_allclose(approx, best, atol=1e-4 * np.abs(weight).max(), err_msg=key)


def test_rom_beats_weight_svd_on_the_real_model(smollm2_dir, tmp_path):
    """The SFSD finding, at equal ranks on the last four blocks of SmolLM2 with Austen text."""
    calibration = CalibrationConfig(sequences=8, seqlen=256)
    perplexity = {}
    for method in ("rom", "svd"):
        config = CompressConfig(method=method, ratio=0.5, layers="last:4", calibration=calibration)
        streamrom.compress(smollm2_dir, tmp_path / method, config)
        perplexity[method] = streamrom.evaluate(tmp_path / method, [EVAL_TEXT], seqlen=256, max_windows=8).perplexity
    dense = streamrom.evaluate(smollm2_dir, [EVAL_TEXT], seqlen=256, max_windows=8).perplexity
    assert dense < perplexity["rom"] < perplexity["svd"]


@pytest.mark.parametrize("argv,message", [
    (["--target-params", "0.5", "--target-size", "1"], "not allowed with"),
    (["--target-params", "1.5"], "--target-params must be in (0, 1]"),
    (["--rank", "8", "--allocate", "spectrum"], "do not combine"),
    (["--target-params", "0.0001"], "target"),
    (["--method", "svd", "--allocate", "spectrum"], "with --method svd use uniform or last-n"),
    (["--method", "rom", "--spectra", "pass1.npz"], "use it with that allocation"),
])
def test_bad_allocation_arguments_fail_in_one_line(tiny_models, tiny_tokens, tmp_path, capsys, argv, message):
    try:
        code = cli_main(["compress", str(tiny_models["llama"]), str(tmp_path / "o"), "--calib-tokens",
                         str(tiny_tokens), "--calib-sequences", "4", "--calib-seqlen", "64", *argv])
    except SystemExit as exc:  # argparse's own checks exit from inside the parser
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o" / "model.safetensors.index.json").exists()


def test_bad_ranks_file_fails_in_one_line(tiny_models, tiny_tokens, tmp_path, capsys):
    bad = tmp_path / "ranks.json"
    bad.write_text(json.dumps({"ranks": {"model.layers.99.mlp.up_proj": 8}}))
    code = cli_main(["compress", str(tiny_models["llama"]), str(tmp_path / "o"), "--ranks-from", str(bad),
                     "--calib-tokens", str(tiny_tokens), "--calib-sequences", "4", "--calib-seqlen", "64"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "not a block linear" in err and len(err.splitlines()) == 1


def test_pass_one_prices_directions_as_whole_model_autograd_does(tiny_models, tmp_path, monkeypatch):
    """Pass 1 streams a forward and a backward pass block by block (inputs and gradients on disk, in
    chunks). Its price of each output direction, λ_k · Σ_j v_jk² E[g_j²], must equal the one computed
    from the whole model held in RAM with plain autograd and each linear's output moment formed
    directly from its outputs."""
    import torch.nn.functional as F

    from streamrom.model.modeling import EMBED, FINAL_NORM, LM_HEAD, Block, RMSNorm, Rotary, block_prefix
    from streamrom.report.report import StageTimer
    from streamrom.report import memory
    from streamrom.compression.spectra import collect_spectra

    monkeypatch.setattr(memory, "HEAD_POSITIONS", 7)  # the logits at the top in several slices of positions
    reader = CheckpointReader(tiny_models["llama"])
    spec = reader.spec
    tokens = np.random.default_rng(3).integers(0, spec.vocab_size, size=(5, 24))
    layers = [1, 2]
    costs = collect_spectra(reader, tokens, layers, list(BLOCK_LINEARS), tmp_path / "work", chunk_tokens=48,
                            centered=False, work_dtype=np.float64, timer=StageTimer())

    blocks = [Block.from_tensors(spec, reader.block_tensors(i)).double() for i in range(spec.num_layers)]
    outputs = {}

    def keep(key):
        def hook(module, args, output):
            output.retain_grad()
            outputs[key] = output
        return hook

    for i in layers:
        for name in BLOCK_LINEARS:
            blocks[i].linear(name).register_forward_hook(keep(f"{block_prefix(i)}{name}"))
    cos, sin = (t.double() for t in Rotary(spec).cos_sin(tokens.shape[1]))
    ids = torch.from_numpy(tokens)
    x = reader.tensor(EMBED).double()[ids].requires_grad_(True)
    with torch.enable_grad():
        for block in blocks:
            x = block(x, cos, sin)
        norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps).double()
        norm.weight.data = reader.tensor(FINAL_NORM).double()
        logits = F.linear(norm(x), reader.tensor(LM_HEAD).double())
        F.cross_entropy(logits[:, :-1].reshape(-1, spec.vocab_size), ids[:, 1:].reshape(-1), reduction="sum").backward()
    assert set(costs) == set(outputs)
    for key, output in outputs.items():
        y = output.detach().reshape(-1, output.shape[-1]).numpy()
        g = output.grad.reshape(-1, output.shape[-1]).numpy()
        values, vectors = np.linalg.eigh(y.T @ y / len(y))
        keep_count = min(spec.linear_shape(key.split(".", 3)[3]))
        values, vectors = values[::-1][:keep_count], vectors[:, ::-1][:, :keep_count]
        expected = values * ((vectors ** 2).T @ ((g ** 2).sum(0) / len(g)))
        # the streamed pass runs the blocks in float32, the reference in float64
        np.testing.assert_allclose(costs[key], expected, rtol=1e-5, atol=1e-7 * expected.max(), err_msg=key)


@pytest.mark.pipeline
def test_bayes_allocation_meets_the_size_and_is_seeded(tiny_models, tiny_tokens, tmp_path):
    """Five trials: the first is the spectrum plan itself, the last proposed by the Gaussian process; the
    result is the best-scoring trial, meets the whole-model size within one step, and a second run
    with the same seed makes the same choice."""
    from streamrom.linalg.bayes import MULTIPLIER_RANGE, STARTUP_TRIALS, BayesConfig

    source = tiny_models["llama"]
    config = CompressConfig(allocate="bayes", target_params=0.7, calibration=tiny_calibration(tiny_tokens),
                            bayes=BayesConfig(trials=STARTUP_TRIALS + 1, seed=1, held_out_windows=4))
    first = streamrom.compress(source, tmp_path / "a", config)
    again = streamrom.compress(source, tmp_path / "b", config)
    spectrum = streamrom.compress(source, tmp_path / "s", CompressConfig(
        allocate="spectrum", target_params=0.7, calibration=tiny_calibration(tiny_tokens)))
    scores = [trial["score"] for trial in first.settings["bayes"]["scores"]]
    assert len(scores) == STARTUP_TRIALS + 1 and first.ranks == again.ranks
    def without_times(trials):
        return [{k: v for k, v in trial.items() if not k.endswith("_seconds")} for trial in trials]
    assert without_times(first.settings["bayes"]["scores"]) == without_times(again.settings["bayes"]["scores"])
    assert all(trial["execute_seconds"] > 0 and trial["score_seconds"] > 0 and trial["overhead_seconds"] >= 0
               for trial in first.settings["bayes"]["scores"])
    for trial in first.settings["bayes"]["scores"][1:]:
        assert all(MULTIPLIER_RANGE[0] <= m <= MULTIPLIER_RANGE[1] for m in trial["multipliers"].values())
    before = CheckpointReader(source).parameter_count()
    assert first.parameters_after <= int(0.7 * before) and int(0.7 * before) - first.parameters_after < largest_step(
        CheckpointReader(source).spec)
    if scores[0] == min(scores):  # the spectrum plan won: it is what was written
        assert first.ranks == spectrum.ranks
    else:
        assert first.ranks != spectrum.ranks


def test_the_command_line_offers_every_method_and_every_setting_choice():
    from streamrom.cli import METHOD_NAMES
    from streamrom.compression.methods import METHODS

    assert set(METHOD_NAMES) == set(METHODS)
    from streamrom import cli
    from streamrom.linalg import structured

    assert cli.NEURON_SELECTIONS == structured.NEURON_SELECTIONS
    from streamrom.compression import config

    assert cli.ALLOCATIONS == config.ALLOCATIONS and cli.TARGET_BASES == config.TARGET_BASES
    assert cli.OUTPUT_DTYPES == tuple(config.OUTPUT_DTYPES) and cli.PRECISIONS == tuple(config.PRECISIONS)
    from streamrom.gguf import correction, importer

    assert cli.ADAPTER_TYPES == tuple(correction.ADAPTER_TYPES) and cli.IMPORT_DTYPES == tuple(importer.OUTPUT_DTYPES)
    from streamrom.gguf import sizing

    assert cli.SIZING_TYPES == tuple(sizing.CANDIDATE_TYPES) and cli.SIZING_DEFAULT_TYPES == sizing.DEFAULT_CANDIDATES


def test_pass_one_wide_moment_summed_from_disk_equals_the_in_graph_sum(tiny_models, tmp_path, monkeypatch):
    """A moment wider than statistics.WIDE (the MLP neurons' at 7B shape) is not summed beside the
    autograd graph: pass 1 writes those values to a file during the backward and sums them after it.
    With WIDE lowered below the tiny MLP's width, that path must price the neurons (costs and greedy
    order) and every other linear as the in-graph sum does."""
    from streamrom.compression import spectra, statistics
    from streamrom.report.report import StageTimer

    reader = CheckpointReader(tiny_models["llama"])
    tokens = np.random.default_rng(5).integers(0, reader.spec.vocab_size, size=(5, 24))
    units = ["mlp.neurons", "self_attn.value_dims"]

    def costs(work):
        return spectra.collect_spectra(reader, tokens, [0, 2], list(BLOCK_LINEARS), tmp_path / work, chunk_tokens=48,
                                       centered=False, work_dtype=np.float64, timer=StageTimer(), units=units)

    in_graph = costs("in-graph")
    assert reader.spec.hidden_size <= 96 < reader.spec.intermediate_size
    monkeypatch.setattr(spectra, "WIDE", 96)
    monkeypatch.setattr(statistics, "WIDE", 96)
    spilled = costs("spilled")
    assert set(spilled) == set(in_graph) and any(key.endswith("mlp.neurons") for key in spilled)
    for key, value in in_graph.items():
        if key.startswith(spectra.ORDER_PREFIX):
            np.testing.assert_array_equal(spilled[key], value, err_msg=key)
        else:
            np.testing.assert_allclose(spilled[key], value, rtol=1e-9, atol=1e-12 * np.abs(value).max(), err_msg=key)
    assert not list((tmp_path / "spilled").rglob("*.f32"))  # the wide values' file went with the backward
