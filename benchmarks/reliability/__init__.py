"""The long reliability run: kills at every point, fuzzed parsers."""
