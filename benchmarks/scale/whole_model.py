"""The whole-model way: the same ROM algorithm (the same `compress_block`, the same chunks) with the
whole model loaded in its float32 working dtype and every calibration activation held in RAM, as the
ROM paper's and the SFSD study's code do it. For comparison with streamrom only: benchmarks/scale/memory_profile.py
runs it beside `streamrom compress` (`--whole-model DEPTH`) and checks both outputs are identical.

    python -m benchmarks.scale.whole_model SRC DST --calib-tokens tokens.npy
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch


REPORT_FILE = "whole-model-report.json"


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
    from streamrom.stream.activations import embed_into
    from streamrom.stream.calibration import CalibrationConfig, calibration_tokens
    from streamrom.storage.checkpoint import CheckpointReader, CheckpointWriter
    from streamrom.model.modeling import EMBED, FINAL_NORM, LM_HEAD, Rotary, block_class, block_prefix
    from streamrom.compression.config import CompressConfig, parse_layers
    from streamrom.compression.block_compression import compress_block
    from streamrom.compression.plans import BlockPlan
    from streamrom.compression.planning import rank_plan
    from streamrom.report.report import StageTimer

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
        blocks = [block_class(spec).from_tensors(spec, reader.block_tensors(i), i) for i in range(spec.num_layers)]
        tail = {k: v.float() for k, v in reader.read([FINAL_NORM] + ([] if spec.tie_word_embeddings else [LM_HEAD])).items()}
    chunk_sequences = max(1, config.chunk_tokens // seqlen)
    inputs, outputs = (MemoryBuffer(sequences, seqlen, spec.hidden_size) for _ in range(2))
    cache = {name: MemoryBuffer(sequences, seqlen, width) for name, width in block_class(spec).cached_widths(spec).items()}
    with timer("forward"):
        embed_into(embedding, tokens, inputs, chunk_sequences, spec.embedding_scale)
    cos, sin = Rotary(spec).cos_sin(seqlen)
    for index, block in enumerate(blocks):
        has_next = index + 1 < spec.num_layers
        compress_block(block, BlockPlan.of(plan), inputs, outputs if has_next else None, cache, cos, sin, config,
                       chunk_sequences, timer, block_label=block_prefix(index))
        inputs, outputs = outputs, inputs
    with timer("write"):
        output.mkdir(parents=True)
        writer = CheckpointWriter(output, spec.num_layers + 2, {})
        writer.write_shard(1, {EMBED: embedding.to(dtype)})
        for index, block in enumerate(blocks):
            writer.write_shard(index + 2, {block_prefix(index) + k: v.to(dtype) for k, v in block.state_dict().items()})
        writer.write_shard(spec.num_layers + 2, {k: v.to(dtype) for k, v in tail.items()})
        writer.finish(dict(reader.config), reader.tokenizer_files())
    return {"stage_seconds": timer.seconds, "wall_seconds": time.perf_counter() - start}


def compare(first: Path, second: Path) -> dict:
    """Largest absolute difference over all tensors of two checkpoints with the same names."""
    from streamrom.storage.checkpoint import CheckpointReader

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
    parser.add_argument("source", type=Path)
    parser.add_argument("output", type=Path)
    parser.add_argument("--calib-tokens", type=Path, required=True)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--ratio", type=float, default=0.8)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shutil.rmtree(args.output, ignore_errors=True)
    result = compress_in_memory(args.source, args.output, args.calib_tokens, args.sequences, args.seqlen, args.ratio)
    (args.output / REPORT_FILE).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
