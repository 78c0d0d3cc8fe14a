"""Execute a plan: the streamed block loop that compresses each block of the source and writes it
(compression/block_compression.py compresses one block, compression/anchoring.py holds the dense stream's side, and
compression/output_format.py the files written).

    reader ─(one block)─► Block ─► per group (Block.GROUPS): statistics ─► method ─► new modules
    calibration tokens ─► embeddings ─► activation files ─(chunks)─► block ─► next activation file
    compressed block ─► its own shard; index and config written last

After every block, its shard and the next block's inputs are on disk before the progress record says
so: a rerun picks up from there; shards lost since are redone alone. A bayes trial runs this stage
alone, on what the prepare stage already holds.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..faults import fault_point
from ..stream.activations import ActivationBuffer, ActivationPair, BlockCache, embed_into
from .anchoring import DenseStream, dense_pair
from .block_compression import compress_block
from .plans import ModelPlan
from ..storage.checkpoint import NUMBERED_SHARD, CheckpointReader, CheckpointWriter, shard_is_complete
from .config import CompressConfig
from ..storage.importance import BlockEnergies, save_block
from ..report.memory import RSSMonitor, release_freed_memory
from ..model.modeling import EMBED, Block, Rotary, block_class, block_prefix
from .output_format import block_tensors, importance_block_file, write_tail
from .progress import Progress
from ..report.report import StageTimer

log = logging.getLogger(__name__)

WORK_FOLDER = ".streamrom-work"


def damaged_shards(output: Path, progress: Progress) -> list[int]:
    """Numbers of the shards an interrupted run recorded as written that are now missing or truncated
    (1: the embedding; i + 2: block i), found before any work so that only they are redone."""
    damaged = []
    for name in sorted(set(progress.weight_map.values())):
        if not shard_is_complete(output / name):
            log.warning("shard %s of the interrupted run is missing or damaged: it is redone", name)
            damaged.append(int(NUMBERED_SHARD.fullmatch(name)[1]))
    return damaged


def _remove_stray_temporaries(output: Path) -> None:
    """Temporary files of a write that a kill interrupted (earlier versions wrote them beside the shards)."""
    for path in output.glob(".*tmp*"):
        if path.is_file():
            path.unlink()


def write_model(reader: CheckpointReader, output: Path, tokens: np.ndarray, plan: ModelPlan,
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
        dense = dense_pair(config, work, sequences, seqlen, spec.hidden_size,
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
                    writer.write_shard(index + 2, block_tensors(block, index, dtype), scratch=work,
                                       before_rename=lambda: fault_point(f"writing-block-{index}"))
                progress.ranks.update(plan.blocks[index].keyed(index))
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
        write_tail(reader, writer, config, layers, progress, dtype, sequences, seqlen, work)
    fault_point("after-tail")
    progress.weight_map = dict(writer.weight_map)
    progress.stage = "written"
    progress.save(output)


class _BlockSteps:
    """Compressing one block of the source: read it, compress it group by group on its inputs (when the
    method needs calibration), and hand its outputs on as the next block's inputs."""

    def __init__(self, reader: CheckpointReader, plan: ModelPlan, config: CompressConfig,
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
        compress_block(block, self.plan.blocks[index], inputs, activations.outputs if has_next else None,
                       cache, self.cos, self.sin, self.config, self.chunk_sequences, self.timer,
                       block_label=block_prefix(index), target_from=self.target_from, scratch=self.work,
                       dense=stream, energies=energies, block_index=index,
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
        dense = dense_pair(config, steps.work / "redo", sequences, seqlen, reader.spec.hidden_size, None)
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
                    writer.write_shard(index + 2, block_tensors(block, index, dtype), scratch=steps.work)
            del block
    finally:
        if activations is not None:
            activations.close(remove=True)
        if dense is not None:
            dense.close(remove=True)
        steps.close()
        shutil.rmtree(steps.work / "redo", ignore_errors=True)
