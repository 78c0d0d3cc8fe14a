"""Calibration and evaluation tokens: text files through the model's own tokenizer, or a .npy of ids.

Defaults (CalibrationConfig): 32 sequences of 512 tokens, seed 0, drawn at random offsets. 16,384
tokens are over three times the widest hidden size of a 7B/13B model (4096/5120), so the input
second moments are well conditioned; 512-token windows give attention realistic context; and the
forward passes over them keep a 7B run on a laptop CPU within hours. Random offsets (as in GPTQ and
ROM) sample a whole text rather than its first pages.

The default text is the general calibration set shipped in streamrom/data/general (data/
build_general.py rebuilds it; SOURCES.json lists sources and licences): narrative prose of two
authors and periods (Austen's Emma, Carroll's Alice with its dialogue), technical documentation and
code. Several text files are parts: each gives an equal share of the sequences (the first ones one
more where they do not divide), so that no text dominates by its length; a part's sequences are
drawn from it alone, with its own seed. One file is exactly the single-text draw.

Text is tokenized as the model is run: where the tokenizer puts special tokens before a text (Gemma's
and Llama's BOS), every calibration sequence and every evaluation window starts with them, followed
by `seqlen` less that many tokens of text. A model whose first position always holds BOS behaves
differently there (an attention sink, activations of another scale), and a fit that never saw it
changes what the model does with it. Token files (.npy) are taken as they are.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

import numpy as np
from tokenizers import Tokenizer

from ..errors import InputError, UsageError

log = logging.getLogger(__name__)

GENERAL_SET = "general"  # streamrom/data/general: the default calibration parts, SOURCES.json their record


def default_calibration_texts() -> tuple[Path, ...]:
    """The general calibration set's parts, in SOURCES.json's order."""
    folder = Path(str(resources.files("streamrom") / "data" / GENERAL_SET))
    names = json.loads((folder / "SOURCES.json").read_text(encoding="utf-8"))["parts"]
    return tuple(folder / f"{name}.txt" for name in names)


@dataclass(frozen=True)
class CalibrationConfig:
    text_files: tuple[Path, ...] = ()  # empty: the packaged general set; several: parts of equal share
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
    """One token stream for all files, in order, without special tokens (see sequence_prefix)."""
    pieces = [np.asarray(tokenizer.encode(read_text(p), add_special_tokens=False).ids, dtype=np.int64)
              for p in paths]
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def sequence_prefix(tokenizer: Tokenizer) -> np.ndarray:
    """The special tokens the tokenizer puts before a text (its post-processor's BOS; none for many
    models), which every sequence the model sees starts with."""
    probe = "The"
    with_special = tokenizer.encode(probe).ids
    text = tokenizer.encode(probe, add_special_tokens=False).ids
    for start in range(len(with_special) - len(text) + 1):
        if text and with_special[start:start + len(text)] == text:
            return np.asarray(with_special[:start], dtype=np.int64)
    return np.zeros(0, dtype=np.int64)


def check_vocabulary(ids: np.ndarray, vocab_size: int, source: object) -> np.ndarray:
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise InputError(f"{source} has token ids outside the model's vocabulary [0, {vocab_size})")
    return ids


def load_token_file(path: Path, vocab_size: int) -> np.ndarray:
    try:
        ids = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputError(f"token file not found: {path}") from None
    except Exception as exc:  # numpy raises many types for a damaged header (EOFError, SyntaxError, ...)
        raise InputError(f"token file {path} is not a readable .npy of integers: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    if not isinstance(ids, np.ndarray):  # an .npz archive
        raise InputError(f"token file {path} is an archive of several arrays; give a .npy of token ids")
    if ids.dtype.kind not in "iu" or ids.ndim not in (1, 2):
        raise InputError(f"token file {path} must hold a 1-D or 2-D array of integers, got {ids.dtype} {ids.shape}")
    return check_vocabulary(ids.astype(np.int64), vocab_size, f"token file {path}")


def _draw_starts(length: int, sequences: int, seqlen: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, length - seqlen + 1, size=sequences)


def draw_sequences(stream: np.ndarray, sequences: int, seqlen: int, seed: int,
                   prefix: np.ndarray | None = None) -> np.ndarray:
    """`sequences` windows of `seqlen` tokens at random offsets of a token stream (seeded), each
    `prefix` (see sequence_prefix) and then `seqlen` less its length tokens of the stream."""
    prefix = _prefix(prefix, seqlen)
    length = seqlen - len(prefix)
    if len(stream) < length:
        raise InputError(
            f"calibration text too short: {len(stream)} tokens, need at least one sequence of {length}"
        )
    if len(stream) < sequences * length:
        log.warning("calibration text has %d tokens, fewer than %d x %d: windows will overlap",
                    len(stream), sequences, length)
    starts = _draw_starts(len(stream), sequences, length, seed)
    return np.stack([np.concatenate([prefix, stream[s:s + length]]) for s in starts])


def _prefix(prefix: np.ndarray | None, seqlen: int) -> np.ndarray:
    prefix = np.zeros(0, dtype=np.int64) if prefix is None else prefix
    if len(prefix) >= seqlen:
        raise UsageError(f"a sequence of {seqlen} tokens has no room for text after the tokenizer's "
                         f"{len(prefix)} leading special tokens")
    return prefix


def _calibration_streams(config: CalibrationConfig, checkpoint: Path,
                         vocab_size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The calibration source as token ids: a token file as saved (one 1-D stream or 2-D rows), or each
    text file (default: the general set's parts) through the checkpoint's tokenizer, one stream each;
    and what each sequence starts with (the tokenizer's leading special tokens; none for a token file)."""
    if config.token_file is not None:
        return [load_token_file(config.token_file, vocab_size)], np.zeros(0, dtype=np.int64)
    tokenizer = load_tokenizer(checkpoint)
    source = f"the tokenizer of {checkpoint}"
    return ([check_vocabulary(tokenize_files(tokenizer, [path]), vocab_size, source)
             for path in config.text_files or default_calibration_texts()],
            check_vocabulary(sequence_prefix(tokenizer), vocab_size, source))


