"""Calibration and evaluation tokens: text files through the model's own tokenizer, or a .npy of ids.

Defaults (CalibrationConfig): 32 sequences of 512 tokens, seed 0, drawn at random offsets from the
whole token stream. 16,384 tokens are over three times the widest hidden size of a 7B/13B model
(4096/5120), so the input second moments are well conditioned; 512-token windows give attention
realistic context; and the forward passes over them keep a 7B run on a laptop CPU within hours. The
same 32 x 512 setting was used for the reference measurements in the issues. Random offsets (as in
GPTQ and ROM) sample the whole text rather than its first pages.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer

from .errors import InputError, UsageError

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION_TEXT = "emma.txt"  # shipped in streamrom/data, public domain (Jane Austen)


def default_calibration_text() -> Path:
    return Path(str(resources.files("streamrom") / "data" / DEFAULT_CALIBRATION_TEXT))


@dataclass(frozen=True)
class CalibrationConfig:
    text_files: tuple[Path, ...] = ()  # empty: the packaged default text
    token_file: Path | None = None  # a .npy of token ids, 1-D stream or 2-D (sequences, length)
    sequences: int = 32
    seqlen: int = 512
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sequences < 1:
            raise UsageError(f"calibration sequences must be at least 1, got {self.sequences}")
        if self.seqlen < 2:
            raise UsageError(f"calibration sequence length must be at least 2, got {self.seqlen}")
        if self.text_files and self.token_file is not None:
            raise UsageError("give calibration text files or a token file, not both")


def load_tokenizer(folder: Path) -> Tokenizer:
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise InputError(f"no tokenizer.json in {folder}: give token ids as a .npy instead of text")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise InputError(f"cannot read tokenizer {path}: {exc}") from None


def read_text(path: Path) -> str:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"text file not found: {path}") from None
    except IsADirectoryError:
        raise InputError(f"text path is a folder, not a file: {path}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"text file {path} is not UTF-8: {exc.reason} at byte {exc.start}") from None
    except OSError as exc:
        raise InputError(f"cannot read text file {path}: {exc.strerror}") from None
    if not text.strip():
        raise InputError(f"text file is empty: {path}")
    return text


def tokenize_files(tokenizer: Tokenizer, paths: tuple[Path, ...] | list[Path]) -> np.ndarray:
    """One token stream for all files, in order, without special tokens."""
    pieces = [np.asarray(tokenizer.encode(read_text(p), add_special_tokens=False).ids, dtype=np.int64)
              for p in paths]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def check_vocabulary(ids: np.ndarray, vocab_size: int, source: object) -> np.ndarray:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise InputError(f"{source} has token ids outside the model's vocabulary [0, {vocab_size})")
    return ids


def load_token_file(path: Path, vocab_size: int) -> np.ndarray:
    try:
        ids = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"token file not found: {path}") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"token file {path} is not a readable .npy of integers: {exc}") from None
    if not isinstance(ids, np.ndarray):  # an .npz archive
        raise InputError(f"token file {path} is an archive of several arrays; give a .npy of token ids")
    if ids.dtype.kind not in "iu" or ids.ndim not in (1, 2):
        raise InputError(f"token file {path} must hold a 1-D or 2-D array of integers, got {ids.dtype} {ids.shape}")
    return check_vocabulary(ids.astype(np.int64), vocab_size, f"token file {path}")


def _draw_starts(length: int, sequences: int, seqlen: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, length - seqlen + 1, size=sequences)


def draw_sequences(stream: np.ndarray, sequences: int, seqlen: int, seed: int) -> np.ndarray:
    """`sequences` windows of `seqlen` tokens at random offsets of a token stream (seeded)."""
    if len(stream) < seqlen:
        raise InputError(
            f"calibration text too short: {len(stream)} tokens, need at least one sequence of {seqlen}"
        )
    if len(stream) < sequences * seqlen:
        log.warning("calibration text has %d tokens, fewer than %d x %d: windows will overlap",
                    len(stream), sequences, seqlen)
    starts = _draw_starts(len(stream), sequences, seqlen, seed)
    return np.stack([stream[s:s + seqlen] for s in starts])


def _calibration_ids(config: CalibrationConfig, checkpoint: Path, vocab_size: int) -> np.ndarray:
    """The calibration source as token ids: a token file as saved (1-D stream or 2-D rows), or the
    text files (default: the packaged one) through the checkpoint's tokenizer."""
    if config.token_file is not None:
        return load_token_file(config.token_file, vocab_size)
    files = config.text_files or (default_calibration_text(),)
    return check_vocabulary(tokenize_files(load_tokenizer(checkpoint), files), vocab_size,
                            f"the tokenizer of {checkpoint}")


