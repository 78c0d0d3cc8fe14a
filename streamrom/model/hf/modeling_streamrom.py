"""Loads a streamrom-compressed checkpoint in Hugging Face transformers.

Written into every compressed checkpoint by streamrom and
named by `auto_map` in its config.json, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

builds the architecture of `model_type` (any transformers XForCausalLM) and replaces each compressed
linear, before the weights are loaded, by two linears `reduce` (rank x in, V^T W) and `expand`
(out x rank, V), with the ranks of config.json's "streamrom" section. Structured ROM's narrower
blocks (layer_intermediate_sizes, layer_value_head_dims, layer_query_key_head_dims) get narrower
gate/up/down, narrower v_proj/o_proj whose values are padded to head_dim around the attention, and
q_proj/k_proj holding only the kept rotary pairs, scattered back into zeros of head_dim at their
places (transformers' attention and rotary take one head width; zeros add nothing to a score). Only
torch and transformers are needed; streamrom itself is not.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
import transformers


class LowRankLinear(nn.Module):
    """y = expand(reduce(x)): a rank-r stand-in for an out x in linear."""

    def __init__(self, in_features: int, out_features: int, rank: int, reduce_bias: bool, expand_bias: bool):
        super().__init__()
        self.reduce = nn.Linear(in_features, rank, bias=reduce_bias)
        self.expand = nn.Linear(rank, out_features, bias=expand_bias)

    def forward(self, x):
        return self.expand(self.reduce(x))


class PaddedValues(nn.Linear):
    """v_proj narrowed to `width` values per KV head, each head zero-padded back to head_dim."""

    def __init__(self, in_features: int, kv_heads: int, width: int, head_dim: int, bias: bool):
        super().__init__(in_features, kv_heads * width, bias=bias)
        self.width, self.head_dim = width, head_dim

    def forward(self, x):
        values = super().forward(x).unflatten(-1, (-1, self.width))
        return F.pad(values, (0, self.head_dim - self.width)).flatten(-2)


class NarrowOutput(nn.Linear):
    """o_proj reading only the first `width` of each head's head_dim (the rest are PaddedValues' zeros)."""

    def __init__(self, heads: int, width: int, head_dim: int, out_features: int, bias: bool):
        super().__init__(heads * width, out_features, bias=bias)
        self.width, self.head_dim = width, head_dim

    def forward(self, x):
        return super().forward(x.unflatten(-1, (-1, self.head_dim))[..., :self.width].flatten(-2))


class ScatteredPairs(nn.Linear):
    """q_proj or k_proj holding each head's kept rotary pairs (the attention's rotary_pairs, per KV
    head: first halves j, then partners j + head_dim/2), scattered back to their places in head_dim."""

    def __init__(self, in_features: int, heads: int, width: int, head_dim: int, bias: bool, attention: nn.Module):
        super().__init__(in_features, heads * width, bias=bias)
        self.heads, self.width, self.head_dim = heads, width, head_dim
        self._attention = [attention]  # a list: the attention is this module's parent, not a submodule

    def forward(self, x):
        pairs = self._attention[0].rotary_pairs.long()
        dims = torch.cat((pairs, pairs + self.head_dim // 2), dim=1).repeat_interleave(
            self.heads // pairs.shape[0], dim=0)
        kept = super().forward(x).unflatten(-1, (self.heads, self.width))
        full = kept.new_zeros(*kept.shape[:-1], self.head_dim)
        return full.scatter(-1, dims.expand_as(kept), kept).flatten(-2)


def install_structured(model: nn.Module, config) -> None:
    """Narrower MLPs, values, queries and keys in the blocks that structured ROM narrowed."""
    inter = getattr(config, "layer_intermediate_sizes", None)
    values = getattr(config, "layer_value_head_dims", None)
    query_keys = getattr(config, "layer_query_key_head_dims", None)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for index, layer in enumerate(model.model.layers):
        mlp, attention = layer.mlp, layer.self_attn
        if query_keys is not None and query_keys[index] != head_dim:
            width = query_keys[index]
            kv_heads = attention.k_proj.out_features // head_dim
            # float, as stored (indices below 256 are exact in any float dtype)
            attention.register_buffer("rotary_pairs", torch.zeros(kv_heads, width // 2))
            for name in ("q_proj", "k_proj"):
                dense = getattr(attention, name)
                setattr(attention, name, ScatteredPairs(dense.in_features, dense.out_features // head_dim, width,
                                                        head_dim, dense.bias is not None, attention))
        if inter is not None and inter[index] != mlp.down_proj.in_features:
            width, hidden = inter[index], mlp.down_proj.out_features
            mlp.gate_proj = nn.Linear(hidden, width, bias=mlp.gate_proj.bias is not None)
            mlp.up_proj = nn.Linear(hidden, width, bias=mlp.up_proj.bias is not None)
            mlp.down_proj = nn.Linear(width, hidden, bias=mlp.down_proj.bias is not None)
        if values is not None and values[index] != head_dim:
            width = values[index]
            kv_heads = attention.v_proj.out_features // head_dim
            heads = attention.o_proj.in_features // head_dim
            attention.v_proj = PaddedValues(attention.v_proj.in_features, kv_heads, width, head_dim,
                                            attention.v_proj.bias is not None)
            attention.o_proj = NarrowOutput(heads, width, head_dim, attention.o_proj.out_features,
                                            attention.o_proj.bias is not None)


def install_low_rank(model: nn.Module, config) -> None:
    """Narrow structured blocks, then swap every linear named in config.streamrom["ranks"] (with a
    rank) for a LowRankLinear."""
    install_structured(model, config)
    section = getattr(config, "streamrom", None) or {}
    # factors with a mean-correction bias (older checkpoints say so only by their method's name)
    centered = section.get("centered", section.get("method") == "rom-centered")
    for name, rank in section.get("ranks", {}).items():
        if not rank:
            continue
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        dense = getattr(parent, child_name)
        setattr(parent, child_name, LowRankLinear(dense.in_features, dense.out_features, int(rank),
                                                  dense.bias is not None, centered))


_REMOTE_CLASSES: dict[str, type] = {}


def __getattr__(name: str) -> type:
    """StreamromXForCausalLM: transformers' XForCausalLM that installs the low-rank linears first (made
    on first use, for whichever class config.json's auto_map names: streamrom's families name it)."""
    base = getattr(transformers, name.removeprefix("Streamrom"), None) if name.startswith("Streamrom") else None
    if base is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _REMOTE_CLASSES:
        def __init__(self, config):
            base.__init__(self, config)
            install_low_rank(self, config)
        _REMOTE_CLASSES[name] = type(name, (base,), {"__init__": __init__, "__module__": __name__})
    return _REMOTE_CLASSES[name]
