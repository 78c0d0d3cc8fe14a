"""Structured ROM (issue 21): known-answer math, planted redundancies, exact references for the model."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

import streamrom
from streamrom import CalibrationConfig, CompressConfig, UsageError
from streamrom.errors import NumericalError
from streamrom.linalg import structured
from streamrom.stream.calibration import calibration_tokens
from streamrom.linalg.allocation import Slot, choose_alternatives, spectrum_ranks, total_params, unit_dominates
from streamrom.linalg import allocation
from streamrom.linalg.decompose import InputMoments
from streamrom.compression.units import narrow_mlp, narrow_query_key, narrow_values
from streamrom.model.modeling import Block, Rotary
from streamrom.compression.statistics import MomentAccumulator

from conftest import read_json

RNG = np.random.default_rng(0)


def moment_of(features: np.ndarray) -> np.ndarray:
    return features.T @ features / features.shape[0]


def refit_error(weight, features, kept, refitted) -> float:
    residual = features @ weight.T - features[:, kept] @ refitted.T
    return float((residual ** 2).sum() / features.shape[0])


# -- MLP neurons -----------------------------------------------------------------------------------

def test_refit_is_the_least_squares_optimum():
    features = RNG.standard_normal((3000, 24)) @ RNG.standard_normal((24, 24))
    weight = RNG.standard_normal((10, 24))
    kept = np.array([0, 3, 4, 9, 11, 17, 20])
    refitted = structured.refit_columns(weight, moment_of(features), kept, 0.0)
    brute = np.linalg.lstsq(features[:, kept], features @ weight.T, rcond=None)[0].T
    np.testing.assert_allclose(refitted, brute, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("selection", ["obs", "leverage"])
def test_a_neuron_that_is_a_combination_of_others_goes_first_at_no_cost(selection):
    features = RNG.standard_normal((4000, 32))
    features[:, 7] = 0.5 * features[:, 1] - 2.0 * features[:, 30]  # planted: no information of its own
    weight = RNG.standard_normal((12, 32))
    moment = moment_of(features)
    kept = structured.select_neurons(moment, weight, 31, selection, 1e-12)
    dropped = sorted(set(range(32)) - set(kept.tolist()))
    assert dropped[0] in (1, 7, 30)  # one of the three dependent ones, whichever
    refitted = structured.refit_columns(weight, moment, kept, 1e-12)
    assert refit_error(weight, features, kept, refitted) < 1e-8 * float((features @ weight.T).var())


def test_greedy_removal_costs_add_up_to_the_refit_error():
    features = RNG.standard_normal((5000, 40)) @ RNG.standard_normal((40, 40))
    weight = RNG.standard_normal((16, 40))
    moment = moment_of(features)
    removal = structured.obs_removal(moment, weight, 8, 1e-12)
    assert sorted(removal.order.tolist()) == list(range(40))
    for keep in (30, 20, 8):
        kept = removal.order[:keep]
        exact = refit_error(weight, features, kept, structured.refit_columns(weight, moment, kept, 1e-12))
        assert removal.costs[keep:].sum() == pytest.approx(exact, rel=1e-6)
    # greedy OBS keeps more than ridge leverage (the usual case; the test's data is fixed)
    leverage = np.sort(structured.leverage_order(moment)[:20])
    by_leverage = refit_error(weight, features, leverage, structured.refit_columns(weight, moment, leverage, 1e-12))
    assert removal.costs[20:].sum() <= by_leverage


# -- values and o_proj -----------------------------------------------------------------------------

def test_values_of_one_head_per_group_reach_the_reduced_rank_optimum():
    heads, head_dim, hidden, width = 2, 8, 12, 3
    mixed = RNG.standard_normal((6000, heads * head_dim)) @ RNG.standard_normal((heads * head_dim,) * 2)
    o_weight = RNG.standard_normal((hidden, heads * head_dim))
    # no correlation between heads: the optimum is per head, the tail of C^½ W_oᵀ W_o C^½'s spectrum
    mixed[:, head_dim:] = RNG.standard_normal((6000, head_dim)) @ RNG.standard_normal((head_dim, head_dim))
    mixed[:, :head_dim] = RNG.standard_normal((6000, head_dim)) @ RNG.standard_normal((head_dim, head_dim))
    moment = moment_of(mixed)
    maps, worth = structured.value_maps(moment, o_weight, heads, heads, head_dim, width, 0.0)
    refitted = structured.refit_output(o_weight, moment, maps, heads, head_dim, 0.0)
    narrowed = np.hstack([mixed[:, h * head_dim:(h + 1) * head_dim] @ maps[h] for h in range(heads)])
    error = float(((mixed @ o_weight.T - narrowed @ refitted.T) ** 2).sum() / len(mixed))
    optimum = 0.0
    for h in range(heads):
        part = slice(h * head_dim, (h + 1) * head_dim)
        values, vectors = np.linalg.eigh(moment[part, part])
        root = (vectors * np.sqrt(values)) @ vectors.T
        spectrum = np.linalg.eigvalsh(root @ o_weight[:, part].T @ o_weight[:, part] @ root)
        optimum += spectrum[:head_dim - width].sum()
    # the cross-head terms of the sample moment are small, not zero: the joint refit can only gain
    assert error == pytest.approx(optimum, rel=2e-2)
    assert worth[width:].sum() == pytest.approx(optimum, rel=1e-6)


def test_a_value_dimension_never_read_is_removed_at_no_cost():
    heads, kv_heads, head_dim, hidden = 4, 2, 6, 10
    values = RNG.standard_normal((3000, kv_heads * head_dim))
    mixed = np.hstack([values[:, (h // 2) * head_dim:(h // 2 + 1) * head_dim] for h in range(heads)])
    o_weight = RNG.standard_normal((hidden, heads * head_dim))
    for h in range(heads):
        o_weight[:, h * head_dim + 2] = 0.0  # dimension 2 of every head: no query head reads it
    moment = moment_of(mixed)
    maps, _ = structured.value_maps(moment, o_weight, heads, kv_heads, head_dim, head_dim - 1, 1e-12)
    refitted = structured.refit_output(o_weight, moment, maps, heads, head_dim, 1e-12)
    narrowed = np.hstack([mixed[:, h * head_dim:(h + 1) * head_dim] @ maps[h // 2] for h in range(heads)])
    np.testing.assert_allclose(narrowed @ refitted.T, mixed @ o_weight.T, atol=1e-6)


# -- queries and keys: rotary pairs -----------------------------------------------------------------

def test_pair_order_ranks_by_the_scores_a_pair_carries():
    # 2 KV heads of 2 query heads, 3 pairs: head 0's pair 1 has the largest q·k energy product; pair 2
    # of KV head 1 has no key energy at all
    query = np.array([[1.0, 4.0, 2.0], [1.0, 0.0, 2.0], [3.0, 1.0, 1.0], [3.0, 1.0, 1.0]])
    key = np.array([[1.0, 2.0, 1.0], [1.0, 5.0, 0.0]])
    order = structured.rotary_pair_order(query, key)
    assert order.tolist() == [[1, 2, 0], [1, 0, 2]]  # products [2, 8, 4] and [6, 10, 0]
    rows = structured.kept_pair_rows(np.array([[0, 2], [1, 2]]), head_dim=6, heads=4)
    assert rows.tolist() == [0, 2, 3, 5, 6, 8, 9, 11, 13, 14, 16, 17, 19, 20, 22, 23]
    # costs in the kept order, each pair the mean of its query side (summed over the group) and key side
    costs = structured.pair_costs(query, key, order)
    # per pair: KV head 0 ½([2, 4, 4] + [1, 2, 1]) = [1.5, 3, 2.5], KV head 1 ½([6, 2, 2] + [1, 5, 0]) = [3.5, 3.5, 1]
    np.testing.assert_allclose(costs, [3 + 3.5, 2.5 + 3.5, 1.5 + 1])


def test_pair_energies_are_the_rotation_free_output_energies():
    x = RNG.standard_normal((5000, 10))
    weight, bias = RNG.standard_normal((2 * 8, 10)), RNG.standard_normal(2 * 8)
    y = x @ weight.T + bias
    energies = structured.pair_energies(weight, bias, moment_of(x), x.mean(axis=0), heads=2, head_dim=8)
    expected = (y ** 2).mean(axis=0).reshape(2, 2, 4).sum(axis=1)  # dims j and j + 4 of each head
    np.testing.assert_allclose(energies, expected, rtol=1e-10)


# -- the block and the model -----------------------------------------------------------------------

def _block_and_inputs(tiny_models, index=0):
    reader = streamrom.storage.checkpoint.CheckpointReader(tiny_models["llama"])
    spec = reader.spec
    block = Block.from_tensors(spec, reader.block_tensors(index), index)
    x = torch.from_numpy(RNG.standard_normal((4, 40, spec.hidden_size)).astype(np.float32))
    cos, sin = Rotary(spec).cos_sin(40)
    return spec, block, x, cos, sin


def _moment(features: torch.Tensor, chunk: int | None = None) -> InputMoments:
    """E[z zᵀ] and E[z] as the pipeline takes them: float32 products per chunk of sequences, summed in
    float64, handed to the math in float32."""
    accumulator = MomentAccumulator(features.shape[-1], torch.float32)
    for start in range(0, features.shape[0], chunk or features.shape[0]):
        accumulator.add(features[start:start + (chunk or features.shape[0])])
    return InputMoments(accumulator.second_moment().astype(np.float32), accumulator.mean().astype(np.float32), True)


@torch.no_grad()
def test_keeping_every_neuron_and_value_dimension_reproduces_the_block(tiny_models):
    spec, block, x, cos, sin = _block_and_inputs(tiny_models)
    before = block(x, cos, sin)
    narrow_query_key(block, spec.head_dim // 2, _moment(block.input_layernorm(x)), "obs", 1e-9)
    assert block.self_attn.rotary_pairs is not None  # every pair kept, reordered per head: the scores stay
    narrow_values(block, spec.head_dim, _moment(block.self_attn.core(block.input_layernorm(x), cos, sin)), "obs", 1e-9)
    values = streamrom.model.modeling.BlockValues(block, cos, sin, {"x": lambda: x})
    narrow_mlp(block, spec.intermediate_size, _moment(values["mlp"]), "obs", 1e-9)
    torch.testing.assert_close(block(x, cos, sin), before, atol=2e-4, rtol=1e-4)
    assert block.self_attn.value_head_dim == spec.head_dim


@torch.no_grad()
def test_narrowed_block_has_narrower_dense_matrices(tiny_models):
    spec, block, x, cos, sin = _block_and_inputs(tiny_models)
    narrow_query_key(block, 3, _moment(block.input_layernorm(x)), "obs", 1e-6)
    narrow_values(block, 8, _moment(block.self_attn.core(block.input_layernorm(x), cos, sin)), "obs", 1e-6)
    values = streamrom.model.modeling.BlockValues(block, cos, sin, {"x": lambda: x})
    narrow_mlp(block, 96, _moment(values["mlp"]), "obs", 1e-6)
    shapes = {name: tuple(value.shape) for name, value in block.state_dict().items()}
    assert shapes["self_attn.q_proj.weight"] == (spec.num_heads * 6, spec.hidden_size)
    assert shapes["self_attn.k_proj.weight"] == (spec.num_kv_heads * 6, spec.hidden_size)
    assert shapes["self_attn.rotary_pairs"] == (spec.num_kv_heads, 3)
    assert shapes["self_attn.v_proj.weight"] == (spec.num_kv_heads * 8, spec.hidden_size)
    assert shapes["self_attn.o_proj.weight"] == (spec.hidden_size, spec.num_heads * 8)
    assert shapes["mlp.gate_proj.weight"] == shapes["mlp.up_proj.weight"] == (96, spec.hidden_size)
    assert shapes["mlp.down_proj.weight"] == (spec.hidden_size, 96)
    assert block(x, cos, sin).shape == x.shape


@torch.no_grad()
def test_narrowed_queries_and_keys_equal_the_dense_block_with_the_dropped_pairs_zeroed(tiny_models):
    """Per-head rotary tables at the kept pairs, GQA groups sharing their KV head's pairs, the dense
    scale: the narrowed attention computes exactly what the dense one does without those pairs."""
    spec, block, x, cos, sin = _block_and_inputs(tiny_models)
    zeroed = Block.from_tensors(spec, {k: v.clone() for k, v in block.state_dict().items()}, 0)
    narrow_query_key(block, 3, _moment(block.input_layernorm(x)), "obs", 1e-6)
    pairs = block.self_attn.rotary_pairs.long().numpy()
    half, group = spec.head_dim // 2, spec.num_heads // spec.num_kv_heads
    for proj, heads in (("q_proj", spec.num_heads), ("k_proj", spec.num_kv_heads)):
        weight = zeroed.linear(f"self_attn.{proj}").weight
        for head in range(heads):
            kv_head = head // group if proj == "q_proj" else head
            for pair in set(range(half)) - set(pairs[kv_head].tolist()):
                weight[[head * spec.head_dim + pair, head * spec.head_dim + pair + half]] = 0.0
    torch.testing.assert_close(block(x, cos, sin), zeroed(x, cos, sin), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_a_pair_that_adds_nothing_to_the_scores_goes_at_no_cost(tiny_models):
    spec, block, x, cos, sin = _block_and_inputs(tiny_models)
    half = spec.head_dim // 2
    key = block.self_attn.k_proj.weight
    key[[3, 3 + half]] = 0.0  # KV head 0: pair 3 has no key, so it adds nothing to any score
    key[[spec.head_dim + 5, spec.head_dim + 5 + half]] = 0.0  # KV head 1: pair 5
    before = block(x, cos, sin)
    narrow_query_key(block, half - 1, _moment(block.input_layernorm(x)), "obs", 1e-6)
    pairs = block.self_attn.rotary_pairs.long().tolist()
    assert 3 not in pairs[0] and 5 not in pairs[1]
    torch.testing.assert_close(block(x, cos, sin), before, atol=1e-5, rtol=1e-5)


def _config(tiny_tokens, **settings) -> CompressConfig:
    return CompressConfig(calibration=CalibrationConfig(token_file=tiny_tokens, sequences=6, seqlen=64),
                          **{"method": "structured", **settings})


# per block: rotary pairs, value dimensions per KV head, neurons (None: as dense); block 2 untouched
NARROWING = {"self_attn.rotary_pairs": (5, 3, None), "self_attn.value_dims": (8, 12, None),
             "mlp.neurons": (96, 120, None)}


def _narrowing_plan() -> dict[str, int | None]:
    return {f"model.layers.{index}.{unit}": widths[index] for unit, widths in NARROWING.items() for index in range(3)}


@pytest.mark.pipeline
@torch.no_grad()
def test_streamed_structured_equals_an_in_memory_reference(tiny_models, tiny_tokens, tmp_path):
    """Every block narrowed in memory, in the data's order, on the inputs the narrowed blocks before it
    give; the streamed run (chunks of 2 sequences, intermediates cached on disk) writes the same."""
    output = tmp_path / "out"
    # (mixed: the method that narrows all three units)
    streamrom.compress(tiny_models["llama"], output, _config(tiny_tokens, method="mixed", ranks=_narrowing_plan(),
                                                             chunk_tokens=128))
    config = read_json(output / "config.json")
    assert config["layer_query_key_head_dims"] == [10, 6, 16] and config["layer_value_head_dims"] == [8, 12, 16]
    dense = streamrom.load(tiny_models["llama"])
    spec = dense.spec
    tokens = calibration_tokens(CalibrationConfig(token_file=tiny_tokens, sequences=6, seqlen=64), None,
                                spec.vocab_size)
    cos, sin = Rotary(spec).cos_sin(64)
    x = dense.embed_tokens(torch.from_numpy(tokens.astype(np.int64)))
    ours = streamrom.load(output)
    for index, block in enumerate(dense.layers):
        pairs, value_width, neurons = (NARROWING[unit][index] for unit in NARROWING)
        if pairs:
            narrow_query_key(block, pairs, _moment(block.input_layernorm(x), 2), "obs", 1e-6)
        if value_width:
            narrow_values(block, value_width, _moment(block.self_attn.core(block.input_layernorm(x), cos, sin), 2),
                          "obs", 1e-6)
        if neurons:
            values = streamrom.model.modeling.BlockValues(block, cos, sin, {"x": lambda: x})
            narrow_mlp(block, neurons, _moment(values["mlp"], 2), "obs", 1e-6)
        x = block(x, cos, sin)
        assert ours.layers[index].state_dict().keys() == block.state_dict().keys()
        for name, tensor in block.state_dict().items():
            torch.testing.assert_close(ours.layers[index].state_dict()[name], tensor, atol=1e-5, rtol=1e-4,
                                       msg=lambda m, name=name: f"block {index} {name}: {m}")


@pytest.mark.pipeline
def test_plain_checkpoint_loads_in_transformers_without_remote_code(tiny_models, tiny_tokens, tmp_path):
    transformers = pytest.importorskip("transformers")
    output = tmp_path / "plain"
    streamrom.compress(tiny_models["llama"], output,
                       _config(tiny_tokens, ratio=0.6, modules=("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")))
    config = read_json(output / "config.json")
    assert config["intermediate_size"] == 96 and "auto_map" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert not (output / "modeling_streamrom.py").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, streamrom.load(output)(ids), atol=1e-4, rtol=1e-4)


@pytest.mark.pipeline
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_per_block_widths_load_in_transformers_with_remote_code(tiny_models, tiny_tokens, tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    output = tmp_path / kind
    # spectrum: per-block widths; q/k factored beside narrowed values and MLPs
    streamrom.compress(tiny_models[kind], output, _config(tiny_tokens, allocate="spectrum", target_params=0.75))
    config = read_json(output / "config.json")
    assert "layer_value_head_dims" in config or "layer_intermediate_sizes" in config
    model = transformers.AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True,
                                                              dtype=torch.float32).eval()
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, streamrom.load(output)(ids), atol=1e-4, rtol=1e-4)
    report = read_json(output / "streamrom-report.json")
    assert report["parameters_after"] <= 0.75 * report["parameters_before"]


@pytest.mark.pipeline
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_narrowed_queries_and_keys_load_in_transformers_with_remote_code(tiny_models, tiny_tokens, tmp_path, kind):
    transformers = pytest.importorskip("transformers")
    output = tmp_path / kind
    streamrom.compress(tiny_models[kind], output, _config(tiny_tokens, method="mixed", ranks=_narrowing_plan()))
    ours = streamrom.load(output)
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(3))
    for implementation in ("sdpa", "eager"):
        model = transformers.AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True, dtype=torch.float32,
                                                                  attn_implementation=implementation).eval()
        attention = model.model.layers[0].self_attn
        # heads as narrow as the checkpoint's: nothing padded or scattered back to head_dim
        assert type(attention).__name__.startswith("Narrowed")
        assert attention.q_proj.out_features < model.config.num_attention_heads * attention.head_dim
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, ours(ids), atol=1e-4, rtol=1e-4)
    # decoding with the KV cache (narrow keys and values in it) gives what the whole sequence gives
    prompt = ids[:1, :16]
    with torch.no_grad():
        generated = model.generate(prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False)
        expected = prompt
        for _ in range(12):
            expected = torch.cat((expected, ours(expected)[:, -1:].argmax(-1)), dim=1)
    assert torch.equal(generated, expected)


@pytest.mark.pipeline
@pytest.mark.parametrize("kind", ["mistral", "qwen3", "gemma3_text"])
def test_narrowed_attention_of_every_family_loads_in_transformers(tmp_path, tiny_tokens, kind):
    """The narrowed attention replaces each family's own forward: sliding windows (mistral), q/k norms over
    the whole head (qwen3, gemma3: their pairs stay, their values narrow), gemma3's scale and norms."""
    transformers = pytest.importorskip("transformers")
    from conftest import make_tiny

    source = make_tiny(tmp_path / "src", kind)
    plan = _narrowing_plan()
    if kind != "mistral":  # q/k normed over the whole head: no pair is dropped
        plan = {name: width for name, width in plan.items() if "rotary_pairs" not in name}
    output = tmp_path / "out"
    streamrom.compress(source, output, _config(tiny_tokens, method="mixed", ranks=plan))
    model = transformers.AutoModelForCausalLM.from_pretrained(output, trust_remote_code=True,
                                                              dtype=torch.float32).eval()
    assert type(model.model.layers[0].self_attn).__name__.startswith("Narrowed")
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, streamrom.load(output)(ids), atol=1e-4, rtol=1e-4)


