"""Execute a plan: the streamed block loop that compresses each block of the source and writes it.

    reader ─(one block)─► Block ─► per group (Block.GROUPS): statistics ─► method ─► new modules
    calibration tokens ─► embeddings ─► activation files ─(chunks)─► block ─► next activation file
    compressed block ─► its own shard; index and config written last

After every block, its shard and the next block's inputs are on disk before the progress record says
so: a rerun picks up from there; shards lost since are redone alone. A bayes trial runs this stage
alone, on what the prepare stage already holds.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .activations import (DENSE_FILE_NAMES, FILE_NAMES, ActivationBuffer, ActivationPair, BlockCache, chunk_ranges,
                          embed_into, require_finite)
from .checkpoint import CheckpointReader, CheckpointWriter, shard_is_complete
from .config import PRECISIONS, CompressConfig
from .errors import NumericalError
from .importance import BlockEnergies, load_block, save_block, write_importance
from .memory import RSSMonitor, release_freed_memory
from .architectures import UNIT_NAMES, UNITS
from .families import FAMILIES
from .modeling import BLOCK_LINEARS, EMBED, FINAL_NORM, LM_HEAD, Block, BlockValues, Rotary, block_class, block_prefix
from .progress import Progress
from .report import StageTimer
from .statistics import WIDE, CrossAccumulator, GroupStatistics

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WORK_FOLDER = ".streamrom-work"
HF_MODELING_FILE = Path(__file__).parent / "hf" / "modeling_streamrom.py"


def block_plan(plan: dict[str, int | None], index: int) -> dict[str, int | None]:
    """Block `index`'s part of the plan: each linear's rank and each structured unit's width."""
    prefix = block_prefix(index)
    return {name: plan.get(f"{prefix}{name}") for name in BLOCK_LINEARS + UNIT_NAMES
            if name in BLOCK_LINEARS or f"{prefix}{name}" in plan}


@dataclass
class DenseStream:
    """The dense model's activations beside the compressed ones (anchored fits): this block's inputs,
    where its outputs go (None: nothing reads them), and disk buffers for the dense block's values that
    the fits are anchored to (filled per block; `values(name, width)` gives one)."""

    inputs: ActivationBuffer
    outputs: ActivationBuffer | None
    values: Callable[[str, int], ActivationBuffer]
    strength: float


@dataclass(frozen=True)
class AnchorPoint:
    """The dense stream's value a group's fit is anchored to (`value`, `width` features per token), less
    the compressed stream's `less` value where one is given (the residual stream a sum adds to)."""

    value: str
    width: int
    less: str | None = None


def _anchor_points(block: Block, units: list) -> list[AnchorPoint | None]:
    """Per group, where its fit is anchored. A lone linear that adds to the residual stream as it is
    (o_proj, down_proj: Block.RESIDUAL_ADDS; none with a bias), factored or refitted on a structured
    unit's kept features: the dense sum less the compressed stream's value it is added to, i.e. what
    the linear would have to give for the block to carry the dense model's residual stream on. Other
    factored groups: the dense value their moments are taken of. Other units (rotary pairs): none.

    Toward the dense linear's own outputs instead, the structured refits were worse on the real model
    (+2.3 % perplexity at 20 % smaller, +14.7 % at 40 %) and the factored o_proj/down fits were not as
    good (rom-centered spectrum, strength 0.5: 35.36 against 34.67 at 20 %, 66.92 against 62.95 at
    40 %): measured block by block (benchmarks/anchored_units.py), the plain refit's error partly
    undoes the residual stream's upstream error (their inner product is negative), and a refit toward
    the dense outputs fits those better but undoes less, so the block's output ends up no nearer the
    dense one; the sum's target brings it nearer."""
    points: list[AnchorPoint | None] = []
    for group, unit in zip(block.GROUPS, units):
        lone = group.linears[0] if len(group.linears) == 1 else None
        if lone in block.RESIDUAL_ADDS and block.linear(lone).bias is None:
            total, stream = block.RESIDUAL_ADDS[lone]
            points.append(AnchorPoint(total, block.linear(lone).weight.shape[0], stream))
        elif unit is None:
            value, width, _ = group.observed(block)
            points.append(AnchorPoint(value, width))
        else:
            points.append(None)
    return points


