"""Sandwich norms (Block.OUTPUT_NORMS, issue 31): a linear whose output is normalised before the residual
add (Gemma 3's o_proj and down_proj) is fitted by a least squares that weights each token by how much
the norm scales its error, 1 / (RMS² + eps). Tiny random-weight models: the weighting's wiring and its
first-order meaning, not accuracy."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from streamrom import CalibrationConfig, CompressConfig, compress
from streamrom.compression import statistics
from streamrom.model.modeling import BlockValues, block_class
from streamrom.storage.checkpoint import CheckpointReader

from conftest import make_tiny


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("normed")
    return {kind: make_tiny(root / kind, kind) for kind in ("gemma3_text", "llama")}


def test_the_weight_is_how_much_the_norm_scales_a_tokens_error(tiny_models):
    """For a small error δ of the linear's output y, orthogonal to y (the norm's radial part moves
    nothing then, to first order), the normed output moves by G δ / sqrt(RMS² + eps): the weight is
    the square of that scale, token by token."""
    reader = CheckpointReader(tiny_models["gemma3_text"])
    spec = reader.spec
    block = block_class(spec).from_tensors(spec, reader.block_tensors(0), 0, dtype=torch.float64)
    torch.manual_seed(0)
    x = torch.randn(2, 7, spec.hidden_size, dtype=torch.float64)
    cos, sin = torch.ones(7, spec.head_dim, dtype=torch.float64), torch.zeros(7, spec.head_dim, dtype=torch.float64)
    values = BlockValues(block, cos, sin, {"x": lambda: x})
    for name, norm in (("self_attn.o_proj", block.post_attention_layernorm),
                       ("mlp.down_proj", block.post_feedforward_layernorm)):
        weights = block.output_norm_weights(name, values)
        y = block.linear(name)(values[block.OUTPUT_NORMS[name]])
        delta = torch.randn_like(y)
        delta -= (delta * y).sum(-1, keepdim=True) / (y * y).sum(-1, keepdim=True) * y  # orthogonal to y
        delta *= 1e-3 * y.norm(dim=-1, keepdim=True) / delta.norm(dim=-1, keepdim=True)
        moved = norm(y + delta) - norm(y)
        gain = (norm.offset + norm.weight) if norm.offset else norm.weight
        scale = moved.norm(dim=-1) / (gain * delta).norm(dim=-1)
        np.testing.assert_allclose(scale.pow(2).numpy(), weights.numpy(), rtol=1e-3)


@pytest.mark.parametrize("model_type", ["gemma3_text", "llama"])
def test_only_the_normed_linears_moments_are_weighted(tiny_models, tiny_tokens, tmp_path, monkeypatch, model_type):
    """The mixed method on a tiny model: the groups and units whose consumer is a normed linear (o_proj
    with the value dimensions, down_proj with the neurons) gather weighted moments, the others plain
    ones; a family without sandwich norms (llama) never weights."""
    seen = []
    add = statistics.GroupStatistics.add

    def recording(self, features, start, weights=None):
        seen.append((features.shape[-1], weights is not None))
        if weights is not None:
            assert weights.shape == features.shape[:-1] and bool((weights > 0).all())
        return add(self, features, start, weights)

    monkeypatch.setattr(statistics.GroupStatistics, "add", recording)
    from streamrom.compression.methods import Method

    gains, compress_unit = {}, Method.compress_unit

    def recording_unit(self, block, unit, *args):
        gains[unit.name] = args[-1]
        return compress_unit(self, block, unit, *args)

    monkeypatch.setattr(Method, "compress_unit", recording_unit)
    source = tiny_models[model_type]
    spec = CheckpointReader(source).spec
    compress(source, tmp_path / "out", CompressConfig(
        method="mixed", ratio=0.5, calibration=CalibrationConfig(token_file=tiny_tokens, sequences=8, seqlen=64)))
    weighted = {width for width, given in seen if given}
    plain = {width for width, given in seen if not given}
    assert set(gains) == {"self_attn.value_dims", "mlp.neurons"} or model_type == "llama"
    if model_type == "llama":
        assert not weighted and plain
        assert all(gain is None for gain in gains.values())
    else:  # o_proj and the value dims read the attention (heads x head_dim); down and the neurons the MLP
        assert weighted == {spec.num_heads * spec.head_dim, spec.intermediate_size}
        assert spec.hidden_size in plain  # q/k/v and gate/up read the (normed) residual stream
        last = spec.num_layers - 1  # the gains recorded last
        block = block_class(spec).from_tensors(spec, CheckpointReader(source).block_tensors(last), last)
        np.testing.assert_array_equal(gains["mlp.neurons"], block.output_gain("mlp.down_proj"))


def test_the_neurons_kept_are_those_whose_error_the_norm_scales_most(tiny_models):
    """Known answer: half the neurons write only to channel 0, the other half (twice as strongly) only
    to channel 1, all uncorrelated and of equal energy. Unweighted, the second half is kept; with the
    post-norm scaling channel 0 a thousand times more, the first half is; down is refitted either way."""
    from streamrom.compression.methods import narrow_mlp
    from streamrom.linalg.decompose import InputMoments

    reader = CheckpointReader(tiny_models["gemma3_text"])
    spec = reader.spec
    n = spec.intermediate_size
    moments = InputMoments(np.eye(n), np.zeros(n))
    gain = np.ones(spec.hidden_size)
    gain[0] = 1000.0
    for given, kept in ((None, slice(n // 2, n)), (gain, slice(0, n // 2))):
        block = block_class(spec).from_tensors(spec, reader.block_tensors(0), 0, dtype=torch.float64)
        gate = block.mlp.gate_proj.weight.clone()
        down = torch.zeros(spec.hidden_size, n, dtype=torch.float64)
        down[0, : n // 2], down[1, n // 2:] = 1.0, 2.0
        block.mlp.down_proj.weight.data = down
        narrow_mlp(block, n // 2, moments, "obs", 0.0, gain=given)
        torch.testing.assert_close(block.mlp.gate_proj.weight.double(), gate[kept], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(block.mlp.down_proj.weight.double(), down[:, kept], rtol=1e-6, atol=1e-6)  # exact refit