# -- allocation ------------------------------------------------------------------------------------

def test_unit_slots_are_sized_in_units():
    slot = Slot("model.layers.0.mlp.neurons", 0, 0, 0, unit_size=160, unit_parameters=3 * 64)
    assert slot.dense == 160 * 192 and slot.factored(40) == 40 * 192
    assert slot.max_saving_rank() == 152 and slot.full_rank == 160
    assert slot.rank_at(0.5) == 80


def test_spectrum_meets_the_budget_with_units_within_a_step():
    slots = [Slot(f"model.layers.{i}.mlp.neurons", i, 0, 0, unit_size=256, unit_parameters=100) for i in range(3)]
    slots += [Slot(f"model.layers.{i}.self_attn.q_proj", i, 64, 64) for i in range(3)]
    spectra = {slot.key: np.sort(RNG.random(slot.full_rank))[::-1] for slot in slots}
    budget = int(0.6 * sum(slot.dense for slot in slots))
    ranks = spectrum_ranks(slots, spectra, budget)
    used = total_params(slots, ranks)
    assert budget - 8 * 100 < used <= budget


def test_mixed_choice_takes_the_form_that_loses_less_per_parameter():
    unit = Slot("model.layers.0.mlp.neurons", 0, 0, 0, unit_size=128, unit_parameters=3 * 64)
    factored = [Slot(f"model.layers.0.mlp.{name}", 0, *shape) for name, shape in
                (("gate_proj", (128, 64)), ("up_proj", (128, 64)), ("down_proj", (64, 128)))]
    flat = np.ones(128)  # every neuron (direction) worth the same: halving the neurons loses 64, the
    # factors at the same size (rank 21 of 64 each) lose 3 x 43
    steep = np.concatenate([np.full(4, 100.0), np.zeros(124)])  # factors of rank 8 lose nothing
    for factored_values, expected in ((flat, unit.key), (steep, factored[0].key)):
        spectra = {unit.key: flat, **{s.key: factored_values for s in factored}}
        budget = int(0.5 * unit.dense)
        chosen = choose_alternatives([unit, *factored], spectra, budget, [(unit, factored)])
        assert expected in {slot.key for slot in chosen}


