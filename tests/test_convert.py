"""GGUF import (`streamrom import-gguf`): streamed tensor by tensor with the gguf package, checked against
transformers' own GGUF loader on the real model."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from streamrom.cli import main
from streamrom.gguf.importer import GGUFModel, import_gguf, to_output_dtype, unpermute_rotary

from helpers import llama_cpp_permute, write_tiny_gguf
from conftest import EVAL_TEXT, smollm2_gguf


@pytest.mark.parametrize("heads, shape", [(4, (32, 6)), (3, (24,)), (1, (8, 2))])
def test_unpermute_rotary_inverts_llama_cpp_permutation(heads, shape):
    weight = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    permuted = llama_cpp_permute(weight, heads)
    assert not np.array_equal(permuted, weight)
    np.testing.assert_array_equal(unpermute_rotary(permuted, heads), weight)


def test_bfloat16_bytes_match_torch_rounding():
    values = np.concatenate([np.random.default_rng(0).standard_normal(1000).astype(np.float32) * 100,
                             np.array([0.0, -0.0, np.inf, -np.inf, 1 + 2 ** -8, 1 + 3 * 2 ** -8], np.float32)])
    ours = np.frombuffer(to_output_dtype(values, "bfloat16"), dtype=np.uint16)
    theirs = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(ours, theirs)
    assert np.isnan(torch.from_numpy(np.frombuffer(to_output_dtype(np.array([np.nan], np.float32), "bfloat16"),
                                                   dtype=np.int16).copy()).view(torch.bfloat16).float().numpy()).all()


@pytest.fixture(scope="module")
def transformers_gguf():
    """transformers' own GGUF loading of the real model: the reference."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    folder, name = str(gguf.parent), gguf.name
    state = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).state_dict()
    return state, AutoConfig.from_pretrained(folder, gguf_file=name), AutoTokenizer.from_pretrained(folder, gguf_file=name)


def test_import_gguf_matches_transformers_loader(smollm2_dir, transformers_gguf):
    state, config, tokenizer = transformers_gguf
    ours = load_file(str(smollm2_dir / "model.safetensors"))
    # transformers materialises the tied lm_head; the GGUF (and our folder) leave it to the embedding
    assert set(state) - set(ours) == {"lm_head.weight"} and not set(ours) - set(state)
    assert torch.equal(state["lm_head.weight"], ours["model.embed_tokens.weight"])
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, state[name]), name  # same dequantisation, same q/k un-permutation

    written = json.loads((smollm2_dir / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "head_dim"):
        assert written[key] == getattr(config, key), key
    assert written["rms_norm_eps"] == pytest.approx(config.rms_norm_eps)
    assert written["rope_theta"] == config.rope_parameters["rope_theta"]

    # Same ids on the evaluation text; digits are split one by one as llama.cpp's "smollm" rule does
    # (transformers' GGUF converter does not split them, but this vocabulary has no multi-digit tokens).
    from tokenizers import Tokenizer

    text = EVAL_TEXT.read_text(encoding="utf-8")
    built = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    assert built.encode(text, add_special_tokens=False).ids == tokenizer(text, add_special_tokens=False)["input_ids"]
    assert built.encode("in 1813", add_special_tokens=False).tokens[-4:] == ["1", "8", "1", "3"]
    assert built.encode("<|im_start|>user", add_special_tokens=False).ids[0] == written["bos_token_id"]
    settings = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
    assert settings["eos_token"] == "<|im_end|>" and "chat_template" in settings


def test_row_chunks_hold_whole_heads_and_join_to_the_tensor():
    model = GGUFModel(smollm2_gguf())
    query = next(t for t in model.tensors if t.hf_name == "model.layers.3.self_attn.q_proj.weight")
    handle = os.open(model.path, os.O_RDONLY)
    try:
        chunks = list(model.row_chunks(query, handle, max_bytes=3 * 64 * 576 * 4))
    finally:
        os.close(handle)
    assert [len(c) for c in chunks] == [192, 192, 192]  # 3 heads of 64 rows each
    np.testing.assert_array_equal(np.concatenate(chunks), model.dequantized(query))


@pytest.mark.pipeline
def test_bfloat16_import_and_output_folder_only_when_complete(tmp_path):
    out = tmp_path / "bf16"
    import_gguf(str(smollm2_gguf()), out, dtype="bfloat16", shard_bytes=100 * 10 ** 6)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) == 3 and not list(tmp_path.glob(".*tmp"))
    tensors = {}
    for shard in shards:
        tensors.update(load_file(str(out / shard)))
    assert len(tensors) == 272 and all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"


@pytest.mark.pipeline
def test_bad_gguf_inputs_fail_cleanly(tmp_path, capsys):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"not a gguf file at all")
    assert main(["import-gguf", str(not_gguf), str(tmp_path / "a")]) != 0
    assert re.match(r"streamrom: error: cannot read .* as GGUF", capsys.readouterr().err)
    assert not (tmp_path / "a").exists()

    truncated = tmp_path / "truncated.gguf"
    data = smollm2_gguf().read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    assert main(["import-gguf", str(truncated), str(tmp_path / "b")]) != 0
    err = capsys.readouterr().err
    assert err.startswith("streamrom: error:") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "b").exists()

    assert main(["import-gguf", "no_such_package_here", str(tmp_path / "c")]) != 0
    assert "neither a .gguf file nor an installed package" in capsys.readouterr().err


@pytest.mark.pipeline
@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_import_gguf_round_trips_llama_and_qwen2(tmp_path, model_type):
    """A GGUF laid out as llama.cpp's converter does comes back as the original HF tensors (exactly;
    F16 ones as their float16 rounding), with a config streamrom and transformers both accept."""
    import streamrom
    from transformers import AutoModelForCausalLM

    state = write_tiny_gguf(tmp_path / "tiny.gguf", model_type)
    out = import_gguf(str(tmp_path / "tiny.gguf"), tmp_path / "hf")
    ours = load_file(str(out / "model.safetensors"))
    expected = {k: v for k, v in state.items() if not (k == "lm_head.weight" and model_type == "qwen2")}
    assert set(ours) == set(expected)
    for key, value in expected.items():
        if model_type == "qwen2" and value.ndim == 2:
            value = value.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(ours[key].numpy(), value, err_msg=key)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == model_type and config["tie_word_embeddings"] == (model_type == "qwen2")
    ids = torch.tensor([[257, 10, 200, 3, 256, 99]])
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(streamrom.load(out)(ids), hf(ids).logits, rtol=1e-4, atol=1e-4)
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tokenizer.encode("<s> at", add_special_tokens=False).tokens == ["<s>", "Ġ", "a", "t"]
    assert tokenizer.encode(" t", add_special_tokens=False).tokens == ["Ġt"]
    assert tokenizer.decode(tokenizer.encode("héllo wörld").ids) == "héllo wörld"
