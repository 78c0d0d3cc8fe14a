"""Random-weight, bf16, sharded LLaMA checkpoints with the block shapes of Llama-2-7B or -13B.

For memory and time measurements only, never for accuracy. Written one tensor group at a time
(one shard per block), so making a 13B-shaped checkpoint needs no more RAM than one block.

    python -m benchmarks.scale.synthetic 7b --depth 4 --out .cache/synthetic/7b-4
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
               vocab_size=32000),
    "13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40, num_key_value_heads=40,
                vocab_size=32000),
}


def config_for(shape: str, depth: int) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **SHAPES[shape],
            "num_hidden_layers": depth, "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
            "max_position_embeddings": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def write_synthetic(shape: str, depth: int, folder: Path, seed: int = 0) -> Path:
    """Write (or reuse) the checkpoint; returns its folder."""
    folder = Path(folder)
    config = config_for(shape, depth)
    if (folder / "model.safetensors.index.json").is_file() and \
            json.loads((folder / "config.json").read_text()) == config:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = hidden // heads

    def weight(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) * 0.02).to(torch.bfloat16)

    total = depth + 2
    weight_map: dict[str, str] = {}

    def shard(number: int, tensors: dict[str, torch.Tensor]) -> None:
        name = f"model-{number:05d}-of-{total:05d}.safetensors"
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    shard(1, {"model.embed_tokens.weight": weight(vocab, hidden)})
    for index in range(depth):
        p = f"model.layers.{index}."
        shard(index + 2, {
            p + "self_attn.q_proj.weight": weight(heads * head_dim, hidden),
            p + "self_attn.k_proj.weight": weight(kv_heads * head_dim, hidden),
            p + "self_attn.v_proj.weight": weight(kv_heads * head_dim, hidden),
            p + "self_attn.o_proj.weight": weight(hidden, heads * head_dim),
            p + "mlp.gate_proj.weight": weight(inter, hidden),
            p + "mlp.up_proj.weight": weight(inter, hidden),
            p + "mlp.down_proj.weight": weight(hidden, inter),
            p + "input_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=torch.bfloat16),
        })
    shard(total, {"model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16), "lm_head.weight": weight(vocab, hidden)})
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    index = {"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder


def random_tokens(path: Path, count: int, vocab: int = 32000, seed: int = 0) -> Path:
    """A 1-D stream of random token ids for calibration (the checkpoint has no tokenizer)."""
    np.save(path, np.random.default_rng(seed).integers(0, vocab, size=count))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("--depth", type=int, default=2, help="number of decoder blocks")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    print(write_synthetic(args.shape, args.depth, args.out))


if __name__ == "__main__":
    main()
