"""Where a block's time goes: `streamrom compress` on a random-weight 7B/13B-shaped checkpoint
(benchmarks/scale/synthetic.py, the same command benchmarks/scale/memory_profile.py runs), sampled by py-spy, each
sample assigned to one step of the algorithm by the functions on its stack (STEPS, first match wins).

    python -m benchmarks.scale.stage_profile 7b --depth 2 --method mixed --allocate spectrum --sequences 8 --threads 2

py-spy must be installed (`pip install py-spy`; it reads the child's stack from outside, so the run
is not slowed by tracing). Every sample counts, idle ones too (reading and writing files), so the
steps add up to the wall time. Results: benchmarks/results/stage_profile_<shape>.json (one row per
setting; a new run of a setting replaces its row) and the generated table in docs/results/scale.md.
"""
from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from benchmarks.common import REPO, header
from benchmarks.scale.synthetic import random_tokens, write_synthetic

# (step, what it is, functions: a sample whose stack holds any of them is this step's). The order
# matters: a sample goes to the first step any of whose functions is on its stack, so the inner work
# (a solve) is named before the loop that calls it (a pass). ONCE: steps done once per model, not
# once per block (their seconds are not divided by the blocks).
ONCE = ("time estimate probe", "loss head", "allocation")
PHASES = (("pass 1", "collect_spectra"), ("pass 2", "compress_block"))
SETUP = "setup and head"  # the phase of a sample in neither pass
STEPS = [
    ("time estimate probe", "the short GEMM and eigen-solve probe behind the projected time", ("projected_time",)),
    ("neuron removal", "greedy structured-OBS removal of MLP neurons: the 11008² inverse, then rank-k downdates",
     ("obs_removal",)),
    ("neuron refit", "down's refit on the kept neurons (a Cholesky solve of their moment)", ("refit_columns",)),
    ("value dimensions", "per-KV-head value maps and o_proj's refit", ("value_maps", "refit_output")),
    ("query–key pairs", "the rotary pairs' output energies and costs", ("output_energies", "pair_costs")),
    ("pricing bounds", "lower bounds on a unit's factored alternatives (eigenvalues only) and the check that "
     "they decide the choice", ("cost_lower_bound", "unit_dominates")),
    ("factored pricing", "each factored alternative's direction costs (q/k/v/o/gate/up: W̃L, a Gram product, "
     "one 4096 eigen-solve; since the bounds, down's at its output too)",
     ("direction_costs", "weighted_direction_costs", "pricing_problem", "output_pricing_problem",
      "PricingProblem.costs")),
    ("factored fits", "the chosen factored linears' bases (eigen-solves) and factors",
     ("rom_eigenpairs", "factorise", "anchored_map", "least_squares")),
    ("down at its output", "down's directions priced from its output moment (one 4096 eigen-solve)",
     ("top_eigenvectors", "top_eigenvalues")),
    ("loss head", "the next-token loss over the vocabulary and its gradient at the last hidden states",
     ("LossHead.loss_and_gradient",)),
    ("allocation", "the plan: ranks and widths for the target from the priced curves", ("model_plan",)),
    ("moments", "second moments of what the priced or compressed linears read",
     ("MomentAccumulator.add", "GroupStatistics.add", "CrossAccumulator.add", "second_moment_as")),
    ("backward", "the gradient through the block (the MLP's and attention's backward)", ("Tensor.backward",)),
    ("wide-moment pass", "a no-grad forward for the MLP neurons' 11008-wide moment, one sequence at a time",
     ("observe_block.<locals>.<dictcomp>",)),
    ("activations on disk", "reading and writing the activation files",
     ("ActivationBuffer.read", "ActivationBuffer.write", "read_into")),
    ("forward under autograd", "the block's forward again, keeping what its backward needs", ("observe_block",)),
    ("forward", "the block's forward passes (dense in pass 1; in pass 2 the group passes and the outputs')",
     ("run_block", "BlockValues.__getitem__", "_dense_pass")),
    ("weights on disk", "reading the checkpoint and writing the new shards",
     ("CheckpointReader", "safe_open", "save_file", "_weight_reader", "Block.from_tensors", "write_shard")),
]


def classify(stack: list[str]) -> tuple[str, str]:
    """(phase, step) of one sample's stack (outermost frame first, each 'function (path:line)')."""
    functions = [frame.rpartition(" (")[0] for frame in stack]
    phase = next((label for label, function in PHASES if function in functions), SETUP)
    for step, _, markers in STEPS:  # a marker is a function's qualified name, or its last parts
        if any(function == marker or function.endswith("." + marker) for function in functions for marker in markers):
            return phase, step
    return phase, "other"


