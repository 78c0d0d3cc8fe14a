"""Memory of loading a 7B-shaped compressed bf16 checkpoint, by `streamrom.load` and by transformers.

The checkpoint: a real `streamrom compress` output of the 7B-shaped random-weight model
(benchmarks/scale/synthetic.py; rom-centered, 20 % smaller, bf16) at depth 2, its two blocks repeated to
--depth blocks (32: Llama-2-7B's depth) by streamrom's own CheckpointWriter. The loaders only read
shapes, dtypes and bytes, so random weights measure them as well as real ones (never accuracy).

Each loader runs in its own child process, which samples its own RSS every 10 ms from a thread:
before loading (interpreter, torch, transformers imported), the peak while loading, and after every
weight has been touched (a model mapped lazily from its file pays for its pages only then). The OS
peak (ru_maxrss) covers what the sampler missed; the steady RSS is split into anonymous memory and
pages backed by the checkpoint's files (safetensors maps them: a tensor read as stored is no copy). "load peak / file": (peak − before) / bytes on disk;
the issue asks for ≤ 1.15. Parameter dtypes are listed: bf16 in, bf16 resident.

    python -m benchmarks.scale.load_memory --depth 32
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import REPO, header

CHILD = r"""
import json, resource, sys, threading, time
import psutil, torch
folder, loader = sys.argv[1], sys.argv[2]
torch.set_num_threads(2)
if loader == "transformers":
    from transformers import AutoModelForCausalLM
else:
    import streamrom
process = psutil.Process()
before = process.memory_info().rss
peak = [before]
running = [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], process.memory_info().rss)
        time.sleep(0.01)
sampler = threading.Thread(target=sample, daemon=True)
sampler.start()
start = time.perf_counter()
if loader == "transformers":
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
else:
    model = streamrom.load(folder)
load_seconds = time.perf_counter() - start
loaded = process.memory_info().rss
checksum = 0.0
with torch.no_grad():
    for parameter in model.parameters():
        checksum += float(parameter.float().sum()) if parameter.numel() < 2**20 else float(parameter.sum())
steady = process.memory_info().rss
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
kinds = {key: int(status[key].split()[0]) * 1024 for key in ("RssAnon", "RssFile")}
running[0] = False
sampler.join()
dtypes = {}
stored = 0
for parameter in model.parameters():
    dtypes[str(parameter.dtype)] = dtypes.get(str(parameter.dtype), 0) + parameter.numel()
    stored += parameter.numel() * parameter.element_size()
print(json.dumps({"loader": loader, "load_seconds": load_seconds, "rss_before_bytes": before,
                  "rss_loaded_bytes": loaded, "rss_steady_bytes": steady, "peak_rss_bytes": max(peak[0], steady),
                  "os_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "parameter_dtypes": dtypes, "steady_anonymous_bytes": kinds["RssAnon"],
                  "steady_file_backed_bytes": kinds["RssFile"], "parameter_bytes": stored, "type": type(model).__name__}))
