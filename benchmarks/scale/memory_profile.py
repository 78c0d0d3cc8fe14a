"""Memory and time of `streamrom compress` on random-weight checkpoints with Llama-2-7B/13B block
shapes (benchmarks/scale/synthetic.py), at chosen depths.

Each run is a child process; this script samples the child's RSS every 0.1 s (timeline CSV) and reads
the child's own report: sampled and OS peak RSS, seconds per stage, and the estimate of the peak's
parts. Each stage's FLOPs (benchmarks/scale/flop_count.py) are set against this machine's measured float32
GEMM peak at the same thread count. Results: benchmarks/results/memory_<shape>.json (rows of other
depths already there are kept), memory_<shape>_d<depth>_rss.csv, and a PNG of the timeline with
block boundaries when matplotlib is installed.

With `--whole-model DEPTH`, the same checkpoint is also compressed the whole-model way
(benchmarks/scale/whole_model.py: whole model and all activations in RAM, same algorithm) and the two
outputs are compared tensor by tensor.

With `--allocate spectrum`, the run starts with the spectrum allocation's pass 1 (a streamed forward
and backward of the dense model, compression/spectra.py), whose peak the estimate covers too.

    python -m benchmarks.scale.memory_profile 7b --depths 2 4 8 --whole-model 8
    python -m benchmarks.scale.memory_profile 7b --depths 2 --allocate spectrum --sequences 8
    python -m benchmarks.scale.memory_profile 7b --depths 2 --method mixed --allocate spectrum --sequences 8 \
        --neuron-selection obs pass1
    python -m benchmarks.scale.memory_profile 7b --depths 2 --method mixed --allocate spectrum --sequences 8 \
        --neuron-selection pass1 --pass1-tokens all 1024      # pass 1 on all tokens, then on 1024: a pair
"""
from __future__ import annotations

import argparse
import csv
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

import psutil
import torch

from benchmarks.common import REPO, header

from benchmarks.scale.flop_count import block_flops, gemm_peak_gflops
from benchmarks.scale.synthetic import config_for, random_tokens, write_synthetic
from benchmarks.scale.whole_model import REPORT_FILE as WHOLE_MODEL_REPORT, compare

from streamrom.report.memory import vm_hwm_bytes
from streamrom.report.plots import rss_timeline_png


