"""The model families, one file each (base.py says what a family holds). Every module of this package
is imported here, so a family registers itself by being a file in it."""
from __future__ import annotations

import importlib
import pkgutil

from .base import BLOCK_NAMES, FAMILIES, GLOBAL_NAMES, Family, positive_number, register

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "base":
        importlib.import_module(f"{__name__}.{_module.name}")

# llama.cpp's architecture names import-gguf reads, to the family
GGUF_FAMILIES = {family.gguf_architecture: family for family in FAMILIES.values() if family.gguf_architecture}

__all__ = ["BLOCK_NAMES", "FAMILIES", "GGUF_FAMILIES", "GLOBAL_NAMES", "Family", "positive_number", "register"]
