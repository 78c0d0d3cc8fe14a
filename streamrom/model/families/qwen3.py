"""Qwen3 (dense): Llama's block with q and k RMS-normed per head before the rotary, and an explicit
head_dim. Its q/k norms span the whole head, so rotary pairs are not narrowed (structured ROM keeps
them; values and MLP neurons narrow as elsewhere)."""
from __future__ import annotations

from .base import BLOCK_NAMES, Family, register


@register
class Qwen3(Family):
    model_type = "qwen3"
    transformers_class = "Qwen3ForCausalLM"
    transformers_config = "Qwen3Config"
    o_bias_with_attention_bias = True
    query_key_norm = True
    gguf_architecture = "qwen3"
    gguf_block_names = {**BLOCK_NAMES, "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
    gguf_biases = False  # llama.cpp's qwen3 graph loads none
    # head_dim apart from hidden/heads (as Qwen3's own configs have it), tied embeddings
    tiny = {"head_dim": 32, "tie_word_embeddings": True}

    def import_config(self, model, config, names):
        config["attention_bias"] = False
