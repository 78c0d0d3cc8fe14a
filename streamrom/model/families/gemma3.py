"""Gemma 3 (text): norms stored around 0 and multiplied by (1 + w), q and k normed per head, the MLP
normed before and after, scaled embeddings, GeGLU, and sliding blocks with a rope base of their own
beside full ones. llama.cpp's converter stores the norms as 1 + w, and its graph loads no biases."""
from __future__ import annotations

import math
from typing import Any, Mapping

from ...errors import InputError
from .base import BLOCK_NAMES, Family, positive_number, register

SLIDING_PATTERN = 6  # every 6th block attends fully (unless the config or the GGUF says otherwise)
LOCAL_ROPE_BASE = 10000.0  # the sliding blocks' rope base (unless the config or the GGUF says otherwise)


@register
class Gemma3(Family):
    model_type = "gemma3_text"
    transformers_class = "Gemma3ForCausalLM"
    transformers_config = "Gemma3TextConfig"
    block = "sandwich-norm"
    activations = ("gelu_pytorch_tanh",)
    gemma_style = True
    query_key_norm = True
    gguf_architecture = "gemma3"
    # more norms, named differently (ffn_norm is its pre-feed-forward norm)
    gguf_block_names = {
        **BLOCK_NAMES, "ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm", "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
    }
    gguf_norms_plus_one = True
    gguf_biases = False
    gguf_sliding_window = True
    # one KV head, head_dim != hidden/heads, a query scale of its own, sliding (window < length, rope
    # base 10000) and full (base 1e6) blocks
    tiny = {"num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 24, "sliding_window": 16,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]}
    tiny_gguf = {"query_pre_attn_scalar": 32}  # llama.cpp scales queries by 1/√head_dim

    def config_settings(self, config: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
        """Layer types, attention scale and per-type rope bases (transformers 5 writes rope_parameters
        per layer type; transformers 4 rope_theta and rope_local_base_freq)."""
        types = config.get("layer_types")
        if types is None:  # every sliding_window_pattern-th block attends fully
            pattern = config.get("sliding_window_pattern", config.get("_sliding_window_pattern", SLIDING_PATTERN))
            if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
                raise InputError(f"config.json: sliding_window_pattern must be a positive integer, got {pattern!r}")
            types = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)]
        if (not isinstance(types, list) or len(types) != num_layers
                or any(t not in ("sliding_attention", "full_attention") for t in types)):
            raise InputError(f"config.json: layer_types must list sliding_attention or full_attention for each of "
                             f"the {num_layers} blocks")
        scalar = positive_number(config.get("query_pre_attn_scalar"), "query_pre_attn_scalar")
        per_type = config.get("rope_parameters")
        if isinstance(per_type, dict) and "full_attention" in per_type:
            full, local = per_type.get("full_attention") or {}, per_type.get("sliding_attention") or {}
            rope_config = {"rope_parameters": full}
            local_theta = local.get("rope_theta", LOCAL_ROPE_BASE)
        else:
            rope_config = config
            local_theta = config.get("rope_local_base_freq", LOCAL_ROPE_BASE)
        local_theta = positive_number(local_theta, "the sliding layers' rope base")
        return {"sliding_layers": tuple(t == "sliding_attention" for t in types),
                "attention_scale": float(scalar) ** -0.5, "rope_local_theta": float(local_theta),
                "rope_config": rope_config}

    def import_config(self, model, config, names):
        """transformers 5's Gemma3TextConfig: rope per layer type."""
        arch = model.arch
        del config["hidden_act"]
        layers = config["num_hidden_layers"]
        # per block, sliding or not: written by streamrom's export; llama.cpp's converter leaves it out
        pattern = [bool(sliding) for sliding in model.value(
            f"{arch}.attention.sliding_window_pattern", kind="list of flags",
            default=[(i + 1) % SLIDING_PATTERN != 0 for i in range(layers)])]
        if len(pattern) != layers:
            raise InputError(f"{model.path}: sliding_window_pattern has {len(pattern)} entries for {layers} blocks")
        config.update({
            "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": config["head_dim"],
            "sliding_window": model.value(f"{arch}.attention.sliding_window", kind="positive integer"),
            "layer_types": ["sliding_attention" if sliding else "full_attention" for sliding in pattern],
            "rope_parameters": {
                "full_attention": {"rope_type": "default", "rope_theta": config.pop("rope_theta")},
                "sliding_attention": {"rope_type": "default", "rope_theta": float(
                    model.value(f"{arch}.rope.freq_base_swa", LOCAL_ROPE_BASE, "positive number"))}},
            "attn_logit_softcapping": None, "final_logit_softcapping": None,
            "attention_bias": False, "use_bidirectional_attention": False,
        })

    def check_export(self, spec) -> None:
        # llama.cpp scales queries by 1/√head_dim, but by 1/√(hidden/heads) for its 62-block (27B) model
        scale = (spec.hidden_size / spec.num_heads if spec.num_layers == 62 else spec.head_dim) ** -0.5
        if spec.attention_scale is not None and not math.isclose(spec.attention_scale, scale, rel_tol=1e-6):
            raise InputError(f"export-gguf: llama.cpp's gemma3 scales queries by {scale:.6g}, this model by "
                             f"{spec.attention_scale:.6g} (query_pre_attn_scalar)")
        if spec.layer_query_key_head_dims and min(spec.layer_query_key_head_dims) < spec.head_dim:
            # zero rows would enter the per-head q/k norm's mean in llama.cpp
            raise InputError("export-gguf: Gemma queries and keys narrowed to rotary pairs have no llama.cpp form")
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if spec.raw_config.get(key):
                raise InputError(f"export-gguf: {key} is not exported")

    def export_metadata(self, writer, spec) -> None:
        writer.add_sliding_window(int(spec.sliding_window))
        # per block, whether it attends within the window (llama.cpp's default guess is every 6th full)
        writer.add_sliding_window_pattern([spec.window_of(i) is not None for i in range(spec.num_layers)])
        writer.add_rope_freq_base_swa(float(spec.rope_local_theta or spec.rope_theta))
