"""A checkpoint's architecture as streamrom reads it: the tensor names, the structured units, and
ModelSpec (a checkpoint's shapes, read from its config.json with its family's rules: model/families/).

Torch-free, so that commands which only move bytes (import-gguf) start light. Adding a model family:
docs/dev/add-a-model.md (one file in model/families/, and a Block subclass in model/modeling.py where its forward
differs; tests/test_architectures.py's contract test runs it).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Mapping, Sequence

from ..errors import InputError
from .families import FAMILIES, positive_number


GEMMA_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")  # besides NORMS, hidden-sized
HEAD_NORMS = ("self_attn.q_norm", "self_attn.k_norm")  # head_dim-sized (query_key_norm)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

EMBED = "model.embed_tokens.weight"
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"

ATTENTION_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
MLP_LINEARS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
BLOCK_LINEARS = ATTENTION_LINEARS + MLP_LINEARS
NORMS = ("input_layernorm", "post_attention_layernorm")


@dataclass(frozen=True)
class StructuredUnit:
    """Linears narrowed together by structured ROM (linalg/structured.py): `name` is the plan's key within a
    block (its value: how many units stay), `reads` the block value whose moment chooses the units.
    A block's width is recorded in features (config.json's `widths_key`, also a ModelSpec field);
    one unit holds `features_per_unit` of them."""

    name: str
    linears: tuple[str, ...]
    reads: str
    widths_key: str
    features_per_unit: int = 1
    # the unit's features are the value it reads (so that value is narrower afterwards); else it
    # reads its linears' common input, which narrowing leaves as it is
    narrows_reads: bool = True
    # config.json's key where every block keeps one width that the source architecture reads itself
    # (the MLP's intermediate_size); None: the width is always written per block (`widths_key`)
    uniform_key: str | None = None
    # its features are dimensions of every attention head: narrowed, config.json must name the dense
    # head_dim (transformers would derive it from hidden_size / heads)
    per_head: bool = False

    def dense_features(self, spec: "ModelSpec") -> int:
        """Features of the unit in an unnarrowed block."""
        raise NotImplementedError

    def parameters(self, spec: "ModelSpec") -> int:
        """Parameters one unit holds in a block (what keeping one more costs)."""
        raise NotImplementedError

    def read_width(self, spec: "ModelSpec") -> int:
        """Width of the value it reads (its moment is that squared)."""
        raise NotImplementedError

    def applies_to(self, spec: "ModelSpec") -> bool:
        return True

    def size(self, spec: "ModelSpec") -> int:
        """How many units an unnarrowed block has."""
        return self.dense_features(spec) // self.features_per_unit

    def features_of(self, spec: "ModelSpec", index: int | None) -> int:
        """The unit's features in block `index` (None: unnarrowed)."""
        widths = getattr(spec, self.widths_key)
        return self.dense_features(spec) if index is None or widths is None else widths[index]


@dataclass(frozen=True)
class RotaryPairs(StructuredUnit):
    """Query and key dimensions per KV head, kept in rotary pairs (j, j + head_dim/2) so that the
    rotation stays exact; q_proj's rows for every query head of the group, k_proj's for the head."""

    def dense_features(self, spec):
        return spec.head_dim

    def parameters(self, spec):
        # two rows of q_proj per query head, two of k_proj per KV head, and the pair's index entry
        return (2 * (spec.num_heads + spec.num_kv_heads) * (spec.hidden_size + (1 if spec.qkv_bias else 0))
                + spec.num_kv_heads)

    def read_width(self, spec):
        return spec.hidden_size

    def applies_to(self, spec):
        return not spec.query_key_norm  # q and k normed over the whole head: a narrower head changes the norm


@dataclass(frozen=True)
class ValueDims(StructuredUnit):
    """Value dimensions per KV head: v_proj rows, o_proj columns of every query head of the group."""

    def dense_features(self, spec):
        return spec.head_dim

    def parameters(self, spec):
        return spec.num_kv_heads * (spec.hidden_size + (1 if spec.qkv_bias else 0)) + spec.num_heads * spec.hidden_size

    def read_width(self, spec):
        return spec.num_heads * spec.head_dim


