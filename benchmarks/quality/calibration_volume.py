"""Calibration volume (issue 31 item 3): the recommended setting's quality against calibration tokens and
sequence length, on the real model, on every genre's held-out text.

SmolLM2-135M-Instruct (dequantised from its 4-bit GGUF) compressed with `--method mixed --allocate
spectrum` at whole-model reductions (default 20 / 30 / 40 %), calibrated on the general set (its four
parts, an equal share each) with each volume: sequences x sequence length (default 32 x 512 = 16k tokens,
today's default; 128 x 512 = 64k; 8 x 2048 = 16k; 32 x 2048 = 64k). Perplexity on the four genres' held-out
texts (never calibrated on). Pass 1 is made once per volume and reused for every size (`--spectra`), so
a volume's first size carries pass 1's time and the others do not: the table shows both.
Results: benchmarks/results/calibration_volume.json (rows already there are kept unless --again) and a
table on stdout.

    python -m benchmarks.quality.calibration_volume
    python -m benchmarks.quality.calibration_volume --volumes 32x512 128x512 --reductions 30
"""
from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.common import GENRES, REPO, ResultRows, compressed_with_spectrum, dense_model, perplexity_by_genre, run, streamrom_cli
from benchmarks.quality.general import calibrations

DEFAULT_VOLUMES = ["32x512", "128x512", "8x2048", "32x2048"]


def volume(text: str) -> tuple[int, int]:
    sequences, _, seqlen = text.partition("x")
    return int(sequences), int(seqlen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reductions", type=int, nargs="+", default=[20, 30, 40])
    parser.add_argument("--volumes", nargs="+", default=DEFAULT_VOLUMES, help="SEQUENCESxSEQLEN each")
    parser.add_argument("--method", default="mixed")
    parser.add_argument("--max-windows", type=int, default=20)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "calibration_volume.json")
    parser.add_argument("--again", action="store_true", help="measure rows the results file already has again")
    args = parser.parse_args()

    cli = streamrom_cli(args.threads)
    dense = dense_model(args.work, cli)
    parts = calibrations()["general"]
    results = ResultRows(args.out, "quality.calibration_volume", args.max_windows)
    rows = results.rows

    def evaluate(folder: Path, label: str) -> dict[str, float]:
        return perplexity_by_genre(run, cli, folder, str(args.work / f"volume-{label}"),
                                   {genre: text for genre, (_, text) in GENRES.items()}, args.max_windows)

    def save() -> None:
        results.save(model="SmolLM2-135M-Instruct (dequantised from its 4-bit GGUF)",
                     calibration="the general set, an equal share of each part",
                     evaluation_texts={genre: str(text.relative_to(REPO)) for genre, (_, text) in GENRES.items()})

    if "dense" not in rows:
        rows["dense"] = {"key": "dense", "method": "dense", "reduction": 0, "perplexity": evaluate(dense, "dense")}
        save()
    for chosen in args.volumes:
        sequences, seqlen = volume(chosen)
        spectra = args.work / f"volume-pass1-{args.method}-{chosen}.npz"
        for reduction in args.reductions:
            key = f"{args.method}/{reduction}/{chosen}"
            if key in rows and not args.again:
                continue
            output = args.work / f"volume-{args.method}-{reduction}-{chosen}"
            rows[key] = {"key": key, "method": args.method, "reduction": reduction, "sequences": sequences,
                         "seqlen": seqlen, "tokens": sequences * seqlen,
                         **compressed_with_spectrum(run, cli, dense, output, args.method, reduction, spectra, [
                             "--calib-text", *map(str, parts), "--calib-sequences", str(sequences),
                             "--calib-seqlen", str(seqlen)]),
                         "perplexity": evaluate(output, f"{reduction}-{chosen}")}
            save()

    dense_scores = rows["dense"]["perplexity"]
    print("\n| reduction | calibration | tokens | " + " | ".join(GENRES) + " | compress s |")
    print("|---|---|---|" + "---|" * len(GENRES) + "---|")
    print("| 0 % | dense | - | " + " | ".join(f"{dense_scores[g]:.2f}" for g in GENRES) + " | - |")
    for reduction in args.reductions:
        for chosen in args.volumes:
            row = rows.get(f"{args.method}/{reduction}/{chosen}")
            if row:
                pass1 = " (with pass 1)" if row["includes_pass1"] else ""
                print(f"| {reduction} % | {chosen} | {row['tokens']} | "
                      + " | ".join(f"{row['perplexity'][g]:.2f}" for g in GENRES)
                      + f" | {row['compress_seconds']:.0f}{pass1} |")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
