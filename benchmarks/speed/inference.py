"""Inference benchmark: prefill and decode speed and resident memory of compressed models against the
dense one, in Hugging Face transformers on CPU (the runtime most people load a checkpoint in).

Each model is loaded by its own child process (so its RSS is its own), by transformers (float32,
`trust_remote_code` for factored and per-block-width checkpoints, plain loading otherwise) and by
`streamrom.load`. In the child: prefill of one sequence of --prefill tokens (median of --repeats),
and, in transformers, greedy decoding of --decode tokens after a 128-token prompt with the KV cache
(decode rate = tokens / (time of the whole generation − time of its first token)); streamrom.load's
model has no KV cache, so only its prefill is measured. Models are measured in alternation, --rounds
times, at each thread count, so that a slow spell of the shared machine lands on all of them; the
table gives each model's best round. "model RSS": the resident memory the model adds once it has
run (after prefill and generation, so every weight is really in memory: transformers maps the file
and touches pages lazily), over the process before loading; peak RSS: the whole process, sampled.
Results: benchmarks/results/inference.json and a Markdown table on stdout.

    python -m benchmarks.speed.inference dense=.cache/bench/smollm2 structured=.cache/bench/quality-structured-spectrum-20
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import REPO, header


CHILD = r"""
import json, resource, sys, time, threading
import psutil, torch
folder, loader = sys.argv[1], sys.argv[6]
prefill, decode, repeats, threads = map(int, sys.argv[2:6])
torch.set_num_threads(threads)
process = psutil.Process()
peak = [process.memory_info().rss]
stop = threading.Event()
def sample():
    while not stop.wait(0.01):
        peak[0] = max(peak[0], process.memory_info().rss)
threading.Thread(target=sample, daemon=True).start()
before = process.memory_info().rss
config = json.load(open(f"{folder}/config.json"))
remote = "auto_map" in config
start = time.perf_counter()
if loader == "transformers":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=remote).eval()
else:
    import streamrom
    model = streamrom.load(folder)
load_seconds = time.perf_counter() - start
loaded = process.memory_info().rss
parameters = sum(p.numel() for p in model.parameters())
ids = torch.randint(0, config["vocab_size"] - 1, (1, prefill), generator=torch.Generator().manual_seed(0))
times = []
with torch.no_grad():
    model(ids[:, :16])  # warm-up
    for _ in range(repeats):
        start = time.perf_counter()
        model(ids)
        times.append(time.perf_counter() - start)
    decode_rate = None
    if loader == "transformers":
        prompt = ids[:, :128]
        settings = dict(do_sample=False, pad_token_id=0, use_cache=True)
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **settings)
        first = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=decode + 1, min_new_tokens=decode + 1, **settings)
        decode_rate = decode / max(time.perf_counter() - start - first, 1e-9)
steady = process.memory_info().rss  # every weight touched by now (transformers maps the file lazily)
stop.set()
times.sort()
print(json.dumps({"parameters": parameters, "remote_code": remote, "load_seconds": load_seconds,
                  "prefill_tokens_per_second": prefill / times[len(times) // 2],
                  "decode_tokens_per_second": decode_rate,
                  "rss_before_load_bytes": before, "rss_loaded_bytes": loaded, "rss_steady_bytes": steady,
                  "peak_rss_bytes": peak[0],
                  "os_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def measure(folder: Path, loader: str, threads: int, args) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(args.prefill), str(args.decode),
                             str(args.repeats), str(threads), loader], capture_output=True, text=True)
    if result.returncode:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"{loader} could not run {folder}: {last}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="LABEL=FOLDER", help="the models, the dense one first")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--loaders", nargs="+", default=["transformers", "streamrom"])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "inference.json")
    args = parser.parse_args()
    models = dict(item.split("=", 1) for item in args.models)
    cases = [(label, loader, threads) for threads in args.threads for loader in args.loaders for label in models]
    rounds: dict[tuple, list[dict]] = {case: [] for case in cases}
    for number in range(args.rounds):
        for label, loader, threads in cases:
            print(f"round {number + 1}: {label}, {loader}, {threads} thread(s)", flush=True)
            rounds[(label, loader, threads)].append(measure(Path(models[label]), loader, threads, args))
    rows = []
    for (label, loader, threads), found in rounds.items():
        best = max(found, key=lambda r: r["prefill_tokens_per_second"])
        rows.append({"label": label, "loader": loader, "threads": threads, "folder": str(models[label]), **best,
                     "prefill_rounds": [r["prefill_tokens_per_second"] for r in found],
                     "decode_rounds": [r["decode_tokens_per_second"] for r in found]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"header": header("speed.inference"), "dtype": "float32",
                                    "prefill_tokens": args.prefill, "decode_tokens": args.decode,
                                    "rows": rows}, indent=2) + "\n")
    print("\n| model | loader | threads | parameters | prefill tok/s | decode tok/s | model RSS | peak RSS |")
    print("|---|---|---|---|---|---|---|---|")
    first = next(iter(models))
    for row in rows:
        dense = next(r for r in rows if r["label"] == first and r["loader"] == row["loader"]
                     and r["threads"] == row["threads"])
        decode = (f"{row['decode_tokens_per_second']:.1f} "
                  f"({row['decode_tokens_per_second'] / dense['decode_tokens_per_second']:.2f}x)"
                  if row["decode_tokens_per_second"] else "-")
        print(f"| {row['label']} | {row['loader']} | {row['threads']} "
              f"| {row['parameters'] / 1e6:.1f} M ({row['parameters'] / dense['parameters']:.3f}) "
              f"| {row['prefill_tokens_per_second']:.0f} "
              f"({row['prefill_tokens_per_second'] / dense['prefill_tokens_per_second']:.2f}x) | {decode} "
              f"| {(row['rss_steady_bytes'] - row['rss_before_load_bytes']) / 2**20:.0f} MiB "
              f"| {row['peak_rss_bytes'] / 2**20:.0f} MiB |")
    print(f"\nwritten {args.out}")
    from benchmarks import tables

    tables.main()  # docs/results/real-model.md's speed table


if __name__ == "__main__":
    main()
