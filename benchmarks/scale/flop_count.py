"""FLOPs of each compress stage, counted from shapes, and this machine's own matmul peak.

Counts (multiply-add = 2 FLOPs), per block and per calibration token T:
- forward: every linear as run during compression (q/k/v/o/gate/up already factored when their
  outputs are computed, down once dense for its statistics and once factored for the block's
  output) plus attention's two L x L products per head (counted in full, as the kernel does);
- statistics: one Σ x xᵀ product per group: 2 T n² (n = the group's input width, or down's output);
- eigen: the matrix products of the decomposition, and each symmetric eigen-solve as 4 n³
  (tridiagonal reduction 4/3 n³ + back-transformation 2 n³ + divide and conquer, roughly; an
  estimate only, eigen-solvers do not run at GEMM speed).
The bound of a stage is its FLOPs at the measured float32 GEMM rate; `seconds / bound` is how far
from it the stage ran (1.0 = at the machine's matmul peak).
"""
from __future__ import annotations

import time

import torch

LINEARS = ("q", "k", "v", "o", "gate", "up", "down")


def linear_shapes(config: dict) -> dict[str, tuple[int, int]]:
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim", hidden // heads)
    return {"q": (heads * head_dim, hidden), "k": (kv_heads * head_dim, hidden), "v": (kv_heads * head_dim, hidden),
            "o": (hidden, heads * head_dim), "gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}


def block_flops(config: dict, ranks: dict[str, int | None], sequences: int, seqlen: int) -> dict[str, float]:
    """FLOPs of one compressed block's stages (ranks: short linear names, None for dense)."""
    shapes = linear_shapes(config)
    tokens = sequences * seqlen

    def run_cost(name: str) -> float:
        out_f, in_f = shapes[name]
        rank = ranks.get(name)
        return 2.0 * tokens * (rank * (out_f + in_f) if rank else out_f * in_f)

    attention = 4.0 * sequences * seqlen * seqlen * config["num_attention_heads"] * (shapes["q"][0] // config["num_attention_heads"])
    forward = sum(run_cost(n) for n in LINEARS) + attention + 2.0 * tokens * shapes["down"][0] * shapes["down"][1]
    groups = [shapes["q"][1], shapes["o"][1], shapes["gate"][1], shapes["down"][0]]
    statistics = sum(2.0 * tokens * n * n for n in groups)
    eigen = 0.0
    for name in ("q", "k", "v", "o"):
        out_f, in_f = shapes[name]
        eigen += 2.0 * out_f * in_f * in_f + 2.0 * out_f * out_f * in_f + 4.0 * out_f ** 3
    hidden = shapes["gate"][1]
    eigen += 4.0 * hidden ** 3  # the shared root of gate/up's input moment
    for name in ("gate", "up"):
        out_f, in_f = shapes[name]
        rank = ranks.get(name) or in_f
        eigen += 4.0 * out_f * in_f * in_f + 4.0 * in_f ** 3 + 2.0 * out_f * in_f * rank
    eigen += 4.0 * shapes["down"][0] ** 3
    eigen += sum(2.0 * (ranks.get(n) or 0) * shapes[n][0] * shapes[n][1] for n in LINEARS)  # Vᵀ W
    return {"forward": forward, "statistics": statistics, "eigen": eigen}


def gemm_peak_gflops(threads: int | None = None, size: int = 4096, repeats: int = 5) -> float:
    """Best float32 GEMM rate of this machine at `threads` torch threads (GFLOP/s)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, b = torch.randn(size, size), torch.randn(size, size)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        return 2.0 * size ** 3 / best / 1e9
    finally:
        torch.set_num_threads(previous)
