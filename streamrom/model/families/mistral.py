"""Mistral: Llama's block with a sliding attention window (llama.cpp's llama graph has none)."""
from __future__ import annotations

from .base import Family, register


@register
class Mistral(Family):
    model_type = "mistral"
    transformers_class = "MistralForCausalLM"
    transformers_config = "MistralConfig"
    sliding_window = True
    gguf_export = "llama"  # refused there while a window is set (llama.cpp's llama attends fully)
    gguf_permuted_query_key = True
    gguf_per_block_widths = "deci"
    tiny = {"sliding_window": 16, "tie_word_embeddings": False}  # a window shorter than the test sequences
