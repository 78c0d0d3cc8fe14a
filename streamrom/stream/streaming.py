"""The one streaming loop: a checkpoint's blocks in turn, each read when its turn comes and gone
before the next (one block in memory). Compression, pass 1 (forward and backward), evaluation and
the benchmarks iterate it; what each does with a block is theirs."""
from __future__ import annotations

import logging
from typing import Iterable, Iterator

from .activations import ActivationPair, run_block
from ..storage.checkpoint import CheckpointReader
from ..report.memory import release_freed_memory
from ..model.modeling import Block, block_class
from ..report.report import StageTimer

log = logging.getLogger(__name__)


def read_blocks(reader: CheckpointReader, indices: Iterable[int], timer: StageTimer,
                stage: str = "") -> Iterator[tuple[int, Block]]:
    """(index, block) for each index; progress is logged under `stage` after the caller is done with a
    block (unless `stage` is empty). The caller deletes its `block` at the end of each turn: a loop
    variable would otherwise keep it alive while the next block is read (two blocks in memory)."""
    indices = list(indices)
    for done, index in enumerate(indices, 1):
        with timer("read"):
            block = block_class(reader.spec).from_tensors(reader.spec, reader.block_tensors(index), index)
        yield index, block
        del block
        release_freed_memory()
        if stage:
            log.info("%s: block %d/%d", stage, index + 1, reader.spec.num_layers,
                     extra={"progress": (done, len(indices), stage)})


def forward_blocks(reader: CheckpointReader, activations: ActivationPair, cos, sin, chunk_sequences: int,
                   timer: StageTimer, stage: str, indices: Iterable[int] | None = None) -> None:
    """Run `activations.inputs` through the blocks (default: all), swapping after each: the last
    block's outputs end up in `activations.inputs`."""
    for _, block in read_blocks(reader, range(reader.spec.num_layers) if indices is None else indices, timer, stage):
        with timer("forward"):
            run_block(block, activations.inputs, activations.outputs, cos, sin, chunk_sequences)
        activations.swap()
        del block
