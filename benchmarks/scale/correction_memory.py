"""Time and memory of `streamrom correct` at the mission's shape (issue 34: "a 7B-shaped model through
quantize + correction within 2.5 GB peak RSS"), and with `--target-size GB` of `export-gguf --target-size`
(the sizing price: every candidate type quantized by llama-quantize, then one streamed forward and backward
pass pricing each linear's error at each type).

The random-weight 7B-shaped checkpoint of benchmarks/scale/synthetic.py (a few blocks) gets a byte-level
tokenizer of its 32,000 ids (export-gguf needs a vocabulary; nothing here is scored), is exported f16,
quantized by llama.cpp's `llama-quantize` (or, without `--llama-bin`, by streamrom's own q4_0), and
corrected at each rank while its RSS is sampled every 0.1 s (psutil) beside the kernel's peak (VmHWM).
Random weights: the error removed says nothing about a real model (docs/results/frontier.md has that).

    python -m benchmarks.scale.correction_memory --llama-bin /path/to/llama.cpp/build/bin [--depth 2] [--ranks 32]
    python -m benchmarks.scale.correction_memory --llama-bin /path/to/llama.cpp/build/bin --target-size 0.45

Each mode replaces its own rows of the results file (the other mode's stay).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.common import REPO, header
from benchmarks.scale.memory_profile import profile
from benchmarks.scale.synthetic import random_tokens, write_synthetic

RESULTS = REPO / "benchmarks" / "results" / "correction_memory.json"


def vocabulary(folder: Path, size: int) -> None:
    """A byte-level BPE tokenizer.json with `size` tokens: the 256 byte symbols and filler pieces."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {text: i for i, text in enumerate(alphabet)}
    vocab.update({f"<filler{i}>": i for i in range(len(vocab), size)})
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.save(str(folder / "tokenizer.json"))


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "streamrom.cli", "--quiet", *map(str, args)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=["7b", "13b"], default="7b")
    parser.add_argument("--depth", type=int, default=2)
    parser.add_argument("--ranks", type=int, nargs="+", default=[32])
    parser.add_argument("--type", default="Q3_K_M", help="llama-quantize's type (default Q3_K_M)")
    parser.add_argument("--llama-bin", type=Path, help="folder with llama-quantize (default: streamrom's q4_0)")
    parser.add_argument("--sequences", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--target-size", type=float, metavar="GB",
                        help="measure export-gguf --target-size GB instead of correct (needs --llama-bin)")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "synthetic")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    folder = write_synthetic(args.shape, args.depth, args.work / f"{args.shape}-{args.depth}")
    vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
    if not (folder / "tokenizer.json").is_file():
        vocabulary(folder, vocab_size)
    tokens = random_tokens(args.work / f"{args.shape}-tokens.npy", args.sequences * args.seqlen, vocab_size)
    if args.target_size is not None:
        if not args.llama_bin:
            parser.error("--target-size needs --llama-bin (the sizing quantizes with llama-quantize)")
        return sizing(args, folder, tokens)
    qtype = args.type if args.llama_bin else "q4_0"
    base = args.work / f"{args.shape}-{args.depth}-{qtype}.gguf"
    if not base.is_file():
        if args.llama_bin:
            f16 = args.work / f"{args.shape}-{args.depth}-F16.gguf"
            subprocess.run(cli("export-gguf", folder, f16, "--type", "f16", "--overwrite"), check=True)
            subprocess.run([str(args.llama_bin / "llama-quantize"), str(f16), str(base), qtype, "2"], check=True,
                           capture_output=True)
            f16.unlink()
        else:
            subprocess.run(cli("export-gguf", folder, base, "--type", "q4_0"), check=True)
    rows = []
    for rank in args.ranks:
        adapter = args.work / f"{args.shape}-{args.depth}-{qtype}.lora-r{rank}.gguf"
        report = adapter.with_suffix(".json")
        command = cli("--threads", args.threads, "correct", folder, base, adapter, "--rank", rank, "--calib-tokens",
                      tokens, "--calib-sequences", args.sequences, "--calib-seqlen", args.seqlen, "--overwrite",
                      "--report", report)
        seconds, sampled, hwm = profile(command, None)
        made = json.loads(report.read_text())
        rows.append({"shape": args.shape, "depth": args.depth, "type": qtype, "rank": rank,
                     "tokens": args.sequences * args.seqlen, "threads": args.threads, "seconds": round(seconds, 1),
                     "peak_rss_sampled_mib": round(sampled / 2**20), "peak_rss_os_mib": round(hwm / 2**20),
                     "stages": made["seconds"], "adapter_bytes": made["adapter_bytes"],
                     "base_bytes": made["base_bytes"]})
        adapter.unlink()
    write_rows(args.out, rows, "correct")
    print("| shape | blocks | type | rank | tokens | seconds | peak RSS (sampled / OS) | per block |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['shape']} | {row['depth']} | {row['type']} | {row['rank']} | {row['tokens']} | "
              f"{row['seconds']} | {row['peak_rss_sampled_mib']} / {row['peak_rss_os_mib']} MiB | "
              f"{row['seconds'] / row['depth']:.0f} s |")


def write_rows(out: Path, rows: list[dict], mode: str) -> None:
    """The results file with this mode's rows replaced (rows from before modes are `correct`'s, made by
    the command of the file's header then)."""
    before = json.loads(out.read_text()) if out.is_file() else {"rows": []}
    kept = [{**row, "mode": row.get("mode", "correct"), "run": row.get("run", before.get("header"))}
            for row in before["rows"] if row.get("mode", "correct") != mode]
    run = header("scale.correction_memory")  # each row keeps the command and commit that made it
    out.write_text(json.dumps({"header": run, "rows": kept + [{**row, "mode": mode, "run": run} for row in rows]},
                              indent=1) + "\n")


def sizing(args: argparse.Namespace, folder: Path, tokens: Path) -> None:
    """export-gguf --target-size on the synthetic checkpoint, its RSS sampled (one row)."""
    output = args.work / f"{args.shape}-{args.depth}-sized.gguf"
    report = output.with_suffix(".json")
    command = cli("--threads", args.threads, "export-gguf", folder, output, "--target-size", args.target_size,
                  "--llama-quantize", args.llama_bin / "llama-quantize", "--calib-tokens", tokens,
                  "--calib-sequences", args.sequences, "--calib-seqlen", args.seqlen, "--overwrite", "--report", report)
    seconds, sampled, hwm = profile(command, None)
    made = json.loads(report.read_text())
    row = {"shape": args.shape, "depth": args.depth, "target_bytes": made["target_bytes"], "bytes": made["bytes"],
           "stored_type_counts": made["stored_type_counts"], "tokens": args.sequences * args.seqlen,
           "threads": args.threads, "seconds": round(seconds, 1), "peak_rss_sampled_mib": round(sampled / 2**20),
           "peak_rss_os_mib": round(hwm / 2**20), "stages": made.get("seconds")}
    output.unlink()
    write_rows(args.out, [row], "sizing")
    print("| shape | blocks | asked | written | types | tokens | seconds | peak RSS (sampled / OS) |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {row['shape']} | {row['depth']} | {row['target_bytes'] / 1e9:.3f} GB | {row['bytes'] / 1e9:.3f} GB | "
          f"{row['stored_type_counts']} | {row['tokens']} | {row['seconds']} | "
          f"{row['peak_rss_sampled_mib']} / {row['peak_rss_os_mib']} MiB |")


if __name__ == "__main__":
    main()
