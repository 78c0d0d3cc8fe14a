"""Compressing one block: per group of linears (Block.GROUPS), in the order the data flows, the
statistics of its inputs on the block compressed so far, then the method's new modules."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from ..stream.activations import ActivationBuffer, BlockCache, chunk_ranges, require_finite
from .anchoring import AnchorPoint, DenseStream, anchor_points
from ..model.architectures import UNITS
from .config import PRECISIONS, CompressConfig
from ..errors import NumericalError
from ..storage.importance import BlockEnergies
from ..report.memory import release_freed_memory
from ..model.modeling import Block, BlockValues
from ..report.report import StageTimer
from .plans import BlockPlan
from .refinement import refine_block, write_dense_outputs
from .statistics import WIDE, CrossAccumulator, GroupStatistics

log = logging.getLogger(__name__)


@torch.no_grad()
def compress_block(block: Block, plan: BlockPlan, inputs: ActivationBuffer,
                   outputs: ActivationBuffer | None, cache: BlockCache, cos: torch.Tensor, sin: torch.Tensor,
                   config: CompressConfig, chunk_sequences: int, timer: StageTimer,
                   block_label: str = "", target_from: int | None = None, scratch: Path | None = None,
                   dense: DenseStream | None = None, energies: BlockEnergies | None = None,
                   orders: dict[str, np.ndarray] | None = None, block_index: int = 0) -> None:
    """Replace the planned linears of `block` by the method's modules, one group after the other, and
    write the compressed block's outputs for `inputs` to `outputs` (unless None).

    `orders` (unit name: order, most important first): units whose kept features pass 1 chose
    (--neuron-selection pass1); the others are chosen here by config.neuron_selection.

    Each group's statistics are gathered with the groups before it already compressed, so later
    factors compensate for the error of earlier ones. Pass g computes the block up to group g's
    input from the intermediates pass g-1 left in `cache`, so all passes together cost one forward.

    With `target_from`, the sequences from that index on are the target text's and those before it
    the general text's: their moments are kept apart and mixed per linear (decompose.mixture_weights
    with config.target_weight).

    With `dense`, the dense block first runs on the dense stream's inputs (its outputs go on as the
    next block's dense inputs, the values the fits anchor to wait on disk), and each group's fit is
    anchored to them (decompose.Anchor) — except while both streams are still equal (nothing upstream
    compressed), where the anchored fit is the plain one and the plain one runs.

    With config.refine_steps (and a `scratch` folder), the dense block's outputs for `inputs` are
    written first, and once every group is compressed the block is refined toward them
    (compression/refinement.py; its draws seeded by `block_index`).

    With `energies`, the last pass (the outputs', or for the last block one of its own) also sums
    the squares of what each of the compressed block's linears reads (importance.BlockEnergies).
    """
    method = config.compression_method
    work_dtype = PRECISIONS[config.precision]
    if not method.uses_calibration:  # weight space: no statistics, and nothing downstream needs outputs
        with timer("eigen"):
            for group in block.GROUPS:
                ranks = {name: plan.ranks[name] for name in group.linears if plan.ranks[name] is not None}
                method.compress_group(block, group, ranks, None, False, work_dtype, config.damping)
        return
    work = [{name: plan.ranks[name] for name in group.linears if plan.ranks[name] is not None} for group in block.GROUPS]
    # a structured unit is narrowed where its consumer's group reads the unit's features
    units = [next((unit for unit in UNITS if unit.reads == group.reads and plan.widths.get(unit.name)), None)
             for group in block.GROUPS]
    last = max((g for g, todo in enumerate(work) if todo or units[g]), default=-1)
    points = anchor_points(block, units)
    anchored_values, streams_equal = {}, True  # streams equal: inputs equal, nothing changed yet
    if dense is not None:
        wanted = [points[g] for g in range(last + 1) if (work[g] or units[g]) and points[g]] if dense.strength > 0 else []
        with timer("dense stream"):  # the anchored fits' cost in time, apart in the report
            anchored_values, streams_equal = _dense_pass(block, inputs, dense, wanted, cos, sin, chunk_sequences,
                                                         block_label)
    targets = None
    if config.refine_steps and scratch is not None:  # before any group changes the block
        scratch.mkdir(parents=True, exist_ok=True)
        targets = ActivationBuffer(scratch, *inputs.shape, anonymous=True)
        with timer("refine"):
            write_dense_outputs(block, inputs, targets, cos, sin, chunk_sequences, block_label)
    passes = _Passes(block, inputs, cache, cos, sin)
    product = torch.float64 if config.precision == "float64" else torch.float32
    for group, todo, unit, point in zip(block.GROUPS[:last + 1], work, units, points):
        if not todo and unit is None:
            continue  # what this group's pass would compute, the next one computes on its way
        if unit is not None:  # the unit's features themselves (input side), uncentered
            observed, width, at_output = unit.reads, block.linear(group.linears[0]).weight.shape[1], False
        else:
            observed, width, at_output = group.observed(block)
        statistics = GroupStatistics(width, product, target_from, config.target_weight, config.target_basis)
        anchored = dense is not None and dense.strength > 0 and not streams_equal and point is not None
        cross = CrossAccumulator(point.width, width, product) if anchored else None
        target = (lambda start, stop: anchored_values[point.value].read(start, stop)) if anchored else None
        # a wide moment (the MLP neurons': 485 MB at 7B shape) is summed beside half a chunk's activations
        pass_sequences = max(1, chunk_sequences // 2) if width > WIDE else chunk_sequences
        passes.gather(observed, statistics, cross, target, point, pass_sequences, target_from, timer)
        if not statistics.is_finite() or (cross is not None and not cross.is_finite()):
            raise NumericalError(f"NaN or Inf activations reach {block_label}{', '.join(todo or unit.linears)} "
                                 "(overflow in the source weights or in the layers before)")
        with timer("eigen"):
            anchor = cross.anchor(dense.strength, work_dtype, target_is_output=point.less is not None) \
                if cross is not None else None
            del cross
            selection = (orders or {}).get(unit.name, config.neuron_selection) if unit is not None else None
            _fit_group(block, group, todo, unit, plan, selection, statistics, anchor, at_output, config, scratch,
                       passes)
            streams_equal = False  # this group changed the block: later groups see the difference
            del statistics, anchor
        release_freed_memory()
    if targets is not None:
        with timer("refine"):
            _refine(block, inputs, targets, cos, sin, config, chunk_sequences, block_index, scratch, block_label)
        passes.forget()  # every value may differ now: the outputs are computed from the inputs again
    if outputs is not None or energies is not None:
        with timer("forward"):
            passes.write_outputs(outputs, energies, chunk_sequences, block_label)


def _fit_group(block: Block, group, todo: dict[str, int], unit, plan: BlockPlan, selection,
               statistics: GroupStatistics, anchor, at_output: bool, config: CompressConfig, scratch: Path | None,
               passes: "_Passes") -> None:
    """One group's new modules from its gathered statistics: the structured unit narrowed to its
    planned width (its features chosen by `selection`), then the group's planned factored linears."""
    method = config.compression_method
    work_dtype = PRECISIONS[config.precision]
    moments = statistics.moments(work_dtype, method.centered, config.damping)
    if unit is not None:
        method.compress_unit(block, unit, plan.widths[unit.name], moments.parts[0], selection, config.damping,
                             scratch, anchor)
        if unit.narrows_reads:  # its features are narrower now: recomputed, never read from the cache
            passes.narrowed(unit.reads)
        # the group's other linears (v_proj beside the query–key pairs) are factored from the same moments
        todo = {name: rank for name, rank in todo.items() if name not in unit.linears}
    if todo:
        method.compress_group(block, group, todo, moments, at_output, work_dtype, config.damping, anchor)


def _refine(block: Block, inputs: ActivationBuffer, targets: ActivationBuffer, cos: torch.Tensor, sin: torch.Tensor,
            config: CompressConfig, chunk_sequences: int, block_index: int, scratch: Path, block_label: str) -> None:
    """The compressed block refined toward the dense block's outputs (`targets`, closed after)."""
    result = refine_block(block, inputs, targets, cos, sin, config.refine_steps, config.refine_lr,
                          max(1, chunk_sequences // 2), chunk_sequences, seed=block_index, scratch=scratch)
    targets.close()
    log.info("%srefined: output error %.4g -> %.4g", block_label, result.error_before, result.error_after)


def _dense_pass(block: Block, inputs: ActivationBuffer, dense: DenseStream, points: list[AnchorPoint],
                cos: torch.Tensor, sin: torch.Tensor, chunk_sequences: int,
                block_label: str) -> tuple[dict[str, ActivationBuffer], bool]:
    """The dense block on the dense stream: the values the fits anchor to (on disk, by name), its
    outputs (the next block's dense inputs), and whether both streams' inputs are still equal."""
    anchored_values = {point.value: dense.values(point.value, point.width) for point in points}
    streams_equal = True
    for start, stop in chunk_ranges(inputs.shape[0], chunk_sequences):
        x = dense.inputs.read(start, stop)
        streams_equal = streams_equal and torch.equal(x, inputs.read(start, stop))
        values = BlockValues(block, cos, sin, {"x": lambda x=x: x})
        for name, buffer in anchored_values.items():
            buffer.write(start, values[name])
        if dense.outputs is not None:
            dense.outputs.write(start, require_finite(values["output"], f"leave {block_label.rstrip('.')}"))
        del x, values
    return anchored_values, streams_equal


class _Passes:
    """The compression passes over one block's inputs: pass g computes the block up to group g's input
    from the intermediates the passes before it left in the cache (on disk, for all chunks), so all
    passes together cost one forward."""

    def __init__(self, block: Block, inputs: ActivationBuffer, cache: BlockCache, cos: torch.Tensor,
                 sin: torch.Tensor) -> None:
        self.block, self.inputs, self.cache, self.cos, self.sin = block, inputs, cache, cos, sin
        self.cached: list[str] = []  # values of the passes so far, on disk for all chunks
        self._narrowed: set[str] = set()  # values a unit made narrower: never cached (the cache has dense widths)

    def values(self, start: int, stop: int) -> BlockValues:
        given = {"x": lambda: self.inputs.read(start, stop)}
        given.update({name: (lambda name=name: self.cache[name].read(start, stop)) for name in self.cached})
        return BlockValues(self.block, self.cos, self.sin, given)

    def forget(self) -> None:
        """The cached values no longer hold (the block changed everywhere): computed again from here on."""
        self.cached = []
        self._narrowed = set(self.cache.buffers) if self.cache is not None else set()

    def narrowed(self, name: str) -> None:
        """`name`'s features are narrower now: recomputed from here on, never read from the cache."""
        self._narrowed.add(name)
        self.cached = [cached for cached in self.cached if cached != name]

    def gather(self, observed: str, statistics: GroupStatistics, cross: CrossAccumulator | None, target,
               point: AnchorPoint | None, pass_sequences: int, target_from: int | None, timer: StageTimer) -> None:
        """One pass: the moments of `observed` (and with `cross`, its cross moment with the anchored
        target, less the compressed stream's `point.less`), keeping what later passes read."""
        written: list[str] = []
        for start, stop in chunk_ranges(self.inputs.shape[0], pass_sequences, target_from):
            with timer("forward"):
                values = self.values(start, stop)
                features = values[observed]
                written = self._keep(values, start)
            with timer("statistics"):
                statistics.add(features, start)
                if cross is not None:
                    anchored = target(start, stop)
                    cross.add(anchored if point.less is None else anchored - values[point.less], features)
        del values, features  # the last chunk's activations, not needed by the decomposition
        release_freed_memory()
        self.cached.extend(written)

    def write_outputs(self, outputs: ActivationBuffer | None, energies: BlockEnergies | None, chunk_sequences: int,
                      block_label: str) -> None:
        """The compressed block's outputs for every input (and the energies of what its linears read)."""
        for start, stop in chunk_ranges(self.inputs.shape[0], chunk_sequences):
            values = self.values(start, stop)
            if outputs is not None:
                outputs.write(start, require_finite(values["output"], f"leave {block_label.rstrip('.')}"))
            if energies is not None:
                energies.add(values)
            del values

    def _keep(self, values: BlockValues, start: int) -> list[str]:
        """Write what this pass computed and later passes read instead of computing again."""
        new = [name for name in values.computed
               if name in self.cache and name not in self.cached and name not in self._narrowed]
        for name in new:
            self.cache[name].write(start, values.computed[name])
        return new
