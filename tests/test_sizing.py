"""export-gguf --target-size (gguf.sizing): the choice of each linear's type and correction rank within a
file's bytes, as known-answer math; the whole command with llama.cpp's quantizer where it is installed."""
from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from streamrom.errors import InputError
from helpers import tiny_with_tokenizer as _tiny_with_tokenizer
from streamrom.gguf.correction import error_prices
from streamrom.gguf.sizing import Alternative, choose, lower_hull, type_price


def _points(pairs):
    return [Alternative(b, l, (str(i), 0)) for i, (b, l) in enumerate(pairs)]


def test_the_lower_hull_drops_dominated_and_concave_alternatives():
    """(25, 4) costs more than (20, 3) and loses more: gone; a point is kept only if the step to it saves
    less per byte than the step before it."""
    hull = lower_hull(_points([(10, 5.0), (20, 3.0), (25, 4.0), (30, 2.9), (40, 1.0)]))
    # slopes: 10→20 saves 0.2/byte, 20→30 0.01/byte, 30→40 0.19/byte: (30, 2.9) is above the chord 20→40
    assert [(a.bytes, a.loss) for a in hull] == [(10, 5.0), (20, 3.0), (40, 1.0)]
    hull = lower_hull(_points([(10, 5.0), (20, 4.5), (30, 2.0)]))  # 0.05 then 0.25 per byte: the middle goes
    assert [(a.bytes, a.loss) for a in hull] == [(10, 5.0), (30, 2.0)]
    hull = lower_hull(_points([(10, 5.0), (10, 4.0), (12, 4.0)]))  # same bytes: the lower loss; same loss: cheaper
    assert [(a.bytes, a.loss) for a in hull] == [(10, 4.0)]


def _brute_force(alternatives, budget):
    best = None
    for combination in itertools.product(*alternatives.values()):
        if sum(a.bytes for a in combination) <= budget:
            loss = sum(a.loss for a in combination)
            best = loss if best is None or loss < best else best
    return best


def test_the_greedy_is_optimal_where_every_step_costs_the_same_bytes():
    """With convex losses over equal steps of bytes, buying the step that saves the most per byte first
    is the exact optimum of the multiple-choice knapsack: checked against every combination, at every
    budget from the cheapest to the dearest."""
    rng = np.random.default_rng(0)
    for _ in range(20):
        alternatives = {}
        for name in "abcd":
            steps = rng.integers(2, 5)
            savings = np.sort(rng.uniform(0.1, 5.0, size=steps))[::-1]  # each step saves less than the last
            base, loss = int(rng.integers(5, 20)), float(rng.uniform(10, 20))
            points = [(base, loss)]
            for saving in savings:
                points.append((points[-1][0] + 3, points[-1][1] - saving))
            alternatives[name] = [Alternative(b, l, (name, k)) for k, (b, l) in enumerate(points)]
        cheapest = sum(options[0].bytes for options in alternatives.values())
        dearest = sum(options[-1].bytes for options in alternatives.values())
        for budget in range(cheapest, dearest + 1):
            chosen = choose(alternatives, budget)
            assert sum(a.bytes for a in chosen.values()) <= budget
            assert sum(a.loss for a in chosen.values()) == pytest.approx(_brute_force(alternatives, budget))


def test_the_greedy_passes_over_a_step_that_does_not_fit_and_refuses_too_small_a_budget():
    alternatives = {"big": _points([(10, 10.0), (30, 0.0)]),  # 0.5 per byte, 20 bytes
                    "small": _points([(10, 5.0), (12, 4.0)])}  # 0.5 per byte... 2 bytes
    chosen = choose(alternatives, 25)  # the big step does not fit: the small one is still bought
    assert (chosen["big"].bytes, chosen["small"].bytes) == (10, 12)
    assert {name: a.bytes for name, a in choose(alternatives, 100).items()} == {"big": 30, "small": 12}
    with pytest.raises(InputError):
        choose(alternatives, 19)


def test_a_types_price_is_the_sum_of_its_error_directions_prices():
    """Σ_j s_j (E C Eᵀ)_jj, against a loop over its definition, and the same loss as error_prices spread
    over the error's directions (both shapes: wide and tall)."""
    rng = np.random.default_rng(1)
    for out_features, in_features in ((6, 9), (9, 6)):
        error = rng.standard_normal((out_features, in_features))
        root = rng.standard_normal((in_features, 3 * in_features))
        moment = root @ root.T / root.shape[1]
        sensitivity = rng.uniform(0.1, 2.0, size=out_features)
        expected = sum(sensitivity[j] * error[j] @ moment @ error[j] for j in range(out_features))
        assert type_price(error, moment, sensitivity) == pytest.approx(expected, rel=1e-10)
        directions = error_prices(error, moment, sensitivity, damping=0.0)
        assert float(np.sum(directions)) == pytest.approx(expected, rel=1e-6)
        assert np.all(np.diff(directions) <= 1e-9 * expected) or out_features > in_features


