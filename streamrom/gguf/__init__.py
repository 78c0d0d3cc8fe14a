"""llama.cpp's GGUF format: import (reader, tokenizer vocabulary), export (tensor layout, quantization),
and the low-rank correction of a quantized model as a LoRA adapter."""
