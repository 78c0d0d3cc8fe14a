"""Our own decoder block and model, plain torch (architecture facts: model/architectures.py).

The block is plain torch with Hugging Face parameter names, so a block's ``state_dict`` keys are the
checkpoint's keys without the ``model.layers.{i}.`` prefix. A compressed linear keeps its HF name and
holds two factors: ``<name>.reduce`` (rank x in, the coefficients VᵀW) and ``<name>.expand``
(out x rank, the basis V).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError

from .architectures import BLOCK_LINEARS, ROTARY_PAIRS, ModelSpec
from .families import FAMILIES
from .architectures import EMBED, FINAL_NORM, LM_HEAD, block_prefix  # noqa: F401 (where most callers look)


def rope_inverse_frequencies(spec: ModelSpec, theta: float | None = None) -> torch.Tensor:
    """Per-pair rotation frequencies, computed in float32 as transformers does (`theta`: another base,
    e.g. of sliding-window blocks, unscaled)."""
    dim = spec.head_dim
    base = spec.rope_theta if theta is None else theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = spec.rope_scaling if theta is None else None
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class Rotary:
    """cos/sin tables for positions 0..L-1, cached per length."""

    def __init__(self, spec: ModelSpec, theta: float | None = None):
        self.inv_freq = rope_inverse_frequencies(spec, theta)
        self._cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def cos_sin(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        if length not in self._cache:
            positions = torch.arange(length, dtype=torch.float32)
            freqs = torch.outer(positions, self.inv_freq)
            angles = torch.cat((freqs, freqs), dim=-1)
            self._cache[length] = (angles.cos(), angles.sin())
        return self._cache[length]


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


class RMSNorm(nn.Module):
    """RMS normalisation times (offset + weight): offset 1 where weights are stored around 0 (Gemma)."""

    def __init__(self, size: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size), requires_grad=False)
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return ((self.offset + self.weight.float()) * x32).to(x.dtype)
        return self.weight * x32.to(x.dtype)


def norm(spec: ModelSpec, size: int | None = None) -> RMSNorm:
    return RMSNorm(spec.hidden_size if size is None else size, spec.rms_norm_eps, spec.norm_offset)


class LowRankLinear(nn.Module):
    """y = expand(reduce(x)): a rank-r stand-in for an out x in linear, r(out+in) parameters."""

    def __init__(self, in_features: int, out_features: int, rank: int,
                 reduce_bias: bool = False, expand_bias: bool = False):
        super().__init__()
        self.reduce = nn.Linear(in_features, rank, bias=reduce_bias)
        self.expand = nn.Linear(rank, out_features, bias=expand_bias)
        self.reduce.requires_grad_(False)
        self.expand.requires_grad_(False)

    @classmethod
    def from_factors(cls, reduce_weight: torch.Tensor, expand_weight: torch.Tensor,
                     reduce_bias: torch.Tensor | None = None,
                     expand_bias: torch.Tensor | None = None) -> "LowRankLinear":
        with torch.device("meta"):  # no random initialisation of weights about to be replaced
            module = cls(reduce_weight.shape[1], expand_weight.shape[0], reduce_weight.shape[0],
                         reduce_bias is not None, expand_bias is not None)
        state = {"reduce.weight": reduce_weight, "expand.weight": expand_weight}
        if reduce_bias is not None:
            state["reduce.bias"] = reduce_bias
        if expand_bias is not None:
            state["expand.bias"] = expand_bias
        module.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, assign=True)
        return module.requires_grad_(False)

    @property
    def rank(self) -> int:
        return self.reduce.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.expand(self.reduce(x))


def _dense(in_features: int, out_features: int, bias: bool) -> nn.Linear:
    linear = nn.Linear(in_features, out_features, bias=bias)
    linear.requires_grad_(False)
    return linear


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    """A linear holding these float32 tensors (structured ROM's narrower matrices), never initialised."""
    with torch.device("meta"):
        linear = _dense(weight.shape[1], weight.shape[0], bias is not None)
    state = {"weight": weight.float().contiguous()}
    if bias is not None:
        state["bias"] = bias.float().contiguous()
    linear.load_state_dict(state, assign=True)
    return linear.requires_grad_(False)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, index: int = 0):
        super().__init__()
        hidden, head_dim = spec.hidden_size, spec.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, head_dim
        # narrower than head_dim after structured ROM
        self.value_head_dim = spec.value_head_dim_of(index)
        query_key_dim = spec.query_key_head_dim_of(index)
        self.sliding_window = spec.window_of(index)
        self.scale = spec.attention_scale  # None: SDPA's 1/√head_dim
        if spec.query_key_norm:  # q and k normed per head before rotary
            self.q_norm, self.k_norm = norm(spec, head_dim), norm(spec, head_dim)
        self.q_proj = _dense(hidden, spec.num_heads * query_key_dim, spec.qkv_bias)
        self.k_proj = _dense(hidden, spec.num_kv_heads * query_key_dim, spec.qkv_bias)
        self.register_buffer("rotary_pairs", None)  # (a None buffer is not in the state dict)
        if query_key_dim < head_dim:
            self.keep_rotary_pairs(torch.zeros(spec.num_kv_heads, query_key_dim // 2))
        self.v_proj = _dense(hidden, spec.num_kv_heads * self.value_head_dim, spec.qkv_bias)
        self.o_proj = _dense(spec.num_heads * self.value_head_dim, hidden, spec.o_bias)

    def keep_rotary_pairs(self, pairs: torch.Tensor) -> None:
        """Queries and keys hold only these rotary pairs per KV head (structured ROM): the buffer
        rotary_pairs (kv_heads x pairs), in a float dtype (see architectures.ROTARY_PAIRS); the
        scale stays the dense head's."""
        self.register_buffer(ROTARY_PAIRS.rpartition(".")[2], pairs)
        if self.scale is None:
            self.scale = self.head_dim ** -0.5

    @property
    def query_key_dim(self) -> int:
        return self.head_dim if self.rotary_pairs is None else 2 * self.rotary_pairs.shape[1]

    def _kept_rotary(self, table: torch.Tensor, heads: int) -> torch.Tensor:
        """The (length x head_dim) cos or sin table at each head's kept dimensions: (heads, length, dims),
        the pairs' first halves then their partners, as rotate_half pairs them (linalg.structured's
        kept_pair_dims in torch: the model's modules import no scipy)."""
        pairs = self.rotary_pairs.long()
        dims = torch.cat((pairs, pairs + self.head_dim // 2), dim=1)
        kept = table[:, dims].transpose(0, 1)
        return kept.repeat_interleave(heads // self.num_kv_heads, dim=0)

    def core(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Attention output before o_proj: (batch, length, heads*value_head_dim)."""
        batch, length, _ = h.shape
        width = self.query_key_dim
        q = self.q_proj(h).view(batch, length, self.num_heads, width).transpose(1, 2)
        k = self.k_proj(h).view(batch, length, self.num_kv_heads, width).transpose(1, 2)
        v = self.v_proj(h).view(batch, length, self.num_kv_heads, self.value_head_dim).transpose(1, 2)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # (a no-op in float32; a bf16 model stays bf16)
        if self.rotary_pairs is None:
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        else:
            q = apply_rotary(q, self._kept_rotary(cos, self.num_heads), self._kept_rotary(sin, self.num_heads))
            k = apply_rotary(k, self._kept_rotary(cos, self.num_kv_heads), self._kept_rotary(sin, self.num_kv_heads))
        groups = self.num_heads // self.num_kv_heads
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        if self.sliding_window is not None and length > self.sliding_window:
            pos = torch.arange(length)
            offset = pos[:, None] - pos[None, :]
            mask = (offset >= 0) & (offset < self.sliding_window)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return out.transpose(1, 2).reshape(batch, length, self.num_heads * self.value_head_dim)


ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, index: int | None = None):
        super().__init__()
        hidden, inter = spec.hidden_size, spec.intermediate_size_of(index)
        self.act = ACTIVATIONS[spec.hidden_act]
        self.gate_proj = _dense(hidden, inter, spec.mlp_bias)
        self.up_proj = _dense(hidden, inter, spec.mlp_bias)
        self.down_proj = _dense(inter, hidden, spec.mlp_bias)

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        """Gated activations (SwiGLU, GeGLU), the input of down_proj."""
        return self.act(self.gate_proj(h)) * self.up_proj(h)


@dataclass(frozen=True)
class Step:
    """One step of a block's forward pass: the value `name`, computed from earlier values (read from a
    BlockValues as `values["x"]`). `cached`: worth keeping on disk between compression passes, since it
    applies a linear; its width (features per token) comes from the spec."""

    name: str
    compute: Callable[["Block", "BlockValues", torch.Tensor, torch.Tensor], torch.Tensor]
    cached_width: Callable[[ModelSpec], int] | None = None


@dataclass(frozen=True)
class LinearGroup:
    """Linears that read one value of the forward pass (`reads`), compressed together. A lone linear may
    name the value that is its own output (`writes`): its moments can be taken there when narrower."""

    linears: tuple[str, ...]
    reads: str
    writes: str | None = None

    def observed(self, block: "Block") -> tuple[str, int, bool]:
        """Where the group's moments are taken: the value, its width, and whether it is the output.
        A lone linear narrower at its output than at its input (down_proj) has its output moment
        accumulated directly (out x out); otherwise the input's, shared by the group."""
        out_features, in_features = block.linear(self.linears[0]).weight.shape
        if self.writes is not None and len(self.linears) == 1 and out_features < in_features:
            return self.writes, out_features, True
        return self.reads, in_features, False


class BlockValues:
    """The values of one block's forward pass for one chunk of tokens: given ones (the block's input
    "x", or intermediates cached on disk) are read when first asked for, the others computed by the
    block's steps, each once."""

    def __init__(self, block: "Block", cos: torch.Tensor, sin: torch.Tensor,
                 given: Mapping[str, Callable[[], torch.Tensor]]):
        self.block, self.cos, self.sin = block, cos, sin
        self.given = given
        self.computed: dict[str, torch.Tensor] = {}
        self._read: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        if name in self.computed:
            return self.computed[name]
        if name in self.given:
            if name not in self._read:
                self._read[name] = self.given[name]()
            return self._read[name]
        self.computed[name] = self.block.step(name).compute(self.block, self, self.cos, self.sin)
        return self.computed[name]


class Block(nn.Module):
    """One decoder block, its forward described once as ordered steps (STEPS) and the groups of linears
    that read their values (GROUPS). Compression, pass 1 (under autograd), evaluation and loading all
    run these steps (BlockValues); `forward` is the whole chain from "x" to "output"."""

    STEPS: tuple[Step, ...] = (
        Step("normed", lambda b, v, cos, sin: b.input_layernorm(v["x"])),
        Step("attention", lambda b, v, cos, sin: b.self_attn.core(v["normed"], *b.rotary_tables(cos, sin)),
             cached_width=lambda spec: spec.num_heads * spec.head_dim),
        Step("residual", lambda b, v, cos, sin: v["x"] + b.self_attn.o_proj(v["attention"]),
             cached_width=lambda spec: spec.hidden_size),
        Step("mlp_normed", lambda b, v, cos, sin: b.post_attention_layernorm(v["residual"])),
        Step("mlp", lambda b, v, cos, sin: b.mlp.hidden(v["mlp_normed"]),
             cached_width=lambda spec: spec.intermediate_size),
        Step("mlp_output", lambda b, v, cos, sin: b.mlp.down_proj(v["mlp"])),
        Step("output", lambda b, v, cos, sin: v["residual"] + v["mlp_output"]),
    )
    # In the order the data flows: each group's statistics come from the groups before it, compressed.
    GROUPS: tuple[LinearGroup, ...] = (
        LinearGroup(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), reads="normed"),
        LinearGroup(("self_attn.o_proj",), reads="attention"),
        LinearGroup(("mlp.gate_proj", "mlp.up_proj"), reads="mlp_normed"),
        LinearGroup(("mlp.down_proj",), reads="mlp", writes="mlp_output"),
    )

    # Linears whose output is added to the residual stream as it is: {linear: (the sum's value, the
    # stream's value it is added to)}. The dense sum less the compressed stream's value is what the
    # linear would have to give for the sum to be the dense model's (its anchored fit's target).
    RESIDUAL_ADDS: Mapping[str, tuple[str, str]] = {"self_attn.o_proj": ("residual", "x"),
                                                    "mlp.down_proj": ("output", "residual")}

    def __init__(self, spec: ModelSpec, index: int = 0):
        super().__init__()
        self.input_layernorm = norm(spec)
        self.self_attn = Attention(spec, index)
        self.post_attention_layernorm = norm(spec)
        self.mlp = MLP(spec, index)
        self._spec, self._theta = spec, spec.rope_theta_of(index)
        self._rotary: Rotary | None = None  # made on first use (blocks are built on the meta device)

    def rotary_tables(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's tables, or this block's own where its rope base differs (Gemma 3's sliding-window
        blocks)."""
        if self._theta == self._spec.rope_theta:
            return cos, sin
        if self._rotary is None:
            self._rotary = Rotary(self._spec, self._theta)
        return self._rotary.cos_sin(cos.shape[0])

    @classmethod
    def step(cls, name: str) -> Step:
        for step in cls.STEPS:
            if step.name == name:
                return step
        raise KeyError(f"no step computes {name!r}")

    @classmethod
    def cached_widths(cls, spec: ModelSpec) -> dict[str, int]:
        """Features per token of each value worth caching between compression passes."""
        return {step.name: step.cached_width(spec) for step in cls.STEPS if step.cached_width is not None}

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        return BlockValues(self, cos, sin, {"x": lambda: x})["output"]

    def linear(self, name: str) -> nn.Module:
        return self.get_submodule(name)

    def set_linear(self, name: str, module: nn.Module) -> None:
        parent, _, child = name.rpartition(".")
        setattr(self.get_submodule(parent), child, module)

    @classmethod
    def from_tensors(cls, spec: ModelSpec, tensors: Mapping[str, torch.Tensor], index: int = 0,
                     dtype: torch.dtype | None = torch.float32) -> "Block":
        """Build a block from its tensors (dense or factored), names without the prefix, in `dtype`
        (float32, the work dtype of compression; None: as stored, no copy)."""
        with torch.device("meta"):  # parameters are assigned from `tensors`, never initialised
            block = cls(spec, index)
            for name in BLOCK_LINEARS:
                if f"{name}.reduce.weight" in tensors:
                    reduce_w = tensors[f"{name}.reduce.weight"]
                    expand_w = tensors[f"{name}.expand.weight"]
                    block.set_linear(name, LowRankLinear(
                        reduce_w.shape[1], expand_w.shape[0], reduce_w.shape[0],
                        reduce_bias=f"{name}.reduce.bias" in tensors,
                        expand_bias=f"{name}.expand.bias" in tensors,
                    ))
        state = {key: (value if dtype is None else value.to(dtype)).contiguous() for key, value in tensors.items()}
        missing, unexpected = block.load_state_dict(state, strict=False, assign=True)
        if missing or unexpected:
            raise InputError(
                "block tensors do not fit the config: "
                + (f"missing {sorted(missing)[:3]} " if missing else "")
                + (f"unexpected {sorted(unexpected)[:3]}" if unexpected else "")
            )
        return block.requires_grad_(False)


class SandwichNormBlock(Block):
    """A block whose attention and MLP outputs are normed before their residual adds, the MLP input by
    a norm of its own (Gemma 2 and 3: pre- and post-feed-forward norms beside the two of a pre-norm
    block)."""

    STEPS: tuple[Step, ...] = (
        Step("normed", lambda b, v, cos, sin: b.input_layernorm(v["x"])),
        Step("attention", lambda b, v, cos, sin: b.self_attn.core(v["normed"], *b.rotary_tables(cos, sin)),
             cached_width=lambda spec: spec.num_heads * spec.head_dim),
        Step("residual", lambda b, v, cos, sin: v["x"] + b.post_attention_layernorm(b.self_attn.o_proj(v["attention"])),
             cached_width=lambda spec: spec.hidden_size),
        Step("mlp_normed", lambda b, v, cos, sin: b.pre_feedforward_layernorm(v["residual"])),
        Step("mlp", lambda b, v, cos, sin: b.mlp.hidden(v["mlp_normed"]),
             cached_width=lambda spec: spec.intermediate_size),
        Step("mlp_output", lambda b, v, cos, sin: b.mlp.down_proj(v["mlp"])),
        Step("output", lambda b, v, cos, sin: v["residual"] + b.post_feedforward_layernorm(v["mlp_output"])),
    )
    RESIDUAL_ADDS: Mapping[str, tuple[str, str]] = {}  # both outputs are normed before their adds

    def __init__(self, spec: ModelSpec, index: int = 0):
        super().__init__(spec, index)
        self.pre_feedforward_layernorm = norm(spec)
        self.post_feedforward_layernorm = norm(spec)


class CausalLM(nn.Module):
    """A whole model built from our blocks, for inference after loading (``streamrom.load``)."""

    def __init__(self, spec: ModelSpec, blocks: list[Block], embed: torch.Tensor,
                 final_norm: torch.Tensor, lm_head: torch.Tensor | None):
        super().__init__()
        self.spec = spec
        # the tensors as given (their dtype, no copies): load() hands them over as stored
        self.embed_tokens = nn.Embedding.from_pretrained(embed, freeze=True)
        self.layers = nn.ModuleList(blocks)
        self.norm = norm(spec)
        self.norm.weight = nn.Parameter(final_norm, requires_grad=False)
        head = self.embed_tokens.weight if lm_head is None else lm_head
        self.lm_head_weight = head if lm_head is None else nn.Parameter(head, requires_grad=False)
        self.rotary = Rotary(spec)

    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits (batch, length, vocab) for token ids (batch, length)."""
        x = self.embed_tokens(input_ids)
        if self.spec.embedding_scale != 1.0:
            x = x * torch.tensor(self.spec.embedding_scale, dtype=x.dtype)
        cos, sin = self.rotary.cos_sin(input_ids.shape[-1])
        for block in self.layers:
            x = block(x, cos, sin)
        return F.linear(self.norm(x), self.lm_head_weight).float()


# The block layouts that families.Family.block names: patterns, not families (llama.cpp's graphs and
# transformers' models share them across families too).
BLOCKS: dict[str, type[Block]] = {"pre-norm": Block, "sandwich-norm": SandwichNormBlock}


def block_class(spec: ModelSpec) -> type[Block]:
    """The block variant of the spec's architecture."""
    return BLOCKS[FAMILIES[spec.model_type].block]
