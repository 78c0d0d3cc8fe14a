"""The general calibration set (issue 20): shipped parts, their record, the equal-share draw, and their
disjointness from every evaluation text."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from streamrom.stream.calibration import (CalibrationConfig, calibration_tokens, default_calibration_texts,
                                   draw_sequences, held_out_windows, load_tokenizer, part_shares,
                                   tokenize_files)

from conftest import EVAL_TEXT, REPO

GENERAL = REPO / "streamrom" / "data" / "general"
SOURCES = json.loads((GENERAL / "SOURCES.json").read_text(encoding="utf-8"))
EVALUATION_TEXTS = [REPO / entry["file"] for entry in SOURCES["evaluation"].values()]


def test_the_default_is_the_general_set_and_its_record_is_true():
    parts = default_calibration_texts()
    assert [p.name for p in parts] == [f"{name}.txt" for name in SOURCES["parts"]]
    assert len(parts) >= 4
    for entry in [*SOURCES["parts"].values(), *SOURCES["evaluation"].values()]:
        data = (REPO / entry["file"]).read_bytes()
        if entry["file"] != "data/austen/prideprejudice.txt":  # recorded before the set, not by its build
            assert len(data) == entry["bytes"] and hashlib.sha256(data).hexdigest() == entry["sha256"], entry["file"]
        assert entry["licence"] and entry["source"] and entry["genre"]
    assert EVAL_TEXT in EVALUATION_TEXTS
    # the shipped text stays small: a few MB at most
    assert sum(p.stat().st_size for p in parts) < 2_000_000


def _pieces(text: str, size: int = 120, step: int = 60) -> set[str]:
    """Overlapping pieces of a text's lines (whitespace normalised), long enough to be unique to it."""
    flat = " ".join(text.split())
    return {flat[i:i + size] for i in range(0, max(1, len(flat) - size), step)}


def test_no_calibration_part_shares_text_with_an_evaluation_text():
    parts = " ".join(" ".join(p.read_text(encoding="utf-8").split()) for p in default_calibration_texts())
    for path in EVALUATION_TEXTS:
        pieces = _pieces(path.read_text(encoding="utf-8"))
        shared = [piece for piece in pieces if piece in parts]
        # code and reST share boilerplate lines (licence headers, directives): none of a piece's length
        assert not shared, f"{path.name} shares {len(shared)} pieces with the calibration set, e.g. {shared[0]!r}"
    docs, code = SOURCES["parts"]["python-docs"], SOURCES["parts"]["python-code"]
    assert not set(docs["pages"]) & set(SOURCES["evaluation"]["python-docs"]["pages"])
    assert not set(code["files"]) & set(SOURCES["evaluation"]["python-code"]["files"])


def test_parts_share_the_sequences_equally():
    assert part_shares(32, 4) == [8, 8, 8, 8]
    assert part_shares(10, 4) == [3, 3, 2, 2]
    assert part_shares(3, 4) == [1, 1, 1, 0]


def test_the_default_draw_takes_each_part_for_its_share(smollm2_dir):
    config = CalibrationConfig(sequences=8, seqlen=64, seed=5)
    tokens = calibration_tokens(config, smollm2_dir, 49152)
    tokenizer = load_tokenizer(smollm2_dir)
    parts = default_calibration_texts()
    expected = np.concatenate([draw_sequences(tokenize_files(tokenizer, [part]), count, 64, 5 + index)
                               for index, (part, count) in enumerate(zip(parts, part_shares(8, len(parts))))])
    np.testing.assert_array_equal(tokens, expected)
    # one text: exactly the single-text draw (the grids measured before the general set)
    emma = CalibrationConfig(text_files=(parts[0],), sequences=8, seqlen=64, seed=5)
    np.testing.assert_array_equal(calibration_tokens(emma, smollm2_dir, 49152),
                                  draw_sequences(tokenize_files(tokenizer, [parts[0]]), 8, 64, 5))
    # the held-out windows (bayes scoring) come from every part, none touched by the draw
    windows = held_out_windows(config, smollm2_dir, 49152, 8)
    assert windows.shape == (8, 64)
    drawn = {tuple(row) for row in tokens}
    assert not any(tuple(row) in drawn for row in windows)


