"""Our plain-torch block and model against transformers' (a test-only dependency)."""
from __future__ import annotations


import pytest
import torch

import streamrom
from streamrom.storage.checkpoint import CheckpointReader
from streamrom.errors import InputError
from streamrom.model.modeling import Block, ModelSpec, Rotary

from conftest import EVAL_TEXT


def hf_model(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def eval_ids(folder, count: int, length: int) -> torch.Tensor:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    ids = tokenizer.encode(EVAL_TEXT.read_text()[:20000], add_special_tokens=False).ids
    return torch.tensor(ids[:count * length]).view(count, length)


@torch.no_grad()
def test_block_matches_transformers_on_the_real_model(smollm2_dir):
    model = hf_model(smollm2_dir)
    captured = {}
    layers = model.model.layers
    hooks = [layer.register_forward_hook(
        lambda mod, args, kwargs, out, i=i: captured.__setitem__(i, (args[0] if args else kwargs["hidden_states"], out)),
        with_kwargs=True) for i, layer in enumerate(layers)]
    ids = eval_ids(smollm2_dir, 2, 128)
    model(ids)
    for hook in hooks:
        hook.remove()
    reader = CheckpointReader(smollm2_dir)
    cos, sin = Rotary(reader.spec).cos_sin(ids.shape[1])
    for index in (0, 1, 14, 29):
        block = Block.from_tensors(reader.spec, reader.block_tensors(index))
        hidden_in, hidden_out = captured[index]
        hidden_out = hidden_out[0] if isinstance(hidden_out, tuple) else hidden_out
        diff = (block(hidden_in, cos, sin) - hidden_out).abs().max().item()
        assert diff <= 1e-4, f"block {index}: max abs diff {diff}"


@torch.no_grad()
def test_loaded_dense_model_matches_transformers_logits(smollm2_dir):
    ids = eval_ids(smollm2_dir, 1, 64)
    expected = hf_model(smollm2_dir)(ids).logits
    got = streamrom.load(smollm2_dir)(ids)
    assert (got - expected).abs().max().item() <= 1e-3


def test_spec_reads_both_rope_config_styles():
    base = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, vocab_size=100)
    old = ModelSpec.from_config({**base, "rope_theta": 5e5, "rope_scaling": {
        "type": "linear", "factor": 2.0}})
    new = ModelSpec.from_config({**base, "rope_parameters": {"rope_theta": 5e5, "rope_type": "linear",
                                                              "factor": 2.0}})
    assert old.rope_theta == new.rope_theta == 5e5
    assert old.rope_scaling["rope_type"] == new.rope_scaling["rope_type"] == "linear"
    assert ModelSpec.from_config(base).num_kv_heads == 4


def test_unsupported_model_type_lists_the_supported_ones():
    with pytest.raises(InputError, match="llama, mistral, qwen2"):
        ModelSpec.from_config({"model_type": "gpt2"})
    with pytest.raises(InputError, match="yarn"):
        ModelSpec.from_config(dict(model_type="llama", hidden_size=8, intermediate_size=8,
                                   num_hidden_layers=1, num_attention_heads=2, vocab_size=8,
                                   rope_scaling={"rope_type": "yarn", "factor": 4.0}))


def test_sharded_and_single_file_readers_agree(smollm2_dir, smollm2_sharded):
    single, sharded = CheckpointReader(smollm2_dir), CheckpointReader(smollm2_sharded)
    assert len(set(sharded.weight_map.values())) > 5
    straddling = [i for i in range(sharded.spec.num_layers)
                  if len({sharded.weight_map[n] for n in sharded.block_names(i)}) > 1]
    assert straddling, "expected at least one block split across two shards"
    for index in straddling[:2] + [0]:
        a, b = single.block_tensors(index), sharded.block_tensors(index)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key])
