"""streamrom against the whole-model way, on one synthetic checkpoint, in one invocation.

The whole-model way is the same ROM algorithm (the same `compress_block`, the same chunks) with the
whole model loaded in its float32 working dtype and every calibration activation held in RAM, as
the ROM paper's and the SFSD study's code do it. Both runs are child processes whose RSS this
script samples every 0.1 s; their outputs are then compared tensor by tensor (they must be
identical). Results: benchmarks/results/whole_model_<shape>.json.

    python benchmarks/whole_model.py 7b --depth 8
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from memory_profile import profile  # noqa: E402
from synthetic import random_tokens, write_synthetic  # noqa: E402

from streamrom.report import machine  # noqa: E402


class MemoryBuffer:
    """ActivationBuffer's interface over one tensor in RAM."""

    def __init__(self, sequences: int, length: int, hidden: int):
        self.data = torch.zeros(sequences, length, hidden)
        self.shape = tuple(self.data.shape)

    def read(self, start: int, stop: int) -> torch.Tensor:
        return self.data[start:stop].clone()  # a fresh tensor, like a read from a file

    def write(self, start: int, values: torch.Tensor) -> None:
        self.data[start:start + values.shape[0]] = values


@torch.no_grad()
def compress_in_memory(source: Path, output: Path, token_file: Path, sequences: int, seqlen: int,
                       ratio: float) -> dict:
    """The whole model and all activations in RAM; the same per-block algorithm as streamrom."""
    from streamrom.activations import embed_into
    from streamrom.calibration import CalibrationConfig, calibration_tokens
    from streamrom.checkpoint import CheckpointReader, CheckpointWriter
    from streamrom.modeling import EMBED, FINAL_NORM, LM_HEAD, Block, Rotary, block_prefix
    from streamrom.pipeline import CompressConfig, compress_block, parse_layers, rank_plan
    from streamrom.report import StageTimer

    timer = StageTimer()
    start = time.perf_counter()
    config = CompressConfig(ratio=ratio, calibration=CalibrationConfig(token_file=token_file, sequences=sequences,
                                                                       seqlen=seqlen))
    reader = CheckpointReader(source)
    spec = reader.spec
    plan = rank_plan(spec, config)
    assert parse_layers(config.layers, spec.num_layers) == list(range(spec.num_layers))
    tokens = calibration_tokens(config.calibration, source, spec.vocab_size)
    dtype = reader.weight_dtype
    with timer("read"):  # the whole model, in the dtype it computes in
        embedding = reader.tensor(EMBED).float()
        blocks = [Block.from_tensors(spec, reader.block_tensors(i)) for i in range(spec.num_layers)]
        tail = {k: v.float() for k, v in reader.read([FINAL_NORM] + ([] if spec.tie_word_embeddings else [LM_HEAD])).items()}
    chunk_sequences = max(1, config.chunk_tokens // seqlen)
    inputs, outputs = (MemoryBuffer(sequences, seqlen, spec.hidden_size) for _ in range(2))
    cache = {"attention": MemoryBuffer(sequences, seqlen, spec.num_heads * spec.head_dim),
             "residual": MemoryBuffer(sequences, seqlen, spec.hidden_size),
             "mlp": MemoryBuffer(sequences, seqlen, spec.intermediate_size)}
    with timer("forward"):
        embed_into(embedding, tokens, inputs, chunk_sequences)
    cos, sin = Rotary(spec).cos_sin(seqlen)
    for index, block in enumerate(blocks):
        has_next = index + 1 < spec.num_layers
        compress_block(block, plan, inputs, outputs if has_next else None, cache, cos, sin, config,
                       chunk_sequences, timer, block_label=block_prefix(index))
        inputs, outputs = outputs, inputs
    with timer("write"):
        writer = CheckpointWriter(output, spec.num_layers + 2, {})
        writer.write_shard(1, {EMBED: embedding.to(dtype)})
        for index, block in enumerate(blocks):
            writer.write_shard(index + 2, {block_prefix(index) + k: v.to(dtype) for k, v in block.state_dict().items()})
        writer.write_shard(spec.num_layers + 2, {k: v.to(dtype) for k, v in tail.items()})
        writer.finish(dict(reader.config), reader.tokenizer_files())
    return {"stage_seconds": timer.seconds, "wall_seconds": time.perf_counter() - start}


def compare(first: Path, second: Path) -> dict:
    """Largest absolute difference over all tensors of two checkpoints with the same names."""
    from streamrom.checkpoint import CheckpointReader

    a, b = CheckpointReader(first), CheckpointReader(second)
    names = sorted(a.weight_map)
    if names != sorted(b.weight_map):
        return {"identical": False, "reason": "different tensor names"}
    worst, equal = 0.0, True
    for name in names:
        x, y = a.tensor(name), b.tensor(name)
        if x.shape != y.shape or x.dtype != y.dtype:
            return {"identical": False, "reason": f"{name}: shape or dtype differs"}
        if not torch.equal(x, y):
            equal = False
            worst = max(worst, float((x.float() - y.float()).abs().max()))
    return {"identical": equal, "tensors": len(names), "max_abs_difference": worst}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("shape", choices=["7b", "13b"])
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--threads", type=int, help="torch threads in both runs (default: torch's)")
    parser.add_argument("--work", type=Path, default=REPO / ".cache" / "synthetic")
    parser.add_argument("--results", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--in-memory-child", nargs=2, type=Path, metavar=("SRC", "DST"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.in_memory_child:
        if args.threads:
            torch.set_num_threads(args.threads)
        source, output = args.in_memory_child
        result = compress_in_memory(source, output, args.work / "tokens.npy", args.sequences, args.seqlen, args.ratio)
        (output / "whole-model-report.json").write_text(json.dumps(result, indent=2) + "\n")
        return

    args.work.mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)
    tokens = random_tokens(args.work / "tokens.npy", args.sequences * args.seqlen * 4)
    source = write_synthetic(args.shape, args.depth, args.work / f"{args.shape}-{args.depth}")
    name = f"{args.shape}-{args.depth}"
    streamed_out, whole_out = args.work / f"{name}-rom", args.work / f"{name}-whole"
    threads = ["--threads", str(args.threads)] if args.threads else []
    streamed = [sys.executable, "-m", "streamrom.cli", "--quiet", *threads, "compress", str(source),
                str(streamed_out), "--ratio", str(args.ratio), "--calib-tokens", str(tokens), "--calib-sequences",
                str(args.sequences), "--calib-seqlen", str(args.seqlen), "--overwrite",
                "--report", str(args.work / f"{name}.report.json")]
    import shutil
    shutil.rmtree(whole_out, ignore_errors=True)
    whole = [sys.executable, str(Path(__file__).resolve()), args.shape, "--depth", str(args.depth), "--sequences",
             str(args.sequences), "--seqlen", str(args.seqlen), "--ratio", str(args.ratio), *threads,
             "--work", str(args.work), "--in-memory-child", str(source), str(whole_out)]
    rows = {}
    for label, command in (("streamed", streamed), ("whole_model", whole)):
        print("$", shlex.join(command[1:]), flush=True)
        timeline = args.results / f"whole_model_{name}_{label}_rss.csv"
        wall, peak = profile(command, timeline)
        rows[label] = {"command": shlex.join(["python", *command[1:]]), "wall_seconds": wall, "peak_rss_bytes": peak,
                       "timeline_csv": timeline.name}
    rows["streamed"]["stage_seconds"] = json.loads((args.work / f"{name}.report.json").read_text())["stage_seconds"]
    rows["whole_model"]["stage_seconds"] = json.loads((whole_out / "whole-model-report.json").read_text())["stage_seconds"]
    outputs = compare(streamed_out, whole_out)
    result = {"benchmark": "whole_model", "shape": args.shape, "depth": args.depth, "ratio": args.ratio,
              "calibration_tokens": args.sequences * args.seqlen, "machine": machine(), "runs": rows,
              "peak_rss_ratio": rows["whole_model"]["peak_rss_bytes"] / rows["streamed"]["peak_rss_bytes"],
              "wall_time_ratio": rows["whole_model"]["wall_seconds"] / rows["streamed"]["wall_seconds"],
              "outputs": outputs}
    out = args.results / f"whole_model_{args.shape}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    mib = 2 ** 20
    print(f"\n| way | wall | peak RSS |\n|---|---|---|")
    for label, row in rows.items():
        print(f"| {label} | {row['wall_seconds']:.0f} s | {row['peak_rss_bytes'] / mib:.0f} MiB |")
    print(f"whole-model / streamed: peak RSS x{result['peak_rss_ratio']:.2f}, wall time x{result['wall_time_ratio']:.2f}; "
          f"outputs {outputs}")
    print(f"written {out}")


if __name__ == "__main__":
    main()
