"""Plan the ranks: every block linear's rank, fixed once before the block loop. Uniform and last-n come
from the shapes; spectrum from pass 1 (compression/spectra.py); bayes searches multipliers of the spectrum plan, each
trial the execute stage alone (on what prepare holds) scored on held-out calibration text.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..linalg import allocation, bayes, decompose
from .config import FIRST_PASS_ALLOCATIONS, PRECISIONS, CompressConfig
from ..errors import OutputError, UsageError
from ..stream.calibration import spread_sequences
from ..stream.evaluation import evaluate
from .execute import WORK_FOLDER, write_model
from ..faults import fault_point
from ..report.memory import RSSMonitor
from ..model.architectures import UNIT_BY_NAME, UNIT_NAMES, UNITS, StructuredUnit
from ..model.modeling import BLOCK_LINEARS, ModelSpec, block_prefix
from .progress import Progress, arguments_fingerprint, source_fingerprint
from ..report.report import StageTimer
from .plans import ModelPlan
from .spectra import collect_spectra, split_first_pass

if TYPE_CHECKING:
    from .pipeline import Prepared
    from .study import SearchSpace, SharedSearch

log = logging.getLogger(__name__)

# --ratio (uniform) factors a linear only where that saves more than this fraction of its parameters.
MIN_FACTOR_SAVING = 0.02
# the MLP's unit: pass 1 keeps the order of its neurons (--neuron-selection pass1)
NEURONS = "mlp.neurons"


def active_units(spec: ModelSpec, config: CompressConfig) -> list[StructuredUnit]:
    """The structured units a run narrows: the method's, where the architecture has them and their
    linears are all chosen."""
    return [unit for unit in UNITS if unit.name in config.compression_method.units and unit.applies_to(spec)
            and all(name in config.modules for name in unit.linears)]


def plan_names(config: CompressConfig) -> tuple[str, ...]:
    """What a block's plan holds: every linear's rank, and for structured methods every unit's width."""
    return BLOCK_LINEARS + config.compression_method.units


def rank_plan(spec: ModelSpec, config: CompressConfig) -> dict[str, int | None]:
    """Rank per block linear at `config.ratio` (or `config.rank`); None keeps it dense (not chosen,
    or factors would not save). Structured methods narrow their units at the ratio instead."""
    plan: dict[str, int | None] = {}
    for name in BLOCK_LINEARS:
        out_features, in_features = spec.linear_shape(name)
        if name not in config.modules:
            plan[name] = None
        elif config.rank is not None:
            plan[name] = min(config.rank, out_features, in_features)
        else:
            rank = decompose.rank_for(config.ratio, out_features, in_features)
            # near ratio 1 the factors keep about half the rank for a sliver of the parameters: not worth it
            saves = decompose.saves_parameters(rank, out_features, in_features, MIN_FACTOR_SAVING)
            plan[name] = rank if saves else None
    if config.compression_method.structured:
        plan.update(dict.fromkeys(config.compression_method.units))
        for unit in active_units(spec, config):
            slot = _unit_slot(spec, unit, 0)
            width = max(slot.rank_at(config.ratio), decompose.RANK_MULTIPLE)
            plan[unit.name] = width if width < slot.unit_size else None
            plan.update(dict.fromkeys(unit.linears))  # narrowed, not factored
    return plan


def _unit_slot(spec: ModelSpec, unit: StructuredUnit, index: int) -> allocation.Slot:
    return allocation.Slot(f"{block_prefix(index)}{unit.name}", index, 0, 0, unit_size=unit.size(spec),
                           unit_parameters=unit.parameters(spec))


def _factored_slot(spec: ModelSpec, config: CompressConfig, name: str, index: int) -> allocation.Slot:
    out_features, in_features = spec.linear_shape(name)
    return allocation.Slot(f"{block_prefix(index)}{name}", index, out_features, in_features, spec.has_bias(name),
                           config.compression_method.extra_parameters(out_features))


