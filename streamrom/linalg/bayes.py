"""Bayesian-optimised rank allocation (after Bolaco, arXiv 2405.10616), an optional extra (optuna).

The search runs over a few group multipliers — one per module type and half of the model (q_proj in
the first half, q_proj in the second, ...) — applied to a base plan (the spectrum allocation): slot
k's ratio becomes the base ratio times its group's multiplier, rescaled by one common factor so the
whole model meets its size (allocation.scaled_ranks). A Gaussian-process sampler (optuna's
GPSampler, seeded) proposes multipliers; every trial is scored by `score(ranks)`, which the caller
makes a real streamed compression plus a streamed perplexity on held-out calibration text. The first
trial is the base plan itself, so the result is never worse than it on that score.

Pure of I/O: the caller provides the scoring; this module only proposes and keeps the best.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from .allocation import Slot, scaled_ranks
from ..errors import UsageError

log = logging.getLogger(__name__)

# Per group, on a log scale, around the base plan's ratio. A first version searched 0.5-2 with
# optuna's default 10 random trials before the GP: on the real model at 40 % none of 11 trials beat the
# base plan (the random ones scored 8-50 % worse, the best GP one 5 % worse), so the search stays closer
# to the plan, which is already first-order optimal, and the surrogate guides all but the first trials.
MULTIPLIER_RANGE = (2 / 3, 1.5)
STARTUP_TRIALS = 4  # the base plan and 3 random trials; then the Gaussian process proposes


@dataclass(frozen=True)
class BayesConfig:
    trials: int = 12  # scored compressions, the base plan's included
    seed: int = 0
    held_out_windows: int = 8  # windows of the calibration text's held-out slice that score a trial
    # A shared search (compression/study.py): an optuna storage URL that workers on any machine join; None: in process
    study: str | None = None
    study_name: str | None = None  # None: named after the run's arguments and calibration tokens
    heartbeat_seconds: int = 60  # a worker silent for 3 heartbeats is dead: its trial is run again

    def __post_init__(self) -> None:
        if self.trials < 1:
            raise UsageError(f"--trials must be at least 1, got {self.trials}")
        if self.heartbeat_seconds < 1:
            raise UsageError(f"--heartbeat must be at least 1 second, got {self.heartbeat_seconds}")
        if self.study_name is not None and self.study is None:
            raise UsageError("--study-name names a shared study: give its storage with --study")


@dataclass
class SearchResult:
    ranks: dict[str, int | None]
    score: float
    trials: list[dict] = field(default_factory=list)  # per trial: multipliers, score


def group_of(slot: Slot, num_layers: int) -> str:
    """A slot's search group: its module type and the half of the model it is in."""
    half = "early" if slot.block < num_layers / 2 else "late"
    return f"{slot.key.rsplit('.', 1)[-1]}@{half}"


def base_ratio(slot: Slot, rank: int | None) -> float:
    """The fraction of the slot's dense parameters that the base plan's rank keeps (1 for dense)."""
    return 1.0 if rank is None else slot.factored(rank) / slot.dense


def search_groups(slots: Sequence[Slot], num_layers: int) -> list[str]:
    return sorted({group_of(slot, num_layers) for slot in slots})


def startup_multipliers(groups: Sequence[str], seed: int, count: int) -> list[dict[str, float]]:
    """The search's first points: the base plan (every multiplier 1), then `count - 1` log-uniform draws."""
    rng = np.random.default_rng(seed)
    low, high = np.log(MULTIPLIER_RANGE)
    return [{group: 1.0 for group in groups}] + [
        {group: float(np.exp(rng.uniform(low, high))) for group in groups} for _ in range(count - 1)]


def trial_ranks(slots: Sequence[Slot], budget: int, base: Mapping[str, int | None], multipliers: Mapping[str, float],
                num_layers: int) -> dict[str, int | None]:
    """A trial's plan: the base plan itself where every multiplier is 1, else the base ratios scaled."""
    if all(value == 1.0 for value in multipliers.values()):
        return dict(base)
    return ranks_for(slots, budget, base, multipliers, num_layers)


def ranks_for(slots: Sequence[Slot], budget: int, base: Mapping[str, int | None], multipliers: Mapping[str, float],
              num_layers: int) -> dict[str, int | None]:
    weights = {slot.key: base_ratio(slot, base[slot.key]) * multipliers[group_of(slot, num_layers)] for slot in slots}
    return scaled_ranks(slots, budget, weights)


def search(slots: Sequence[Slot], budget: int, base: Mapping[str, int | None],
           score: Callable[[dict[str, int | None]], float], config: BayesConfig, num_layers: int) -> SearchResult:
    """The best-scoring plan of `config.trials` trials (lower score is better), the first being `base`."""
    try:
        import optuna
    except ImportError:
        raise UsageError("--allocate bayes needs optuna: pip install 'streamrom[bayes]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    groups = search_groups(slots, num_layers)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.GPSampler(
        seed=config.seed, n_startup_trials=STARTUP_TRIALS))
    study.enqueue_trial({group: 1.0 for group in groups})
    best = SearchResult(dict(base), math.inf)
    for number in range(config.trials):
        trial = study.ask()
        multipliers = {group: trial.suggest_float(group, *MULTIPLIER_RANGE, log=True) for group in groups}
        ranks = dict(base) if number == 0 else ranks_for(slots, budget, base, multipliers, num_layers)
        value = score(ranks)
        study.tell(trial, value)
        best.trials.append({"trial": number, "score": value, "multipliers": multipliers})
        log.info("bayes trial %d/%d: held-out perplexity %.4f%s", number + 1, config.trials, value,
                 " (best so far)" if value < best.score else "", extra={"progress": (number + 1, config.trials, "bayes")})
        if value < best.score:
            best.ranks, best.score = ranks, value
    return best
