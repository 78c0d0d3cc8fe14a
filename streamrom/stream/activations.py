"""Activations between blocks: disk-backed buffers moved through one block at a time, in chunks.

The buffers are plain files read and written with explicit I/O (not memory maps), so activations
never count towards the process's resident memory: RAM holds one chunk, whatever the number of
calibration sequences.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import NumericalError, OutputError
from ..model.modeling import Block


def read_into(file, array: np.ndarray, what: str) -> None:
    """Fill a C-contiguous `array` from `file`'s current position (short reads retried)."""
    view, done = memoryview(array).cast("B"), 0
    while done < len(view):
        got = file.readinto(view[done:])
        if not got:
            raise OSError(f"{what} is shorter than expected")
        done += got


class ActivationBuffer:
    """A float32 file of shape (sequences, length, hidden), read and written by sequence ranges."""

    def __init__(self, path: Path, sequences: int, length: int, hidden: int, reopen: bool = False,
                 anonymous: bool = False):
        """`anonymous`: a nameless file in the folder `path` (gone with the process, even on SIGKILL)."""
        self.path = Path(path)
        self.anonymous = anonymous
        self.shape = (sequences, length, hidden)
        self._row_bytes = length * hidden * 4
        size = sequences * self._row_bytes
        if anonymous:
            self._file = tempfile.TemporaryFile(dir=self.path, buffering=0)
            self._file.truncate(size)
        elif reopen:  # a resumed run: keep what the interrupted one wrote
            if not self.path.is_file() or self.path.stat().st_size != size:
                raise OutputError(f"activation file {self.path} is missing or damaged; pass --overwrite to start over")
            self._file = open(self.path, "r+b", buffering=0)
        else:
            self._file = open(self.path, "w+b", buffering=0)
            self._file.truncate(size)

    def read(self, start: int, stop: int) -> torch.Tensor:
        out = np.empty((stop - start,) + self.shape[1:], dtype=np.float32)
        self._file.seek(start * self._row_bytes)
        read_into(self._file, out, f"activation file {self.path}")
        return torch.from_numpy(out)

    def write(self, start: int, values: torch.Tensor) -> None:
        data = values.detach().to(torch.float32).contiguous().numpy()
        self._file.seek(start * self._row_bytes)
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += self._file.write(view[done:])

    def sync(self) -> None:
        """Make what was written durable before a progress record points at it."""
        os.fsync(self._file.fileno())

    def close(self, remove: bool = False) -> None:
        self._file.close()
        if remove and not self.anonymous:  # (an anonymous file is gone once closed)
            self.path.unlink(missing_ok=True)


FILE_NAMES = ("activations-a.f32", "activations-b.f32")
# the dense model's stream beside the compressed one (anchored fits); it swaps with the compressed pair,
# so the compressed pair's inputs file names the dense one's too
DENSE_FILE_NAMES = ("dense-a.f32", "dense-b.f32")


class ActivationPair:
    """The current block's inputs and outputs; `swap` makes the outputs the next block's inputs.

    With `inputs_name` (a resumed run) the files are reopened and that one holds the inputs.
    """

    def __init__(self, folder: Path, sequences: int, length: int, hidden: int,
                 inputs_name: str | None = None, anonymous: bool = False, names: tuple[str, str] = FILE_NAMES):
        folder.mkdir(parents=True, exist_ok=True)
        if anonymous:  # nothing to resume from: nameless files that no kill can leave behind
            self.inputs, self.outputs = (ActivationBuffer(folder, sequences, length, hidden, anonymous=True)
                                         for _ in range(2))
            return
        if inputs_name is not None and inputs_name not in names:
            raise OutputError(f"progress record names an unknown activation file {inputs_name!r}")
        first = inputs_name or names[0]
        second = names[1] if first == names[0] else names[0]
        self.inputs = ActivationBuffer(folder / first, sequences, length, hidden, reopen=inputs_name is not None)
        self.outputs = ActivationBuffer(folder / second, sequences, length, hidden)

    def swap(self) -> None:
        self.inputs, self.outputs = self.outputs, self.inputs

    def close(self, remove: bool = True) -> None:
        for buffer in (self.inputs, self.outputs):
            buffer.close(remove)


class BlockCache:
    """Disk buffers for one block's intermediates while it is compressed group by group (the values its
    steps mark as cached: for a Llama block the attention output, the residual after attention and the
    SwiGLU activations). Each is written by the pass that first computes it with the layers before it
    already compressed, so the block costs one forward pass however many groups it has."""

    def __init__(self, folder: Path, sequences: int, length: int, widths: dict[str, int]):
        folder.mkdir(parents=True, exist_ok=True)
        self.buffers = {name: ActivationBuffer(folder / f"cache-{name}.f32", sequences, length, width)
                        for name, width in widths.items()}

    def __getitem__(self, name: str) -> ActivationBuffer:
        return self.buffers[name]

    def __contains__(self, name: str) -> bool:
        return name in self.buffers

    @staticmethod
    def bytes_needed(tokens: int, widths: dict[str, int]) -> int:
        return tokens * sum(widths.values()) * 4

    def close(self, remove: bool = True) -> None:
        for buffer in self.buffers.values():
            buffer.close(remove)


def chunk_ranges(sequences: int, chunk_sequences: int, boundary: int | None = None) -> Iterator[tuple[int, int]]:
    """Ranges of at most `chunk_sequences`; none straddles `boundary` (where two calibration texts meet)."""
    for first, last in ((0, boundary), (boundary, sequences)) if boundary else ((0, sequences),):
        for start in range(first, last, chunk_sequences):
            yield start, min(start + chunk_sequences, last)


@torch.no_grad()
def embed_into(embedding: torch.Tensor, tokens: np.ndarray, buffer: ActivationBuffer,
               chunk_sequences: int, scale: float = 1.0) -> None:
    """The embeddings of `tokens`, times `scale` (Gemma: √hidden, in float32 as transformers does)."""
    for start, stop in chunk_ranges(len(tokens), chunk_sequences):
        ids = torch.from_numpy(np.ascontiguousarray(tokens[start:stop], dtype=np.int64))
        rows = embedding[ids].float()
        buffer.write(start, rows * torch.tensor(scale, dtype=torch.float32) if scale != 1.0 else rows)


def require_finite(values: torch.Tensor, where: str) -> torch.Tensor:
    """Stop at the first NaN/Inf a block produces: later blocks and statistics would only spread it."""
    if not torch.isfinite(values).all():
        raise NumericalError(f"NaN or Inf activations {where} (overflow in the source weights or in the "
                             "layers before)")
    return values


@torch.no_grad()
def run_block(block: Block, source: ActivationBuffer, destination: ActivationBuffer,
              cos: torch.Tensor, sin: torch.Tensor, chunk_sequences: int) -> None:
    for start, stop in chunk_ranges(source.shape[0], chunk_sequences):
        destination.write(start, require_finite(block(source.read(start, stop), cos, sin), "leave a block"))