def allocation_slots(spec: ModelSpec, config: CompressConfig, layers: list[int]) -> list[allocation.Slot]:
    """What the allocation sizes, each parameter once: the chosen linears outside structured units
    (factored) and the structured units."""
    units = active_units(spec, config)
    in_units = {name for unit in units for name in unit.linears}
    slots = []
    for index in layers:
        for name in BLOCK_LINEARS:
            if name in config.modules and name not in in_units:
                slots.append(_factored_slot(spec, config, name, index))
        slots.extend(_unit_slot(spec, unit, index) for unit in units)
    return slots


def mixed_alternatives(spec: ModelSpec, config: CompressConfig,
                       layers: list[int]) -> list[tuple[allocation.Slot, list[allocation.Slot]]]:
    """For the mixed mode: each unit of each chosen block with the factored slots of its linears."""
    return [(_unit_slot(spec, unit, index), [_factored_slot(spec, config, name, index) for name in unit.linears])
            for index in layers for unit in active_units(spec, config)]


def block_alternatives(spec: ModelSpec, config: CompressConfig) -> list[tuple[allocation.Slot, list[allocation.Slot]]]:
    """mixed_alternatives of one block, keyed by the bare names pass 1 prices a block by (mlp.neurons, mlp.up_proj)."""
    def bare(slot: allocation.Slot) -> allocation.Slot:
        return replace(slot, key=slot.key[len(block_prefix(0)):])
    return [(bare(unit), [bare(slot) for slot in factored]) for unit, factored in mixed_alternatives(spec, config, [0])]


def model_plan(spec: ModelSpec, config: CompressConfig, layers: list[int], total_params: int, dtype_bytes: int,
               spectra: dict[str, np.ndarray] | None = None, unit_always: set[str] = frozenset()) -> ModelPlan:
    """Rank of every block linear of the model (None: dense), and for structured methods every unit's
    width (None: not narrowed).

    Without a target, `uniform` is `rank_plan` in every chosen block; `last-n` and `spectrum`
    spend what that plan would. With a target, the chosen allocation meets the whole-model
    parameter count within one rank step. The mixed method's spectrum first chooses per unit
    between narrowing it and factoring its linears (allocation.choose_alternatives; the units in
    `unit_always` take their unit form at every price, pass 1 having shown it from bounds).
    """
    if config.ranks is not None:
        return _checked_ranks(spec, config, config.ranks)
    per_block = rank_plan(spec, config)
    plan = {f"{block_prefix(i)}{name}": (per_block[name] if i in layers else None)
            for i in range(spec.num_layers) for name in plan_names(config)}
    if config.rank is not None or (config.allocate == "uniform" and not config.has_target):
        return ModelPlan.from_record(plan, spec.num_layers)
    slots = allocation_slots(spec, config, layers)
    budget = slot_budget(slots, config, total_params, dtype_bytes, plan)
    if config.allocate == "uniform":
        ranks = allocation.uniform_ranks(slots, budget)
    elif config.allocate == "last-n":
        ranks = allocation.last_n_ranks(slots, budget, config.ratio, spec.num_layers)
    else:
        if config.compression_method.mixed:
            alternatives = mixed_alternatives(spec, config, layers)
            every = slots + [slot for _, factored in alternatives for slot in factored]
            slots = allocation.choose_alternatives(every, spectra or {}, budget, alternatives, unit_always)
        ranks = allocation.spectrum_ranks(slots, spectra or {}, budget)
    return ModelPlan.from_record({key: ranks.get(key) for key in plan}, spec.num_layers)


