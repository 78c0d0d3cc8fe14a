"""Quality benchmark: method x allocation x whole-model size on the real model.

SmolLM2-135M-Instruct, calibrated on 32 x 512 tokens of Emma (`--calib-text`; the default before the general set), perplexity on Pride
and Prejudice (never used for calibration). Each row is one `streamrom compress --target-params`
command (a whole-model parameter target) followed by `streamrom eval`, each its own process, read
back from their JSON reports. Rows already in the results file are kept unless rerun. The spectrum
allocation's first pass is made once per method and reused for every size (`--spectra`), so the
compress time of a spectrum row includes pass 1 only in the first size run.
Results: benchmarks/results/quality.json and a Markdown table on stdout.

    python -m benchmarks.quality.grid                                   # the full grid (hours)
    python -m benchmarks.quality.grid --reductions 30 40 --methods rom --allocations uniform spectrum
"""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from benchmarks.common import EMMA, EVAL_TEXT, REPO, ResultRows, dense_model, run, streamrom_cli


def quality_row(cli: list[str], dense: Path, work: Path, method: str, allocate: str,
                reduction: int) -> tuple[Path, list[str]]:
    """A row's output folder in `work` and its `compress` command (benchmarks/quality/centered.py reuses the folders).
    `method` may carry a neuron selection, e.g. structured+leverage, and pass 1's tokens after @, e.g.
    mixed+pass1@4096 (--pass1-tokens)."""
    output = work / f"quality-{method}-{allocate}-{reduction}"
    method_selection, _, pass1_tokens = method.partition("@")
    name, _, selection = method_selection.partition("+")
    command = cli + ["compress", str(dense), str(output), "--method", name, "--allocate", allocate,
                     "--target-params", f"{1 - reduction / 100:.2f}", "--overwrite", "--calib-text", str(EMMA)]
    if selection:
        command += ["--neuron-selection", selection]
    if pass1_tokens:
        command += ["--pass1-tokens", pass1_tokens]
    if allocate in ("spectrum", "bayes"):  # pass 1 does not depend on the size: made once per method
        command += ["--spectra", str(work / f"quality-pass1-{method}.npz")]
    return output, command


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reductions", type=int, nargs="+", default=[10, 20, 30, 40],
                        help="whole-model parameter reductions in percent (default 10 20 30 40)")
    parser.add_argument("--methods", nargs="+", default=["rom", "rom-centered", "svd"],
                        help="methods, a neuron selection after + (structured+leverage; default: obs), pass 1's "
                             "tokens after @ (mixed+pass1@4096)")
    parser.add_argument("--allocations", nargs="+", default=["uniform", "last-n", "spectrum", "bayes"])
    parser.add_argument("--max-windows", type=int, help="evaluate only the first N windows of 512 (default: all)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "quality.json")
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    streamrom = streamrom_cli(args.threads)
    dense = dense_model(args.work, streamrom)
    windows = ["--max-windows", str(args.max_windows)] if args.max_windows else []
    results = ResultRows(args.out, "quality.grid", args.max_windows)  # rows evaluated on another slice: dropped
    rows = results.rows

    def save() -> None:
        results.save(model="SmolLM2-135M-Instruct", eval_text=EVAL_TEXT.name)

    if "dense" not in rows:
        report = args.work / "quality-dense.eval.json"
        seconds = run(streamrom + ["eval", str(dense), "--text", str(EVAL_TEXT), "--report", str(report), *windows])
        rows["dense"] = {"key": "dense", "method": "dense", "allocate": "-", "reduction": 0,
                         "perplexity": json.loads(report.read_text())["perplexity"], "parameter_ratio": 1.0,
                         "eval_seconds": seconds}
        save()
    for reduction in args.reductions:
        for method in args.methods:
            for allocate in args.allocations:
                key = f"{method}/{allocate}/{reduction}"
                if method == "svd" and allocate in ("spectrum", "bayes"):
                    continue  # both price the directions ROM keeps; svd has none to price
                output, command = quality_row(streamrom, dense, args.work, method, allocate, reduction)
                compress_seconds = run(command)
                compressed = json.loads((output / "streamrom-report.json").read_text())
                eval_report = args.work / f"quality-{method}-{allocate}-{reduction}.eval.json"
                # against the dense model on the same windows: KL of the next-token distributions, top-1
                eval_seconds = run(streamrom + ["eval", str(output), "--text", str(EVAL_TEXT), "--report",
                                                str(eval_report), "--reference", str(dense), *windows])
                evaluation = json.loads(eval_report.read_text())["evaluation"]
                ranks = [r for r in compressed["ranks"].values() if r is not None]
                rows[key] = {
                    "key": key, "method": method, "allocate": allocate, "reduction": reduction,
                    "command": shlex.join(["streamrom", *command[len(streamrom) - 1 + 1:]]),
                    "perplexity": json.loads(eval_report.read_text())["perplexity"],
                    "mean_kl": evaluation["mean_kl"], "top1_agreement": evaluation["top1_agreement"],
                    "parameter_ratio": compressed["parameter_ratio"], "factored_linears": len(ranks),
                    "compress_seconds": compress_seconds, "stage_seconds": compressed["stage_seconds"],
                    "eval_seconds": eval_seconds,
                }
                save()

    print("\n| reduction | method | allocation | parameters kept | perplexity | vs uniform | KL from dense "
          "| top-1 agreement | compress |")
    print("|---|---|---|---|---|---|---|---|---|")
    ordered = sorted(rows.values(), key=lambda r: (r["reduction"], r["method"], r["allocate"]))
    for row in ordered:
        uniform = rows.get(f"{row['method']}/uniform/{row['reduction']}")
        versus = f"{row['perplexity'] / uniform['perplexity'] - 1:+.1%}" if uniform and row is not uniform else ""
        compress = f"{row['compress_seconds']:.0f} s" if "compress_seconds" in row else "-"
        closeness = (f"{row['mean_kl']:.3f} | {100 * row['top1_agreement']:.1f} %" if "mean_kl" in row
                     else "- | -")  # (rows measured before eval --reference existed)
        print(f"| {row['reduction']}% | {row['method']} | {row['allocate']} | {row['parameter_ratio']:.3f} "
              f"| {row['perplexity']:.2f} | {versus} | {closeness} | {compress} |")
    print(f"\nwritten {args.out}")
    from benchmarks import tables

    tables.main()  # docs/results/real-model.md's grids, from the rows just written


if __name__ == "__main__":
    main()