@torch.no_grad()
def compress_block(block: Block, plan: dict[str, int | None], inputs: ActivationBuffer,
                   outputs: ActivationBuffer | None, cache: BlockCache, cos: torch.Tensor, sin: torch.Tensor,
                   config: CompressConfig, chunk_sequences: int, timer: StageTimer,
                   block_label: str = "", target_from: int | None = None, scratch: Path | None = None,
                   dense: DenseStream | None = None, energies: BlockEnergies | None = None,
                   orders: dict[str, np.ndarray] | None = None) -> None:
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

    With `energies`, the last pass (the outputs', or for the last block one of its own) also sums
    the squares of what each of the compressed block's linears reads (importance.BlockEnergies).
    """
    method = config.compression_method
    work_dtype = PRECISIONS[config.precision]
    if not method.uses_calibration:  # weight space: no statistics, and nothing downstream needs outputs
        with timer("eigen"):
            for group in block.GROUPS:
                ranks = {name: plan[name] for name in group.linears if plan[name] is not None}
                method.compress_group(block, group, ranks, None, False, work_dtype, config.damping)
        return
    work = [{name: plan[name] for name in group.linears if plan[name] is not None} for group in block.GROUPS]
    # a structured unit is narrowed where its consumer's group reads the unit's features
    units = [next((unit for unit in UNITS if unit.reads == group.reads and plan.get(unit.name)), None)
             for group in block.GROUPS]
    last = max((g for g, todo in enumerate(work) if todo or units[g]), default=-1)
    points = _anchor_points(block, units)
    streams_equal = True  # the compressed stream is still the dense one: inputs equal, nothing changed yet
    if dense is not None:
        anchored_values = {points[g].value: dense.values(points[g].value, points[g].width)
                           for g in range(last + 1) if (work[g] or units[g]) and points[g]} if dense.strength > 0 else {}
        with timer("dense stream"):  # the anchored fits' cost in time, apart in the report
            for start, stop in chunk_ranges(inputs.shape[0], chunk_sequences):
                x = dense.inputs.read(start, stop)
                streams_equal = streams_equal and torch.equal(x, inputs.read(start, stop))
                values = BlockValues(block, cos, sin, {"x": lambda: x})
                for name, buffer in anchored_values.items():
                    buffer.write(start, values[name])
                if dense.outputs is not None:
                    dense.outputs.write(start, require_finite(values["output"], f"leave {block_label.rstrip('.')}"))
                del x, values
    cached: list[str] = []  # values of the passes so far, on disk for all chunks
    narrowed: set[str] = set()  # values a unit made narrower: never cached (the cache has the dense widths)

    def chunk_values(start: int, stop: int) -> BlockValues:
        given = {"x": lambda: inputs.read(start, stop)}
        given.update({name: (lambda name=name: cache[name].read(start, stop)) for name in cached})
        return BlockValues(block, cos, sin, given)

    def keep(values: BlockValues, start: int) -> list[str]:
        """Write what this pass computed and later passes read instead of computing again."""
        new = [name for name in values.computed if name in cache and name not in cached and name not in narrowed]
        for name in new:
            cache[name].write(start, values.computed[name])
        return new

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
        written: list[str] = []
        # a wide moment (the MLP neurons': 485 MB at 7B shape) is summed beside half a chunk's activations
        pass_sequences = max(1, chunk_sequences // 2) if width > WIDE else chunk_sequences
        for start, stop in chunk_ranges(inputs.shape[0], pass_sequences, target_from):
            with timer("forward"):
                values = chunk_values(start, stop)
                features = values[observed]
                written = keep(values, start)
            with timer("statistics"):
                statistics.add(features, start)
                if cross is not None:
                    target = anchored_values[point.value].read(start, stop)
                    cross.add(target if point.less is None else target - values[point.less], features)
        del values, features  # the last chunk's activations, not needed by the decomposition
        release_freed_memory()
        cached.extend(written)
        if not statistics.is_finite() or (cross is not None and not cross.is_finite()):
            raise NumericalError(f"NaN or Inf activations reach {block_label}{', '.join(todo or unit.linears)} "
                                 "(overflow in the source weights or in the layers before)")
        with timer("eigen"):
            moments = statistics.moments(work_dtype, method.centered, config.damping)
            anchor = cross.anchor(dense.strength, work_dtype, target_is_output=point.less is not None) \
                if cross is not None else None
            del cross
            streams_equal = False  # this group changes the block: later groups see the difference
            if unit is not None:
                selection = (orders or {}).get(unit.name, config.neuron_selection)
                method.compress_unit(block, unit, plan[unit.name], moments.parts[0], selection, config.damping,
                                     scratch, anchor)
                if unit.narrows_reads:  # its features are narrower now: recomputed, never read from the cache
                    narrowed.add(unit.reads)
                    cached = [name for name in cached if name != unit.reads]
                # the group's other linears (v_proj beside the query–key pairs) are factored from the same moments
                todo = {name: rank for name, rank in todo.items() if name not in unit.linears}
            if todo:
                method.compress_group(block, group, todo, moments, at_output, work_dtype, config.damping, anchor)
            del moments, statistics, anchor
        release_freed_memory()
    if outputs is not None or energies is not None:
        with timer("forward"):
            for start, stop in chunk_ranges(inputs.shape[0], chunk_sequences):
                values = chunk_values(start, stop)
                if outputs is not None:
                    outputs.write(start, require_finite(values["output"], f"leave {block_label.rstrip('.')}"))
                if energies is not None:
                    energies.add(values)
                del values


def _block_tensors(block: Block, index: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    prefix = block_prefix(index)
    return {prefix + key: value.to(dtype) for key, value in block.state_dict().items()}


def fault_point(name: str) -> None:
    """Test hook: STREAMROM_FAULT=<name> kills the process here with SIGKILL, as a crash would;
    STREAMROM_FAULT=sigint:<name> sends it SIGINT, as Ctrl-C would; stop:<name> stops it (SIGSTOP)."""
    fault = os.environ.get("STREAMROM_FAULT")
    if fault == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == f"sigint:{name}":
        os.kill(os.getpid(), signal.SIGINT)
    elif fault == f"stop:{name}":  # held there (SIGSTOP) until the test sends SIGCONT
        os.kill(os.getpid(), signal.SIGSTOP)


def damaged_shards(output: Path, progress: Progress) -> list[int]:
    """Numbers of the shards an interrupted run recorded as written that are now missing or truncated
    (1: the embedding; i + 2: block i), found before any work so that only they are redone."""
    damaged = []
    for name in sorted(set(progress.weight_map.values())):
        if not shard_is_complete(output / name):
            log.warning("shard %s of the interrupted run is missing or damaged: it is redone", name)
            damaged.append(int(name.split("-")[1]))
    return damaged


def _remove_stray_temporaries(output: Path) -> None:
    """Temporary files of a write that a kill interrupted (earlier versions wrote them beside the shards)."""
    for path in output.glob(".*tmp*"):
        if path.is_file():
            path.unlink()


def write_model(reader: CheckpointReader, output: Path, tokens: np.ndarray, plan: dict[str, int | None],
                layers: list[int], config: CompressConfig, progress: Progress, timer: StageTimer,
                monitor: RSSMonitor, target_from: int | None = None, damaged: list[int] = (),
                orders: dict[str, np.ndarray] | None = None) -> None:
    """The block loop. After every block, its shard and the next block's inputs are on disk before
    the progress record says so; a rerun picks up from there. Ends with the index in place and the
    progress record at stage "written". `orders`: pass 1's keep orders by unit key (pass1 selection)."""
    spec = reader.spec
    dtype = config.output_dtype(reader.weight_dtype)
    sequences, seqlen = tokens.shape
    chunk_sequences = max(1, config.chunk_tokens // seqlen)
    work = output / WORK_FOLDER
    writer = CheckpointWriter(output, spec.num_layers + 2, progress.weight_map)
    resuming = progress.blocks_done >= 0
    if resuming:
        _remove_stray_temporaries(output)
    cos, sin = Rotary(spec).cos_sin(seqlen)
    steps = _BlockSteps(reader, plan, config, chunk_sequences, timer, target_from, cos, sin, work, orders)

    def record(blocks_done: int, inputs_file: str) -> None:
        progress.blocks_done = blocks_done
        progress.inputs_file = inputs_file
        progress.weight_map = dict(writer.weight_map)
        progress.save(output)

    if 1 in damaged:
        with timer("write"):
            writer.write_shard(1, {EMBED: reader.tensor(EMBED).to(dtype)}, scratch=work)
    redo = sorted(number - 2 for number in damaged if 2 <= number < spec.num_layers + 2)
    if redo:
        _redo_blocks(steps, writer, redo, tokens, dtype)
        record(progress.blocks_done, progress.inputs_file)
    if progress.blocks_done < spec.num_layers:
        activations = ActivationPair(work, sequences, seqlen, spec.hidden_size,
                                     inputs_name=progress.inputs_file if resuming else None)
        dense = _dense_pair(config, work, sequences, seqlen, spec.hidden_size,
                            progress.inputs_file if resuming else None)
        finished = False
        try:
            if not resuming:
                with timer("read"):
                    embedding = reader.tensor(EMBED)
                with timer("write"):
                    writer.write_shard(1, {EMBED: embedding.to(dtype)}, scratch=work)
                if config.compression_method.uses_calibration:
                    with timer("forward"):
                        embed_into(embedding, tokens, activations.inputs, chunk_sequences, spec.embedding_scale)
                        activations.inputs.sync()
                        if dense is not None:
                            embed_into(embedding, tokens, dense.inputs, chunk_sequences, spec.embedding_scale)
                            dense.inputs.sync()
                del embedding
                record(0, activations.inputs.path.name)
            log.info("compressing blocks %d..%d", progress.blocks_done + 1, spec.num_layers,
                     extra={"progress": (progress.blocks_done, spec.num_layers, "compress")})
            for index in range(progress.blocks_done, spec.num_layers):
                monitor.mark(f"block {index}")
                block = steps.compress(index, activations, dense)
                with timer("write"):
                    writer.write_shard(index + 2, _block_tensors(block, index, dtype), scratch=work,
                                       before_rename=lambda: fault_point(f"writing-block-{index}"))
                for name, rank in block_plan(plan, index).items():
                    progress.ranks[f"{block_prefix(index)}{name}"] = rank
                record(index + 1, activations.inputs.path.name)
                fault_point(f"after-block-{index}")
                del block
                release_freed_memory()
                log.info("block %d/%d done", index + 1, spec.num_layers,
                         extra={"progress": (index + 1, spec.num_layers, "compress")})
            finished = True
        finally:
            # Kept on failure or interruption: the activations are what a rerun resumes from.
            activations.close(remove=finished)
            if dense is not None:
                dense.close(remove=finished)
            steps.close()
    with timer("write"):
        _write_tail(reader, writer, config, layers, progress, dtype, sequences, seqlen, work)
    fault_point("after-tail")
    progress.weight_map = dict(writer.weight_map)
    progress.stage = "written"
    progress.save(output)


class _BlockSteps:
    """Compressing one block of the source: read it, compress it group by group on its inputs (when the
    method needs calibration), and hand its outputs on as the next block's inputs."""

    def __init__(self, reader: CheckpointReader, plan: dict[str, int | None], config: CompressConfig,
                 chunk_sequences: int, timer: StageTimer, target_from: int | None, cos: torch.Tensor,
                 sin: torch.Tensor, work: Path, orders: dict[str, np.ndarray] | None = None):
        self.reader, self.plan, self.config, self.orders = reader, plan, config, orders or {}
        self.chunk_sequences, self.timer, self.target_from = chunk_sequences, timer, target_from
        self.cos, self.sin, self.work = cos, sin, work
        self._cache: BlockCache | None = None
        self._dense_values: dict[str, ActivationBuffer] = {}

    def cache(self, shape: tuple[int, int]) -> BlockCache:
        if self._cache is None:
            spec = self.reader.spec
            self._cache = BlockCache(self.work, *shape, block_class(spec).cached_widths(spec))
        return self._cache

    def dense_value(self, shape: tuple[int, int]) -> Callable[[str, int], ActivationBuffer]:
        """values(name, width): the disk buffer for one anchored value (nameless files: they hold one
        block's values at a time and nothing resumes from them)."""
        def value(name: str, width: int) -> ActivationBuffer:
            if name not in self._dense_values:
                self.work.mkdir(parents=True, exist_ok=True)
                self._dense_values[name] = ActivationBuffer(self.work, *shape, width, anonymous=True)
            return self._dense_values[name]
        return value

    def compress(self, index: int, activations: ActivationPair | None, dense: ActivationPair | None = None) -> Block:
        spec = self.reader.spec
        with self.timer("read"):
            block = block_class(spec).from_tensors(spec, self.reader.block_tensors(index), index)
        # the last block's outputs feed nothing; nor do any, for weight-space SVD
        uses_calibration = self.config.compression_method.uses_calibration
        has_next = activations is not None and index + 1 < spec.num_layers and uses_calibration
        inputs = activations.inputs if activations is not None else None
        cache = self.cache(inputs.shape[:2]) if inputs is not None and uses_calibration else None
        stream = None
        if dense is not None and inputs is not None:
            stream = DenseStream(dense.inputs, dense.outputs if has_next else None,
                                 self.dense_value(inputs.shape[:2]), self.config.anchor)
        energies = BlockEnergies(block.GROUPS) if inputs is not None and uses_calibration else None
        compress_block(block, block_plan(self.plan, index), inputs, activations.outputs if has_next else None,
                       cache, self.cos, self.sin, self.config, self.chunk_sequences, self.timer,
                       block_label=block_prefix(index), target_from=self.target_from, scratch=self.work,
                       dense=stream, energies=energies,
                       orders={key[len(block_prefix(index)):]: order for key, order in self.orders.items()
                               if key.startswith(block_prefix(index))})
        if energies is not None:  # before the progress record counts the block
            save_block(self.work / importance_block_file(index), energies.per_linear(block_prefix(index)),
                       energies.tokens)
        fault_point(f"during-block-{index}")
        if has_next:
            activations.outputs.sync()
            activations.swap()
            if dense is not None:
                dense.outputs.sync()
                dense.swap()
        return block

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None
        for buffer in self._dense_values.values():
            buffer.close()
        self._dense_values = {}


def _redo_blocks(steps: _BlockSteps, writer: CheckpointWriter, redo: list[int], tokens: np.ndarray,
                 dtype: torch.dtype) -> None:
    """Rewrite the shards of the blocks in `redo` (finished before, lost since). Each block's inputs
    come from compressing the blocks before it again, from the embeddings up (deterministic: the same
    bytes as before); only the lost shards are written."""
    reader, config = steps.reader, steps.config
    log.info("redoing block(s) %s (their shards were lost)", ", ".join(map(str, redo)))
    activations = dense = None
    if config.compression_method.uses_calibration:
        sequences, seqlen = tokens.shape
        activations = ActivationPair(steps.work / "redo", sequences, seqlen, reader.spec.hidden_size)
        dense = _dense_pair(config, steps.work / "redo", sequences, seqlen, reader.spec.hidden_size, None)
        with steps.timer("forward"):
            embedding = reader.tensor(EMBED)
            for pair in (activations, dense):
                if pair is not None:
                    embed_into(embedding, tokens, pair.inputs, steps.chunk_sequences, reader.spec.embedding_scale)
            del embedding
    try:
        for index in (redo if activations is None else range(max(redo) + 1)):
            block = steps.compress(index, activations, dense)
            if index in redo:
                with steps.timer("write"):
                    writer.write_shard(index + 2, _block_tensors(block, index, dtype), scratch=steps.work)
            del block
    finally:
        if activations is not None:
            activations.close(remove=True)
        if dense is not None:
            dense.close(remove=True)
        steps.close()
        shutil.rmtree(steps.work / "redo", ignore_errors=True)


def _dense_pair(config: CompressConfig, folder: Path, sequences: int, seqlen: int, hidden: int,
                compressed_inputs: str | None) -> ActivationPair | None:
    """The dense stream's pair of activation files (anchored fits only); a resumed run reopens the one
    that pairs with the compressed stream's inputs (both swap after every block)."""
    if not config.anchor or not config.compression_method.uses_calibration:
        return None
    inputs = None if compressed_inputs is None else DENSE_FILE_NAMES[FILE_NAMES.index(compressed_inputs)]
    return ActivationPair(folder, sequences, seqlen, hidden, inputs_name=inputs, names=DENSE_FILE_NAMES)


def _write_tail(reader: CheckpointReader, writer: CheckpointWriter, config: CompressConfig, layers: list[int],
                progress: Progress, dtype: torch.dtype, sequences: int, seqlen: int, work: Path) -> None:
    """The final norm and head, then config, tokenizer and the index (last: it marks the model complete)."""
    spec = reader.spec
    tail = [FINAL_NORM] + ([] if spec.tie_word_embeddings else [LM_HEAD])
    writer.write_shard(spec.num_layers + 2, {k: v.to(dtype) for k, v in reader.read(tail).items()}, scratch=work)
    out_config = dict(reader.config)
    out_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if "dtype" in out_config:  # transformers 5 writes "dtype"
        out_config["dtype"] = out_config["torch_dtype"]
    ranks = {key: rank for key, rank in progress.ranks.items() if not key.endswith(UNIT_NAMES)}
    widths = {key: width for key, width in progress.ranks.items() if key.endswith(UNIT_NAMES) and width}
    out_config.update(_layer_widths(spec, widths))
    out_config["streamrom"] = {
        "format_version": FORMAT_VERSION,
        "method": config.method,
        "centered": config.centered,  # factored linears' expand has a bias
        "allocate": config.allocate,
        "target_params": config.target_params,
        "target_size_gb": config.target_size_gb,
        "ratio": config.ratio,
        "rank": config.rank,
        "layers": layers,
        "dense_parameters": reader.parameter_count(),  # the source's (the config's widths may be narrowed)
        "ranks": ranks,
        **({"widths": widths} if widths else {}),
        "factor_tensors": {
            "reduce": "<linear>.reduce.weight: (rank, in) = Vᵀ W; <linear>.reduce.bias = Vᵀ b",
            "expand": "<linear>.expand.weight: (out, rank) = V; <linear>.expand.bias = (I − V Vᵀ) μ (centered only)",
        },
        "calibration": {"sequences": sequences, "seqlen": seqlen, "seed": config.calibration.seed},
    }
    _write_importance(writer.folder, spec.num_layers, work)
    extra_files = [HF_MODELING_FILE]
    if not any(ranks.values()) and not any(unit.widths_key in out_config for unit in UNITS):
        # dense tensors of the source's shapes (one MLP width, no factors): a plain checkpoint of the
        # source architecture, which transformers loads without remote code
        out_config.pop("auto_map", None)
        out_config["architectures"] = [FAMILIES[spec.model_type].transformers_class]
        extra_files = []
    else:
        # transformers builds the factored model from the file beside it (trust_remote_code=True)
        model_class = FAMILIES[spec.model_type].remote_class
        out_config["auto_map"] = {"AutoModelForCausalLM": f"{HF_MODELING_FILE.stem}.{model_class}"}
        out_config["architectures"] = [model_class]
    writer.finish(out_config, [*reader.tokenizer_files(), *extra_files])


def importance_block_file(index: int) -> str:
    return f"importance-{index:05d}.npz"


def _write_importance(output: Path, num_layers: int, work: Path) -> None:
    """importance.IMPORTANCE_FILE from every block's saved energies; left out (logged) where a block's
    are missing (a method without calibration, or blocks compressed by an older version)."""
    blocks = [load_block(work / importance_block_file(index)) for index in range(num_layers)]
    if all(block is not None for block in blocks):
        write_importance(output, blocks)
    else:
        log.info("no importance file: input energies were not summed for every block")


def _layer_widths(spec, widths: dict[str, int]) -> dict[str, object]:
    """config.json's per-block widths after structured ROM: intermediate_size itself where every block
    keeps one MLP width, else layer_intermediate_sizes; the head widths (layer_value_head_dims,
    layer_query_key_head_dims) where they narrowed."""
    found: dict[str, object] = {}
    narrowed = spec.narrowed(widths)
    for unit in UNITS:
        per_block = [unit.features_of(narrowed, index) for index in range(spec.num_layers)]
        if all(width == unit.dense_features(spec) for width in per_block):
            continue
        if unit.name == "mlp.neurons" and len(set(per_block)) == 1:
            found["intermediate_size"] = per_block[0]  # what the source architecture reads itself
        else:
            found[unit.widths_key] = per_block
    if any(key in found for key in ("layer_value_head_dims", "layer_query_key_head_dims")):
        found["head_dim"] = spec.head_dim  # the dense head's: it must not be derived from hidden/heads
    return found
