"""The same bayes search run by one worker and by two workers sharing an optuna study (issue 19).

On the real model (SmolLM2-135M, rom-centered, 20 % smaller, Emma calibration): pass 1 is made once
and reused (--spectra), then the 12-trial search runs twice, each time as a fresh study in its own
SQLite file: once by the compress command alone, once by the compress command and one
`streamrom tune-worker`. Every process runs at one thread, so on a 2-core machine the two workers stand
in for two single-core machines; the one-worker run leaves the second core idle. Reported: wall time of
each search (the compress command's from start to written model, pass 1 excluded), trials per worker,
the best trial's held-out perplexity and multipliers, and the chosen plans' perplexity on Pride and
Prejudice (the evaluation text).

    python -m benchmarks.speed.bayes_parallel                 # 12 trials, 16 x 512 calibration tokens
"""
from __future__ import annotations

import argparse
import json
import subprocess
import time
from pathlib import Path

from benchmarks.common import EMMA, EVAL_TEXT, REPO, dense_model, header, run, streamrom_cli


RESULTS = REPO / "benchmarks" / "results" / "bayes_parallel.json"


def search_times(storage: str) -> tuple[float, float]:
    """From the study: the search's wall time (first trial's start to last trial's end) and the mean
    wall time of one trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    complete = optuna.load_study(study_name="bench", storage=storage).get_trials(
        states=(optuna.trial.TrialState.COMPLETE,))
    search = max(t.datetime_complete for t in complete) - min(t.datetime_start for t in complete)
    mean = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in complete) / len(complete)
    return search.total_seconds(), mean


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench", help="scratch folder")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--sequences", type=int, default=16, help="calibration sequences of 512 tokens")
    parser.add_argument("--max-windows", type=int, default=40, help="evaluation windows of 512 tokens")
    args = parser.parse_args()

    cli = streamrom_cli(1)
    dense = dense_model(args.work, cli)
    spectra = args.work / f"bayes-parallel-pass1-{args.sequences}.npz"
    common = ["--method", "rom-centered", "--target-params", "0.8", "--calib-text", str(EMMA),
              "--calib-sequences", str(args.sequences), "--spectra", str(spectra), "--overwrite"]
    if not spectra.is_file():  # pass 1 once, outside the timed searches
        run(cli + ["compress", str(dense), str(args.work / "bayes-parallel-spectrum"), "--allocate", "spectrum",
                   *common])
    rows = []
    for workers in (1, 2):
        database = args.work / f"bayes-parallel-{workers}.db"
        database.unlink(missing_ok=True)
        storage = f"sqlite:///{database}"
        output = args.work / f"bayes-parallel-{workers}"
        command = cli + ["compress", str(dense), str(output), "--allocate", "bayes", "--trials", str(args.trials),
                         "--study", storage, "--study-name", "bench", *common]
        print("$", " ".join(command), flush=True)
        started = time.perf_counter()
        processes = [subprocess.Popen(command, cwd=REPO)]
        processes += [subprocess.Popen(cli + ["tune-worker", storage, "--study-name", "bench", "--wait", "600"],
                                       cwd=REPO) for _ in range(workers - 1)]
        for process in processes:
            if process.wait() != 0:
                raise SystemExit(f"a worker failed with exit status {process.returncode}")
        wall = time.perf_counter() - started
        report = json.loads((output / "streamrom-report.json").read_text())
        trials = report["settings"]["bayes"]["scores"]
        best = min(trials, key=lambda trial: (trial["score"], trial["trial"]))
        evaluation = output / "eval.json"
        run(cli + ["eval", str(output), "--text", str(EVAL_TEXT), "--max-windows", str(args.max_windows),
                   "--reference", str(dense), "--report", str(evaluation)])
        evaluated = json.loads(evaluation.read_text())
        per_worker: dict[str, int] = {}
        for trial in trials:
            per_worker[trial["worker"]] = per_worker.get(trial["worker"], 0) + 1
        search_seconds, trial_seconds = search_times(storage)
        rows.append({"workers": workers, "wall_seconds": wall, "search_seconds": search_seconds,
                     "mean_trial_seconds": trial_seconds, "trials": trials,
                     "trials_per_worker": sorted(per_worker.values(), reverse=True),
                     "best_trial": best["trial"], "best_score": best["score"], "best_multipliers": best["multipliers"],
                     "perplexity": evaluated["perplexity"], "mean_kl": evaluated["evaluation"].get("mean_kl"),
                     "parameter_ratio": report["parameters_after"] / report["parameters_before"]})
    result = {"header": header("speed.bayes_parallel"), "model": "SmolLM2-135M-Instruct", "method": "rom-centered",
              "target_params": 0.8, "trials": args.trials, "calibration_sequences": args.sequences,
              "eval_text": EVAL_TEXT.name, "max_windows": args.max_windows, "threads_per_worker": 1,
              "rows": rows}
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    one = rows[0]["wall_seconds"]
    search = rows[0]["search_seconds"]
    print("| workers | command wall | vs 1 worker | search (trials only) | vs 1 worker | mean trial | trials per "
          "worker | best held-out ppl (trial) | chosen plan: P&P ppl / KL |\n|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['workers']} | {row['wall_seconds']:.0f} s | {one / row['wall_seconds']:.2f}x | "
              f"{row['search_seconds']:.0f} s | {search / row['search_seconds']:.2f}x | "
              f"{row['mean_trial_seconds']:.0f} s | "
              f"{'+'.join(map(str, row['trials_per_worker']))} | {row['best_score']:.3f} ({row['best_trial']}) | "
              f"{row['perplexity']:.2f} / {row['mean_kl']:.3f} |")
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
