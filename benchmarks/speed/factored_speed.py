"""When is a factored linear faster than the dense one it replaces, on this CPU?

A factored linear x ↦ V (R x) costs r·(out + in) multiply-adds per token against out·in for the dense
one: "fraction" below is that ratio (the parameters it keeps). Near fraction 1 it does the same work
in two smaller products, so it must be slower; this finds where it starts to pay. For each linear
shape of SmolLM2-135M and of Llama-2-7B, ranks at fractions 0.3 … 0.98, tokens 1 (decoding) and
512 (prefill), 1 and 2 threads, float32 (transformers' default) and bf16 (what `streamrom.load`
keeps): the median time of many calls, dense and factored measured in alternation in one process.
The smallest speed-up over all cases at each fraction is the table's last column: a factored
linear at that fraction is at least that much faster, wherever it runs here.

    python -m benchmarks.speed.factored_speed            # writes benchmarks/results/factored_speed.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.common import REPO, header
RESULTS = REPO / "benchmarks" / "results" / "factored_speed.json"
SHAPES = {
    "smollm2 q/o (576x576)": (576, 576), "smollm2 gate/up (1536x576)": (1536, 576),
    "smollm2 down (576x1536)": (576, 1536),
    "7b q/k/v/o (4096x4096)": (4096, 4096), "7b gate/up (11008x4096)": (11008, 4096),
    "7b down (4096x11008)": (4096, 11008),
}
FRACTIONS = (0.3, 0.5, 0.7, 0.8, 0.9, 0.98)


def median_seconds(call, budget: float = 0.25, least: int = 3) -> float:
    call()  # warm-up
    times = []
    started = time.perf_counter()
    while len(times) < least or time.perf_counter() - started < budget:
        begin = time.perf_counter()
        call()
        times.append(time.perf_counter() - begin)
    return statistics.median(times)


def main() -> None:

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="thread counts to measure (rows of the others already in the results are kept)")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    kept = json.loads(RESULTS.read_text())["rows"] if RESULTS.is_file() else []
    rows = [row for row in kept if row["threads"] not in args.threads]
    for threads in args.threads:
        torch.set_num_threads(threads)
        for dtype in (torch.float32, torch.bfloat16):
            for label, (out_f, in_f) in SHAPES.items():
                dense = torch.randn(out_f, in_f, generator=generator).to(dtype)
                for tokens in (1, 512):
                    x = torch.randn(tokens, in_f, generator=generator).to(dtype)
                    for fraction in FRACTIONS:
                        rank = max(8, int(fraction * out_f * in_f / (out_f + in_f)) // 8 * 8)
                        reduce = torch.randn(rank, in_f, generator=generator).to(dtype)
                        expand = torch.randn(out_f, rank, generator=generator).to(dtype)
                        with torch.no_grad():
                            dense_s = median_seconds(lambda: F.linear(x, dense))
                            factored_s = median_seconds(lambda: F.linear(F.linear(x, reduce), expand))
                        rows.append({"shape": label, "out": out_f, "in": in_f, "threads": threads,
                                     "dtype": str(dtype).removeprefix("torch."), "tokens": tokens,
                                     "fraction": fraction, "rank": rank, "dense_seconds": dense_s,
                                     "factored_seconds": factored_s, "speedup": dense_s / factored_s})
                    print(f"{threads} thr {dtype} {label} tokens {tokens}: " + ", ".join(
                        f"{row['fraction']}: {row['speedup']:.2f}x" for row in rows[-len(FRACTIONS):]), flush=True)
    RESULTS.write_text(json.dumps({"header": header("speed.factored_speed"),
                                   "torch": torch.__version__, "rows": rows}, indent=2) + "\n")
    print("\n| fraction of the dense parameters | speed-up over dense, 1 token (min / median) "
          "| 512 tokens (min / median) | slowest case |")
    print("|---|---|---|---|")
    for fraction in FRACTIONS:
        at = [row for row in rows if row["fraction"] == fraction]
        cells = []
        for tokens in (1, 512):
            speedups = [row["speedup"] for row in at if row["tokens"] == tokens]
            cells.append(f"{min(speedups):.2f} × / {statistics.median(speedups):.2f} ×")
        worst = min(at, key=lambda row: row["speedup"])
        print(f"| {fraction} | {cells[0]} | {cells[1]} | {worst['shape']}, {worst['tokens']} token(s), "
              f"{worst['dtype']}, {worst['threads']} thread(s): {worst['speedup']:.2f} × |")
    print(f"written {RESULTS}")
    from benchmarks import tables

    tables.main()  # docs/results/real-model.md's factored-speed table


if __name__ == "__main__":
    main()
