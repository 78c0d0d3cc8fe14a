"""Benchmarks: scripts that measure, write JSON under benchmarks/results/ (with the command and commit)
and print a table. Run each from the repository root as a module: `python -m benchmarks.<group>.<name> --help`.

Grouped by what they measure: quality/ (perplexity on the real models), scale/ (memory and time at
7B/13B shapes), speed/ (inference and search speed), gguf/ (files checked by llama.cpp), quantization/
(against and with llama.cpp's quantizer), reliability/ (kills and fuzzing). common.py holds what they
share (the result header, the real model, the texts); tables.py writes docs/results/ from the JSON."""
