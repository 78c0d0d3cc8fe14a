"""Llama (1, 2, 3): the reference family; Llama 3's rope scaling travels to llama.cpp as rope_freqs."""
from __future__ import annotations

from .base import Family, register


@register
class Llama(Family):
    model_type = "llama"
    transformers_class = "LlamaForCausalLM"
    transformers_config = "LlamaConfig"
    o_bias_with_attention_bias = True
    gguf_architecture = "llama"
    gguf_permuted_query_key = True
    gguf_per_block_widths = "deci"  # llama.cpp's deci: per-block feed-forward lengths (no biases)
    # GQA, Llama 3 rope scaling, an untied head
    tiny = {"tie_word_embeddings": False, "rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}}

    tiny_gguf = {"rope_scaling": None}  # llama.cpp's rope_freqs for Llama 3 scaling has no way back to a config

    def import_config(self, model, config, names):
        config["attention_bias"] = "model.layers.0.self_attn.q_proj.bias" in names
        config["mlp_bias"] = False
