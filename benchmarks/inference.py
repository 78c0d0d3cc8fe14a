"""Inference benchmark: prefill and decode speed and resident memory of compressed models against the
dense one, in Hugging Face transformers on CPU (the runtime most people load a checkpoint in).

Each model is loaded by its own child process (so its RSS is its own): float32, `trust_remote_code`
for factored and per-block-width checkpoints, plain loading otherwise. In the child: prefill of one
sequence of --prefill tokens (median of --repeats), and greedy decoding of --decode tokens after a
128-token prompt with the KV cache (decode rate = tokens / (time of the whole generation − time of
its first token)). Models are measured in alternation, --rounds times, so that a slow spell of the
shared machine lands on all of them; the table gives each model's best round.
Results: benchmarks/results/inference.json and a Markdown table on stdout.

    python benchmarks/inference.py dense=.cache/bench/smollm2 structured=.cache/bench/quality-structured-spectrum-20
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from streamrom.report import machine  # noqa: E402

CHILD = r"""
import json, resource, sys, time, threading
import psutil, torch
from transformers import AutoModelForCausalLM
folder, prefill, decode, repeats, threads = sys.argv[1], *map(int, sys.argv[2:6])
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
model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, trust_remote_code=remote).eval()
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
    prompt = ids[:, :128]
    settings = dict(do_sample=False, pad_token_id=0, use_cache=True)
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **settings)
    first = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=decode + 1, min_new_tokens=decode + 1, **settings)
    whole = time.perf_counter() - start
stop.set()
times.sort()
print(json.dumps({"parameters": parameters, "remote_code": remote, "load_seconds": load_seconds,
                  "prefill_tokens_per_second": prefill / times[len(times) // 2],
                  "decode_tokens_per_second": decode / max(whole - first, 1e-9),
                  "rss_before_load_bytes": before, "rss_loaded_bytes": loaded, "peak_rss_bytes": peak[0],
                  "os_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def measure(folder: Path, args) -> dict:
    result = subprocess.run([sys.executable, "-c", CHILD, str(folder), str(args.prefill), str(args.decode),
                             str(args.repeats), str(args.threads)], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="LABEL=FOLDER", help="the models, the dense one first")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--decode", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "inference.json")
    args = parser.parse_args()
    models = dict(item.split("=", 1) for item in args.models)
    rounds: dict[str, list[dict]] = {label: [] for label in models}
    for number in range(args.rounds):
        for label, folder in models.items():
            print(f"round {number + 1}: {label}", flush=True)
            rounds[label].append(measure(Path(folder), args))
    rows = []
    for label, folder in models.items():
        best = max(rounds[label], key=lambda r: r["decode_tokens_per_second"])
        rows.append({"label": label, "folder": str(folder), **best,
                     "prefill_rounds": [r["prefill_tokens_per_second"] for r in rounds[label]],
                     "decode_rounds": [r["decode_tokens_per_second"] for r in rounds[label]]})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "inference", "runtime": "transformers, CPU, float32",
                                    "prefill_tokens": args.prefill, "decode_tokens": args.decode,
                                    "threads": args.threads, "machine": machine(), "rows": rows}, indent=2) + "\n")
    dense = rows[0]
    print("\n| model | parameters | prefill tok/s | decode tok/s | RSS loaded | peak RSS |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['label']} | {row['parameters'] / 1e6:.1f} M ({row['parameters'] / dense['parameters']:.3f}) "
              f"| {row['prefill_tokens_per_second']:.0f} ({row['prefill_tokens_per_second'] / dense['prefill_tokens_per_second']:.2f}x) "
              f"| {row['decode_tokens_per_second']:.1f} ({row['decode_tokens_per_second'] / dense['decode_tokens_per_second']:.2f}x) "
              f"| {(row['rss_loaded_bytes'] - row['rss_before_load_bytes']) / 2**20:.0f} MiB "
              f"| {row['peak_rss_bytes'] / 2**20:.0f} MiB |")
    print(f"\nwritten {args.out}")


if __name__ == "__main__":
    main()
