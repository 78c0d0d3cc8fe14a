"""The general calibration set against Emma alone, in genre and out of genre, on the real model.

SmolLM2-135M-Instruct compressed at whole-model reductions (default 20 % and 40 %, `--target-params`)
with each calibration:

- emma: Emma alone (the default before the general set);
- general: the general set (streamrom/data/general: Emma, Alice I-VIII, Python documentation, Python
  code; an equal share of the 32 x 512 sequences from each part), today's default;
- without-<genre>: the general set without that genre's part (leave one genre out), evaluated on
  that genre only: what the general set gives on a genre it has not seen.

Every model is evaluated on the held-out text of each genre (data/eval and Pride and Prejudice; the
first `--max-windows` windows of 512 tokens), so that each genre has its in-genre figure (general)
and its out-of-genre one (without it), beside Emma alone's. The spectrum allocation's pass 1 is made
once per calibration and method and reused for every size.
Results: benchmarks/results/general.json and a Markdown table on stdout.

    python -m benchmarks.quality.general --methods rom-centered --reductions 20 40
"""
from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from benchmarks.common import EMMA, GENRES, REPO, ResultRows, dense_model, perplexity_by_genre, run, streamrom_cli
from streamrom.stream.calibration import default_calibration_texts

SOURCES = json.loads((REPO / "streamrom" / "data" / "general" / "SOURCES.json").read_text(encoding="utf-8"))


def calibrations() -> dict[str, list[Path]]:
    parts = {path.stem: path for path in default_calibration_texts()}
    found = {"emma": [EMMA], "general": list(parts.values())}
    for genre, (part, _) in GENRES.items():
        found[f"without-{genre}"] = [path for name, path in parts.items() if name != part]
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reductions", type=int, nargs="+", default=[20, 40])
    parser.add_argument("--methods", nargs="+", default=["rom-centered"])
    parser.add_argument("--allocate", default="spectrum")
    parser.add_argument("--calibrations", nargs="+", help="of emma, general, without-<genre> (default: all)")
    parser.add_argument("--max-windows", type=int, default=20)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "general.json")
    parser.add_argument("--again", action="store_true",
                        help="measure rows the results file already has again (default: keep them, so a stopped "
                             "run resumes)")
    args = parser.parse_args()

    cli = streamrom_cli(args.threads)
    dense = dense_model(args.work, cli)
    texts = calibrations()
    chosen = args.calibrations or list(texts)
    results = ResultRows(args.out, "quality.general", args.max_windows)
    rows = results.rows

    def evaluate(folder: Path, label: str, genres: list[str]) -> dict[str, float]:
        return perplexity_by_genre(run, cli, folder, str(args.work / f"general-{label}"),
                                   {genre: GENRES[genre][1] for genre in genres}, args.max_windows)

    def save() -> None:
        results.save(model="SmolLM2-135M-Instruct (dequantised from its 4-bit GGUF)",
                     calibration="32 x 512 tokens; several parts: an equal share each",
                     parts={name: entry["genre"] for name, entry in SOURCES["parts"].items()},
                     evaluation_texts={genre: str(text.relative_to(REPO)) for genre, (_, text) in GENRES.items()})

    if "dense" not in rows:
        rows["dense"] = {"key": "dense", "calibration": "-", "method": "dense", "reduction": 0,
                         "perplexity": evaluate(dense, "dense", list(GENRES))}
        save()
    for method in args.methods:
        for calibration in chosen:
            genres = [calibration.removeprefix("without-")] if calibration.startswith("without-") else list(GENRES)
            for reduction in args.reductions:
                key = f"{method}/{args.allocate}/{reduction}/{calibration}"
                label = f"{method}-{args.allocate}-{reduction}-{calibration}"
                output = args.work / f"general-{label}"
                if key in rows and not args.again:
                    continue
                command = cli + ["compress", str(dense), str(output), "--method", method, "--allocate", args.allocate,
                                 "--target-params", f"{1 - reduction / 100:.2f}", "--overwrite",
                                 "--calib-text", *map(str, texts[calibration])]
                if args.allocate in ("spectrum", "bayes"):
                    command += ["--spectra", str(args.work / f"general-pass1-{method}-{calibration}.npz")]
                seconds = run(command)
                report = json.loads((output / "streamrom-report.json").read_text())
                rows[key] = {"key": key, "method": method, "allocate": args.allocate, "reduction": reduction,
                             "calibration": calibration, "command": shlex.join(["streamrom", *command[len(cli):]]),
                             "parameter_ratio": report["parameter_ratio"], "compress_seconds": seconds,
                             "perplexity": evaluate(output, label, genres)}
                save()

    print("\n| reduction | method | genre (held-out text) | dense | Emma alone | general set (in genre) "
          "| general set without the genre (out of genre) |")
    print("|---|---|---|---|---|---|---|")
    dense_scores = rows["dense"]["perplexity"]
    for method in args.methods:
        for reduction in args.reductions:
            def score(calibration: str, genre: str) -> str:
                row = rows.get(f"{method}/{args.allocate}/{reduction}/{calibration}")
                return f"{row['perplexity'][genre]:.2f}" if row and genre in row["perplexity"] else "-"
            for genre in GENRES:
                print(f"| {reduction}% | {method} {args.allocate} | {genre} ({GENRES[genre][1].name}) "
                      f"| {dense_scores[genre]:.2f} | {score('emma', genre)} | {score('general', genre)} "
                      f"| {score(f'without-{genre}', genre)} |")
    print(f"\nwritten {args.out}")
    from benchmarks import tables

    tables.main()  # docs/results/real-model.md's genre table


if __name__ == "__main__":
    main()
