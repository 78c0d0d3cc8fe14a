"""Anchored fits: the dense model's stream beside the compressed one, and where each group's fit is
anchored to it (compress_block runs them; decompose.Anchor is the math)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..stream.activations import DENSE_FILE_NAMES, FILE_NAMES, ActivationBuffer, ActivationPair
from .config import CompressConfig
from ..model.modeling import Block


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


def anchor_points(block: Block, units: list) -> list[AnchorPoint | None]:
    """Per group, where its fit is anchored. A lone linear that adds to the residual stream as it is
    (o_proj, down_proj: Block.RESIDUAL_ADDS; none with a bias), factored or refitted on a structured
    unit's kept features: the dense sum less the compressed stream's value it is added to, i.e. what
    the linear would have to give for the block to carry the dense model's residual stream on. Other
    factored groups: the dense value their moments are taken of. Other units (rotary pairs): none.

    Toward the dense linear's own outputs instead, the structured refits were worse on the real model
    (+2.3 % perplexity at 20 % smaller, +14.7 % at 40 %) and the factored o_proj/down fits were not as
    good (rom-centered spectrum, strength 0.5: 35.36 against 34.67 at 20 %, 66.92 against 62.95 at
    40 %): measured block by block (benchmarks/quality/anchored_units.py), the plain refit's error partly
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


def dense_pair(config: CompressConfig, folder: Path, sequences: int, seqlen: int, hidden: int,
                compressed_inputs: str | None) -> ActivationPair | None:
    """The dense stream's pair of activation files (anchored fits only); a resumed run reopens the one
    that pairs with the compressed stream's inputs (both swap after every block)."""
    if not config.anchored:
        return None
    inputs = None if compressed_inputs is None else DENSE_FILE_NAMES[FILE_NAMES.index(compressed_inputs)]
    return ActivationPair(folder, sequences, seqlen, hidden, inputs_name=inputs, names=DENSE_FILE_NAMES)