def _unit_wins_everywhere(unit, unit_values, factored, prices) -> bool:
    """choose_alternatives' comparison at each price, for one alternative."""
    unit_curve = allocation._curve(unit, unit_values)
    curves = [allocation._curve(slot, values) for slot, values in factored]
    for price in prices:
        unit_value, unit_params = allocation._best(unit_curve, price)
        best = [allocation._best(curve, price) for curve in curves]
        all_dense = unit_params == unit.dense and all(p == slot.dense for (slot, _), (_, p) in zip(factored, best))
        if not (all_dense or unit_value <= sum(value for value, _ in best)):
            return False
    return True


def test_a_unit_ahead_of_the_bounds_wins_at_every_price_whatever_the_values_above_them():
    unit = Slot("mlp.neurons", 0, 0, 0, unit_size=128, unit_parameters=3 * 64)
    factored = [Slot(name, 0, *shape) for name, shape in
                (("mlp.gate_proj", (128, 64)), ("mlp.up_proj", (128, 64)), ("mlp.down_proj", (64, 128)))]
    prices = 10.0 ** np.linspace(-10, 10, 1201)
    rng = np.random.default_rng(3)
    decided = ruled_out = 0
    for _ in range(150):
        unit_values = np.sort(rng.random(128) ** rng.uniform(0.5, 4))[::-1]
        scale = 10 ** rng.uniform(-2, 2)
        true = [np.sort(rng.random(64) ** rng.uniform(0.2, 6))[::-1] * scale for _ in factored]
        bounds = [values * rng.uniform(0.7, 1.0) for values in true]
        ahead = unit_dominates(unit, unit_values, list(zip(factored, bounds)))
        decided += ahead
        # the cheap test from the totals alone never rules out what the bounds show
        totals = [(slot, float(values.sum())) for slot, values in zip(factored, true)]
        assert not (ahead and allocation.unit_loses_somewhere(unit, unit_values, totals))
        ruled_out += allocation.unit_loses_somewhere(unit, unit_values, totals)
        if ahead:  # the true values, each above its bound, never take the choice from the unit
            assert _unit_wins_everywhere(unit, unit_values, list(zip(factored, true)), prices)
        else:  # and the check says no only where the bounds themselves lose somewhere
            assert not _unit_wins_everywhere(unit, unit_values, list(zip(factored, bounds)), prices)
    assert 25 < decided < 125 and ruled_out > 10  # every answer was exercised


