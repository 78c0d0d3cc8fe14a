"""Loads a streamrom-compressed checkpoint in Hugging Face transformers.

Written into every compressed checkpoint by streamrom and
named by `auto_map` in its config.json, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

builds the architecture of `model_type` (llama, mistral, qwen2, gemma3_text) and replaces each compressed
linear, before the weights are loaded, by two linears `reduce` (rank x in, V^T W) and `expand`
(out x rank, V), with the ranks of config.json's "streamrom" section. Only torch and transformers
are needed; streamrom itself is not.
"""
from __future__ import annotations

from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

try:  # transformers 4.50 and later
    from transformers import Gemma3ForCausalLM
except ImportError:  # older ones load the other architectures still
    Gemma3ForCausalLM = None


class LowRankLinear(nn.Module):
    """y = expand(reduce(x)): a rank-r stand-in for an out x in linear."""

    def __init__(self, in_features: int, out_features: int, rank: int, reduce_bias: bool, expand_bias: bool):
        super().__init__()
        self.reduce = nn.Linear(in_features, rank, bias=reduce_bias)
        self.expand = nn.Linear(rank, out_features, bias=expand_bias)

    def forward(self, x):
        return self.expand(self.reduce(x))


def install_low_rank(model: nn.Module, config) -> None:
    """Swap every linear named in config.streamrom["ranks"] (with a rank) for a LowRankLinear."""
    section = getattr(config, "streamrom", None) or {}
    centered = section.get("method") == "rom-centered"
    for name, rank in section.get("ranks", {}).items():
        if not rank:
            continue
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        dense = getattr(parent, child_name)
        setattr(parent, child_name, LowRankLinear(dense.in_features, dense.out_features, int(rank),
                                                  dense.bias is not None, centered))


class StreamromLlamaForCausalLM(LlamaForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        install_low_rank(self, config)


class StreamromMistralForCausalLM(MistralForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        install_low_rank(self, config)


class StreamromQwen2ForCausalLM(Qwen2ForCausalLM):
    def __init__(self, config):
        super().__init__(config)
        install_low_rank(self, config)


if Gemma3ForCausalLM is not None:
    class StreamromGemma3ForCausalLM(Gemma3ForCausalLM):
        def __init__(self, config):
            super().__init__(config)
            install_low_rank(self, config)
