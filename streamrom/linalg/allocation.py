"""Rank allocation: which rank each linear of each block gets, for a whole-model parameter budget.

Pure functions of shapes and eigen-spectra (no model, no I/O). A `Slot` is one linear of one block
that may be factored; everything else in the model is a fixed cost the caller subtracts first.

- `uniform_ranks`: one ratio for every slot, the largest that fits, then single rank steps (or the
  step to dense) handed out in slot order until none fits: the budget is met to within one step.
- `last_n_ranks` (ROM's scheme): only the last N blocks are factored, N the fewest that reach the
  budget at the given ratio; their common ratio is then raised as far as the budget allows.
- `spectrum_ranks`: a global greedy over rank steps. Each slot comes with the value of each of its
  output directions, in the order its basis keeps them (pass 1 prices them in loss units: the
  direction's energy times the loss's squared gradient along it, so slots are comparable); a step
  keeps STEP more directions at a cost of STEP·(out + in) parameters, and the best value per
  parameter is bought first. Keeping a slot dense is its last step. Where values fall along each
  slot (as eigenvalues do) the greedy is the optimum of the relaxed problem.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np

from .decompose import RANK_MULTIPLE as STEP, rank_for
from ..errors import UsageError


def factored_parameters(out_features: int, in_features: int, rank: int, bias: bool, extra: int = 0) -> int:
    """Parameters of rank-`rank` factors of an out x in linear: a bias b becomes Vᵀb (rank entries);
    `extra`: what the method adds beyond the factors (methods.Method.extra_parameters)."""
    return rank * (out_features + in_features) + (rank if bias else 0) + extra


@dataclass(frozen=True)
class Slot:
    """One factorable linear: `key` is its full tensor prefix, e.g. model.layers.3.mlp.down_proj; or,
    with `unit_size`, one structured unit of a block (model.layers.3.mlp.neurons): its "rank" is how
    many of its `unit_size` units stay, each holding `unit_parameters` (out/in unused)."""

    key: str
    block: int
    out_features: int
    in_features: int
    bias: bool = False
    extra: int = 0  # parameters the method adds to a factored linear (methods.Method.extra_parameters)
    unit_size: int = 0
    unit_parameters: int = 0

    @property
    def structured(self) -> bool:
        return self.unit_size > 0

    @property
    def full_rank(self) -> int:
        """How many directions (or units) the slot has."""
        return self.unit_size if self.structured else min(self.out_features, self.in_features)

    @property
    def dense(self) -> int:
        if self.structured:
            return self.unit_size * self.unit_parameters
        return self.out_features * self.in_features + (self.out_features if self.bias else 0)

    def factored(self, rank: int) -> int:
        if self.structured:
            return rank * self.unit_parameters
        return factored_parameters(self.out_features, self.in_features, rank, self.bias, self.extra)

    def params(self, rank: int | None) -> int:
        return self.dense if rank is None else self.factored(rank)

    def rank_at(self, ratio: float) -> int:
        """The rank (units) holding `ratio` of the dense parameters, rounded down to STEP."""
        if self.structured:
            return int(ratio * self.unit_size // STEP) * STEP
        return rank_for(ratio, self.out_features, self.in_features, STEP)

    def max_saving_rank(self) -> int:
        """The largest multiple of STEP whose factors (units) are smaller than the dense linear (0: none)."""
        rank = (self.full_rank // STEP) * STEP
        while rank > 0 and self.factored(rank) >= self.dense:
            rank -= STEP
        return rank


def total_params(slots: Iterable[Slot], ranks: Mapping[str, int | None]) -> int:
    return sum(slot.params(ranks.get(slot.key)) for slot in slots)


def _at_ratio(slots: Sequence[Slot], ratio: float, weights: Mapping[str, float] | None = None) -> dict[str, int | None]:
    """decompose.rank_for's rank at `ratio` (times the slot's weight, if given), kept between STEP
    and the largest saving rank, so the count is monotone in the ratio (None: dense, where factors
    never save or the ratio reaches 1)."""
    ranks: dict[str, int | None] = {}
    for slot in slots:
        top = slot.max_saving_rank()
        here = ratio * (weights[slot.key] if weights is not None else 1.0)
        rank = slot.rank_at(min(here, 1.0))
        ranks[slot.key] = None if here >= 1.0 or top == 0 else min(max(rank, STEP), top)
    return ranks


def _check_reachable(slots: Sequence[Slot], budget: int) -> None:
    floor = sum(min(slot.factored(STEP), slot.dense) for slot in slots)
    if budget < floor:
        raise UsageError(f"the target is below what rank {STEP} everywhere gives; "
                         f"the compressible linears need at least {floor:,} parameters, the target leaves {budget:,}")


def uniform_ranks(slots: Sequence[Slot], budget: int) -> dict[str, int | None]:
    """The same ratio everywhere, the largest whose parameters fit `budget`, then topped up."""
    return scaled_ranks(slots, budget, {slot.key: 1.0 for slot in slots})


def scaled_ranks(slots: Sequence[Slot], budget: int, weights: Mapping[str, float]) -> dict[str, int | None]:
    """Slot k at ratio min(1, m·weights[k]), m the largest common factor whose parameters fit
    `budget`, then topped up step by step (all weights 1: one ratio everywhere)."""
    if total_params(slots, dict.fromkeys(s.key for s in slots)) <= budget:
        return {slot.key: None for slot in slots}  # everything dense already fits
    _check_reachable(slots, budget)
    low, high = 0.0, 1.0 / max(min(weights[s.key] for s in slots), 1e-9)
    for _ in range(60):  # bisection on the factor; the parameter count is monotone in it
        middle = (low + high) / 2
        if total_params(slots, _at_ratio(slots, middle, weights)) <= budget:
            low = middle
        else:
            high = middle
    return _top_up(slots, _at_ratio(slots, low, weights), budget)


def _top_up(slots: Sequence[Slot], ranks: dict[str, int | None], budget: int) -> dict[str, int | None]:
    """Add single rank steps, one slot after the other, while the total stays within budget."""
    used = total_params(slots, ranks)
    if used > budget:
        raise UsageError(f"cannot meet the parameter target: {used:,} needed at the smallest ranks, budget {budget:,}")
    progress = True
    while progress:
        progress = False
        for slot in slots:
            rank = ranks[slot.key]
            if rank is None:
                continue
            next_rank = None if rank + STEP > slot.max_saving_rank() else rank + STEP  # or dense, cheaper than a step
            cost = slot.params(next_rank) - slot.factored(rank)
            if used + cost <= budget:
                ranks[slot.key] = next_rank
                used += cost
                progress = True
    return ranks


def last_n_ranks(slots: Sequence[Slot], budget: int, ratio: float, num_layers: int) -> dict[str, int | None]:
    """Factor only the last N blocks, N the fewest for which `ratio` reaches the budget."""
    all_dense = dict.fromkeys((s.key for s in slots), None)
    if total_params(slots, all_dense) <= budget:
        return all_dense
    for count in range(1, num_layers + 1):
        chosen = [s for s in slots if s.block >= num_layers - count]
        rest = [s for s in slots if s.block < num_layers - count]
        dense_rest = total_params(rest, all_dense)
        if dense_rest + total_params(chosen, _at_ratio(chosen, ratio)) <= budget:
            return {**all_dense, **uniform_ranks(chosen, budget - dense_rest)}
    return uniform_ranks(slots, budget)  # even every block at `ratio` is too big: go below it


def spectrum_ranks(slots: Sequence[Slot], spectra: Mapping[str, np.ndarray], budget: int) -> dict[str, int | None]:
    """Greedy allocation of rank steps by value kept per parameter.

    `spectra[key]` is the value of each of the slot's output directions in the order its basis keeps
    them (at least the top min(out, in)), in units common to all slots.
    """
    if total_params(slots, dict.fromkeys(s.key for s in slots)) <= budget:
        return {slot.key: None for slot in slots}
    _check_reachable(slots, budget)
    ranks: dict[str, int | None] = {}
    values_of: dict[str, np.ndarray] = {}  # each slot's direction values
    heap: list[tuple[float, int, str]] = []
    by_key = {slot.key: slot for slot in slots}
    used = 0
    for order, slot in enumerate(slots):
        values = np.clip(np.asarray(spectra[slot.key], dtype=np.float64), 0.0, None)
        values_of[slot.key] = values[:slot.full_rank]
        if slot.max_saving_rank() == 0:
            ranks[slot.key] = None  # factors never save here: it stays dense, at its dense cost
            used += slot.dense
            continue
        ranks[slot.key] = STEP
        used += slot.factored(STEP)
        heapq.heappush(heap, (-_step_value(slot, STEP, values_of[slot.key]), order, slot.key))
    if used > budget:
        raise UsageError(f"cannot meet the parameter target: {used:,} needed at rank {STEP}, budget {budget:,}")
    while heap:
        _, order, key = heapq.heappop(heap)
        slot, rank = by_key[key], ranks[key]
        next_rank = None if rank + STEP > slot.max_saving_rank() else rank + STEP
        cost = slot.params(next_rank) - slot.factored(rank)
        if used + cost > budget:
            continue  # this slot's next step does not fit; cheaper steps of others still might
        ranks[key] = next_rank
        used += cost
        if next_rank is not None:
            heapq.heappush(heap, (-_step_value(slot, next_rank, values_of[key]), order, key))
    return ranks


def _step_value(slot: Slot, rank: int, values: np.ndarray) -> float:
    """Value per parameter of the slot's best run of further steps from `rank` (one or more rank
    steps, or all the way to dense): the greedy then buys the run's first step. Looking ahead keeps
    a slot whose next step is worth little but whose following ones are worth much from being
    passed over (values priced by the loss need not fall along a slot)."""
    base = slot.factored(rank)
    best = 0.0
    kept = 0.0
    top = slot.max_saving_rank()
    for upper in range(rank + STEP, top + 1, STEP):
        kept += float(values[upper - STEP:upper].sum())
        best = max(best, kept / (slot.factored(upper) - base))
    return max(best, float(values[rank:].sum()) / max(1, slot.dense - base))


def choose_alternatives(slots: Sequence[Slot], spectra: Mapping[str, np.ndarray], budget: int,
                        alternatives: Sequence[tuple[Slot, Sequence[Slot]]],
                        decided: Iterable[str] = ()) -> list[Slot]:
    """The mixed mode's choice: for each (structured unit, factored slots of the same linears), the
    form that prices best, by Lagrangian relaxation. At a price μ per parameter every slot takes the
    rank minimising lost value + μ·parameters, and each alternative the form whose sum is lower (the
    unit where both keep everything dense: the same parameters, nothing narrowed); μ is the smallest
    price whose choices fit `budget`. Units in `decided` take their unit form at every price without
    comparing (unit_dominates showed it, from lower bounds on the factored forms' values). Returns the
    slots to allocate over (spectrum_ranks then meets the budget within a step); the others stay dense
    (a unit not chosen is not narrowed)."""
    decided = set(decided)
    unpriced = {s.key for unit, factored in alternatives if unit.key in decided for s in factored}
    curves = {slot.key: _curve(slot, spectra[slot.key]) for slot in slots if slot.key not in unpriced}
    in_alternative = {s.key for unit, factored in alternatives for s in (unit, *factored)}
    fixed = [slot for slot in slots if slot.key not in in_alternative]

    def choose(price: float) -> tuple[list[Slot], int]:
        chosen, used = list(fixed), sum(_best(curves[s.key], price)[1] for s in fixed)
        for unit, factored in alternatives:
            unit_value, unit_params = _best(curves[unit.key], price)
            if unit.key in decided:
                chosen.append(unit)
                used += unit_params
                continue
            factored_best = [_best(curves[s.key], price) for s in factored]
            all_dense = unit_params == unit.dense and all(params == s.dense for s, (_, params) in zip(factored, factored_best))
            if all_dense or unit_value <= sum(value for value, _ in factored_best):
                chosen.append(unit)
                used += unit_params
            else:
                chosen.extend(factored)
                used += sum(params for _, params in factored_best)
        return chosen, used

    low, high = -60.0, 60.0  # log10 of the price; the parameters used fall as it rises
    for _ in range(100):
        middle = (low + high) / 2
        if choose(10.0 ** middle)[1] <= budget:
            high = middle
        else:
            low = middle
    return choose(10.0 ** high)[0]


def unit_dominates(unit: Slot, unit_values: np.ndarray, factored: Sequence[tuple[Slot, np.ndarray]],
                   margin: float = 1e-6) -> bool:
    """Whether choose_alternatives takes the unit form at every price, whatever the factored slots'
    values are, given lower bounds on their tail sums (`factored`: each slot with values whose every
    tail sum is at most its true values'). Then their true values are never needed.

    At a price μ the unit's best value u(μ) and each factored slot's f_i(μ) are minima of lines in μ
    (concave, piecewise linear, breaking where their argmin moves); the true f_i(μ) is at least the
    bound's. So the unit wins everywhere if u(μ) <= Σ f_i(μ) holds for the bounds, and the difference
    is linear between the breakpoints of all the curves: it is checked at each breakpoint, as μ → 0
    (where every form loses least) and beyond the last breakpoint (its slope). `margin` (relative) keeps
    float rounding from deciding a near tie.
    """
    curves = [_curve(unit, unit_values)] + [_curve(slot, values) for slot, values in factored]
    if unit.dense > sum(slot.dense for slot, _ in factored):
        return False  # where everything stays dense the factored forms hold fewer parameters

    def ahead(value_unit: float, value_factored: float) -> bool:
        return value_factored - value_unit >= margin * max(value_unit, value_factored)

    def factored_dense(params: Sequence[float]) -> bool:
        # Where the factored bounds sit at dense, so do their true values (a bound loses no more), and
        # both forms' sums are the same numbers in either case: the unit wins there, having no more
        # parameters (its best is at most its dense cost; all dense, the chooser's tie rule), no check needed.
        return all(p == slot.dense for p, (slot, _) in zip(params, factored))

    # as μ → 0 every curve sits where it loses least (the fewest parameters among those): a + b·μ
    firsts = [np.lexsort((params, lost))[0] for lost, params in curves]
    lost_at = [float(curve[0][at]) for curve, at in zip(curves, firsts)]
    params_at = [float(curve[1][at]) for curve, at in zip(curves, firsts)]
    if not factored_dense(params_at[1:]) and not (
            ahead(lost_at[0], sum(lost_at[1:]))
            and (sum(lost_at[1:]) > lost_at[0] or ahead(params_at[0], sum(params_at[1:])))):
        return False
    prices = np.unique(np.concatenate([_envelope_prices(*curve) for curve in curves]))
    for price in prices[np.isfinite(prices) & (prices > 0)]:
        best = [_best(curve, price) for curve in curves]
        if not factored_dense([params for _, params in best[1:]]) and not ahead(best[0][0], sum(v for v, _ in best[1:])):
            return False
    # beyond the last breakpoint every form sits at its fewest parameters: the difference's slope
    fewest = [float(np.min(curve[1])) for curve in curves]
    return factored_dense(fewest[1:]) or ahead(fewest[0], sum(fewest[1:]))


def unit_loses_somewhere(unit: Slot, unit_values: np.ndarray, factored: Sequence[tuple[Slot, float]],
                         margin: float = 1e-6) -> bool:
    """Whether the unit loses to its factored slots at some price even if each slot lost its whole
    `factored` total (an upper bound on its values' every tail sum) at any rank short of dense: then no
    lower bound can show unit_dominates, and computing one is wasted work. A cheap necessary test; a
    unit holding more parameters than its linears dense loses at low prices, whatever the values."""
    if unit.dense > sum(slot.dense for slot, _ in factored):
        return True
    unit_curve = _curve(unit, unit_values)
    upper = []
    for slot, total in factored:
        params = np.array([slot.factored(STEP) if slot.max_saving_rank() else slot.dense, slot.dense], dtype=np.float64)
        upper.append((np.array([total if slot.max_saving_rank() else 0.0, 0.0]), params))
    prices = np.unique(np.concatenate([_envelope_prices(*curve) for curve in [unit_curve, *upper]]))
    for price in prices[np.isfinite(prices) & (prices > 0)]:
        unit_value = _best(unit_curve, price)[0]
        factored_value = sum(_best(curve, price)[0] for curve in upper)
        if unit_value - factored_value > margin * max(unit_value, factored_value):
            return True
    fewest = float(np.min(unit_curve[1])), sum(float(np.min(curve[1])) for curve in upper)
    return fewest[0] > fewest[1] * (1 + margin)


def lower_hull(costs: Sequence[float], losses: Sequence[float]) -> list[int]:
    """Indices of the points (cost, loss) on their lower convex hull, cheapest first: each loses less than
    every cheaper one, and the loss saved per unit of cost falls from one step to the next (a point above
    the hull is never the best at any price)."""
    hull: list[int] = []
    for index in sorted(range(len(costs)), key=lambda i: (costs[i], losses[i])):
        cost, loss = costs[index], losses[index]
        if hull and loss >= losses[hull[-1]]:
            continue  # no cheaper than the last kept one and no better
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment from a to this point: drop it
            if (losses[b] - losses[a]) * (cost - costs[a]) >= (loss - losses[a]) * (costs[b] - costs[a]):
                hull.pop()
            else:
                break
        hull.append(index)
    return hull


def _envelope_prices(lost: np.ndarray, params: np.ndarray) -> np.ndarray:
    """The prices μ > 0 at which argmin(lost + μ·params) moves: the slopes of the lower convex hull of
    the points (params, lost), from the fewest parameters on."""
    params, lost = params.tolist(), lost.tolist()
    hull = lower_hull(params, lost)
    return np.array([(lost[a] - lost[b]) / (params[b] - params[a]) for a, b in zip(hull, hull[1:])], dtype=np.float64)


def _curve(slot: Slot, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lost value, parameters) at each rank step from STEP up to the largest saving rank, and dense."""
    values = np.clip(np.asarray(values, dtype=np.float64)[:slot.full_rank], 0.0, None)
    tail = np.concatenate([np.cumsum(values[::-1])[::-1], [0.0]])  # tail[r]: value of directions r.. dropped
    ranks = list(range(STEP, slot.max_saving_rank() + 1, STEP))
    lost = np.array([tail[min(r, values.size)] for r in ranks] + [0.0])
    params = np.array([slot.factored(r) for r in ranks] + [slot.dense], dtype=np.float64)
    return lost, params


def _best(curve: tuple[np.ndarray, np.ndarray], price: float) -> tuple[float, int]:
    lost, params = curve
    total = lost + price * params
    at = int(np.argmin(total))
    return float(total[at]), int(params[at])
