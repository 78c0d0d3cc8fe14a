"""Block refinement (issue 31 item 2, the step AA-SVD runs after its closed-form fits): once a block is
compressed group by group, a short local optimisation of the compressed block's own parameters (its
factors, kept rows and refits, the norms' scales) so that, on the compressed stream's inputs, its
output comes nearer what the dense block gives for the same inputs.

The closed-form fits each minimise one linear's error with the groups before it already compressed;
none sees the nonlinearities after it (attention's softmax, the MLP's gate) or the error that groups
after it add. The refinement minimises the block's own output error, all parameters at once, by
Adafactor on mini-batches of calibration sequences with a cosine-decayed step. The dense block's
outputs are computed before the block is compressed and wait on disk (one file of tokens x hidden
floats), so memory stays one block, its gradients and one mini-batch under autograd.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..model.modeling import Block
from ..stream.activations import ActivationBuffer, chunk_ranges, require_finite


@dataclass(frozen=True)
class RefinementResult:
    """The mean squared output error against the dense block's outputs, over every calibration
    sequence, before and after the refinement (the report's per-block record)."""

    error_before: float
    error_after: float


@torch.no_grad()
def write_dense_outputs(block: Block, inputs: ActivationBuffer, targets: ActivationBuffer, cos: torch.Tensor,
                        sin: torch.Tensor, chunk_sequences: int, block_label: str) -> None:
    """The (still dense) block's outputs for the compressed stream's inputs: the refinement's target."""
    for start, stop in chunk_ranges(inputs.shape[0], chunk_sequences):
        targets.write(start, require_finite(block(inputs.read(start, stop), cos, sin),
                                            f"leave {block_label.rstrip('.')}"))


@torch.no_grad()
def output_error(block: Block, inputs: ActivationBuffer, targets: ActivationBuffer, cos: torch.Tensor,
                 sin: torch.Tensor, chunk_sequences: int) -> float:
    """Mean over tokens and features of (block(x) − target)² on every sequence."""
    total, count = 0.0, 0
    for start, stop in chunk_ranges(inputs.shape[0], chunk_sequences):
        difference = block(inputs.read(start, stop), cos, sin) - targets.read(start, stop)
        total += float(difference.double().pow(2).sum())
        count += difference.numel()
    return total / max(count, 1)


def refine_block(block: Block, inputs: ActivationBuffer, targets: ActivationBuffer, cos: torch.Tensor,
                 sin: torch.Tensor, steps: int, learning_rate: float, batch_sequences: int, chunk_sequences: int,
                 seed: int, scratch: Path | None = None) -> RefinementResult:
    """`steps` optimiser steps (_optimise) on every floating-point parameter of `block` (in place), each
    on one mini-batch of `batch_sequences` consecutive calibration sequences, the batches in an order drawn from
    `seed` (the block's index: a rerun refines exactly as the interrupted run did), the step size
    decaying from `learning_rate` (relative to each tensor's root mean square) to 0 along a cosine.
    The result: the output error before and after, on all sequences; where the steps made it worse,
    the block's parameters go back to where they were (a refinement never costs accuracy on the
    calibration set; the parameters wait for that in a nameless file in `scratch`)."""
    parameters = [p for p in block.parameters() if p.dtype.is_floating_point]
    before = output_error(block, inputs, targets, cos, sin, chunk_sequences)
    if steps <= 0 or not parameters:
        return RefinementResult(before, before)
    with tempfile.TemporaryFile(dir=scratch) as saved:  # the block as it was, on disk (nameless), not in RAM
        for p in parameters:
            np.save(saved, p.detach().numpy())
        _optimise(block, parameters, inputs, targets, cos, sin, steps, learning_rate, batch_sequences, seed)
        after = output_error(block, inputs, targets, cos, sin, chunk_sequences)
        if not after < before:  # (also a NaN) the closed-form block stands
            saved.seek(0)
            with torch.no_grad():
                for p in parameters:
                    p.copy_(torch.from_numpy(np.load(saved)))
            after = before
    return RefinementResult(before, after)


def _optimise(block: Block, parameters: list[torch.Tensor], inputs: ActivationBuffer, targets: ActivationBuffer,
              cos: torch.Tensor, sin: torch.Tensor, steps: int, learning_rate: float, batch_sequences: int,
              seed: int) -> None:
    """The steps, by Adafactor: its step is relative to each tensor's root mean square (a basis's
    entries are far smaller than a norm's gains), and its second moments are factored by rows and
    columns, so the optimiser's state is small beside the block (Adam's two moments would be twice
    the block's size: 1.3 GB more at 7B shape)."""
    batches = list(chunk_ranges(inputs.shape[0], batch_sequences))
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for p in parameters:
        p.requires_grad_(True)
    optimizer = torch.optim.Adafactor(parameters, lr=learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    try:
        with torch.enable_grad():
            for _ in range(steps):
                if not order:  # a new pass over the batches, in a new order
                    order = torch.randperm(len(batches), generator=generator).tolist()
                start, stop = batches[order.pop()]
                x, target = inputs.read(start, stop), targets.read(start, stop)
                loss = (block(x, cos, sin) - target).pow(2).mean()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                del x, target, loss
    finally:
        for p in parameters:
            p.requires_grad_(False)
            p.grad = None
