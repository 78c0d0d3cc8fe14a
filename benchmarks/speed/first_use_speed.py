"""Speed as a new user first measures it: one plain script, transformers with the remote code, float32.

The protocol of issue 34's report (item 5), kept as it was written so that its numbers can be set
beside benchmarks/speed/inference.py's: all models loaded in one process, then in alternation, --rounds
times: a 64-token warm-up, three forward passes over the same 512 tokens (each timed), then 64
greedy tokens generated after a 32-token prompt (timed whole, first token included). Each model's
best round counts; the table gives the speed-ups over the first model (the dense one).

    python -m benchmarks.speed.first_use_speed dense=.cache/bench/smollm2 structured=.cache/bench/quality-structured-spectrum-20

A label=folder pair per model; the same weights beside another remote-code file (a copy of the folder
whose modeling_streamrom.py differs) measure that file's effect. Results:
benchmarks/results/first_use_speed.json and a Markdown table on stdout.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import REPO, header

PROMPT, NEW_TOKENS, PREFILL, WARM_UP, PASSES = 32, 64, 512, 64, 3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="label=folder, the dense model first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "first_use_speed.json")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    models = {}
    for item in args.models:
        label, _, folder = item.partition("=")
        remote = "auto_map" in json.loads((Path(folder) / "config.json").read_text())
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=remote).eval()
        models[label] = {"folder": folder, "model": model, "prefill_rounds": [], "decode_rounds": [],
                         "parameters": sum(p.numel() for p in model.parameters())}
    ids = torch.randint(0, 49000, (1, PREFILL), generator=torch.Generator().manual_seed(0))
    for _ in range(args.rounds):
        for row in models.values():
            model = row["model"]
            with torch.no_grad():
                model(ids[:, :WARM_UP])
                passes = []
                for _ in range(PASSES):
                    start = time.perf_counter()
                    model(ids)
                    passes.append(PREFILL / (time.perf_counter() - start))
                start = time.perf_counter()
                model.generate(ids[:, :PROMPT], max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
                row["decode_rounds"].append(NEW_TOKENS / (time.perf_counter() - start))
            row["prefill_rounds"].append(sum(passes) / len(passes))
    rows = [{"label": label, "folder": row["folder"], "parameters": row["parameters"],
             "prefill_tokens_per_second": max(row["prefill_rounds"]), "prefill_rounds": row["prefill_rounds"],
             "decode_tokens_per_second": max(row["decode_rounds"]), "decode_rounds": row["decode_rounds"]}
            for label, row in models.items()]
    result = {"header": header("speed.first_use_speed"), "threads": args.threads, "rounds": args.rounds, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    dense = rows[0]
    print("| model | parameters | prefill tokens/s | × dense | decode tokens/s | × dense |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['label']} | {row['parameters'] / 1e6:.1f} M | {row['prefill_tokens_per_second']:.0f} "
              f"| {row['prefill_tokens_per_second'] / dense['prefill_tokens_per_second']:.2f} "
              f"| {row['decode_tokens_per_second']:.1f} "
              f"| {row['decode_tokens_per_second'] / dense['decode_tokens_per_second']:.2f} |")
    from benchmarks import tables

    tables.main()  # docs/results/real-model.md's first-use table


if __name__ == "__main__":
    main()
