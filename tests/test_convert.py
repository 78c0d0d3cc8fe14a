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

from conftest import EVAL_TEXT, smollm2_gguf


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's HF-to-GGUF converter does to q/k rows (written out from its description)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


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


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def write_tiny_gguf(path, model_type: str, block_count: int = 2, override: dict | None = None):
    """A GGUF written with the gguf package from a tiny random transformers model, the way llama.cpp's
    converter lays it out (q/k rows permuted for llama, F16 tensors for qwen2); returns the HF state.
    `block_count` and `override` (metadata key -> any value, its GGUF type taken from the value) write a
    file that says something else than its tensors, as a hostile or broken converter could."""
    import gguf
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    sizes = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=258, max_position_embeddings=128, rms_norm_eps=1e-5)
    config = (LlamaConfig(**sizes, tie_word_embeddings=False, rope_theta=5e4) if model_type == "llama"
              else Qwen2Config(**sizes, tie_word_embeddings=True, rope_theta=5e4))
    torch.manual_seed(0)
    state = {k: v.detach().float().numpy() for k, v in AutoModelForCausalLM.from_config(config).state_dict().items()}
    for key in [k for k in state if k.endswith(".bias")]:
        state[key] = np.random.default_rng(1).standard_normal(state[key].shape).astype(np.float32)
    writer = gguf.GGUFWriter(str(path), model_type)
    writer.add_block_count(block_count)
    writer.add_context_length(128)
    writer.add_embedding_length(64)
    writer.add_feed_forward_length(96)
    writer.add_head_count(4)
    writer.add_head_count_kv(2)
    writer.add_rope_freq_base(5e4)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([*byte_level_alphabet(), "Ġt", "<s>"])
    writer.add_token_types([1] * 257 + [3])
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(257)
    writer.add_eos_token_id(257)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    block_names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
                   "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                   "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for key, value in state.items():
        if key == "lm_head.weight" and config.tie_word_embeddings:
            continue
        if key.startswith("model.layers."):
            _, _, index, rest = key.split(".", 3)
            module, kind = rest.rsplit(".", 1)
            name = f"blk.{index}.{block_names[module]}.{kind}"
            if model_type == "llama" and module in ("self_attn.q_proj", "self_attn.k_proj"):
                value = llama_cpp_permute(value, 4 if "q_proj" in module else 2)
        else:
            name = names[key]
        writer.add_tensor(name, value.astype(np.float16) if model_type == "qwen2" and value.ndim == 2 else value)
    for key, value in (override or {}).items():
        writer.kv_data[0].pop(key, None)
        if isinstance(value, list) and not value:
            continue  # the gguf package writes no empty array: an empty list removes the key
        writer.add_key_value(key, value, _gguf_value_type(value),
                             _gguf_value_type(value[0]) if isinstance(value, list) else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return state


def _gguf_value_type(value):
    import gguf

    kinds = gguf.GGUFValueType
    if isinstance(value, bool):
        return kinds.BOOL
    if isinstance(value, int):
        return kinds.INT64 if value < 2**63 else kinds.UINT64
    if isinstance(value, float):
        return kinds.FLOAT32
    if isinstance(value, str):
        return kinds.STRING
    return kinds.ARRAY


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