def slot_budget(slots: list[allocation.Slot], config: CompressConfig, total_params: int, dtype_bytes: int,
                plan: dict[str, int | None]) -> int:
    """Parameters the factorable linears may use: the target's, less everything else in the model
    (without a target, what `plan` — uniform at --ratio — spends)."""
    fixed = total_params - sum(slot.dense for slot in slots)
    if config.target_params is not None:
        return int(config.target_params * total_params) - fixed
    if config.target_size_gb is not None:
        return int(config.target_size_gb * 1e9 // dtype_bytes) - fixed
    return allocation.total_params(slots, plan)


def _checked_ranks(spec: ModelSpec, config: CompressConfig, ranks: dict[str, int | None]) -> ModelPlan:
    names = plan_names(config)
    plan = {f"{block_prefix(i)}{name}": None for i in range(spec.num_layers) for name in names}
    for key, rank in ranks.items():
        if key not in plan:
            another_unit = key.split(".", 3)[-1] in UNIT_NAMES  # a width this method does not size
            raise UsageError(f"ranks name {key!r}, which is not a block linear of this model"
                             + (f" that --method {config.method} sizes (another method's plan)" if another_unit else ""))
        name = key.split(".", 3)[3]
        if rank and name in UNIT_NAMES and not UNIT_BY_NAME[name].applies_to(spec):
            raise UsageError(f"ranks narrow {key}, which a {spec.model_type} model cannot narrow")
        largest = UNIT_BY_NAME[name].size(spec) if name in UNIT_NAMES else min(spec.linear_shape(name))
        if rank is not None and not (isinstance(rank, int) and 0 < rank <= largest):
            raise UsageError(f"rank of {key} must be a positive integer up to {largest}, got {rank!r}")
        plan[key] = rank
    for index in range(spec.num_layers):
        prefix = block_prefix(index)
        for unit in UNITS:
            if plan.get(prefix + unit.name) and any(plan[prefix + name] for name in unit.linears):
                raise UsageError(f"{prefix}{unit.name} is narrowed, so its linears cannot also be factored")
    return ModelPlan.from_record(plan, spec.num_layers)


def plan_ranks(prepared: "Prepared", output: Path, progress: Progress, timer: StageTimer,
               monitor: RSSMonitor) -> None:
    """Every block linear's rank, fixed once (pass 1 and bayes when the allocation needs them) and
    recorded in the progress file, so that a resumed run keeps it."""
    config = prepared.config
    if progress.plan:
        return
    shared = join_study(prepared, create=True) if config.bayes.study and config.allocate == "bayes" else None
    record = shared.record() if shared is not None else None
    if record is not None:  # another process made pass 1's plan already
        log.info("bayes: joining study %s, which has its base plan", shared.name)
        plan = ModelPlan.from_record(record["base"], prepared.spec.num_layers)
        orders = recorded_orders(prepared, record.get("orders", {}), STUDY_ORDERS)
    else:
        plan, orders = _first_plan(prepared, output, timer)
    progress.orders = {key: order.tolist() for key, order in orders.items()}
    if config.allocate == "bayes":
        log.info("bayes: %d trials, each a compression scored on held-out calibration text", config.bayes.trials)
        space = search_space(prepared, plan)
        scorer = TrialScorer(prepared, output / WORK_FOLDER, plan, monitor, orders)
        if shared is None:
            result = bayes.search(space.slots, space.budget, space.base, lambda ranks: scorer(ranks)[0],
                                  config.bayes, space.num_layers)
            progress.trials.extend({**trial, **times} for trial, times in zip(result.trials, scorer.seconds))
        else:
            shared.publish(study_record(prepared, plan, progress.orders),
                           bayes.search_groups(space.slots, space.num_layers))
            log.info("bayes: study %s on %s; more workers join with: streamrom tune-worker %s --study-name %s",
                     shared.name, shared.shown_url, shared.shown_url, shared.name)
            shared.run(space, scorer)
            result = shared.result()
            progress.study = shared.name
            progress.trials.extend(result.trials)
        plan = plan.replaced(result.ranks)
    progress.plan = plan.record()
    progress.save(output)


def _first_plan(prepared: "Prepared", output: Path, timer: StageTimer) -> tuple[ModelPlan, dict[str, np.ndarray]]:
    """The plan of the allocation itself: from the shapes, or from pass 1's prices (spectrum, bayes);
    with --neuron-selection pass1, also the keep order of every MLP pass 1 priced."""
    reader, config, spec, layers = prepared.reader, prepared.config, prepared.spec, prepared.layers
    if config.allocate not in FIRST_PASS_ALLOCATIONS:
        return prepared.sizing_plan, {}
    log.info("pass 1: output spectra of %d blocks", len(layers))
    chosen_units = active_units(spec, config)
    units = [unit.name for unit in chosen_units]
    # factored slots are priced for the linears outside units (mixed: for all, as the alternative)
    in_units = {name for unit in chosen_units for name in unit.linears}
    names = [name for name in config.modules if config.compression_method.mixed or name not in in_units]
    pass_one = {"source": source_fingerprint(reader), "layers": layers, "modules": names,
                "centered": config.centered, "precision": config.precision}
    if units:  # pass1 prices as obs does (and obs saves its orders too): either reuses the other's pass 1
        pass_one.update(units=units, neuron_selection="obs" if config.neuron_selection == "pass1"
                        else config.neuron_selection)
    # with a target text, directions are priced by the target's statistics and loss alone
    tokens = prepared.tokens
    priced_on = spread_sequences(tokens if prepared.target_from is None else tokens[prepared.target_from:],
                                 config.pass1_tokens)
    if len(priced_on) < len(tokens):
        log.info("pass 1 on %d of the %d calibration sequences (--pass1-tokens)", len(priced_on), len(tokens))
    spectra = collect_spectra(reader, priced_on, layers, names, output / WORK_FOLDER,
                              config.chunk_tokens, config.centered, PRECISIONS[config.precision], timer,
                              saved=config.spectra_file, fingerprint=arguments_fingerprint(pass_one, priced_on),
                              units=units, neuron_selection=config.neuron_selection,
                              alternatives=block_alternatives(spec, config) if config.compression_method.mixed else ())
    spectra, orders, unit_always = split_first_pass(spectra)
    if unit_always:
        log.info("pass 1: %d of %d units taken at every price by bounds (their factored forms' eigenvectors "
                 "not computed)", len(unit_always), len(layers) * len(chosen_units))
    plan = model_plan(spec, config, layers, prepared.total_params, prepared.dtype_bytes, spectra, unit_always)
    if config.neuron_selection != "pass1":
        return plan, {}
    # every priced MLP's order, not only those the plan narrows: a bayes trial may narrow others
    missing = [key for index, block in enumerate(plan.blocks) if block.widths.get(NEURONS)
               and (key := f"{block_prefix(index)}{NEURONS}") not in orders]
    if missing:
        raise UsageError(f"pass 1 ({config.spectra_file or 'the saved first pass'}) has no keep order of "
                         f"{missing[0]} (made before pass 1 kept them): remove it to price again")
    return plan, checked_orders(spec, orders, "pass 1's keep orders", UsageError)


def checked_orders(spec: ModelSpec, orders: dict, where: str, error=UsageError) -> dict[str, np.ndarray]:
    """Keep orders ("model.layers.<i>.mlp.neurons": every neuron of that block's MLP, most important
    first), each checked to be an ordering of exactly its block's neurons before any is used."""
    blocks = {f"{block_prefix(index)}{NEURONS}": index for index in range(spec.num_layers)}
    checked = {}
    for key, order in orders.items():
        if key not in blocks:
            raise error(f"{where}: {key!r} is no MLP of this model")
        width = spec.linear_shape("mlp.down_proj", blocks[key])[1]
        order = np.asarray(order)
        if order.shape != (width,) or order.dtype.kind not in "iu" or \
                not np.array_equal(np.sort(order), np.arange(width)):
            raise error(f"{where}: the order of {key} is not an ordering of its {width} neurons")
        checked[key] = order.astype(np.int64)
    return checked


PROGRESS_ORDERS = "the progress file's keep orders (pass --overwrite to start over)"
STUDY_ORDERS = "the study's keep orders"


def recorded_orders(prepared: "Prepared", recorded: dict, where: str) -> dict[str, np.ndarray]:
    """A run's recorded keep orders (`where`: PROGRESS_ORDERS or STUDY_ORDERS), checked; none unless pass1."""
    if prepared.config.neuron_selection != "pass1":
        return {}
    return checked_orders(prepared.spec, recorded, where, OutputError)


def search_space(prepared: "Prepared", plan: ModelPlan) -> "SearchSpace":
    """The slots bayes searches over, their budget, and the base (spectrum) plan's ranks of them."""
    from .study import SearchSpace

    config, spec = prepared.config, prepared.spec
    slots = allocation_slots(spec, config, prepared.layers)
    budget = slot_budget(slots, config, prepared.total_params, prepared.dtype_bytes, prepared.sizing_plan.record())
    base = plan.record()
    if config.compression_method.mixed:  # the forms the spectrum plan chose are searched, the others stay off
        slots = [slot for slot in slots if not slot.structured or base[slot.key]] + [
            slot for unit, factored in mixed_alternatives(spec, config, prepared.layers) if not base[unit.key]
            for slot in factored]
    return SearchSpace(slots, budget, {slot.key: base[slot.key] for slot in slots}, spec.num_layers)


class TrialScorer:
    """A bayes trial: the execute stage alone, on the reader, tokens and settings prepare already holds
    (no re-reading, tokenizing, fingerprinting, lock or pictures), into `work`/bayes-trial, scored by
    streamed perplexity on the held-out calibration slice. Returns the score and the trial's seconds
    (executing, scoring, and the rest), also kept in `seconds`."""

    def __init__(self, prepared: "Prepared", work: Path, base: ModelPlan, monitor: RSSMonitor,
                 orders: dict[str, np.ndarray] | None = None) -> None:
        self.prepared, self.work, self.base, self.monitor = prepared, work, base, monitor
        self.orders = orders or {}
        self.seconds: list[dict[str, float]] = []

    def __call__(self, ranks: dict[str, int | None]) -> tuple[float, dict[str, float]]:
        prepared, work = self.prepared, self.work
        folder = work / "bayes-trial"
        started = time.perf_counter()
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        executed = time.perf_counter()
        write_model(prepared.reader, folder, prepared.tokens, self.base.replaced(ranks), prepared.layers,
                    prepared.config, Progress(arguments="bayes trial", source=""), StageTimer(), self.monitor,
                    prepared.target_from, orders=self.orders)
        fault_point("during-bayes-trial")
        scored = time.perf_counter()
        value = evaluate(folder, (), windows=prepared.held_out_windows(), chunk_tokens=prepared.config.chunk_tokens,
                         work_dir=work).perplexity
        ended = time.perf_counter()
        shutil.rmtree(folder, ignore_errors=True)
        times = {"execute_seconds": scored - executed, "score_seconds": ended - scored,
                 "overhead_seconds": executed - started}
        self.seconds.append(times)
        return value, times


def join_study(prepared: "Prepared", create: bool, name: str | None = None) -> "SharedSearch":
    """This process in the run's shared study (named after its arguments unless --study-name), checked
    to be a study of the same source, settings and calibration tokens."""
    from .study import SharedSearch, default_name

    bayes_config = prepared.config.bayes
    arguments = arguments_fingerprint(prepared.fingerprint, prepared.tokens)
    shared = SharedSearch(bayes_config.study, name or bayes_config.study_name or default_name(arguments), create,
                          bayes_config.trials, bayes_config.seed, bayes_config.heartbeat_seconds)
    shared.check(arguments, source_fingerprint(prepared.reader))
    return shared


def study_record(prepared: "Prepared", base: ModelPlan, orders: dict[str, list[int]]) -> dict:
    """What a worker elsewhere needs to run this study's trials (compression/study.py)."""
    from .config import config_to_json
    from .study import RECORD_FORMAT

    return {"orders": orders, "format": RECORD_FORMAT, "config": config_to_json(prepared.config),
            "source": str(prepared.reader.folder.absolute()),
            "source_fingerprint": source_fingerprint(prepared.reader),
            "arguments": arguments_fingerprint(prepared.fingerprint, prepared.tokens), "base": base.record()}
