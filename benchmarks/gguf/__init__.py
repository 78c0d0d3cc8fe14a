"""GGUF in and out, checked by llama.cpp itself (llama-cpp-python), and the memory of import-gguf."""
