"""Block refinement (issue 31 item 2): the recommended setting with and without `--refine-steps`, on the
real model, on every genre's held-out text.

SmolLM2-135M-Instruct (dequantised from its 4-bit GGUF) compressed with `--method mixed --allocate
spectrum` at whole-model reductions (default 30 / 40 %), calibrated on the general set (32 x 512 tokens,
today's default), each block refined by N steps (`--refine-steps N --refine-lr RATE`; N = 0: not
refined). Pass 1 is made once and shared with benchmarks/quality/calibration_volume.py (the same
calibration: the same file), so the rows differ only in the refinement; the unrefined cells are that
benchmark's rows at 32 x 512 when this one has none of its own. Perplexity on the four genres'
held-out texts (never calibrated on) and the compression's seconds.
Results: benchmarks/results/refinement.json (rows already there are kept unless --again) and a table.

    python -m benchmarks.quality.refinement --steps 256 --reductions 30 40
"""
from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import (GENRES, REPO, ResultRows, compressed_with_spectrum, dense_model, perplexity_by_genre,
                               run, streamrom_cli)
from benchmarks.quality.general import calibrations


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reductions", type=int, nargs="+", default=[30, 40])
    parser.add_argument("--steps", type=int, nargs="+", default=[256])
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--max-windows", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "refinement.json")
    parser.add_argument("--again", action="store_true", help="measure rows the results file already has again")
    args = parser.parse_args()

    cli = streamrom_cli(args.threads)
    dense = dense_model(args.work, cli)
    parts = calibrations()["general"]
    results = ResultRows(args.out, "refinement", args.max_windows)
    spectra = args.work / "volume-pass1-mixed-32x512.npz"  # calibration_volume's, for the same calibration
    texts = {genre: text for genre, (_, text) in GENRES.items()}
    for reduction in args.reductions:
        for steps in args.steps:
            key = f"mixed/{reduction}/{steps}/{args.lr:g}"
            if key in results.rows and not args.again:
                continue
            label = f"refine-{reduction}-{steps}-{args.lr:g}"
            output = args.work / label
            results.rows[key] = {
                "key": key, "method": "mixed", "reduction": reduction, "refine_steps": steps, "refine_lr": args.lr,
                **compressed_with_spectrum(run, cli, dense, output, "mixed", reduction, spectra, [
                    "--calib-text", *map(str, parts), "--calib-sequences", "32", "--calib-seqlen", "512",
                    "--refine-steps", str(steps), "--refine-lr", f"{args.lr:g}"]),
                "perplexity": perplexity_by_genre(run, cli, output, str(args.work / label), texts, args.max_windows)}
            results.save(model="SmolLM2-135M-Instruct (dequantised from its 4-bit GGUF)",
                         calibration="the general set, 32 x 512 tokens",
                         evaluation_texts={genre: str(text.relative_to(REPO)) for genre, text in texts.items()})
    from benchmarks import tables

    print(tables.refinement_table())
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