@pytest.mark.parametrize("path", EVALUATION_TEXTS, ids=lambda p: p.name)
def test_each_evaluation_text_gives_enough_windows(path, smollm2_dir):
    count = len(tokenize_files(load_tokenizer(smollm2_dir), [path])) // 512
    assert count >= 20, f"{path.name}: {count} windows of 512 tokens"


# -- text as the model is run: the tokenizer's leading special tokens start every sequence ----------------
def _word_tokenizer(bos: bool):
    """A word-level tokenizer over a small vocabulary; with `bos`, a post-processor that puts <bos>
    (id 1) before every text, as Gemma's and Llama's do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<unk>", "<bos>"] + [f"w{i}" for i in range(40)] + ["The"]
    tokenizer = Tokenizer(models.WordLevel({word: i for i, word in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return tokenizer


def test_the_prefix_is_what_the_tokenizer_puts_before_a_text():
    from streamrom.stream.calibration import sequence_prefix

    assert sequence_prefix(_word_tokenizer(bos=True)).tolist() == [1]
    assert sequence_prefix(_word_tokenizer(bos=False)).tolist() == []


def test_sequences_and_windows_start_with_the_prefix_then_text():
    from streamrom.stream.calibration import evaluation_windows

    stream = np.arange(100, 120, dtype=np.int64)
    prefix = np.array([1], dtype=np.int64)
    # windows: the prefix, then 3 text tokens each, consecutive; the remainder dropped
    np.testing.assert_array_equal(evaluation_windows(stream, 4, 2, prefix),
                                  [[1, 100, 101, 102], [1, 103, 104, 105]])
    assert evaluation_windows(stream, 4, None, prefix).shape == (6, 4)
    np.testing.assert_array_equal(evaluation_windows(stream, 4, 2), [[100, 101, 102, 103], [104, 105, 106, 107]])
    # draws: the same starts as a draw of 3-token windows, each after the prefix
    drawn = draw_sequences(stream, 5, 4, seed=3, prefix=prefix)
    plain = draw_sequences(stream, 5, 3, seed=3)
    np.testing.assert_array_equal(drawn[:, 0], 1)
    np.testing.assert_array_equal(drawn[:, 1:], plain)
    with pytest.raises(Exception, match="no room for text"):
        evaluation_windows(stream, 2, None, np.array([1, 1], dtype=np.int64))


def test_a_bos_model_calibrates_and_evaluates_on_sequences_that_start_with_bos(tmp_path):
    """Calibration draws, bayes's held-out windows and eval's windows of a text, for a tokenizer that
    puts BOS first: every sequence is BOS and then text the stream holds, and the held-out windows
    share no text position with the calibration draw."""
    from streamrom.stream.calibration import text_windows

    folder = tmp_path / "model"
    folder.mkdir()
    _word_tokenizer(bos=True).save(str(folder / "tokenizer.json"))
    rng = np.random.default_rng(0)
    text = tmp_path / "text.txt"
    ids = rng.integers(2, 42, size=3000)
    text.write_text(" ".join(f"w{i - 2}" for i in ids), encoding="utf-8")
    config = CalibrationConfig(text_files=(text,), sequences=6, seqlen=32, seed=2)
    tokens = calibration_tokens(config, folder, 43)
    assert tokens.shape == (6, 32) and (tokens[:, 0] == 1).all() and (tokens[:, 1:] >= 2).all()
    starts = [next(s for s in range(len(ids)) if (ids[s:s + 31] == row[1:]).all()) for row in tokens]
    held = held_out_windows(config, folder, 43, 10)
    assert held.shape == (10, 32) and (held[:, 0] == 1).all()
    held_starts = [next(s for s in range(0, len(ids), 31) if (ids[s:s + 31] == row[1:]).all()) for row in held]
    taken = {p for s in starts for p in range(s, s + 31)}
    assert not taken & {p for s in held_starts for p in range(s, s + 31)}
    windows = text_windows(load_tokenizer(folder), [text], 43, 32, 4)
    np.testing.assert_array_equal(windows, np.concatenate([np.ones((4, 1), np.int64), ids[:124].reshape(4, 31)], 1))