"""


def compressed_depth2(work: Path) -> Path:
    """The 2-block compressed 7B-shaped checkpoint: benchmarks.scale.memory_profile's output where it is there, else
    made here with a short calibration (the weights' values do not matter to loading)."""
    from benchmarks.scale.synthetic import random_tokens, write_synthetic

    output = work / "7b-2-rom"
    if (output / "config.json").is_file():
        return output
    source = write_synthetic("7b", 2, work / "7b-2")
    tokens = random_tokens(work / "tokens.npy", 32 * 512 * 4)
    subprocess.run([sys.executable, "-m", "streamrom.cli", "--quiet", "compress", str(source), str(output),
                    "--ratio", "0.8", "--calib-tokens", str(tokens), "--calib-sequences", "8", "--calib-seqlen",
                    "256", "--overwrite"], check=True)
    return output


def repeat_blocks(folder: Path, depth: int, out: Path) -> Path:
    """`folder`'s blocks repeated (block k = block k mod n) to `depth` blocks, one shard per block."""
    from streamrom.storage.checkpoint import CheckpointReader, CheckpointWriter
    from streamrom.model.architectures import block_prefix

    reader = CheckpointReader(folder)
    config = reader.config  # edited into the repeated checkpoint's
    if (out / "config.json").is_file() and json.loads((out / "config.json").read_text())["num_hidden_layers"] == depth:
        return out
    out.mkdir(parents=True, exist_ok=True)
    count = reader.spec.num_layers
    writer = CheckpointWriter(out, depth + 2)
    globals_ = [name for name in reader.weight_map if not name.startswith("model.layers.")]
    writer.write_shard(1, reader.read([n for n in globals_ if "embed" in n]))
    for index in range(depth):
        tensors = reader.block_tensors(index % count)
        writer.write_shard(index + 2, {block_prefix(index) + name: t for name, t in tensors.items()})
    writer.write_shard(depth + 2, reader.read([n for n in globals_ if "embed" not in n]))
    section = config["streamrom"]
    per_block = {}
    for name, rank in section["ranks"].items():
        _, _, layer, rest = name.split(".", 3)
        per_block.setdefault(int(layer), {})[rest] = rank
    section["ranks"] = {f"{block_prefix(i)}{rest}": rank for i in range(depth)
                        for rest, rank in per_block[i % count].items()}
    section["layers"] = list(range(depth))
    outside_blocks = sum(math.prod(reader.shapes[name]) for name in globals_)
    section["dense_parameters"] = outside_blocks + depth * (section["dense_parameters"] - outside_blocks) // count
    config["num_hidden_layers"] = depth
    writer.finish(config, reader.tokenizer_files())
    for extra in folder.glob("*.py"):
        (out / extra.name).write_bytes(extra.read_bytes())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=32)
    parser.add_argument("--loaders", nargs="+", default=["streamrom", "transformers"])
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "synthetic")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--keep", action="store_true", help="keep the repeated checkpoint (default: remove it)")
    args = parser.parse_args()
    from streamrom.storage.checkpoint import CheckpointReader

    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    folder = repeat_blocks(compressed_depth2(args.work), args.depth, args.work / f"7b-{args.depth}-rom-repeated")
    print(f"checkpoint {folder} ready in {time.perf_counter() - start:.0f} s", flush=True)
    reader = CheckpointReader(folder)
    on_disk = reader.size_on_disk()
    rows = []
    for loader in args.loaders:
        subprocess.run(["sync"], check=False)
        result = subprocess.run([sys.executable, "-c", CHILD, str(folder), loader], capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"{loader} failed: {result.stderr.strip().splitlines()[-1:]}")
        row = json.loads(result.stdout.strip().splitlines()[-1])
        peak = max(row["peak_rss_bytes"], row["os_peak_rss_bytes"])
        row.update({"bytes_on_disk": on_disk, "load_peak_over_file": (peak - row["rss_before_bytes"]) / on_disk,
                    "steady_over_file": (row["rss_steady_bytes"] - row["rss_before_bytes"]) / on_disk})
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.results.mkdir(parents=True, exist_ok=True)
    out = args.results / "load_memory.json"
    versions = {name: importlib.metadata.version(name) for name in ("torch", "safetensors", "transformers")}
    out.write_text(json.dumps({"header": header("scale.load_memory"), "depth": args.depth, "checkpoint": folder.name,
                               "parameters": reader.parameter_count(), "versions": versions,
                               "rows": rows},
                              indent=2) + "\n")
    if not args.keep:
        for path in folder.iterdir():
            path.unlink()
        folder.rmdir()
    gib = 2 ** 30
    print(f"\n7B-shaped compressed checkpoint, {args.depth} blocks, {on_disk / gib:.2f} GiB on disk (bf16)")
    print("| loader | load s | before | peak (sampled / OS) | steady (anonymous + file-backed) | load peak / file "
          "| steady / file | resident dtypes |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['loader']} | {row['load_seconds']:.1f} | {row['rss_before_bytes'] / gib:.2f} GiB "
              f"| {row['peak_rss_bytes'] / gib:.2f} / {row['os_peak_rss_bytes'] / gib:.2f} GiB "
              f"| {row['rss_steady_bytes'] / gib:.2f} GiB ({row['steady_anonymous_bytes'] / gib:.2f} + "
              f"{row['steady_file_backed_bytes'] / gib:.2f}) | {row['load_peak_over_file']:.3f} "
              f"| {row['steady_over_file']:.3f} | {', '.join(sorted(row['parameter_dtypes']))} |")
    from benchmarks import tables

    tables.main()  # docs/results/real-model.md's loading table


if __name__ == "__main__":
    main()
