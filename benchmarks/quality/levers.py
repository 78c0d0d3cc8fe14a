"""Levers on the recommended setting (issue 31 items 2 and 4): block refinement (`--refine-steps`) and the
bayes search over the mixed plan (`--allocate bayes`), each against the spectrum plan alone, on the real
model, on every genre's held-out text.

SmolLM2-135M-Instruct (dequantised from its 4-bit GGUF) compressed with `--method mixed` at whole-model
reductions (default 30 / 40 %), calibrated on the general set (32 x 512 tokens, today's default). A
refinement row adds `--refine-steps N --refine-lr RATE` to the spectrum plan; a bayes row replaces the
spectrum allocation by `--allocate bayes --trials N` (its first trial is the spectrum plan, every trial a
compression scored on held-out calibration windows, the best one written). Pass 1 is made once and
shared with benchmarks/quality/calibration_volume.py (the same calibration: the same file), so the rows
differ only in the lever; the plain rows are that benchmark's rows at 32 x 512. Perplexity on the four
genres' held-out texts (never calibrated on) and the compression's seconds.
Results: benchmarks/results/levers.json (rows already there are kept unless --again) and the tables.

    python -m benchmarks.quality.levers --refine-steps 256 --reductions 30 40
    python -m benchmarks.quality.levers --bayes-trials 12 --reductions 40
    python -m benchmarks.quality.levers --anchor 0.5 --combined 256 --reductions 30 40
    python -m benchmarks.quality.levers --combined 0 --reductions 30 40

An anchored row (`--anchor S`) fits each group toward the dense model's outputs at strength S (the dense
stream beside the compressed one). A combined row (`--combined STEPS`) pulls three levers at once, the
candidate for new defaults: four times the calibration tokens (128 x 512, pass 1 shared with calibration_volume's 128 x 512 rows), anchored fits
(`--anchor`, strength 0.5) and block refinement (`--refine-steps STEPS`; 0: none, the two levers that cost
little at 7B shape); it is set against today's cells (32 x 512, no lever).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import (GENRES, REPO, ResultRows, compressed_with_spectrum, dense_model, perplexity_by_genre,
                               run, streamrom_cli)
from benchmarks.quality.general import calibrations

# the combined row's calibration sequences (of 512 tokens) and anchoring strength
COMBINED_SEQUENCES = 128
COMBINED_ANCHOR = 0.5


def trial_scores(output: Path) -> dict:
    """The search's record from the report: each trial's held-out score (trial 0 is the spectrum plan)
    and seconds, and the trial whose plan was written (the lowest score)."""
    trials = json.loads((output / "streamrom-report.json").read_text())["settings"]["bayes"]["scores"]
    best = min(trials, key=lambda trial: trial["score"])
    return {"trial_scores": [round(trial["score"], 5) for trial in trials],
            "trial_seconds": [round(sum(trial.get(part, 0.0) for part in ("execute_seconds", "score_seconds",
                                                                          "overhead_seconds")), 1) for trial in trials],
            "best_trial": best["trial"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reductions", type=int, nargs="+", default=[30, 40])
    parser.add_argument("--refine-steps", "--steps", type=int, nargs="*", default=[],
                        help="refinement rows: --refine-steps of each")
    parser.add_argument("--lr", type=float, default=1e-2, help="--refine-lr of the refinement rows")
    parser.add_argument("--bayes-trials", type=int, nargs="*", default=[], help="bayes rows: --trials of each")
    parser.add_argument("--anchor", type=float, nargs="*", default=[], metavar="STRENGTH",
                        help="anchored rows: --anchor STRENGTH (the dense stream beside the compressed one)")
    parser.add_argument("--combined", type=int, nargs="*", default=[], metavar="STEPS",
                        help="combined rows: 128 x 512 tokens, --anchor 0.5 and --refine-steps STEPS "
                             "(0: no refinement, the two cheap levers alone)")
    parser.add_argument("--max-windows", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "levers.json")
    parser.add_argument("--again", action="store_true", help="measure rows the results file already has again")
    args = parser.parse_args()
    if not args.refine_steps and not args.bayes_trials and not args.anchor and not args.combined:
        parser.error("name a lever: --refine-steps N ..., --bayes-trials N ..., --anchor S ... or --combined N ...")

    cli = streamrom_cli(args.threads)
    dense = dense_model(args.work, cli)
    parts = calibrations()["general"]

    def calibration(sequences: int) -> list[str]:
        return ["--calib-text", *map(str, parts), "--calib-sequences", str(sequences), "--calib-seqlen", "512"]

    results = ResultRows(args.out, "quality.levers", args.max_windows)
    # calibration_volume's pass-1 files, for the same calibrations
    spectra = {sequences: args.work / f"volume-pass1-mixed-{sequences}x512.npz" for sequences in (32, 128)}
    texts = {genre: text for genre, (_, text) in GENRES.items()}
    refine = ["--refine-lr", f"{args.lr:g}"]
    levers = ([("refine", steps, 32, ["--refine-steps", str(steps), *refine],
                {"refine_steps": steps, "refine_lr": args.lr}) for steps in args.refine_steps]
              + [("bayes", trials, 32, ["--trials", str(trials)], {"trials": trials})
                 for trials in args.bayes_trials]
              + [("anchor", f"{strength:g}", 32, ["--anchor", f"{strength:g}"], {"anchor": strength})
                 for strength in args.anchor]
              + [("combined", steps, COMBINED_SEQUENCES,
                  ["--anchor", f"{COMBINED_ANCHOR:g}", *(["--refine-steps", str(steps), *refine] if steps else [])],
                  {"sequences": COMBINED_SEQUENCES, "seqlen": 512, "anchor": COMBINED_ANCHOR, "refine_steps": steps,
                   **({"refine_lr": args.lr} if steps else {})})
                 for steps in args.combined])
    for reduction in args.reductions:
        for lever, amount, sequences, flags, fields in levers:
            refined = lever == "refine" or (lever == "combined" and amount)
            key = f"mixed/{reduction}/{lever}/{amount}" + (f"/{args.lr:g}" if refined else "")
            if key in results.rows and not args.again:
                continue
            label = "levers-" + key.replace("/", "-")
            output = args.work / label
            results.rows[key] = {
                "key": key, "method": "mixed", "reduction": reduction, "lever": lever,
                "allocate": "bayes" if lever == "bayes" else "spectrum", **fields,
                **compressed_with_spectrum(run, cli, dense, output, "mixed", reduction, spectra[sequences],
                                           calibration(sequences) + flags,
                                           allocate="bayes" if lever == "bayes" else "spectrum"),
                **(trial_scores(output) if lever == "bayes" else {}),
                "perplexity": perplexity_by_genre(run, cli, output, str(args.work / label), texts, args.max_windows)}
            results.save(model="SmolLM2-135M-Instruct (dequantised from its 4-bit GGUF)",
                         calibration=f"the general set, 32 x 512 tokens (combined rows: {COMBINED_SEQUENCES} x 512)",
                         evaluation_texts={genre: str(text.relative_to(REPO)) for genre, text in texts.items()})
    from benchmarks import tables

    print(tables.refinement_table())
    print()
    print(tables.bayes_mixed_table())
    print()
    print(tables.anchor_levers_table())
    print()
    print(tables.combined_levers_table())
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