def part_shares(sequences: int, parts: int) -> list[int]:
    """Sequences per part: equal, the first `sequences % parts` one more."""
    return [sequences // parts + (1 if index < sequences % parts else 0) for index in range(parts)]


def _chosen_rows(rows: int, config: CalibrationConfig) -> np.ndarray:
    """The rows of a 2-D token file that calibration takes (seeded), in order."""
    rng = np.random.default_rng(config.seed)
    return np.sort(rng.choice(rows, size=min(config.sequences, rows), replace=False))


def _part_draws(streams: list[np.ndarray], config: CalibrationConfig) -> list[tuple[np.ndarray, int, int]]:
    """(stream, sequences, seed) of each part that calibration draws from (one part: the config's seed)."""
    counts = part_shares(config.sequences, len(streams))
    return [(stream, count, config.seed + index) for index, (stream, count) in enumerate(zip(streams, counts))
            if count]


def calibration_tokens(config: CalibrationConfig, checkpoint: Path, vocab_size: int) -> np.ndarray:
    """(sequences, seqlen) token ids for calibration."""
    streams, prefix = _calibration_streams(config, checkpoint, vocab_size)
    ids = streams[0]
    if ids.ndim == 2:
        if ids.shape[1] < config.seqlen or ids.shape[0] < 1:
            raise InputError(f"token file rows are {ids.shape[1]} tokens, shorter than seqlen {config.seqlen}")
        return ids[_chosen_rows(ids.shape[0], config), :config.seqlen]
    return np.concatenate([draw_sequences(stream, count, config.seqlen, seed, prefix)
                           for stream, count, seed in _part_draws(streams, config)])


def held_out_windows(config: CalibrationConfig, checkpoint: Path, vocab_size: int, count: int) -> np.ndarray:
    """Up to `count` consecutive `seqlen` windows of the calibration text that no calibration sequence
    touches: a held-out slice of the same text (of every part in turn), for scoring allocation trials."""
    streams, prefix = _calibration_streams(config, checkpoint, vocab_size)
    if streams[0].ndim == 2:  # rows: calibration takes some, the others are held out
        stream = streams[0]
        taken = set(_chosen_rows(stream.shape[0], config).tolist())
        free = [row for row in range(stream.shape[0]) if row not in taken][:count]
        if not free:
            raise UsageError("every row of the token file is used for calibration: none is left to score on")
        return stream[free, :config.seqlen]
    length = config.seqlen - len(_prefix(prefix, config.seqlen))  # text tokens of a window
    per_part = []
    for stream, sequences, seed in _part_draws(streams, config):
        if len(stream) < length:
            raise InputError(f"calibration text too short: {len(stream)} tokens")
        used = np.zeros(len(stream), dtype=bool)
        for start in _draw_starts(len(stream), sequences, length, seed):
            used[start:start + length] = True
        per_part.append([np.concatenate([prefix, stream[s:s + length]])
                         for s in range(0, len(stream) - length + 1, length) if not used[s:s + length].any()])
    # round robin over the parts, so a few windows still see every genre
    windows = [part[i] for i in range(max(map(len, per_part), default=0)) for part in per_part if i < len(part)][:count]
    if not windows:
        raise UsageError("the calibration text has no window left that calibration does not use: give a longer "
                         "text or fewer --calib-sequences")
    return np.stack(windows)


def spread_sequences(tokens: np.ndarray, most_tokens: int | None) -> np.ndarray:
    """At most `most_tokens` of the (sequences, seqlen) `tokens`, as whole sequences spread evenly over
    them (the calibration set is its parts one after another: a prefix would be one part). At least one
    sequence; all of them when `most_tokens` is None or covers them."""
    sequences, seqlen = tokens.shape
    count = spread_count(sequences, seqlen, most_tokens)
    if count == sequences:
        return tokens
    return tokens[np.linspace(0, sequences - 1, count).round().astype(np.int64)]


def spread_count(sequences: int, seqlen: int, most_tokens: int | None) -> int:
    """How many of `sequences` sequences spread_sequences keeps."""
    return sequences if most_tokens is None else min(sequences, max(1, most_tokens // seqlen))


def held_out(names: Iterable[str], fraction: float, salt: str = "streamrom") -> set[str]:
    """The names (e.g. module names of a code corpus) held out for evaluation: those whose SHA-256
    (with `salt`) falls in the first `fraction` of the hash range. Stable across runs, machines and
    orderings, so a calibration/evaluation split by name is reproducible and disjoint by construction."""
    if not 0.0 < fraction < 1.0:
        raise UsageError(f"held-out fraction must be in (0, 1), got {fraction}")
    limit = int(fraction * 2 ** 64)
    return {name for name in names
            if int.from_bytes(hashlib.sha256(f"{salt}:{name}".encode()).digest()[:8], "big") < limit}


def evaluation_windows(stream: np.ndarray, seqlen: int, max_windows: int | None = None,
                       prefix: np.ndarray | None = None) -> np.ndarray:
    """Consecutive non-overlapping windows of `seqlen` tokens from the start, each `prefix` (see
    sequence_prefix) and then `seqlen` less its length tokens of the stream; the remainder is dropped."""
    prefix = _prefix(prefix, seqlen)
    length = seqlen - len(prefix)
    count = len(stream) // length
    if max_windows is not None:
        count = min(count, max_windows)
    if count < 1:
        raise InputError(f"evaluation text too short: {len(stream)} tokens, need at least {length}")
    text = stream[:count * length].reshape(count, length)
    return np.concatenate([np.broadcast_to(prefix, (count, len(prefix))), text], axis=1)


def text_windows(tokenizer: Tokenizer, paths: tuple[Path, ...] | list[Path], vocab_size: int, seqlen: int,
                 max_windows: int | None = None, source: object = "the tokenizer") -> np.ndarray:
    """Evaluation windows of text files as the model is run: each starts with the tokenizer's leading
    special tokens."""
    stream = check_vocabulary(tokenize_files(tokenizer, paths), vocab_size, source)
    prefix = check_vocabulary(sequence_prefix(tokenizer), vocab_size, source)
    return evaluation_windows(stream, seqlen, max_windows, prefix)
