"""The files of a Hugging Face checkpoint folder: their names, tensor byte sizes, atomic writes.

Kept free of torch so that commands which only move bytes (import-gguf) start light.
"""
from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from typing import Any, Iterable

from ..errors import InputError, OutputError, ResourceError
from ..faults import fault_point

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model",
)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

# export-gguf --type: how 2-D weights are stored (norms and biases stay float32, as llama.cpp's converter
# keeps them); GGUF_TYPES are written by streamrom, LLAMA_QUANTIZE_TYPES by llama.cpp's own quantizer
# (llama-quantize) from the f16 export: its K-quants and the rest
GGUF_TYPES = ("source", "f32", "f16", "bf16", "q8_0", "q4_0")
LLAMA_QUANTIZE_TYPES = ("q2_k", "q3_k_s", "q3_k_m", "q3_k_l", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k",
                        "q4_1", "q5_0", "q5_1")
# where llama-quantize is looked for: --llama-quantize, then this variable, then PATH
LLAMA_QUANTIZE_VARIABLE = "STREAMROM_LLAMA_QUANTIZE"


# Bytes per element of the safetensors dtype codes.
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2,
               "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def tensor_bytes(shape: Iterable[int], dtype: str) -> int:
    return math.prod(shape) * DTYPE_BYTES[dtype]


def read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{what} {path} is not valid JSON: {exc}") from None


def atomic_temporary(path: Path) -> Path:
    """Where write_atomic writes `path` before renaming it into place."""
    return path.with_name(f".{path.name}.tmp")


def write_atomic(path: Path, data: bytes) -> None:
    """`path` holds `data` whole or is as it was. The tests kill a run at `replacing-NAME`: the
    temporary is on disk, not yet renamed into place."""
    tmp = atomic_temporary(path)
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    fault_point(f"replacing-{path.name}")
    os.replace(tmp, path)


def _same_file(a: Path, b: Path) -> bool:
    """Whether two paths name one file or folder (device and inode), whatever their text says:
    a bind mount or a symlinked parent of the source is the source."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def check_output_path(source: Path, output: Path, create: bool = True) -> None:
    """Refuse outputs that are, contain or lie inside the source (a folder or a file): the source is
    never written to. Compared by identity, not by path text. Creates the output folder unless
    `create` is false."""
    src, dst = Path(source).absolute(), Path(output).absolute()
    try:  # the folder the output's text leads to, through any symlinks on its way (a link into the source)
        resolved = dst.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        raise OutputError(f"output path {output} cannot be resolved: {exc}") from None
    for ancestor in (dst, *dst.parents, resolved, *resolved.parents):
        if _same_file(ancestor, src):
            if ancestor in (dst, resolved):
                kind = "folder" if src.is_dir() else "file"
                raise OutputError(f"output folder {output} is the source {kind}; the source is never written to")
            raise OutputError(f"output folder {output} is inside the source folder; the source is never written to")
    if dst.exists():
        for ancestor in src.parents:
            if _same_file(ancestor, dst):
                raise OutputError(f"output folder {output} contains the source {source}; choose another")
    if dst.exists() and not dst.is_dir():
        raise OutputError(f"output path exists and is not a folder: {output}")
    if not create:
        return
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {output}: {exc.strerror}") from None


def check_output_file(source: Path, output: Path) -> None:
    """An output file (export-gguf's) never lies inside the source folder, whatever path or symlink
    leads there, and is never the source itself: the source is never written to."""
    try:
        resolved = Path(output).absolute().resolve()
    except (OSError, RuntimeError) as exc:
        raise OutputError(f"output path {output} cannot be resolved: {exc}") from None
    for ancestor in (Path(output).absolute(), *Path(output).absolute().parents, resolved, *resolved.parents):
        if _same_file(ancestor, source):
            raise OutputError(f"output {output} lies inside the source {source}; the source is never written to")


def check_report_path(path: Path) -> None:
    """Fail before the work when the report cannot be written where asked."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"--report {path} is a folder; give a file path")
    if not folder.is_dir():
        raise OutputError(f"--report {path}: its folder {folder} does not exist or is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"--report {path} cannot be written (permission denied)")


def check_free_disk(folder: Path, needed: dict[str, int]) -> None:
    """Fail before the long work when `folder`'s file system cannot hold what the run will write
    (`needed`: bytes by what they are for, named in the message)."""
    gib = 2 ** 30
    free = shutil.disk_usage(folder).free
    total = sum(needed.values())
    if total > free:
        detail = ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in needed.items())
        raise ResourceError(f"not enough free disk space in {folder}: need {total / gib:.2f} GiB "
                            f"({detail}), have {free / gib:.2f} GiB")
