"""What a model family is to streamrom: one registered class per family (model/families/<family>.py), holding
everything that differs between families, so that no other module branches on a family's name.

A family names its config.json model_type, its transformers classes, its block layout (modeling.BLOCKS),
what its config leaves implicit, its llama.cpp architecture and GGUF tensor names and quirks, and the
tiny config the architecture contract test builds (tests/test_architectures.py). Hooks with defaults
here are overridden where a family differs. Torch-free: import-gguf starts light.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

from ...errors import InputError

FAMILIES: dict[str, "Family"] = {}  # model_type -> the family (filled by @register as each file is imported)

# GGUF tensor names to Hugging Face's: the model's own, and per block (blk.N.<key>.weight|bias)
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


class Family:
    """A model family. Subclasses set the class attributes and override the hooks they need."""

    model_type: str  # config.json's model_type
    transformers_class: str  # the dense model in transformers (plain checkpoints load as this)
    transformers_config: str  # its config class in transformers (the contract test's tiny model)
    block: str = "pre-norm"  # the block layout in modeling.BLOCKS (pre-norm, sandwich-norm)
    qkv_bias: bool = False  # q/k/v always have biases (else only with attention_bias)
    o_bias_with_attention_bias: bool = False  # attention_bias also gives o_proj a bias
    sliding_window: bool = False  # the sliding window applies without use_sliding_window
    activations: tuple[str, ...] = ("silu",)  # hidden_act (hidden_activation) values it takes
    # Gemma-style blocks: norms multiply by (1 + w), q and k are normed per head, the MLP is normed
    # before and after, the embeddings are scaled by √hidden, layer_types mix sliding and full attention
    gemma_style: bool = False
    query_key_norm: bool = False  # q and k RMS-normed per head (head_dim weights) before the rotary
    # llama.cpp: the architecture import-gguf reads as this family (None: none), and the one export-gguf
    # writes it as (default: that one)
    gguf_architecture: str | None = None
    gguf_export: str | None = None
    gguf_block_names: Mapping[str, str] = BLOCK_NAMES  # GGUF block tensor key -> HF's
    gguf_norms_plus_one: bool = False  # llama.cpp's converter stores the norms as 1 + w
    gguf_biases: bool = True  # llama.cpp's graph loads biases of block linears (a file with one fails if not)
    gguf_permuted_query_key: bool = False  # llama.cpp's converter permutes q/k rows (rotary halves interleaved)
    gguf_sliding_window: bool = False  # llama.cpp's graph has a sliding window
    # the llama.cpp architecture of per-block MLP widths, where one exists (else narrower blocks are padded)
    gguf_per_block_widths: str | None = None
    tiny: Mapping[str, Any] = {}  # the contract test's tiny config, beside tests/conftest.TINY_COMMON
    # ... changed where llama.cpp's graph fixes a setting (the GGUF round trip of the contract test)
    tiny_gguf: Mapping[str, Any] = {}

    @property
    def remote_class(self) -> str:
        """Our subclass of transformers_class for factored checkpoints (model/hf/modeling_streamrom.py)."""
        return f"Streamrom{self.transformers_class}"

    @property
    def gguf_writes_as(self) -> str | None:
        return self.gguf_export or self.gguf_architecture

    def config_settings(self, config: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
        """ModelSpec fields the family reads from config.json in its own way (checked); "rope_config":
        where its rope settings lie, when elsewhere than the config's top level."""
        return {}

    def import_config(self, model: Any, config: dict[str, Any], names: set[str]) -> None:
        """Complete the config.json that import-gguf writes from the GGUF's metadata (`model`: a
        convert.GGUFModel; `names`: its tensors' Hugging Face names)."""

    def check_export(self, spec: Any) -> None:
        """Refuse, in one line (InputError), what llama.cpp's graph fixes and this model sets otherwise."""

    def export_metadata(self, writer: Any, spec: Any) -> None:
        """The family's own GGUF metadata (a gguf.GGUFWriter)."""


def register(cls: type[Family]) -> type[Family]:
    """Class decorator: the family joins FAMILIES under its model_type."""
    if cls.model_type in FAMILIES:
        raise ValueError(f"two families register model_type {cls.model_type!r}")
    FAMILIES[cls.model_type] = cls()
    return cls


def positive_number(value: Any, what: str) -> float:
    """A finite number above 0 (a norm's epsilon, a rope base, a scale), or one line saying what it is not."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise InputError(f"config.json: {what} must be a positive number, got {value!r}")
    return float(value)
