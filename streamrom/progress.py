"""Run state of a compression in its output folder: the lock, the progress manifest, fingerprints.

A run holds an exclusive lock on ``DST/.streamrom.lock`` (released by the OS even on SIGKILL). After
each block it records, in ``DST/.streamrom-progress.json`` (written atomically, after the shard and the
activations are on disk), how many blocks are done, which activation file holds the next block's
inputs, and the fingerprints of the arguments and of the source. A rerun with the same fingerprints
resumes from the first unfinished block; with others it is refused unless ``--overwrite``.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .checkpoint import CheckpointReader, write_atomic
from .errors import BusyError, OutputError

LOCK_FILE = ".streamrom.lock"
PROGRESS_FILE = ".streamrom-progress.json"
PROGRESS_FORMAT = 1


class OutputLock:
    """An exclusive, non-blocking flock on the output folder's lock file."""

    def __init__(self, folder: Path):
        self.path = Path(folder) / LOCK_FILE
        self._handle = None

    def __enter__(self) -> "OutputLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise BusyError(f"another streamrom run is writing {self.path.parent} (lock {self.path})") from None
        self._handle = handle
        return self

    def __exit__(self, *exc_info) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def release_and_remove(self) -> None:
        """At a successful end: nothing is left to protect."""
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self.__exit__()


def source_fingerprint(reader: CheckpointReader) -> str:
    """Config, index and every shard's header and size: what a changed source would change.

    Hashing whole shards would read the model once more; headers hold every tensor's name, dtype,
    shape and offsets, and the sizes catch truncation.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(reader.config, sort_keys=True).encode())
    for shard in sorted(set(reader.weight_map.values())):
        path = reader.folder / shard
        with open(path, "rb") as handle:
            header_length = int.from_bytes(handle.read(8), "little")
            digest.update(shard.encode())
            digest.update(handle.read(min(header_length, 100_000_000)))
        digest.update(str(path.stat().st_size).encode())
    return digest.hexdigest()


def arguments_fingerprint(settings: dict[str, Any], tokens: np.ndarray) -> str:
    """Everything that shapes the output: the settings and the calibration tokens themselves."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(np.ascontiguousarray(tokens, dtype=np.int64).tobytes())
    return digest.hexdigest()


@dataclass
class Progress:
    arguments: str
    source: str
    blocks_done: int = -1  # -1: embeddings not yet written
    inputs_file: str = ""
    ranks: dict[str, int | None] = field(default_factory=dict)
    plan: dict[str, int | None] = field(default_factory=dict)  # every block linear's rank, fixed up front
    weight_map: dict[str, str] = field(default_factory=dict)
    total_size: int = 0
    format: int = PROGRESS_FORMAT

    def save(self, folder: Path) -> None:
        write_atomic(Path(folder) / PROGRESS_FILE, (json.dumps(asdict(self), indent=1) + "\n").encode())

    @classmethod
    def load(cls, folder: Path) -> "Progress | None":
        path = Path(folder) / PROGRESS_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("format") != PROGRESS_FORMAT:
                return None
            return cls(**data)
        except (OSError, ValueError, TypeError):
            raise OutputError(f"progress file {path} is unreadable; pass --overwrite to start over") from None
