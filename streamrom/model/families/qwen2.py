"""Qwen2: Llama's block with q/k/v biases always."""
from __future__ import annotations

from .base import Family, register


@register
class Qwen2(Family):
    model_type = "qwen2"
    transformers_class = "Qwen2ForCausalLM"
    transformers_config = "Qwen2Config"
    qkv_bias = True
    gguf_architecture = "qwen2"
    tiny = {"tie_word_embeddings": True}
