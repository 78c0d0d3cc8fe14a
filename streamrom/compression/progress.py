"""Run state of a compression in its output folder: the lock, the progress manifest, fingerprints.

A run holds an exclusive lock on ``DST/.streamrom.lock`` (released by the OS even on SIGKILL). After
each block it records, in ``DST/.streamrom-progress.json`` (written atomically, after the shard and the
activations are on disk), how many blocks are done, which activation file holds the next block's
inputs, and the fingerprints of the arguments and of the source (with each source file's modification
time and inode). A rerun with the same fingerprints resumes from the first unfinished block, or only
finishes the steps after the index (clean-up, evaluation, report); with others it is refused unless
``--overwrite``. The lock is held, and the progress record kept, until the run has done everything it
does to the folder.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..storage.checkpoint import CONFIG_FILE, NUMBERED_SHARD, CheckpointReader
from ..storage.layout import atomic_temporary, write_atomic
from ..errors import OutputError
from ..storage.locking import LOCK_FILE, OutputLock  # noqa: F401 (the lock lives with the run state)

PROGRESS_FILE = ".streamrom-progress.json"
PROGRESS_FORMAT = 1
CHECKSUM = "checksum"  # sha256 of the record's other fields (records of earlier versions have none)
RETIRED_FIELDS = ("total_size",)  # written by earlier versions, read by none: dropped when an old record is loaded


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


def source_files(reader: CheckpointReader) -> dict[str, list[int]]:
    """Each source file's size, modification time (ns), device and inode: a shard rewritten in place
    with the same header and size (which `source_fingerprint` cannot see) changes its time or inode."""
    files = {}
    for name in [CONFIG_FILE, *sorted(set(reader.weight_map.values()))]:
        stat = (reader.folder / name).stat()
        files[name] = [stat.st_size, stat.st_mtime_ns, stat.st_dev, stat.st_ino]
    return files


def changed_source_file(recorded: dict[str, list[int]], now: dict[str, list[int]]) -> str | None:
    """The first source file that differs between two `source_files` records (None: none does)."""
    for name in sorted(set(recorded) | set(now)):
        if recorded.get(name) != now.get(name):
            return name
    return None


def arguments_fingerprint(settings: dict[str, Any], tokens: np.ndarray) -> str:
    """Everything that shapes the output: the settings and the calibration tokens themselves."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    digest.update(np.ascontiguousarray(tokens, dtype=np.int64).tobytes())
    return digest.hexdigest()


def _checksum(record: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def integer(value, low: int = 0) -> bool:
    """An int (not a bool) of at least `low`: what a record read back from JSON must hold there."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def mapping(value, check) -> bool:
    return isinstance(value, dict) and all(isinstance(key, str) and check(item) for key, item in value.items())


def is_plan(value) -> bool:
    """A flat plan as records hold it: {"model.layers.<i>.<name>": rank or width, or None}."""
    return mapping(value, lambda rank: rank is None or integer(rank, 1)) and all(
        key.startswith("model.layers.") for key in value)


def is_orders(value) -> bool:
    """Keep orders as records hold them: {unit key: [feature, ...]}."""
    return mapping(value, lambda order: isinstance(order, list) and all(map(integer, order)))


@dataclass
class Progress:
    arguments: str
    source: str
    blocks_done: int = -1  # -1: embeddings not yet written
    inputs_file: str = ""
    ranks: dict[str, int | None] = field(default_factory=dict)
    plan: dict[str, int | None] = field(default_factory=dict)  # every block linear's rank, fixed up front
    weight_map: dict[str, str] = field(default_factory=dict)
    format: int = PROGRESS_FORMAT
    # "compressing" until the model's index is in place, then "written": a rerun only finishes the
    # remaining steps (clean-up, evaluation, report)
    stage: str = "compressing"
    source_files: dict[str, list[int]] = field(default_factory=dict)  # see source_files()
    trials: list[dict] = field(default_factory=list)  # bayes: each trial's multipliers and score
    study: str = ""  # bayes --study: the shared study's name
    # --neuron-selection pass1: each narrowed MLP's neurons, most important first (pass 1's greedy removal)
    orders: dict[str, list[int]] = field(default_factory=dict)

    def save(self, folder: Path) -> None:
        record = asdict(self)
        record[CHECKSUM] = _checksum(record)
        write_atomic(Path(folder) / PROGRESS_FILE, (json.dumps(record, indent=1) + "\n").encode())

    @staticmethod
    def discard_unplaced(folder: Path) -> None:
        """Removes a record written but never renamed into place (a run killed in between: before its
        first record, it had written nothing else). Every save writes its temporary anew, so one left
        beside a record in place is stale too."""
        atomic_temporary(Path(folder) / PROGRESS_FILE).unlink(missing_ok=True)

    @classmethod
    def load(cls, folder: Path) -> "Progress | None":
        path = Path(folder) / PROGRESS_FILE
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text())
            if data.get("format") != PROGRESS_FORMAT:
                return None
            written = data.pop(CHECKSUM, None)
            if written is not None and written != _checksum(data):
                # a record that parses yet was changed (a flipped digit is still JSON: another rank)
                raise OutputError(f"progress file {path} does not match its checksum (damaged or edited since it "
                                  "was written); pass --overwrite to start over")
            progress = cls(**{key: value for key, value in data.items() if key not in RETIRED_FIELDS})
            problem = progress._shape_problem()
        except (OSError, ValueError, TypeError, AttributeError):
            problem = ""
        if problem is not None:
            said = f" ({problem})" if problem else ""
            raise OutputError(f"progress file {path} is unreadable{said}; pass --overwrite to start over")
        return progress

    def _shape_problem(self) -> str | None:
        """What in a loaded record is not of the shape a run writes (a damaged or edited file), or None:
        checked whole here, so that no later step meets a value of the wrong type."""
        checks = {
            "arguments": isinstance(self.arguments, str), "source": isinstance(self.source, str),
            "blocks_done": integer(self.blocks_done, -1), "inputs_file": isinstance(self.inputs_file, str),
            "ranks": is_plan(self.ranks), "plan": is_plan(self.plan),
            "weight_map": mapping(self.weight_map, lambda shard: isinstance(shard, str)
                                  and NUMBERED_SHARD.fullmatch(shard) is not None),
            "stage": self.stage in ("compressing", "written"),
            "source_files": mapping(self.source_files, lambda stat: isinstance(stat, list) and len(stat) == 4
                                    and all(integer(number) for number in stat)),
            "trials": isinstance(self.trials, list) and all(isinstance(trial, dict) for trial in self.trials),
            "study": isinstance(self.study, str),
            "orders": is_orders(self.orders),
        }
        wrong = [name for name, fine in checks.items() if not fine]
        return f"{wrong[0]} is not what a run writes" if wrong else None