def test_a_unit_is_not_decided_where_factors_of_low_rank_lose_nothing():
    unit = Slot("mlp.neurons", 0, 0, 0, unit_size=128, unit_parameters=3 * 64)
    factored = [Slot(name, 0, *shape) for name, shape in
                (("mlp.gate_proj", (128, 64)), ("mlp.up_proj", (128, 64)), ("mlp.down_proj", (64, 128)))]
    steep = np.concatenate([np.full(4, 100.0), np.zeros(60)])
    assert not unit_dominates(unit, np.ones(128), [(slot, steep) for slot in factored])
    flat = np.ones(64)  # every direction worth as much as a neuron: halving either loses the same share,
    # but the factors pay for every kept direction out + in parameters
    assert unit_dominates(unit, np.ones(128), [(slot, flat) for slot in factored])
    # a unit holding more parameters than its linears dense is never decided (it loses at low prices)
    fat = Slot("mlp.neurons", 0, 0, 0, unit_size=128, unit_parameters=3 * 64 + 1)
    assert not unit_dominates(fat, np.ones(128), [(slot, flat) for slot in factored])


@pytest.mark.pipeline
def test_structured_refuses_a_target_text(tiny_models, tiny_tokens, tmp_path):
    result = subprocess.run([sys.executable, "-m", "streamrom.cli", "compress", str(tiny_models["llama"]),
                             str(tmp_path / "out"), "--method", "structured", "--calib-tokens", str(tiny_tokens),
                             "--target-text", str(tiny_tokens)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "structured" in result.stderr


@pytest.mark.pipeline
def test_pass_one_prices_units_and_mixed_writes_both_forms(tiny_models, tiny_tokens, tmp_path):
    spectra_file = tmp_path / "pass1.npz"
    output = tmp_path / "mixed"
    streamrom.compress(tiny_models["llama"], output, CompressConfig(
        calibration=CalibrationConfig(token_file=tiny_tokens, sequences=6, seqlen=64), method="mixed",
        allocate="spectrum", target_params=0.7, spectra_file=spectra_file))
    with np.load(spectra_file) as found:
        assert found["model.layers.1.mlp.neurons"].shape == (160,)
        assert found["model.layers.1.self_attn.value_dims"].shape == (16,)
        assert "model.layers.1.mlp.down_proj" in found.files  # the factored alternative is priced too
    report = read_json(output / "streamrom-report.json")
    assert report["parameters_after"] <= 0.7 * report["parameters_before"]
    plan = report["ranks"]
    for index in range(3):  # a unit narrowed or its linears factored, never both
        prefix = f"model.layers.{index}."
        if plan.get(prefix + "mlp.neurons"):
            assert not any(plan[prefix + name] for name in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    json.dumps(plan)


def test_mixed_plan_and_files_are_the_same_with_pass_one_bounds(smollm2_dir, tmp_path, monkeypatch):
    """Units shown by lower bounds to win at every price skip their factored forms' eigenvectors; the
    plan and the model files must be those the costs give (the real model: where units win is data)."""
    arguments = ["--quiet", "compress", str(smollm2_dir), "OUT", "--layers", "20,29",
                 "--calib-sequences", "4", "--calib-seqlen", "128", "--method", "mixed", "--allocate", "spectrum",
                 "--ratio", "0.6", "--spectra", "SPECTRA"]

    def run(name: str) -> dict[str, bytes]:
        from streamrom.cli import main
        folder = tmp_path / name
        assert main([str(folder) if a == "OUT" else str(tmp_path / f"{name}.npz") if a == "SPECTRA" else a
                     for a in arguments]) == 0
        return {path.name: path.read_bytes() for path in sorted(folder.glob("*.safetensors"))}

    bounded = run("bounded")
    with np.load(tmp_path / "bounded.npz") as found:
        assert any(key.startswith("unit-always.") for key in found.files)  # the bounds decided some unit here
    monkeypatch.setattr(allocation, "unit_dominates", lambda *args, **kwargs: False)
    assert run("costs") == bounded
    with np.load(tmp_path / "costs.npz") as found:
        assert not any(key.startswith("unit-always.") for key in found.files)


@pytest.mark.pipeline
@pytest.mark.parametrize("method", ["structured", "mixed"])
def test_bayes_searches_structured_units_and_meets_the_size(tiny_models, tiny_tokens, tmp_path, method):
    """bayes over unit widths (and, mixed, the factored alternatives the spectrum plan left out): its
    first trial is the spectrum plan, the others differ from it, and the chosen plan meets the size."""
    from streamrom.linalg.bayes import BayesConfig

    calibration = CalibrationConfig(token_file=tiny_tokens, sequences=6, seqlen=64)
    report = streamrom.compress(tiny_models["llama"], tmp_path / "bayes", CompressConfig(
        calibration=calibration, method=method, allocate="bayes", target_params=0.7,
        bayes=BayesConfig(trials=3, held_out_windows=2)))
    spectrum = streamrom.compress(tiny_models["llama"], tmp_path / "spectrum", CompressConfig(
        calibration=calibration, method=method, allocate="spectrum", target_params=0.7))
    scores = [trial["score"] for trial in report.settings["bayes"]["scores"]]
    assert len(scores) == 3 and len(set(scores)) > 1  # the other trials tried other widths
    assert abs(report.parameter_ratio - 0.7) < 0.03 and abs(spectrum.parameter_ratio - 0.7) < 0.03
    widths = {key: rank for key, rank in report.ranks.items() if key.endswith(("mlp.neurons", "value_dims"))}
    assert any(widths.values())  # units narrowed by the chosen plan
    if scores[0] == min(scores):
        assert report.ranks == spectrum.ranks


@pytest.mark.pipeline
def test_inspect_shows_each_blocks_widths(tiny_models, tiny_tokens, tmp_path):
    from streamrom.report.summary import checkpoint_summary, format_summary

    output = tmp_path / "out"
    streamrom.compress(tiny_models["llama"], output, _config(tiny_tokens, ratio=0.6, layers="1"))
    summary = checkpoint_summary(output)
    assert [block["mlp_width"] for block in summary["blocks"]] == [160, 96, 160]
    assert [block["value_head_dim"] for block in summary["blocks"]] == [16, 8, 16]
    assert summary["parameter_ratio"] == pytest.approx(
        read_json(output / "streamrom-report.json")["parameter_ratio"])
    table = format_summary(summary).splitlines()
    assert table[1].split()[-5:] == ["mlp", "v/head", "qk/head", "params", "MiB"]
    assert table[3].split()[8:11] == ["96", "8", "16"]


@torch.no_grad()
def test_load_keeps_the_stored_dtype(tmp_path):
    """A bf16 checkpoint loads as bf16 (one copy of each tensor), float32 on request; both agree."""
    from conftest import make_tiny

    folder = make_tiny(tmp_path / "bf16", "llama", dtype=torch.bfloat16)
    model = streamrom.load(folder)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    wide = streamrom.load(folder, dtype=torch.float32)
    assert {p.dtype for p in wide.parameters()} == {torch.float32}
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(0))
    logits, reference = model(ids), wide(ids)
    assert logits.dtype == torch.float32
    assert (logits.argmax(-1) == reference.argmax(-1)).float().mean() > 0.9
    torch.testing.assert_close(logits, reference, atol=0.1, rtol=0.05)


def test_in_place_removal_equals_the_compacting_one(monkeypatch):
    """The wide path (H and W updated in place, full size) removes the same features at the same costs."""
    features = RNG.standard_normal((3000, 96)) @ RNG.standard_normal((96, 96))
    moment, weight = moment_of(features).astype(np.float32), RNG.standard_normal((20, 96)).astype(np.float32)
    compacted = structured.obs_removal(moment, weight, 24, 1e-2)
    monkeypatch.setattr(structured, "IN_PLACE_FROM", 10)
    in_place = structured.obs_removal(moment, weight, 24, 1e-2)
    assert in_place.order.tolist() == compacted.order.tolist()
    np.testing.assert_allclose(in_place.costs[24:], compacted.costs[24:], rtol=1e-3)


def test_wide_refit_equals_the_narrow_one(monkeypatch):
    features = RNG.standard_normal((2000, 64)) @ RNG.standard_normal((64, 64))
    moment, weight = moment_of(features).astype(np.float32), RNG.standard_normal((12, 64)).astype(np.float32)
    kept = np.sort(RNG.choice(64, 40, replace=False))
    narrow = structured.refit_columns(weight, moment, kept, 1e-6)
    monkeypatch.setattr(structured, "IN_PLACE_FROM", 10)
    wide = structured.refit_columns(weight, moment, kept, 1e-6)
    np.testing.assert_allclose(wide, narrow, rtol=1e-3, atol=1e-4)
    # C[S,S] built in the moment's own buffer: the same refit, bit for bit, and the moment spent
    spent = moment.copy()
    np.testing.assert_array_equal(structured.refit_columns(weight, spent, kept, 1e-6, overwrite_moment=True), wide)
    assert not np.array_equal(spent, moment)
    with pytest.raises(ValueError, match="ascending"):
        structured.refit_columns(weight, moment.copy(), kept[::-1].copy(), 1e-6, overwrite_moment=True)


@pytest.mark.parametrize("damping", [1e-2, 1e-9])
def test_least_squares_in_the_grams_own_buffer_equals_the_copying_one(damping):
    """Bit for bit, also where the first attempts fail (an indefinite gram: the damping grows until
    it is positive) and the failed factorisation must be undone from the untouched triangle."""
    from streamrom.linalg.decompose import least_squares, least_squares_in_place

    basis = np.linalg.qr(RNG.standard_normal((600, 600)))[0]  # two bands of _mirror_lower
    spectrum = np.linspace(1.0, 2.0, 600)
    spectrum[-3:] = -1e-4  # three small negative eigenvalues: the undamped gram is not positive
    gram = ((basis * spectrum) @ basis.T).astype(np.float32)
    gram = (gram + gram.T) / 2  # symmetric to the bit, as a moment is
    cross = RNG.standard_normal((600, 7)).astype(np.float32)
    copied = least_squares(lambda: gram.copy(order="F"), np.asfortranarray(cross), damping)
    own = gram.copy(order="F")
    np.testing.assert_array_equal(least_squares_in_place(own, np.asfortranarray(cross), damping), copied)
    with pytest.raises(ValueError, match="F-ordered"):
        least_squares_in_place(np.ascontiguousarray(gram), cross, damping)


@torch.no_grad()
def test_a_parked_moment_gives_the_same_narrowing_and_comes_back_whole(tiny_models, tmp_path, monkeypatch):
    """Wide moments (in place path) wait on disk while their buffer holds the inverse: the same
    neurons are kept and the refit agrees (the moment comes back whole for it, then is spent)."""
    monkeypatch.setattr(structured, "IN_PLACE_FROM", 10)
    spec, block, x, cos, sin = _block_and_inputs(tiny_models)
    twin = Block.from_tensors(spec, {k: v.clone() for k, v in block.state_dict().items()}, 0)
    values = streamrom.model.modeling.BlockValues(block, cos, sin, {"x": lambda: x})
    narrow_mlp(twin, 96, _moment(values["mlp"]), "obs", 1e-6)
    narrow_mlp(block, 96, _moment(values["mlp"]), "obs", 1e-6, scratch=tmp_path)
    assert list(tmp_path.iterdir()) == []  # the parked copy is gone
    torch.testing.assert_close(block.mlp.gate_proj.weight, twin.mlp.gate_proj.weight)  # the same neurons
    torch.testing.assert_close(block.mlp.down_proj.weight, twin.mlp.down_proj.weight, atol=1e-5, rtol=1e-4)


@torch.no_grad()
def test_a_parked_anchor_gives_the_same_anchored_refit_and_is_spent(tiny_models, tmp_path, monkeypatch):
    """The anchored refit's cross moment waits on disk beside the parked moment (wide path) and comes
    back whole: the same refit as without parking; either way the fit takes the anchor's cross."""
    from streamrom.linalg.decompose import Anchor

    monkeypatch.setattr(structured, "IN_PLACE_FROM", 10)
    spec, block, x, cos, sin = _block_and_inputs(tiny_models)
    twin, plain = (Block.from_tensors(spec, {k: v.clone() for k, v in block.state_dict().items()}, 0)
                   for _ in range(2))
    values = streamrom.model.modeling.BlockValues(block, cos, sin, {"x": lambda: x})
    neurons = values["mlp"].reshape(-1, values["mlp"].shape[-1]).double().numpy()
    target = RNG.standard_normal((neurons.shape[0], spec.hidden_size)) + neurons @ RNG.standard_normal(
        (neurons.shape[1], spec.hidden_size)) * 0.1
    cross = target.T @ neurons / len(neurons)
    anchors = [Anchor(cross.copy(), target.mean(axis=0), 0.7) for _ in range(2)]
    narrow_mlp(twin, 96, _moment(values["mlp"]), "obs", 1e-6, anchor=anchors[0])
    narrow_mlp(block, 96, _moment(values["mlp"]), "obs", 1e-6, scratch=tmp_path, anchor=anchors[1])
    assert anchors[0].cross is None and anchors[1].cross is None  # taken by the refit
    assert list(tmp_path.iterdir()) == []
    torch.testing.assert_close(block.mlp.gate_proj.weight, twin.mlp.gate_proj.weight)
    torch.testing.assert_close(block.mlp.down_proj.weight, twin.mlp.down_proj.weight, atol=1e-5, rtol=1e-4)
    narrow_mlp(plain, 96, _moment(values["mlp"]), "obs", 1e-6)  # the anchor moved the refit
    assert (plain.mlp.down_proj.weight - twin.mlp.down_proj.weight).abs().max() > 1e-2


def _kept_rows(source: np.ndarray, output: Path, index: int) -> np.ndarray:
    """Which of the source's gate rows block `index` of `output` kept (each found by exact equality)."""
    from safetensors.numpy import load_file

    found = {}
    for shard in sorted(output.glob("model-*.safetensors")):
        found.update(load_file(shard))
    gate = found[f"model.layers.{index}.mlp.gate_proj.weight"]
    return np.array([int(np.flatnonzero((source == row).all(axis=1))[0]) for row in gate])


@pytest.mark.pipeline
def test_pass1_selection_keeps_pass_ones_order_and_obs_chooses_again(tiny_models, tiny_tokens, tmp_path):
    """--neuron-selection pass1 keeps each MLP's first `width` neurons of the order pass 1 saved; obs
    (reusing the same pass 1) removes again on the compressed inputs, and keeps other neurons."""
    from safetensors.numpy import load_file

    spectra_file = tmp_path / "pass1.npz"
    runs = {}
    for selection in ("pass1", "obs"):
        runs[selection] = streamrom.compress(tiny_models["llama"], tmp_path / selection, _config(
            tiny_tokens, allocate="spectrum", target_params=0.7, spectra_file=spectra_file,
            neuron_selection=selection))
    assert runs["pass1"].ranks == runs["obs"].ranks  # one pass 1, one plan
    source = load_file(next(tiny_models["llama"].glob("*.safetensors")))
    differs = False
    with np.load(spectra_file) as found:
        for index in range(3):
            width = runs["pass1"].ranks.get(f"model.layers.{index}.mlp.neurons")
            order = found[f"keep-order.model.layers.{index}.mlp.neurons"]
            assert np.array_equal(np.sort(order), np.arange(160))
            if not width:
                continue
            gate = source[f"model.layers.{index}.mlp.gate_proj.weight"]
            kept = _kept_rows(gate, tmp_path / "pass1", index)
            assert np.array_equal(kept, np.sort(order[:width]))
            differs |= not np.array_equal(_kept_rows(gate, tmp_path / "obs", index), kept)
    assert differs


@pytest.mark.pipeline
def test_pass1_selection_refuses_what_has_no_pass_one_and_damaged_orders(tiny_models, tiny_tokens, tmp_path):
    from streamrom.errors import OutputError, UsageError
    from streamrom.compression.planning import checked_orders
    from streamrom.model.architectures import ModelSpec

    for settings in ({"allocate": "uniform", "target_params": 0.7}, {"ranks": {"model.layers.0.mlp.neurons": 96}}):
        with pytest.raises(UsageError, match="pass1"):
            _config(tiny_tokens, neuron_selection="pass1", **settings)
    spec = ModelSpec.from_config(read_json(tiny_models["llama"] / "config.json"))
    order = np.arange(160)[::-1]
    assert np.array_equal(checked_orders(spec, {"model.layers.2.mlp.neurons": order}, "x")["model.layers.2.mlp.neurons"],
                          order)
    for key, bad in (("model.layers.3.mlp.neurons", order), ("model.layers.0.mlp.down_proj", order),
                     ("model.layers.0.mlp.neurons", order[:-1]), ("model.layers.0.mlp.neurons", np.zeros(160, int)),
                     ("model.layers.0.mlp.neurons", order.astype(float))):
        with pytest.raises(OutputError, match="recorded"):
            checked_orders(spec, {key: bad}, "the recorded keep orders", OutputError)
    # a first pass saved without its orders (or with one damaged) is refused before any block is written
    spectra_file = tmp_path / "pass1.npz"
    streamrom.compress(tiny_models["llama"], tmp_path / "obs", _config(
        tiny_tokens, allocate="spectrum", target_params=0.7, spectra_file=spectra_file))
    with np.load(spectra_file) as found:
        saved = {key: found[key] for key in found.files}
    for damage in ("drop", "repeat"):
        edited = dict(saved)
        if damage == "drop":
            edited = {key: value for key, value in edited.items() if not key.startswith("keep-order.")}
        else:
            edited["keep-order.model.layers.1.mlp.neurons"] = np.zeros(160, dtype=np.int64)
        np.savez(spectra_file, **edited)
        with pytest.raises(UsageError, match="has no keep order" if damage == "drop" else "not an ordering"):
            streamrom.compress(tiny_models["llama"], tmp_path / damage, _config(
                tiny_tokens, allocate="spectrum", target_params=0.7, spectra_file=spectra_file,
                neuron_selection="pass1"))
        assert not list((tmp_path / damage).glob("model-*.safetensors"))


@pytest.mark.pipeline
def test_pass1_tokens_prices_on_sequences_spread_over_the_set(tiny_models, tmp_path):
    """--pass1-tokens: pass 1 on whole sequences spread over the calibration set. Its saved pass 1 is, bit
    for bit, the pass 1 of a run calibrated on those sequences alone; pass 2 still fits on all of them."""
    from streamrom.stream.calibration import spread_sequences

    rows = np.random.default_rng(1).integers(0, 256, size=(6, 64))
    assert np.array_equal(spread_sequences(rows, 2 * 64 + 5), rows[[0, 5]])
    assert np.array_equal(spread_sequences(rows, 3 * 64), rows[[0, 2, 5]])  # 0, 2.5, 5 rounded to even
    assert np.array_equal(spread_sequences(rows, 10), rows[[0]])
    assert spread_sequences(rows, None) is rows and spread_sequences(rows, 10 ** 6) is rows
    files = {"all": tmp_path / "all.npy", "spread": tmp_path / "spread.npy"}
    np.save(files["all"], rows)
    np.save(files["spread"], rows[[0, 5]])
    runs = {}
    for name, token_file, sequences, pass1_tokens in (("subset", "all", 6, 128), ("alone", "spread", 2, None),
                                                       ("full", "all", 6, None)):
        runs[name] = streamrom.compress(tiny_models["llama"], tmp_path / name, CompressConfig(
            calibration=CalibrationConfig(token_file=files[token_file], sequences=sequences, seqlen=64),
            method="mixed", allocate="spectrum", target_params=0.7, neuron_selection="pass1",
            pass1_tokens=pass1_tokens, spectra_file=tmp_path / f"{name}.npz"))
    with np.load(tmp_path / "subset.npz") as subset, np.load(tmp_path / "alone.npz") as alone:
        assert sorted(subset.files) == sorted(alone.files)
        for key in subset.files:
            assert np.array_equal(subset[key], alone[key]), key
    with np.load(tmp_path / "subset.npz") as subset, np.load(tmp_path / "full.npz") as full:
        assert any(not np.array_equal(subset[key], full[key]) for key in subset.files)
    assert runs["subset"].settings["pass1_tokens"] == 128 and "pass1_tokens" not in runs["full"].settings
    with pytest.raises(UsageError, match="pass1-tokens"):
        CompressConfig(allocate="uniform", pass1_tokens=128)


def test_the_in_place_inverse_is_scipys_cholesky_inverse_in_the_lower_triangle():
    """Bit for bit scipy.linalg.inv's result (which takes the Cholesky path for an exactly symmetric
    positive definite matrix) where the removal reads it, in the matrix's own buffer; a matrix that
    is not positive definite is one NumericalError."""
    features = RNG.standard_normal((500, 64)).astype(np.float32)
    moment = features.T @ features / 500
    moment = np.tril(moment) + np.tril(moment, -1).T  # exactly symmetric, as the statistics hand it over
    moment[np.diag_indices(64)] += 0.01
    expected = scipy.linalg.inv(moment)
    buffer = moment.copy()
    inverse = structured._lower_inverse_in_place(buffer)
    assert np.shares_memory(inverse, buffer)
    assert np.array_equal(np.tril(inverse), np.tril(expected))
    np.testing.assert_allclose(np.tril(inverse), np.tril(np.linalg.inv(moment.astype(np.float64))), rtol=1e-3,
                               atol=1e-4)
    broken = moment.copy()
    broken[5, 5] = -1.0
    with pytest.raises(NumericalError):
        structured._lower_inverse_in_place(broken)