def aggregate(raw: Path) -> Counter:
    """Samples per (phase, step) in a py-spy raw file ('frame;frame;... count' per line)."""
    counts: Counter = Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")  # outermost first
        if frames[0].startswith("Thread._bootstrap"):
            continue  # a helper thread (the RSS sampler): the main thread's samples alone add up to the wall time
        counts[classify(frames)] += int(count)
    return counts


def row_key(row: dict) -> tuple[str, int, str]:
    """What a row of the results stands for: its setting, its tokens and its label."""
    return row["setting"], row["calibration_tokens"], row.get("label", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=["7b", "13b"])
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--method", default="mixed")
    parser.add_argument("--allocate", default="spectrum")
    parser.add_argument("--target-params", default="0.8")
    parser.add_argument("--extra", default="", help="more compress options, one string (e.g. '--pass1-tokens 1024')")
    parser.add_argument("--label", default="", help="what tells this row from others of the same setting (the code "
                        "it ran: a before/after pair keeps both rows)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rate", type=int, default=20, help="py-spy samples per second (default 20)")
    parser.add_argument("--reclassify", action="store_true",
                        help="no run: name the steps again in the kept py-spy profile of this setting")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "synthetic")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    spy = shutil.which("py-spy")
    if spy is None:
        sys.exit("py-spy is not installed: pip install py-spy")
    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    tokens = random_tokens(args.work / "tokens.npy", args.sequences * args.seqlen * 4)
    source = write_synthetic(args.shape, args.depth, args.work / f"{args.shape}-{args.depth}")
    output = args.work / f"{args.shape}-{args.depth}-profiled"
    setting = ["--method", args.method, "--allocate", args.allocate, "--target-params", args.target_params,
               *shlex.split(args.extra)]
    compress = ["--quiet", "--threads", str(args.threads), "compress", str(source), str(output), "--calib-tokens",
                str(tokens), "--calib-sequences", str(args.sequences), "--calib-seqlen", str(args.seqlen),
                "--overwrite", *setting]
    key = (shlex.join(setting), args.sequences * args.seqlen, args.label)
    out = args.results / f"stage_profile_{args.shape}.json"
    rows = json.loads(out.read_text())["rows"] if out.is_file() else []
    earlier = [row for row in rows if row_key(row) == key]
    # kept beside the checkpoint, so that --reclassify can name the steps again without a new run
    raw = args.work / f"stage_profile_{args.shape}-{args.depth}-{'_'.join([*setting, args.label]).replace('-', '')}.txt"
    if args.reclassify:
        if not earlier or not raw.is_file():
            sys.exit(f"--reclassify: no kept profile of this setting ({raw.name}) or no row for it in {out.name}")
        row = earlier[0]
    else:
        command = [spy, "record", "--idle", "--format", "raw", "--rate", str(args.rate), "--output", str(raw), "--",
                   sys.executable, "-m", "streamrom.cli", *compress]
        print("$", shlex.join(command), flush=True)
        started = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - started
        shutil.rmtree(output, ignore_errors=True)
        row = {"setting": key[0], "label": args.label, "depth": args.depth,
               "calibration_tokens": key[1],
               "threads": args.threads, "compress": shlex.join(["streamrom", *compress]), "wall_seconds": wall,
               "rate": args.rate, "run": header("scale.stage_profile")}
    counts = aggregate(raw)
    total = sum(counts.values())
    row["samples"] = total
    row["steps"] = [{"phase": phase, "step": step, "seconds": count / row["rate"],
                     "once": step in ONCE or phase == SETUP, "share": count / total}
                    for (phase, step), count in sorted(counts.items(), key=lambda item: -item[1])]
    rows = [old for old in rows if row_key(old) != key] + [row]
    out.write_text(json.dumps({"benchmark": "scale.stage_profile", "shape": args.shape, "rows": rows}, indent=2) + "\n")
    wall, steps = row["wall_seconds"], row["steps"]
    print(f"{wall:.0f} s, {total} samples of the main thread:")
    for step in steps:
        seconds = step["seconds"] if step["once"] else step["seconds"] / args.depth
        print(f"  {step['phase']:<15} {step['step']:<22} {seconds:7.1f} s {'once' if step['once'] else 'a block':<8}"
              f"{100 * step['share']:5.1f} %")
    from benchmarks import tables
    tables.main()


if __name__ == "__main__":
    main()
