"""Anchored against unanchored fits on the real model (SmolLM2-135M-Instruct), the same ranks and widths.

For each method, allocation and whole-model reduction, the compression runs twice with one pass-1
file (so the allocation, and with it every rank and width, is the same): once plain (`--anchor 0`) and
once anchored (`--anchor STRENGTH`: a dense stream beside the compressed one, each fit toward the
dense model's outputs). Each output is evaluated on Pride and Prejudice against the dense model
(perplexity, mean KL of the next-token distributions, top-1 agreement). Calibration: Emma, as in
benchmarks/quality/grid.py, so the plain rows match its grid. Written to benchmarks/results/anchored.json
with the compression's time and the disk the second stream costs.

    python -m benchmarks.quality.anchored --methods rom-centered structured --reductions 20 30 40 --strengths 1
"""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from benchmarks.common import EVAL_TEXT, REPO, ResultRows, dense_model, run, streamrom_cli
from benchmarks.quality.grid import quality_row



def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["rom-centered", "structured"])
    parser.add_argument("--allocate", default="spectrum")
    parser.add_argument("--reductions", type=int, nargs="+", default=[20, 30, 40])
    parser.add_argument("--strengths", type=float, nargs="+", default=[1.0],
                        help="anchor strengths beside the plain fit (0), default 1")
    parser.add_argument("--max-windows", type=int, default=40)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "anchored.json")
    parser.add_argument("--redo", type=float, nargs="*",
                        help="measure rows already in --out again: those of these strengths, or every row when "
                             "none is given (default: keep them)")
    args = parser.parse_args()

    streamrom = streamrom_cli(args.threads)
    dense = dense_model(args.work, streamrom)
    results = ResultRows(args.out, "quality.anchored", args.max_windows)
    rows = results.rows
    for reduction in args.reductions:
        for method in args.methods:
            for strength in [0.0, *args.strengths]:
                key = f"{method}/{args.allocate}/{reduction}/{strength:g}"
                if key in rows and (args.redo is None or (args.redo and strength not in args.redo)):
                    continue
                output, command = quality_row(streamrom, dense, args.work, method, args.allocate, reduction)
                output = output.with_name(f"anchored-{output.name}-{strength:g}")
                command[command.index("compress") + 2] = str(output)
                command += ["--anchor", f"{strength:g}"]
                seconds = run(command)
                compressed = json.loads((output / "streamrom-report.json").read_text())
                report = args.work / f"{output.name}.eval.json"
                run(streamrom + ["eval", str(output), "--text", str(EVAL_TEXT), "--report", str(report),
                                 "--reference", str(dense), "--max-windows", str(args.max_windows)])
                evaluation = json.loads(report.read_text())
                rows[key] = {
                    "key": key, "method": method, "allocate": args.allocate, "reduction": reduction,
                    "anchor": strength, "command": shlex.join(["streamrom", *command[len(streamrom):]]),
                    "perplexity": evaluation["perplexity"], "mean_kl": evaluation["evaluation"]["mean_kl"],
                    "top1_agreement": evaluation["evaluation"]["top1_agreement"],
                    "parameter_ratio": compressed["parameter_ratio"], "ranks": compressed["ranks"],
                    "compress_seconds": seconds, "stage_seconds": compressed["stage_seconds"],
                    "disk_estimate": compressed.get("disk"),
                }
                note = {"note": results.fields["note"]} if "note" in results.fields else {}
                results.save(model="SmolLM2-135M-Instruct", eval_text=EVAL_TEXT.name, **note)

    print("\n| reduction | method | anchor | parameters kept | same ranks | perplexity | vs plain | KL from dense "
          "| top-1 agreement | compress |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in sorted(rows.values(), key=lambda r: (r["reduction"], r["method"], r["anchor"])):
        plain = rows.get(f"{row['method']}/{row['allocate']}/{row['reduction']}/0")
        versus = f"{row['perplexity'] / plain['perplexity'] - 1:+.1%}" if plain and row is not plain else ""
        same = "yes" if plain and plain["ranks"] == row["ranks"] else "no"
        print(f"| {row['reduction']}% | {row['method']} {row['allocate']} | {row['anchor']:g} "
              f"| {row['parameter_ratio']:.3f} | {same} | {row['perplexity']:.2f} | {versus} | {row['mean_kl']:.3f} "
              f"| {100 * row['top1_agreement']:.1f} % | {row['compress_seconds']:.0f} s |")
    print(f"\nwritten {args.out}")
    from benchmarks import tables

    tables.main()  # docs/results/real-model.md's anchored table


if __name__ == "__main__":
    main()