def _chosen_rows(rows: int, config: CalibrationConfig) -> np.ndarray:
    """The rows of a 2-D token file that calibration takes (seeded), in order."""
    rng = np.random.default_rng(config.seed)
    return np.sort(rng.choice(rows, size=min(config.sequences, rows), replace=False))


def calibration_tokens(config: CalibrationConfig, checkpoint: Path, vocab_size: int) -> np.ndarray:
    """(sequences, seqlen) token ids for calibration."""
    ids = _calibration_ids(config, checkpoint, vocab_size)
    if ids.ndim == 2:
        if ids.shape[1] < config.seqlen or ids.shape[0] < 1:
            raise InputError(f"token file rows are {ids.shape[1]} tokens, shorter than seqlen {config.seqlen}")
        return ids[_chosen_rows(ids.shape[0], config), :config.seqlen]
    return draw_sequences(ids, config.sequences, config.seqlen, config.seed)


def held_out_windows(config: CalibrationConfig, checkpoint: Path, vocab_size: int, count: int) -> np.ndarray:
    """Up to `count` consecutive `seqlen` windows of the calibration text that no calibration sequence
    touches: a held-out slice of the same text, for scoring allocation trials."""
    stream = _calibration_ids(config, checkpoint, vocab_size)
    if stream.ndim == 2:  # rows: calibration takes some, the others are held out
        taken = set(_chosen_rows(stream.shape[0], config).tolist())
        free = [row for row in range(stream.shape[0]) if row not in taken][:count]
        if not free:
            raise UsageError("every row of the token file is used for calibration: none is left to score on")
        return stream[free, :config.seqlen]
    if len(stream) < config.seqlen:
        raise InputError(f"calibration text too short: {len(stream)} tokens")
    used = np.zeros(len(stream), dtype=bool)
    for start in _draw_starts(len(stream), config.sequences, config.seqlen, config.seed):
        used[start:start + config.seqlen] = True
    windows = [stream[s:s + config.seqlen] for s in range(0, len(stream) - config.seqlen + 1, config.seqlen)
               if not used[s:s + config.seqlen].any()][:count]
    if not windows:
        raise UsageError("the calibration text has no window left that calibration does not use: give a longer "
                         "text or fewer --calib-sequences")
    return np.stack(windows)


def held_out(names: Iterable[str], fraction: float, salt: str = "streamrom") -> set[str]:
    """The names (e.g. module names of a code corpus) held out for evaluation: those whose SHA-256
    (with `salt`) falls in the first `fraction` of the hash range. Stable across runs, machines and
    orderings, so a calibration/evaluation split by name is reproducible and disjoint by construction."""
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"held-out fraction must be in (0, 1), got {fraction}")
    limit = int(fraction * 2 ** 64)
    return {name for name in names
            if int.from_bytes(hashlib.sha256(f"{salt}:{name}".encode()).digest()[:8], "big") < limit}


def evaluation_windows(stream: np.ndarray, seqlen: int, max_windows: int | None = None) -> np.ndarray:
    """Consecutive non-overlapping windows of `seqlen` tokens from the start; the remainder is dropped."""
    count = len(stream) // seqlen
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise InputError(f"evaluation text too short: {len(stream)} tokens, need at least {seqlen}")
    return stream[:count * seqlen].reshape(count, seqlen)
