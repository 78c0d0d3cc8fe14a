"""The input energies of every linear of a compressed model: per input column, the sum over the
calibration tokens of x_j², x what the linear reads in the compressed model (the compressed stream,
every block before it already compressed). That is what llama.cpp's importance matrix holds (its
`<tensor>.in_sum2`, with the token count in `<tensor>.counts`), so `export-gguf --type q4_k_m` can
hand llama.cpp's quantizer an importance matrix without a second calibration run.

`compress` sums them in the forward pass it makes anyway (the block's outputs for the next block;
the last block, which feeds nothing, gets a pass of its own), keeps one small file per block in its
work folder (a resumed run finds them there), and writes them all beside the model as
IMPORTANCE_FILE: a safetensors file of float32 vectors named "<linear>.in_sum2" (model.layers.<i>...)
with the token count in its metadata.
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

from .layout import write_atomic

IMPORTANCE_FILE = "streamrom-importance.safetensors"
FORMAT = "streamrom input energies 1"
BAND_TOKENS = 256


class BlockEnergies:
    """Σ x² per column of the values one block's linears read, and the tokens summed over."""

    def __init__(self, groups) -> None:
        self.reads = {group.reads: group.linears for group in groups}
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens = 0

    def add(self, values) -> None:
        """One chunk's values (modeling.BlockValues): each value the groups read, squared and summed."""
        first = True
        for value in self.reads:
            x = values[value].detach()
            flat = x.reshape(-1, x.shape[-1])
            # in bands of tokens: no chunk-sized temporary (the 7B MLP's chunk is 90 MB in float32)
            total = sum(band.square().sum(0, dtype=torch.float64) for band in flat.split(BAND_TOKENS))
            if value in self.sums:
                self.sums[value] += total
            else:
                self.sums[value] = total
            if first:
                self.tokens += flat.shape[0]
                first = False

    def per_linear(self, prefix: str) -> dict[str, np.ndarray]:
        return {f"{prefix}{linear}": self.sums[value].numpy() for value, linears in self.reads.items()
                for linear in linears}


def save_block(path: Path, energies: dict[str, np.ndarray], tokens: int) -> None:
    """One block's energies, atomically (a resumed run trusts a file that exists)."""
    buffer = io.BytesIO()
    np.savez(buffer, tokens=np.array(tokens), **energies)
    write_atomic(path, buffer.getvalue())


def load_block(path: Path) -> tuple[dict[str, np.ndarray], int] | None:
    """A block's saved energies, or None where the file is missing or unreadable (not written by this
    version, or damaged: the importance file is then left out, never made from part of the model)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            found = {key: stored[key] for key in stored.files}
    except Exception:  # missing, truncated, not a zip: each raises its own type
        return None
    tokens = found.pop("tokens", None)
    return (found, int(tokens)) if tokens is not None else None


def write_importance(folder: Path, blocks: list[tuple[dict[str, np.ndarray], int]]) -> None:
    """IMPORTANCE_FILE in `folder` from every block's energies (all summed over the same tokens)."""
    from safetensors.numpy import save

    tokens = {count for _, count in blocks}
    if len(tokens) != 1:
        raise ValueError(f"blocks summed over different token counts: {sorted(tokens)}")
    tensors = {f"{name}.in_sum2": values.astype(np.float32) for energies, _ in blocks for name, values in energies.items()}
    # one metadata key: safetensors writes several in hash order, and the file must be the same bytes
    # on every run (a resumed run's equal to an uninterrupted one's); written as bytes by write_atomic
    # (safetensors' own files are 0600; this one follows the umask like every other output file)
    data = save(tensors, metadata={"streamrom": json.dumps({"format": FORMAT, "tokens": tokens.pop()})})
    write_atomic(folder / IMPORTANCE_FILE, data)


def read_importance(folder: Path) -> tuple[dict[str, np.ndarray], int] | None:
    """{linear's name: Σ x² per input column}, tokens; None where the checkpoint has no such file."""
    from safetensors import safe_open

    from ..errors import InputError

    path = Path(folder) / IMPORTANCE_FILE
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = json.loads((handle.metadata() or {}).get("streamrom", "{}"))
            sums = {key.removesuffix(".in_sum2"): handle.get_tensor(key) for key in handle.keys()}
        tokens = int(metadata.get("tokens", 0))
    except Exception as exc:  # safetensors raises several types for damaged files
        raise InputError(f"cannot read {path}: {type(exc).__name__}: {exc}") from None
    if metadata.get("format") != FORMAT or tokens < 1:
        raise InputError(f"{path} is not a streamrom importance file of this version (format {metadata.get('format')!r})")
    for name, values in sums.items():
        if values.ndim != 1 or not np.all(np.isfinite(values)) or np.any(values < 0):
            raise InputError(f"{path}: {name} is not a vector of finite sums of squares")
    return sums, tokens
