"""A bayes trial's time outside its compression and its scoring, on the real model.

Since the redesign a trial runs only the execute stage (the block loop) and the scoring evaluation on
what the prepare stage holds; each trial's seconds are in the report (settings.bayes.scores:
execute_seconds, score_seconds, overhead_seconds). Before it, each trial called the whole `compress`
(headers re-read, calibration re-tokenized, fingerprints, resource checks, lock, report, pictures):
measured at 0e0a163 by timing each trial's `compress` call against its block loop (`_run`), with the
same settings (results/bayes_trial_overhead.json keeps both).

    python -m benchmarks.speed.bayes_overhead            # SmolLM2-135M, 4 trials, 8 x 256 tokens, 1 thread
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, dense_model, header, streamrom_cli


RESULTS = REPO / "benchmarks" / "results" / "bayes_trial_overhead.json"


def main() -> None:
    import torch

    from streamrom import CalibrationConfig, CompressConfig, compress
    from streamrom.linalg.bayes import BayesConfig

    torch.set_num_threads(1)
    config = CompressConfig(method="rom", allocate="bayes", target_params=0.8,
                            calibration=CalibrationConfig(sequences=8, seqlen=256), bayes=BayesConfig(trials=4))
    with tempfile.TemporaryDirectory() as work:
        start = time.perf_counter()
        report = compress(dense_model(Path(work), streamrom_cli(1)), Path(work) / "out", config)
        total = time.perf_counter() - start
    trials = report.settings["bayes"]["scores"]
    after = {"trials": trials, "total_seconds": total,
             "mean_overhead_seconds": sum(t["overhead_seconds"] for t in trials) / len(trials)}
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results.pop("machine", None)  # results of before the shared header
    results.update({"header": header("speed.bayes_overhead"), "after": after})
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    before = results.get("before", {})
    print("| | mean overhead per trial | trials' total |\n|---|---|---|")
    if before:
        print(f"| before (0e0a163) | {before['mean_overhead']:.3f} s | {before['total']:.0f} s |")
    print(f"| after | {after['mean_overhead_seconds']:.3f} s | {total:.0f} s |")


if __name__ == "__main__":
    main()
