"""Pass 1's pricing of one 7B-shaped block (the mixed method's spectrum), this commit against an earlier
one, as pairs in one run: the direction costs of a square linear (q/k/v/o: 4096 x 4096) and of a wide
one (gate/up: 11008 x 4096) from a centered input moment, and the greedy neuron removal's costs
(down_proj 4096 x 11008, 11008 neurons, down to 8), in float32 as the default precision runs them.

The moments are sums of x xᵀ over `--tokens` synthetic activations with a heavy-tailed per-feature
scale (a few outlier features, as real LLM activations have). At 4096 tokens the centered 4096-wide
moment is singular (the memory profile's calibration: 8 x 512); at 16384 (the default calibration)
it is not. The earlier code is read with `git show REV:streamrom/linalg/<module>.py` and imported beside the
current one; both run on the same arrays, alternately, and their costs are compared: entry by entry, and
by what the allocation reads of them (the costs of all directions from each rank on, up to the largest
rank whose factors save parameters: beyond it only their sum counts).

    python -m benchmarks.scale.pricing --before c3ef3dd [--tokens 4096 16384] [--repeats 2]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, header
RESULT = REPO / "benchmarks" / "results" / "pricing.json"


def module_at(revision: str, name: str, folder: Path):
    """streamrom/<name>.py (e.g. linalg/decompose) as it was at `revision`, imported beside today's (its
    relative imports are today's modules)."""
    source = subprocess.run(["git", "show", f"{revision}:streamrom/{name}.py"], capture_output=True, text=True,
                            check=True, cwd=REPO).stdout
    package, _, module = name.rpartition("/")
    path = folder / f"{module}_{revision}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(".".join(["streamrom", *package.split("/"), f"{module}_{revision}"]),
                                                  path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def moment_of(rng, tokens: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    scale = np.exp(1.5 * rng.standard_normal(width)).astype(np.float32)
    scale[:4] *= 100.0  # outlier features
    second, total = np.zeros((width, width)), np.zeros(width)
    for start in range(0, tokens, 2048):
        x = rng.standard_normal((min(2048, tokens - start), width)).astype(np.float32) * scale
        second += (x.T @ x).astype(np.float64)
        total += x.sum(0, dtype=np.float64)
    second /= tokens
    return second.astype(np.float32), (total / tokens).astype(np.float32)


def _costs(found):
    """neuron_costs' costs: the array itself before it returned a Removal (costs and keep order)."""
    return getattr(found, "costs", found)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the git revision to compare with")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    import streamrom.linalg.decompose as decompose_now
    from streamrom.linalg.allocation import Slot
    import streamrom.linalg.structured as structured_now

    torch.set_num_threads(2)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        decompose_before = module_at(args.before, "linalg/decompose", Path(folder))
        structured_before = module_at(args.before, "linalg/structured", Path(folder))
        sides = {"before": (decompose_before, structured_before), "after": (decompose_now, structured_now)}
        rng = np.random.default_rng(0)
        hidden, intermediate = args.hidden, args.intermediate
        square = (rng.standard_normal((hidden, hidden)) / np.sqrt(hidden)).astype(np.float32)
        wide = (rng.standard_normal((intermediate, hidden)) / np.sqrt(hidden)).astype(np.float32)
        down = (rng.standard_normal((hidden, intermediate)) / np.sqrt(intermediate)).astype(np.float32)
        sensitivity = rng.random(intermediate).astype(np.float32)
        for tokens in args.tokens:
            second, mean = moment_of(rng, tokens, hidden)
            wide_second, _ = moment_of(rng, tokens, intermediate)
            jobs = {
                "direction costs, square (q/k/v/o)": lambda d, s: d.direction_costs(
                    d.InputMoments(second, mean, True), square, None, sensitivity[:hidden]),
                "direction costs, wide (gate/up)": lambda d, s: d.direction_costs(
                    d.InputMoments(second, mean, True), wide, None, sensitivity),
                "neuron costs (down, to 8)": lambda d, s: _costs(  # a Removal since keep orders are saved
                    s.neuron_costs(wide_second.copy(), down, "obs", 1e-6, 8, overwrite_moment=True)),
            }
            # the directions the allocation reads one by one: up to the largest rank whose factors save
            read_by_allocation = {job: Slot(job, 0, out, hidden).max_saving_rank() for job, out in (
                ("direction costs, square (q/k/v/o)", hidden), ("direction costs, wide (gate/up)", intermediate))}
            for job, run in jobs.items():
                found = {}
                for repeat in range(args.repeats):
                    for label, (decompose, structured) in sides.items():
                        start = time.perf_counter()
                        found[label] = run(decompose, structured)
                        seconds = time.perf_counter() - start
                        rows.append({"tokens": tokens, "job": job, "code": label, "repeat": repeat,
                                     "seconds": round(seconds, 2)})
                        print(rows[-1], flush=True)
                before, after = (np.asarray(found[k], dtype=np.float64) for k in ("before", "after"))
                read = read_by_allocation.get(job, before.size)
                tails = [np.cumsum(costs[::-1])[::-1][:read + 1] for costs in (before, after)]
                rows.append({"tokens": tokens, "job": job,
                             "largest_cost_difference": float(np.abs(before - after).max() / np.abs(before).max()),
                             "largest_tail_difference": float(np.abs(tails[0] - tails[1]).max() / tails[0].max()),
                             "total_cost_difference": float(abs(before.sum() - after.sum()) / abs(before.sum()))})
                print(rows[-1], flush=True)
    result = {"header": header("scale.pricing", argv), "before": args.before, "hidden": hidden,
              "intermediate": intermediate, "rows": rows}
    RESULT.write_text(json.dumps(result, indent=1) + "\n")
    print("| tokens | job | before (s) | after (s) | speed-up | largest cost difference | largest tail difference |")
    print("|---|---|---|---|---|---|---|")
    for tokens in args.tokens:
        for job in dict.fromkeys(r["job"] for r in rows if r["tokens"] == tokens):
            times = {label: min(r["seconds"] for r in rows if r["tokens"] == tokens and r["job"] == job
                                and r.get("code") == label) for label in ("before", "after")}
            compared = next(r for r in rows if r["tokens"] == tokens and r["job"] == job and "largest_cost_difference" in r)
            print(f"| {tokens} | {job} | {times['before']} | {times['after']} | "
                  f"{times['before'] / times['after']:.2f}x | {compared['largest_cost_difference']:.1e} | "
                  f"{compared['largest_tail_difference']:.1e} |")


if __name__ == "__main__":
    main()
