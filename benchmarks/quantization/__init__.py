"""streamrom next to llama.cpp's quantizer: the size-quality frontier, and low-rank corrections of quantization error."""