# -- the command ------------------------------------------------------------------------------------------------
def _llama_quantize():
    found = os.environ.get("STREAMROM_LLAMA_QUANTIZE") or shutil.which("llama-quantize")
    return found if found and os.access(found, os.X_OK) else None


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "streamrom.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return _tiny_with_tokenizer(tmp_path_factory.mktemp("source"))


@pytest.mark.parametrize("case", ["with --type", "adapter alone", "not positive", "no llama-quantize",
                                  "candidate unknown", "sizing option alone", "imatrix and none"])
def test_a_sized_export_is_refused_in_one_line(tiny_llama, tmp_path, case):
    env = {k: v for k, v in os.environ.items() if k != "STREAMROM_LLAMA_QUANTIZE"}
    env["PATH"] = "/usr/bin:/bin"  # no llama-quantize there
    extra = {"with --type": ["--target-size", "0.001", "--type", "q4_k_m"],
             "adapter alone": ["--type", "f16", "--adapter", tmp_path / "a.gguf"],
             "not positive": ["--target-size", "-1"],
             "no llama-quantize": ["--target-size", "0.001"],
             "candidate unknown": ["--target-size", "0.001", "--candidate-types", "q3_k_m"],
             "sizing option alone": ["--type", "f16", "--candidate-types", "q4_k"],
             "imatrix and none": ["--target-size", "0.001", "--imatrix", tmp_path / "m.gguf", "--no-imatrix"]}[case]
    result = _cli("export-gguf", tiny_llama, tmp_path / "out.gguf", *extra, env=env)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("streamrom: error:"), result.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.pipeline
@pytest.mark.skipif(_llama_quantize() is None, reason="llama.cpp's llama-quantize is not installed "
                                                      "(set STREAMROM_LLAMA_QUANTIZE; docs/gguf.md)")
def test_a_sized_file_meets_its_size_with_mixed_types_and_corrections(tmp_path, tiny_tokens):
    """A tiny llama whose rows fit the K-quants: at a size between its all-q2_k and all-q8_0 files the linears
    get several types, the file is the bytes planned and within the size; with --adapter the file and the
    adapter together are; too small a size is refused in one line before pass 1, nothing left behind."""
    import gguf

    source = _tiny_with_tokenizer(tmp_path, hidden=256)
    calibration = ["--calib-tokens", tiny_tokens, "--calib-sequences", "4", "--calib-seqlen", "32"]
    sizes = {}
    for kind in ("q2_k", "q8_0"):
        made = _cli("export-gguf", source, tmp_path / f"{kind}.gguf", "--target-size", "1", "--candidate-types", kind,
                    "--embedding-type", "q8_0", "--llama-quantize", _llama_quantize(), *calibration)
        assert made.returncode == 0, made.stderr
        sizes[kind] = (tmp_path / f"{kind}.gguf").stat().st_size
    target = (sizes["q2_k"] + sizes["q8_0"]) // 2
    result = _cli("export-gguf", source, tmp_path / "out.gguf", "--target-size", target / 1e9, "--embedding-type",
                  "q8_0", "--llama-quantize", _llama_quantize(), *calibration, "--report", tmp_path / "out.json")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    written = (tmp_path / "out.gguf").stat().st_size
    assert written == report["bytes"] == report["predicted_bytes"] and target - 64 * 1024 < written <= target
    kinds = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(tmp_path / "out.gguf").tensors}
    assert len({kinds[name] for name in kinds if name.startswith("blk") and "norm" not in name}) > 1
    assert len(set(report["types"].values())) > 1

    corrected = _cli("export-gguf", source, tmp_path / "c.gguf", "--target-size", target / 1e9, "--embedding-type",
                     "q8_0", "--adapter", tmp_path / "c.lora.gguf", "--llama-quantize", _llama_quantize(),
                     *calibration, "--report", tmp_path / "c.json")
    assert corrected.returncode == 0, corrected.stderr
    report = json.loads((tmp_path / "c.json").read_text())
    assert (tmp_path / "c.gguf").stat().st_size + (tmp_path / "c.lora.gguf").stat().st_size <= target
    assert any(report["ranks"].values()) and report["total_bytes"] <= target

    refused = _cli("--quiet", "export-gguf", source, tmp_path / "small.gguf", "--target-size", sizes["q2_k"] / 2e9,
                   "--llama-quantize", _llama_quantize(), *calibration)
    assert refused.returncode == 3 and len(refused.stderr.splitlines()) == 1, refused.stderr
    assert "smallest" in refused.stderr
    assert not (tmp_path / "small.gguf").exists() and not list(tmp_path.glob(".*"))
