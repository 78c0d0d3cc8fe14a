"""streamrom: low-rank (ROM) compression of LLaMA-family models on a CPU, one decoder block in memory.

The public names load their modules on first use, so `import streamrom` (and commands that need no torch,
such as `streamrom import-gguf`) stay light.
"""
from __future__ import annotations

import importlib
from typing import Any

from .errors import InputError, OutputError, StreamromError, UsageError

__version__ = "0.1.0"

_LAZY = {
    "CalibrationConfig": "stream.calibration", "CompressConfig": "compression.pipeline",
    "compress": "compression.pipeline", "evaluate": "stream.evaluation", "load": "loading",
    "Report": "report.report",
}

__all__ = [
    "CalibrationConfig", "CompressConfig", "Report", "compress", "evaluate", "load",
    "StreamromError", "InputError", "OutputError", "UsageError", "__version__",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
