"""Benchmarks: scripts that measure, write JSON under benchmarks/results/ (with the command and commit)
and print a table. Run each from the repository root as a module: `python -m benchmarks.<name> --help`."""