@dataclass(frozen=True)
class MlpNeurons(StructuredUnit):
    """MLP neurons: rows of gate and up, columns of down."""

    def dense_features(self, spec):
        return spec.intermediate_size

    def parameters(self, spec):
        return 3 * spec.hidden_size + (2 if spec.mlp_bias else 0)

    def read_width(self, spec):
        return spec.intermediate_size


# In the order the data flows. Pairs are chosen from the q/k input's moment (`normed`); values and
# neurons from the features their consumer (o_proj, down_proj) reads.
UNITS: tuple[StructuredUnit, ...] = (
    RotaryPairs("self_attn.rotary_pairs", ("self_attn.q_proj", "self_attn.k_proj"), reads="normed",
                widths_key="layer_query_key_head_dims", features_per_unit=2, narrows_reads=False, per_head=True),
    ValueDims("self_attn.value_dims", ("self_attn.v_proj", "self_attn.o_proj"), reads="attention",
              widths_key="layer_value_head_dims", per_head=True),
    MlpNeurons("mlp.neurons", MLP_LINEARS, reads="mlp", widths_key="layer_intermediate_sizes",
               uniform_key="intermediate_size"),
)
UNIT_NAMES = tuple(unit.name for unit in UNITS)
UNIT_BY_NAME = {unit.name: unit for unit in UNITS}
# The tensor of a block whose queries and keys lost pairs: per KV head, the rotary pairs kept
# (indices j < head_dim/2, ascending). Stored in the model's float dtype so that every tool that
# casts a checkpoint keeps it: the indices are below 256, exact in bf16 and fp16.
ROTARY_PAIRS = "self_attn.rotary_pairs"


def block_prefix(index: int) -> str:
    return f"model.layers.{index}."


