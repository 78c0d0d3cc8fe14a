"""Helpers the test files share: running the command line, reading a model's files, tiny GGUFs and
tokenizers (fixtures live in conftest.py)."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch


MODEL_FILES = ("*.safetensors", "model.safetensors.index.json", "config.json")


def run(command, fault: str | None = None, preexec=None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("STREAMROM_FAULT", None)
    if fault:
        env["STREAMROM_FAULT"] = fault
    return subprocess.run(command, capture_output=True, text=True, env=env, preexec_fn=preexec, timeout=300)


def cli_command(source, output, tokens, *extra) -> list[str]:
    return [sys.executable, "-m", "streamrom.cli", "--quiet", "compress", str(source), str(output),
            "--method", "rom", "--calib-tokens", str(tokens), "--calib-sequences", "8", "--calib-seqlen", "64",
            "--chunk-tokens", "128", "--ratio", "0.5", *extra]


def model_files(folder: Path) -> dict[str, bytes]:
    files = {}
    for pattern in MODEL_FILES:
        for path in folder.glob(pattern):
            files[path.name] = path.read_bytes()
    return files


def default_sigint() -> None:
    """A test runner started in the background (nohup ... &) ignores SIGINT, and its children
    inherit that; a user's terminal does not. Give the child the terminal's default."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """What llama.cpp's HF-to-GGUF converter does to q/k rows (written out from its description)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def byte_level_tokenizer(folder: Path) -> None:
    """A 256-token byte-level BPE vocabulary (no merges) for the tiny models' vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={text: i for i, text in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.save(str(folder / "tokenizer.json"))


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
        writer.add_key_value(key, value, gguf_value_type(value),
                             gguf_value_type(value[0]) if isinstance(value, list) else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return state


def gguf_value_type(value):
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


def tiny_with_tokenizer(tmp_path: Path, hidden: int = 64) -> Path:
    """A tiny llama with a byte-level tokenizer; `hidden` 256 gives rows K-quants take whole."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from conftest import TINY_COMMON

    torch.manual_seed(0)
    sizes = {**TINY_COMMON, "hidden_size": hidden, "intermediate_size": 2 * hidden if hidden > 64 else 160}
    AutoModelForCausalLM.from_config(LlamaConfig(**sizes, tie_word_embeddings=False)).save_pretrained(tmp_path / "src")
    byte_level_tokenizer(tmp_path / "src")
    return tmp_path / "src"
