"""A projected wall time for `compress`, before the work starts: the work of each stage counted from the
shapes, the calibration tokens and the method (floating-point operations of the forward and backward
passes and of the moment products; eigen-solves and greedy removals by their size), divided by this
machine's speed measured in a short probe (a torch matrix product at the block's own shapes and a
scipy eigen-solve). It counts what `compress` does, not every detail: the report puts it beside the
measured seconds (`projected_seconds`), so how close it comes is on record for every run.

Pure arithmetic on shapes here; `probe()` is the only part that measures anything.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

# What the arithmetic above leaves out and small models feel: seconds per linear priced or fitted
# (reading its weight back, the checks and conversions of its moments) and per block and pass.
PER_LINEAR_SECONDS = 0.05
PER_BLOCK_SECONDS = 0.3
READ_BYTES_PER_SECOND = 400e6  # safetensors read and converted to float32 (the page cache warm or not)


@dataclass(frozen=True)
class MachineSpeed:
    """Measured once per run: multiply-adds per second of a float32 matrix product at the block's shape,
    and seconds of a symmetric eigen-solve of size `eigen_size` (scaled by n³)."""

    multiply_adds_per_second: float
    eigen_seconds: float
    eigen_size: int

    def eigen(self, size: int) -> float:
        return self.eigen_seconds * (size / self.eigen_size) ** 3

    def products(self, multiply_adds: float) -> float:
        return multiply_adds / self.multiply_adds_per_second


def probe(hidden: int, work_dtype=np.float32, budget_seconds: float = 2.0) -> MachineSpeed:
    """This machine's speed at the model's shape: a (2048 x hidden) · (hidden x hidden) torch product (one
    untimed call first: the thread pool and the first pages cost more than the product) and a scipy
    eigen-solve of min(hidden, 4096) (the eigen stage's solver and dtype; the solver's time grows more
    slowly than n³ below a few thousand, so it is measured near the size it serves), each the best of
    a few repeats within about `budget_seconds` (at least three products and one solve)."""
    import scipy.linalg
    import torch

    rng = np.random.default_rng(0)
    rows = 2048
    a = torch.from_numpy(rng.standard_normal((rows, hidden), dtype=np.float32))
    b = torch.from_numpy(rng.standard_normal((hidden, hidden), dtype=np.float32))
    torch.mm(a, b)
    best = float("inf")
    deadline = time.perf_counter() + budget_seconds / 2
    for repeat in range(8):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
        if repeat >= 2 and time.perf_counter() > deadline:
            break
    rate = rows * hidden * hidden / max(best, 1e-9)
    size = min(hidden, 4096)
    x = rng.standard_normal((size + 16, size)).astype(work_dtype)
    symmetric = x.T @ x
    eigen = float("inf")
    deadline = time.perf_counter() + budget_seconds / 2
    for _ in range(3):
        start = time.perf_counter()
        scipy.linalg.eigh(symmetric, driver="evd")
        eigen = min(eigen, time.perf_counter() - start)
        if time.perf_counter() > deadline:
            break
    return MachineSpeed(rate, eigen, size)


@dataclass(frozen=True)
class UnitWork:
    """A structured unit as the projection sees it (compression/units.py counts it for each unit): the
    width of the value whose moment chooses its units, and the seconds of pricing them in pass 1 and of
    narrowing a block to a width of it in pass 2."""

    read_width: int
    price_seconds: float
    narrow_seconds: float


@dataclass(frozen=True)
class Shapes:
    """What the work depends on (from a ModelSpec and the run's settings)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    blocks: int
    chosen_blocks: int  # blocks the plan compresses (--layers)
    tokens: int  # calibration tokens (sequences x length)
    seqlen: int
    source_bytes: int
    first_pass_tokens: int = 0  # the tokens pass 1 sees (--pass1-tokens); 0: all of them


def project(shapes: Shapes, speed: MachineSpeed, factored: list[str], units: list[UnitWork], first_pass: bool,
            priced: list[str], refine_steps: int = 0, refine_batch_tokens: int = 0) -> dict[str, float]:
    """Projected seconds per stage (the report's stage names) and in all ("total").

    `factored`: the linears pass 2 factors in each chosen block ("q"...); `units`: the work of the
    structured units it narrows there (pass 1 prices the same ones); `first_pass`: pass 1 runs
    (spectrum/bayes, not reused); `priced`: the linears pass 1 prices in each chosen block;
    `refine_steps` (--refine-steps), each a forward and backward of `refine_batch_tokens` tokens
    through the block, beside the dense block's outputs and the output error before and after (three
    forwards over every token). The compressed block is counted at the dense block's size: an upper bound on its
    weights that its factored forms' extra backward products about make up for."""
    s = shapes
    attention_width, kv_width = s.heads * s.head_dim, s.kv_heads * s.head_dim
    shape_of = {"q": (attention_width, s.hidden), "k": (kv_width, s.hidden), "v": (kv_width, s.hidden),
                "o": (s.hidden, attention_width), "gate": (s.intermediate, s.hidden),
                "up": (s.intermediate, s.hidden), "down": (s.hidden, s.intermediate)}
    block_weights = sum(out * inp for out, inp in shape_of.values())
    # multiply-adds of one block's forward per calibration token (attention: the full score matrix)
    per_token = block_weights + 2 * s.seqlen * attention_width
    forward = s.tokens * per_token
    reads_of = {"q": s.hidden, "k": s.hidden, "v": s.hidden, "o": attention_width, "gate": s.hidden,
                "up": s.hidden, "down": s.intermediate}
    seconds = dict.fromkeys(("read", "forward", "backward", "statistics", "eigen", "write"), 0.0)
    if refine_steps > 0:
        seconds["refine"] = speed.products(s.chosen_blocks * (3 * forward
                                                              + refine_steps * 3 * refine_batch_tokens * per_token))

    def moment(width: int, tokens: int = s.tokens) -> float:  # one moment's products over the tokens
        return speed.products(tokens * width * width)

    def factor_cost(name: str) -> float:
        """Pricing or fitting one linear's directions: its products with the input's Cholesky factor
        and the eigen-solve of its output moment (the smaller side)."""
        out, inp = shape_of[name]
        if out < inp:  # a lone narrow-output linear (down) is fitted from its output's own moment
            return speed.eigen(out) + PER_LINEAR_SECONDS
        return speed.eigen(inp) + speed.products(out * inp * inp + inp ** 3) + PER_LINEAR_SECONDS

    values_read = {reads_of[name] for name in factored} | {unit.read_width for unit in units}
    if first_pass:
        tokens = min(s.first_pass_tokens or s.tokens, s.tokens)
        seconds["read"] += 2 * s.source_bytes / READ_BYTES_PER_SECOND
        seconds["forward"] += speed.products(s.blocks * tokens * per_token)
        head = speed.products(3 * tokens * s.hidden * s.vocab)
        # recomputed forward under autograd, then twice its work backward (a wide moment is summed from
        # the values that forward wrote to disk: no forward of its own)
        seconds["backward"] += head + speed.products(s.chosen_blocks * 3 * tokens * per_token)
        priced_values = {reads_of[name] for name in priced} | values_read
        seconds["statistics"] += s.chosen_blocks * sum(moment(width, tokens) for width in priced_values)
        seconds["eigen"] += s.chosen_blocks * (sum(factor_cost(name) for name in priced)
                                               + sum(unit.price_seconds for unit in units) + PER_BLOCK_SECONDS)
    seconds["read"] += s.source_bytes / READ_BYTES_PER_SECOND
    # pass 2: the group passes together make one forward, the outputs' pass a second (not the last block's)
    seconds["forward"] += speed.products((2 * s.blocks - 1) * forward)
    seconds["statistics"] += s.chosen_blocks * sum(moment(width) for width in values_read)
    seconds["eigen"] += s.chosen_blocks * (sum(factor_cost(name) for name in factored)
                                           + sum(unit.narrow_seconds for unit in units)
                                           + PER_BLOCK_SECONDS)
    seconds["write"] += s.source_bytes / READ_BYTES_PER_SECOND / 2
    seconds["total"] = sum(seconds.values())
    return seconds