@dataclass(frozen=True)
class ModelSpec:
    """What streamrom needs to know of a checkpoint's architecture, read from its config.json."""

    model_type: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Mapping[str, Any] | None
    tie_word_embeddings: bool
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    hidden_act: str = "silu"
    gemma_style: bool = False  # see families.Family.gemma_style
    query_key_norm: bool = False  # see families.Family.query_key_norm
    attention_scale: float | None = None  # None: 1/√head_dim
    # per block, whether it attends within the sliding window (None: every block, when there is a window)
    sliding_layers: tuple[bool, ...] | None = None
    rope_local_theta: float | None = None  # the rope base of sliding-window blocks, where it differs
    # structured ROM's per-block widths in features (None: intermediate_size and head_dim in every block)
    layer_intermediate_sizes: tuple[int, ...] | None = None
    layer_value_head_dims: tuple[int, ...] | None = None
    layer_query_key_head_dims: tuple[int, ...] | None = None
    raw_config: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ModelSpec":
        model_type = config.get("model_type")
        if not isinstance(model_type, str) or model_type not in FAMILIES:
            raise InputError(
                f"unsupported model_type {model_type!r}: streamrom supports "
                + ", ".join(sorted(FAMILIES))
            )
        family = FAMILIES[model_type]
        act = config.get("hidden_act") or config.get("hidden_activation") or "silu"
        if act not in family.activations:
            raise InputError(f"unsupported hidden_act {act!r} for {model_type}: streamrom supports "
                             f"{', '.join(family.activations)}")
        sizes = {}
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "vocab_size", "num_key_value_heads", "head_dim"):
            value = config.get(key)
            if value is None and key in ("num_key_value_heads", "head_dim"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
                raise InputError(f"config.json: {key} must be a positive integer, got {value!r}")
            sizes[key] = value
        hidden, heads = sizes["hidden_size"], sizes["num_attention_heads"]
        eps = positive_number(config.get("rms_norm_eps", 1e-6), "rms_norm_eps")
        spec_kwargs = dict(
            model_type=model_type,
            hidden_size=hidden,
            intermediate_size=sizes["intermediate_size"],
            num_layers=sizes["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=sizes.get("num_key_value_heads", heads),
            head_dim=sizes.get("head_dim", hidden // heads),
            vocab_size=sizes["vocab_size"],
            rms_norm_eps=eps,
        )
        if spec_kwargs["head_dim"] < 1 or spec_kwargs["head_dim"] % 2:
            raise InputError(f"config.json: head_dim must be a positive even number, got {spec_kwargs['head_dim']}")
        own = family.config_settings(config, sizes["num_hidden_layers"])
        rope_theta, rope_scaling = _rope_settings(own.pop("rope_config", config))
        attention_bias = bool(config.get("attention_bias", False))
        use_sliding = (family.sliding_window or family.gemma_style
                       or bool(config.get("use_sliding_window", False)))
        window = config.get("sliding_window") if use_sliding else None
        if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 0):
            raise InputError(f"config.json: sliding_window must be a positive integer or null, got {window!r}")
        spec = cls(
            **spec_kwargs,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=_flag(config, "tie_word_embeddings"),
            qkv_bias=family.qkv_bias or attention_bias,
            o_bias=family.o_bias_with_attention_bias and attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            sliding_window=int(window) if window else None,
            hidden_act=act,
            gemma_style=family.gemma_style,
            query_key_norm=family.query_key_norm,
            **own,
            raw_config=dict(config),
        )
        spec = replace(spec, **_layer_widths(config, spec))
        if spec.num_heads % spec.num_kv_heads:
            raise InputError(
                f"num_attention_heads={spec.num_heads} is not a multiple of "
                f"num_key_value_heads={spec.num_kv_heads}"
            )
        return spec

    def intermediate_size_of(self, index: int | None) -> int:
        """The MLP width of block `index` (None: the config's intermediate_size)."""
        return UNIT_BY_NAME["mlp.neurons"].features_of(self, index)

    def value_head_dim_of(self, index: int | None) -> int:
        """The value width per KV head of block `index` (None: head_dim)."""
        return UNIT_BY_NAME["self_attn.value_dims"].features_of(self, index)

    def query_key_head_dim_of(self, index: int | None) -> int:
        """The query and key width per head of block `index` (None: head_dim)."""
        return UNIT_BY_NAME["self_attn.rotary_pairs"].features_of(self, index)

    def linear_shape(self, name: str, index: int | None = None) -> tuple[int, int]:
        """(out, in) of a block linear (of block `index`, where structured ROM narrowed it)."""
        query_key_dim = self.query_key_head_dim_of(index)
        inter = self.intermediate_size_of(index)
        value_dim = self.value_head_dim_of(index)
        return {
            "self_attn.q_proj": (self.num_heads * query_key_dim, self.hidden_size),
            "self_attn.k_proj": (self.num_kv_heads * query_key_dim, self.hidden_size),
            "self_attn.v_proj": (self.num_kv_heads * value_dim, self.hidden_size),
            "self_attn.o_proj": (self.hidden_size, self.num_heads * value_dim),
            "mlp.gate_proj": (inter, self.hidden_size),
            "mlp.up_proj": (inter, self.hidden_size),
            "mlp.down_proj": (self.hidden_size, inter),
        }[name]

    def narrowed(self, widths: Sequence[Mapping[str, int | None]]) -> "ModelSpec":
        """This spec with the per-block widths that a plan's structured units give (`widths[i]`: block
        i's units kept, by unit name; one entry per block); a unit without a width keeps this spec's own."""
        fields = {}
        for unit in UNITS:
            fields[unit.widths_key] = tuple(
                (widths[i].get(unit.name) or 0) * unit.features_per_unit
                or unit.features_of(self, i) for i in range(self.num_layers))
        return replace(self, **fields)

    def has_bias(self, name: str) -> bool:
        if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            return self.qkv_bias
        if name == "self_attn.o_proj":
            return self.o_bias
        return self.mlp_bias

    def dense_block_shapes(self, index: int | None = None) -> dict[str, tuple[int, ...]]:
        """Tensor names (without the block prefix) and shapes of an unfactored block (block `index`,
        with its structured widths)."""
        shapes: dict[str, tuple[int, ...]] = {}
        for name in BLOCK_LINEARS:
            out_features, in_features = self.linear_shape(name, index)
            shapes[f"{name}.weight"] = (out_features, in_features)
            if self.has_bias(name):
                shapes[f"{name}.bias"] = (out_features,)
        for norm in NORMS + (GEMMA_NORMS if self.gemma_style else ()):
            shapes[f"{norm}.weight"] = (self.hidden_size,)
        for norm in HEAD_NORMS if self.query_key_norm else ():
            shapes[f"{norm}.weight"] = (self.head_dim,)
        if self.query_key_head_dim_of(index) < self.head_dim:
            shapes[ROTARY_PAIRS] = (self.num_kv_heads, self.query_key_head_dim_of(index) // 2)
        return shapes

    @property
    def norm_offset(self) -> float:
        """RMSNorm multiplies by (offset + w): Gemma stores w around 0."""
        return 1.0 if self.gemma_style else 0.0

    @property
    def embedding_scale(self) -> float:
        return self.hidden_size ** 0.5 if self.gemma_style else 1.0

    def window_of(self, index: int) -> int | None:
        """The sliding window block `index` attends within (None: all earlier positions)."""
        if self.sliding_layers is not None and not self.sliding_layers[index]:
            return None
        return self.sliding_window

    def rope_theta_of(self, index: int) -> float:
        if self.sliding_layers is not None and self.sliding_layers[index] and self.rope_local_theta is not None:
            return self.rope_local_theta
        return self.rope_theta

    def global_shapes(self) -> dict[str, tuple[int, ...]]:
        shapes = {EMBED: (self.vocab_size, self.hidden_size), FINAL_NORM: (self.hidden_size,)}
        if not self.tie_word_embeddings:
            shapes[LM_HEAD] = (self.vocab_size, self.hidden_size)
        return shapes


def _layer_widths(config: Mapping[str, Any], spec: ModelSpec) -> dict[str, Any]:
    """Structured ROM's per-block widths (layer_intermediate_sizes, layer_value_head_dims,
    layer_query_key_head_dims), checked."""
    found = {}
    for unit in UNITS:
        widths, largest, step = config.get(unit.widths_key), unit.dense_features(spec), unit.features_per_unit
        if widths is None:
            continue
        if (not isinstance(widths, list) or len(widths) != spec.num_layers
                or any(isinstance(w, bool) or not isinstance(w, int) or not 0 < w <= largest or w % step
                       for w in widths)):
            raise InputError(f"config.json: {unit.widths_key} must list {spec.num_layers} positive integers up to "
                             f"{largest}" + (f", multiples of {step}" if step > 1 else ""))
        if not unit.applies_to(spec) and any(w != largest for w in widths):
            raise InputError(f"config.json: {unit.widths_key} narrows a {spec.model_type} model, which cannot be")
        found[unit.widths_key] = tuple(widths)
    return found


def _flag(config: Mapping[str, Any], key: str) -> bool:
    value = config.get(key) or False  # absent or null: false
    if not isinstance(value, bool):
        raise InputError(f"config.json: {key} must be true or false, got {value!r}")
    return value


def _rope_settings(config: Mapping[str, Any]) -> tuple[float, dict[str, Any] | None]:
    # transformers 4 writes rope_theta + rope_scaling; transformers 5 writes rope_parameters.
    params = config.get("rope_parameters") or {}
    scaling = config.get("rope_scaling") or None
    if not isinstance(params, dict) or not (scaling is None or isinstance(scaling, dict)):
        raise InputError("config.json: rope_parameters / rope_scaling must be objects")
    theta = positive_number(config.get("rope_theta") or params.get("rope_theta") or 10000.0, "rope_theta")
    if scaling is None and params.get("rope_type", "default") != "default":
        scaling = dict(params)
    if scaling is not None:
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise InputError(
                f"unsupported rope scaling {rope_type!r}: streamrom supports "
                + ", ".join(SUPPORTED_ROPE_TYPES)
            )
        scaling = {**scaling, "rope_type": rope_type}
        needed = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                    "original_max_position_embeddings")}.get(rope_type, ())
        for key in needed:
            positive_number(scaling.get(key), f"{rope_type} rope scaling's {key}")
        if rope_type == "default":
            scaling = None
    return theta, scaling


