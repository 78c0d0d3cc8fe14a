"""The greedy neuron removal (structured.obs_removal) at 7B shape, this commit against an earlier one,
as pairs in one run: 11008 neurons, down_proj 4096 x 11008, float32, down to 8 neurons (pass 1's
pricing of every neuron, the mixed method's biggest step at 7B shape) and down to 80 % (the
compression's selection). The earlier code is read with `git show REV:streamrom/linalg/structured.py` and
imported beside the current one; both run on the same moment, alternately, and must remove the same
neurons in the same order.

    python -m benchmarks.scale.neuron_removal --before 21f2bfa [--neurons 11008] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.scale.pricing import module_at  # the module as it was at a revision

from benchmarks.common import REPO, header
RESULT = REPO / "benchmarks" / "results" / "neuron_removal.json"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", required=True, help="the git revision to compare with")
    parser.add_argument("--neurons", type=int, default=11008)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    import tempfile

    import streamrom.linalg.structured as current

    with tempfile.TemporaryDirectory() as folder:
        before = module_at(args.before, "linalg/structured", Path(folder))
        rng = np.random.default_rng(0)
        n = args.neurons
        # a moment with a decaying spectrum, as real MLP activations have
        basis = np.linalg.qr(rng.standard_normal((n, n)).astype(np.float32))[0]
        spectrum = (1.0 / (1.0 + np.arange(n) / 64.0)).astype(np.float32)
        moment = (basis * spectrum) @ basis.T
        del basis
        weight = rng.standard_normal((args.hidden, n)).astype(np.float32)
        rows = []
        for keep in (8, int(0.8 * n)):
            orders = {}
            for repeat in range(args.repeats):
                for label, module in (("before", before), ("after", current)):
                    start = time.perf_counter()
                    removal = module.obs_removal(moment, weight, keep, 1e-2)
                    seconds = time.perf_counter() - start
                    orders.setdefault(label, removal.order)
                    rows.append({"keep": keep, "code": label, "repeat": repeat, "seconds": round(seconds, 2)})
                    print(rows[-1], flush=True)
            rows.append({"keep": keep, "same_order": bool(np.array_equal(orders["before"], orders["after"]))})
        result = {"header": header("scale.neuron_removal", argv), "before": args.before, "neurons": n,
                  "hidden": args.hidden, "rows": rows}
        RESULT.write_text(json.dumps(result, indent=1) + "\n")
        for keep in (8, int(0.8 * n)):
            times = {label: min(r["seconds"] for r in rows if r.get("keep") == keep and r.get("code") == label)
                     for label in ("before", "after")}
            print(f"keep {keep}: before {times['before']} s, after {times['after']} s "
                  f"({times['before'] / times['after']:.2f}x)")


if __name__ == "__main__":
    main()
