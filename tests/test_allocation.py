"""Known-answer tests of rank allocation on synthetic shapes and spectra (no model)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from streamrom.linalg.allocation import STEP, Slot, last_n_ranks, spectrum_ranks, total_params, uniform_ranks
from streamrom.errors import UsageError

LLAMA_LIKE = {"q": (64, 64), "k": (32, 64), "v": (32, 64), "o": (64, 64), "gate": (160, 64), "up": (160, 64),
              "down": (64, 160)}


def model_slots(blocks: int = 4, shapes=LLAMA_LIKE) -> list[Slot]:
    return [Slot(f"model.layers.{b}.{name}", b, o, i) for b in range(blocks) for name, (o, i) in shapes.items()]


def largest_step(slots) -> int:
    return max(slot.factored(STEP) - slot.factored(0) for slot in slots)


WIDE = {"q": (256, 256), "k": (128, 256), "v": (128, 256), "o": (256, 256), "gate": (640, 256),
        "up": (640, 256), "down": (256, 640)}


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7, 0.9])
def test_uniform_meets_the_budget_to_one_rank_step(fraction):
    slots = model_slots(shapes=WIDE)
    dense = total_params(slots, {})
    budget = int(fraction * dense)
    ranks = uniform_ranks(slots, budget)
    used = total_params(slots, ranks)
    assert used <= budget
    assert budget - used < largest_step(slots)
    assert all(r is None or (r % STEP == 0 and r >= STEP) for r in ranks.values())
    # one ratio: each slot's rank is within one step of rank_for at the common ratio
    ratios = [s.params(ranks[s.key]) / s.dense for s in slots]
    assert max(ratios) - min(ratios) < 0.15


def test_everything_dense_when_the_budget_allows_it_and_error_when_unreachable():
    slots = model_slots()
    dense = total_params(slots, {})
    assert set(uniform_ranks(slots, dense).values()) == {None}
    assert set(spectrum_ranks(slots, {s.key: np.ones(64) for s in slots}, dense).values()) == {None}
    with pytest.raises(UsageError, match="target"):
        uniform_ranks(slots, 1000)
    with pytest.raises(UsageError, match="target"):
        spectrum_ranks(slots, {s.key: np.ones(64) for s in slots}, 1000)


def test_spectrum_gives_rank_to_the_flat_spectrum_not_the_low_rank_one():
    """Two equal slots: A's energy is all in its first 8 directions, B's is spread evenly. Every
    step after the first is worth nothing in A, so B gets all the remaining budget."""
    a, b = Slot("a", 0, 64, 64), Slot("b", 0, 64, 64)
    spectra = {"a": np.r_[np.ones(8), np.zeros(56)], "b": np.ones(64)}
    budget = a.factored(8) + b.factored(24)
    ranks = spectrum_ranks([a, b], spectra, budget)
    assert ranks == {"a": 8, "b": 24}
    assert total_params([a, b], ranks) == budget


def test_spectrum_greedy_matches_brute_force_optimum():
    """Against every rank combination of three small slots: the greedy keeps as much value as the
    best combination that fits, up to one step's worth."""
    rng = np.random.default_rng(0)
    slots = [Slot("x", 0, 48, 32), Slot("y", 0, 32, 32), Slot("z", 1, 64, 24)]
    spectra = {s.key: np.sort(rng.exponential(size=min(s.out_features, s.in_features)) ** (3 + i))[::-1]
               for i, s in enumerate(slots)}

    def energy(ranks):
        kept = 0.0
        for s in slots:
            values = spectra[s.key]
            kept += values.sum() if ranks[s.key] is None else values[:ranks[s.key]].sum()
        return kept

    options = {s.key: list(range(STEP, s.max_saving_rank() + 1, STEP)) + [None] for s in slots}
    for fraction in (0.5, 0.7, 0.85):
        budget = int(fraction * total_params(slots, {}))
        best = max((energy(dict(zip(options, combo))) for combo in itertools.product(*options.values())
                    if total_params(slots, dict(zip(options, combo))) <= budget), default=None)
        ranks = spectrum_ranks(slots, spectra, budget)
        assert total_params(slots, ranks) <= budget
        step_worth = max(spectra[s.key][:STEP].sum() for s in slots)
        assert energy(ranks) >= best - step_worth


def test_spectrum_meets_the_budget_to_one_rank_step():
    slots = model_slots()
    rng = np.random.default_rng(1)
    spectra = {s.key: rng.exponential(size=64) ** 4 for s in slots}
    budget = int(0.6 * total_params(slots, {}))
    ranks = spectrum_ranks(slots, spectra, budget)
    used = total_params(slots, ranks)
    assert used <= budget and budget - used < largest_step(slots)


def test_last_n_factors_the_fewest_last_blocks():
    slots = model_slots(blocks=6)
    dense = total_params(slots, {})
    per_block = dense // 6
    at_ratio = total_params([s for s in slots if s.block == 5], uniform_ranks([s for s in slots if s.block == 5],
                                                                               int(0.5 * per_block)))
    # a budget that two blocks at ratio 0.5 reach and one block does not
    budget = dense - int(1.5 * (per_block - at_ratio))
    ranks = last_n_ranks(slots, budget, 0.5, 6)
    factored_blocks = {s.block for s in slots if ranks[s.key] is not None}
    assert factored_blocks == {4, 5}
    used = total_params(slots, ranks)
    assert used <= budget and budget - used < largest_step(slots)


def test_bias_and_centered_costs_are_counted():
    from streamrom.compression.methods import METHODS

    centered = METHODS["rom-centered"]
    slot = Slot("q", 0, 64, 64, bias=True, extra=centered.extra_parameters(64))
    assert slot.dense == 64 * 64 + 64
    assert slot.factored(16) == 16 * 128 + 16 + 64 == centered.parameters(64, 64, 16, bias=True)
    assert slot.max_saving_rank() == 24  # 32*128+32+64 > 4160 >= 24*128+24+64
