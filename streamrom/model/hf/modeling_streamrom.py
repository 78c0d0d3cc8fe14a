"""Loads a streamrom-compressed checkpoint in Hugging Face transformers.

Written into every compressed checkpoint by streamrom and
named by `auto_map` in its config.json, so that

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

builds the architecture of `model_type` (any transformers XForCausalLM) and replaces each compressed
linear, before the weights are loaded, by two linears `reduce` (rank x in, V^T W) and `expand`
(out x rank, V), with the ranks of config.json's "streamrom" section. Structured ROM's narrower
blocks (layer_intermediate_sizes, layer_value_head_dims, layer_query_key_head_dims) get narrower
gate/up/down, and an attention whose heads are as narrow as the checkpoint's: q_proj/k_proj holding
only the kept rotary pairs (rotated with cos and sin at their dimensions), v_proj/o_proj only the kept
values (the attention and the KV cache take them at that width). Only torch and transformers are
needed; streamrom itself is not.
"""
from __future__ import annotations

import sys

import torch
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


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def narrowed_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                               **kwargs):
    """The family's attention forward with each head as narrow as structured ROM left it: queries and keys
    `query_key_width` wide (the kept rotary pairs: first halves, then partners, so rotating half of the
    narrow head pairs them as in the full one; cos and sin are taken at the kept dimensions), values
    `value_width` wide (the attention takes values of their own width, and the cache holds them so). The
    score scale stays the full head's: dropped dimensions are zeros, not a smaller head."""
    if "past_key_values" in kwargs:  # the cache's older name
        cache = kwargs.pop("past_key_values")
    input_shape = hidden_states.shape[:-1]
    query = self.q_proj(hidden_states).unflatten(-1, (-1, self.query_key_width)).transpose(1, 2)
    key = self.k_proj(hidden_states).unflatten(-1, (-1, self.query_key_width)).transpose(1, 2)
    value = self.v_proj(hidden_states).unflatten(-1, (-1, self.value_width)).transpose(1, 2)
    if getattr(self, "q_norm", None) is not None:  # normed over the whole head: such heads keep every pair
        query, key = self.q_norm(query), self.k_norm(key)
    cos, sin = position_embeddings
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (batch, 1, tokens, head_dim): every head alike
    if self.query_key_width != self.head_dim:
        pairs = self.rotary_pairs.long()
        dims = torch.cat((pairs, pairs + self.head_dim // 2), dim=1)  # (kv heads, width)
        cos, sin = cos[..., dims].squeeze(1).movedim(-2, 1), sin[..., dims].squeeze(1).movedim(-2, 1)
        # (batch, kv heads, tokens, width); each query head takes its KV head's
        key = key * cos + _rotate_half(key) * sin
        groups = query.shape[1] // key.shape[1]
        cos, sin = cos.repeat_interleave(groups, dim=1), sin.repeat_interleave(groups, dim=1)
        query = query * cos + _rotate_half(query) * sin
    else:
        query, key = query * cos + _rotate_half(query) * sin, key * cos + _rotate_half(key) * sin
    if cache is not None:
        key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
    # the family's own eager attention where transformers names no other (it knows the family's quirks)
    family = sys.modules[type(self).__mro__[1].__module__]
    attention = transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS.get_interface(
        self.config._attn_implementation, family.eager_attention_forward)
    sliding = getattr(self, "sliding_window", getattr(self.config, "sliding_window", None))
    output, weights = attention(self, query, key, value, attention_mask, dropout=0.0, scaling=self.scaling,
                                sliding_window=sliding, **kwargs)
    return self.o_proj(output.reshape(*input_shape, -1).contiguous()), weights


_NARROWED_CLASSES: dict[type, type] = {}


def narrow_attention(attention: nn.Module, query_key_width: int, value_width: int) -> None:
    """Turns a family's attention into its narrowed twin: q/k/v/o as narrow linears, the forward above."""
    base = type(attention)
    if base not in _NARROWED_CLASSES:
        _NARROWED_CLASSES[base] = type(f"Narrowed{base.__name__}", (base,), {"forward": narrowed_attention_forward})
    head_dim = attention.head_dim
    kv_heads = attention.k_proj.out_features // head_dim
    heads = attention.q_proj.out_features // head_dim
    bias = attention.q_proj.bias is not None
    hidden = attention.q_proj.in_features
    if query_key_width != head_dim:
        # float, as stored (indices below 256 are exact in any float dtype)
        attention.register_buffer("rotary_pairs", torch.zeros(kv_heads, query_key_width // 2))
    attention.q_proj = nn.Linear(hidden, heads * query_key_width, bias=bias)
    attention.k_proj = nn.Linear(hidden, kv_heads * query_key_width, bias=attention.k_proj.bias is not None)
    attention.v_proj = nn.Linear(hidden, kv_heads * value_width, bias=attention.v_proj.bias is not None)
    attention.o_proj = nn.Linear(heads * value_width, attention.o_proj.out_features,
                                 bias=attention.o_proj.bias is not None)
    attention.query_key_width, attention.value_width = query_key_width, value_width
    attention.__class__ = _NARROWED_CLASSES[base]


def install_structured(model: nn.Module, config) -> None:
    """Narrower MLPs, values, queries and keys in the blocks that structured ROM narrowed."""
    inter = getattr(config, "layer_intermediate_sizes", None)
    values = getattr(config, "layer_value_head_dims", None)
    query_keys = getattr(config, "layer_query_key_head_dims", None)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for index, layer in enumerate(model.model.layers):
        mlp, attention = layer.mlp, layer.self_attn
        query_key_width = head_dim if query_keys is None else query_keys[index]
        value_width = head_dim if values is None else values[index]
        if (query_key_width, value_width) != (head_dim, head_dim):
            narrow_attention(attention, query_key_width, value_width)
        if inter is not None and inter[index] != mlp.down_proj.in_features:
            width, hidden = inter[index], mlp.down_proj.out_features
            mlp.gate_proj = nn.Linear(hidden, width, bias=mlp.gate_proj.bias is not None)
            mlp.up_proj = nn.Linear(hidden, width, bias=mlp.up_proj.bias is not None)
            mlp.down_proj = nn.Linear(width, hidden, bias=mlp.down_proj.bias is not None)


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