def profile(command: list[str], timeline_csv: Path | None) -> tuple[float, int, int]:
    """Run `command`, sampling its RSS every 0.1 s; returns (wall seconds, sampled peak bytes, the
    kernel's peak RSS of the child's image, VmHWM, last read while it ran)."""
    start = time.perf_counter()
    child = subprocess.Popen(command, cwd=REPO)
    process = psutil.Process(child.pid)
    samples, hwm = [], 0
    while child.poll() is None:
        try:
            samples.append((time.perf_counter() - start, process.memory_info().rss))
        except psutil.NoSuchProcess:
            break
        hwm = max(hwm, vm_hwm_bytes(child.pid) or 0)
        time.sleep(0.1)
    if child.wait() != 0:
        raise SystemExit(f"command failed ({child.returncode}): {shlex.join(command)}")
    if timeline_csv is not None:
        with open(timeline_csv, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["seconds", "rss_bytes"])
            writer.writerows((f"{t:.2f}", rss) for t, rss in samples)
    return time.perf_counter() - start, max((rss for _, rss in samples), default=0), hwm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=["7b", "13b"])
    parser.add_argument("--depths", type=int, nargs="+", default=[2])
    parser.add_argument("--sequences", type=int, default=32, help="calibration sequences (default 32)")
    parser.add_argument("--seqlen", type=int, default=512, help="calibration sequence length (default 512)")
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--allocate", choices=["uniform", "spectrum"], default="uniform",
                        help="spectrum adds pass 1 (a streamed forward and backward of the dense model) before "
                             "compressing with the ranks it allocates for the same budget (default uniform)")
    parser.add_argument("--method", default="rom", help="compression method (default rom; structured and mixed "
                        "hold the MLP's intermediate_size² moment)")
    parser.add_argument("--neuron-selection", nargs="+", default=["obs"], choices=["obs", "leverage", "pass1"],
                        help="structured/mixed: one run per selection, in turn (a pair: obs pass1)")
    parser.add_argument("--pass1-tokens", nargs="+", default=["all"], metavar="N|all",
                        help="pass 1's tokens (--pass1-tokens), several for a measured pair in one run (default all)")
    parser.add_argument("--threads", type=int, help="torch threads in the compress run (default: torch's)")
    parser.add_argument("--anchor", type=float, default=0.0, help="anchored fits' strength (default 0: off; with it "
                        "the dense stream runs beside the compressed one)")
    parser.add_argument("--refine-steps", type=int, default=0, help="block refinement's steps (default 0: off)")
    parser.add_argument("--whole-model", type=int, nargs="*", default=[], metavar="DEPTH",
                        help="at these depths, also run the whole-model way and compare")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "synthetic")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    threads = args.threads or torch.get_num_threads()
    peak_gflops = gemm_peak_gflops(threads)
    print(f"float32 GEMM peak at {threads} threads: {peak_gflops:.0f} GFLOP/s", flush=True)
    tokens = random_tokens(args.work / "tokens.npy", args.sequences * args.seqlen * 4)
    out = args.results / f"memory_{args.shape}.json"
    previous = json.loads(out.read_text())["rows"] if out.is_file() else []
    tokens_count = args.sequences * args.seqlen
    rows = [row for row in previous if (row["depth"], row["calibration_tokens"], row.get("allocate", "uniform"),
                                        row.get("method", "rom"), row.get("anchor", 0.0),
                                        row.get("neuron_selection", "obs"), row.get("pass1_tokens", "all"),
                                        row.get("refine_steps", 0)) not in
            {(depth, tokens_count, args.allocate, args.method, args.anchor, selection, pass1, args.refine_steps)
             for depth in args.depths for selection in args.neuron_selection for pass1 in args.pass1_tokens}]
    for depth, selection, pass1 in [(depth, selection, pass1) for depth in args.depths
                                    for selection in args.neuron_selection for pass1 in args.pass1_tokens]:
        source = write_synthetic(args.shape, depth, args.work / f"{args.shape}-{depth}")
        output = args.work / f"{args.shape}-{depth}-rom"
        report_path = args.work / f"{args.shape}-{depth}.report.json"
        spectrum = args.allocate == "spectrum"
        command = [sys.executable, "-m", "streamrom.cli", "--quiet", "--threads", str(threads)]
        command += ["compress", str(source), str(output), "--ratio", str(args.ratio), "--calib-tokens",
                    str(tokens), "--calib-sequences", str(args.sequences), "--calib-seqlen", str(args.seqlen),
                    "--overwrite", "--report", str(report_path)] + (["--allocate", "spectrum"] if spectrum else [])
        if args.method != "rom":
            command += ["--method", args.method]
            if spectrum:  # the same whole-model size as uniform at --ratio gives, by pass 1's prices
                command += ["--target-params", str(args.ratio)]
        if args.anchor:
            command += ["--anchor", f"{args.anchor:g}"]
        if args.refine_steps:
            command += ["--refine-steps", str(args.refine_steps)]
        if args.method in ("structured", "mixed"):  # always named: the command line's default depends on the allocation
            command += ["--neuron-selection", selection]
        if pass1 != "all":
            command += ["--pass1-tokens", pass1]
        suffix = (f"d{depth}" + ("" if tokens_count == 16384 else f"_t{tokens_count}")
                  + ("_spectrum" if spectrum else "") + ("" if args.method == "rom" else f"_{args.method}")
                  + (f"_anchor{args.anchor:g}" if args.anchor else "") + ("" if selection == "obs" else f"_{selection}")
                  + ("" if pass1 == "all" else f"_p{pass1}")
                  + (f"_refine{args.refine_steps}" if args.refine_steps else ""))
        timeline = args.results / f"memory_{args.shape}_{suffix}_rss.csv"
        print("$", shlex.join(command[1:]), flush=True)
        wall, sampled_here, _ = profile(command, timeline)
        report = json.loads(report_path.read_text())
        memory = report["memory"]
        ranks = {name.rsplit(".", 1)[-1].removesuffix("_proj"): rank
                 for name, rank in report["ranks"].items() if name.startswith("model.layers.0.")}
        # pass 1 adds a forward and a backward the GEMM count below does not model: no bound for spectrum
        flops = {} if spectrum or args.method != "rom" or args.anchor or args.refine_steps else {stage: depth * count for stage, count in
                                     block_flops(config_for(args.shape, depth), ranks, args.sequences, args.seqlen).items()}
        seconds = report["stage_seconds"]
        picture = rss_timeline_png(memory["timeline"], memory["marks"], args.results / f"memory_{args.shape}_{suffix}_rss.png",
                                   title=f"streamrom compress, {args.shape.upper()} shape, {depth} blocks, "
                                         f"{args.sequences}x{args.seqlen} tokens" + (", spectrum" if spectrum else "")
                                         + ("" if args.method == "rom" else f", {args.method}"),
                                   estimate_bytes=memory["estimated_peak_bytes"])
        rows.append({
            "depth": depth, "allocate": args.allocate, "method": args.method,
            **({"anchor": args.anchor} if args.anchor else {}),
            **({"neuron_selection": selection} if selection != "obs" else {}),
            **({"pass1_tokens": pass1} if pass1 != "all" else {}),
            **({"refine_steps": args.refine_steps} if args.refine_steps else {}), "command": shlex.join(["streamrom", *command[3:]]),
            "wall_seconds": wall, "stage_seconds": seconds,
            "projected_seconds": report.get("projected_seconds", {}).get("seconds", {}),
            "peak_rss_bytes": max(memory["peak_rss_bytes"], sampled_here),
            "os_peak_rss_bytes": memory["os_peak_rss_bytes"],
            "estimate": memory["estimate"], "estimated_peak_bytes": memory["estimated_peak_bytes"],
            "source_bytes_on_disk": memory["source_bytes_on_disk"],
            "calibration_tokens": args.sequences * args.seqlen, "timeline_csv": timeline.name,
            "timeline_png": picture.name if picture else None,
            "threads": threads, "gemm_peak_gflops": peak_gflops, "flops": flops,
            "seconds_over_bound": {stage: seconds[stage] / (flops[stage] / (peak_gflops * 1e9))
                                   for stage in flops if seconds.get(stage)},
            "run": header("scale.memory_profile"),
        })
        if depth in args.whole_model:
            whole_out = args.work / f"{args.shape}-{depth}-whole"
            whole = [sys.executable, "-m", "benchmarks.scale.whole_model", str(source), str(whole_out),
                     "--calib-tokens", str(tokens), "--sequences", str(args.sequences), "--seqlen", str(args.seqlen),
                     "--ratio", str(args.ratio), "--threads", str(threads)]
            print("$", shlex.join(whole[1:]), flush=True)
            whole_timeline = args.results / f"memory_{args.shape}_{suffix}_whole_model_rss.csv"
            whole_wall, whole_sampled, whole_os_peak = profile(whole, whole_timeline)
            whole_peak = max(whole_sampled, whole_os_peak)
            rows[-1]["whole_model"] = {
                "command": shlex.join(["python", *whole[1:]]), "wall_seconds": whole_wall,
                "peak_rss_bytes": whole_peak, "timeline_csv": whole_timeline.name,
                "stage_seconds": json.loads((whole_out / WHOLE_MODEL_REPORT).read_text())["stage_seconds"],
                "peak_rss_ratio": whole_peak / rows[-1]["peak_rss_bytes"],
                "wall_time_ratio": whole_wall / wall,
                "outputs": compare(output, whole_out),
            }
            print("whole-model way:", {k: v for k, v in rows[-1]["whole_model"].items() if "ratio" in k or k == "outputs"},
                  flush=True)
    rows.sort(key=lambda row: (row.get("method", "rom"), row.get("allocate", "uniform"), row["calibration_tokens"],
                               row["depth"], row.get("neuron_selection", "obs"), row.get("pass1_tokens", "all")))
    result = {"benchmark": "scale.memory_profile", "shape": args.shape, "ratio": args.ratio, "rows": rows}
    out.write_text(json.dumps(result, indent=2) + "\n")

    mib = 2 ** 20
    print("\n| depth | tokens | allocate | wall | forward | statistics | eigen | read+write | peak RSS (sampled / OS) "
          "| estimate | measured/estimate | on disk | forward, statistics vs GEMM bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        st = row["stage_seconds"]
        bound = row.get("seconds_over_bound", {})
        anchored = (f" anchor {row['anchor']:g}" if row.get("anchor") else "") + (
            f" {row['neuron_selection']}" if row.get("neuron_selection") else "") + (
            f" pass 1 on {row['pass1_tokens']}" if row.get("pass1_tokens") else "")
        print(f"| {row['depth']} | {row['calibration_tokens']} | {row.get('method', 'rom')} {row.get('allocate', 'uniform')}"
              f"{anchored} "
              f"| {row['wall_seconds']:.0f} s | {st.get('forward', 0):.0f} s "
              f"| {st.get('statistics', 0):.0f} s | {st.get('eigen', 0):.0f} s "
              f"| {st.get('read', 0) + st.get('write', 0):.0f} s "
              f"| {row['peak_rss_bytes'] / mib:.0f} / {row['os_peak_rss_bytes'] / mib:.0f} MiB "
              f"| {row['estimated_peak_bytes'] / mib:.0f} MiB "
              f"| {row['peak_rss_bytes'] / row['estimated_peak_bytes']:.2f} "
              f"| {row['source_bytes_on_disk'] / mib:.0f} MiB "
              f"| {bound.get('forward', 0):.2f}x, {bound.get('statistics', 0):.2f}x |")
    print("estimate parts (MiB):", {k: round(v / mib) for k, v in rows[-1]["estimate"].items()})
    for row in rows:
        if "whole_model" in row:
            whole = row["whole_model"]
            print(f"depth {row['depth']}, whole model in RAM: {whole['wall_seconds']:.0f} s, peak "
                  f"{whole['peak_rss_bytes'] / mib:.0f} MiB = {whole['peak_rss_ratio']:.2f} x streamed "
                  f"(time {whole['wall_time_ratio']:.2f} x); outputs identical: {whole['outputs']['identical']}")
    print(f"\nwritten {out}")
    from benchmarks import tables

    tables.main()  # docs/results/scale.md's table, from the rows just written


if __name__ == "__main__":
    main()
