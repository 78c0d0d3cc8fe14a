"""Quality on the real model (SmolLM2-135M-Instruct, Gemma 3 270M): perplexity of compressed models on held-out text."""
