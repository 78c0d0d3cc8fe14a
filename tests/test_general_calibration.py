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
