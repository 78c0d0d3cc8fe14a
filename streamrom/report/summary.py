"""What a checkpoint holds, per block and module: ranks, parameters, bytes (`streamrom inspect`).

Read from the tensor headers alone, so it works on any checkpoint, compressed or not, without
loading a weight.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from ..storage.checkpoint import CheckpointReader, tensor_bytes
from ..model.modeling import BLOCK_LINEARS, block_prefix

# A factored linear that keeps more than this share of its dense parameters does nearly as much work
# in two smaller products: measured on CPU (benchmarks/speed/factored_speed.py) it runs at about dense speed
# at 0.9 and slower at 0.98, while at 0.8 it is 1.17-1.28x faster in the median of every group of
# shapes, dtypes and threads except 135M-sized matrices in bf16 (slower at any share there).
FACTORED_BREAK_EVEN = 0.8


def checkpoint_summary(folder: str | Path) -> dict[str, Any]:
    reader = CheckpointReader(folder)
    spec = reader.spec

    def size(names: list[str]) -> tuple[int, int]:
        params = sum(math.prod(reader.shapes[n]) for n in names)
        return params, sum(tensor_bytes(reader.shapes[n], reader.dtypes[n]) for n in names)

    blocks = []
    for index in range(spec.num_layers):
        prefix = block_prefix(index)
        names = reader.block_names(index)
        modules = {}
        for linear in BLOCK_LINEARS:
            own = [n for n in names if n.startswith(f"{prefix}{linear}.")]
            reduce_name = f"{prefix}{linear}.reduce.weight"
            params, nbytes = size(own)
            rank = reader.shapes[reduce_name][0] if reduce_name in reader.shapes else None
            modules[linear] = {"rank": rank, "parameters": params, "bytes": nbytes}
            if rank is not None:  # the share of the dense linear's multiply-adds the two factors do
                out_features, in_features = spec.linear_shape(linear, index)
                modules[linear]["fraction_of_dense"] = rank * (out_features + in_features) / (out_features * in_features)
        params, nbytes = size(names)
        blocks.append({"index": index, "parameters": params, "bytes": nbytes, "modules": modules,
                       "mlp_width": spec.intermediate_size_of(index), "value_head_dim": spec.value_head_dim_of(index),
                       "query_key_head_dim": spec.query_key_head_dim_of(index)})
    section = reader.config.get("streamrom") or {}
    # structured ROM narrows the config's own widths: the source's count is recorded beside them
    dense_equivalent = section.get("dense_parameters") or (
        sum(math.prod(s) for s in spec.global_shapes().values())
        + spec.num_layers * sum(math.prod(s) for s in spec.dense_block_shapes().values()))
    total_params, total_bytes = size(list(reader.shapes))
    return {
        "checkpoint": str(folder),
        "model_type": spec.model_type,
        "method": section.get("method", "dense"),
        "num_layers": spec.num_layers,
        "parameters": total_params,
        "bytes": total_bytes,
        "dense_parameters": dense_equivalent,
        "parameter_ratio": total_params / dense_equivalent,
        "compressed_linears": sum(1 for b in blocks for m in b["modules"].values() if m["rank"] is not None),
        "near_break_even": [f"{block_prefix(b['index'])}{name}" for b in blocks for name, m in b["modules"].items()
                            if m.get("fraction_of_dense", 0.0) > FACTORED_BREAK_EVEN],
        "structured": bool(section.get("widths")),
        "blocks": blocks,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A table a person reads: one row per block, the rank of each module ('-' = dense)."""
    short = [name.rsplit(".", 1)[1].removesuffix("_proj") for name in BLOCK_LINEARS]
    widths = summary.get("structured", False)  # structured ROM: each block's MLP, value and q/k widths too
    header = (f"{'block':>5} " + " ".join(f"{s:>6}" for s in short)
              + (f" {'mlp':>6} {'v/head':>6} {'qk/head':>7}" if widths else "")
              + f" {'params':>12} {'MiB':>8}")
    lines = [f"{summary['checkpoint']}: {summary['model_type']}, {summary['num_layers']} blocks, "
             f"method {summary['method']}", header]
    for block in summary["blocks"]:
        ranks = " ".join(f"{m['rank'] if m['rank'] is not None else '-':>6}" for m in block["modules"].values())
        narrowed = (f" {block['mlp_width']:>6} {block['value_head_dim']:>6} {block['query_key_head_dim']:>7}"
                    if widths else "")
        lines.append(f"{block['index']:>5} {ranks}{narrowed} {block['parameters']:>12,} {block['bytes'] / 2**20:>8.2f}")
    lines.append(f"whole model: {summary['parameters']:,} parameters, {summary['bytes'] / 2**20:.1f} MiB; "
                 f"{summary['parameter_ratio']:.4f} of the dense {summary['dense_parameters']:,}; "
                 f"{summary['compressed_linears']} linears factored")
    if summary["near_break_even"]:
        lines.append(near_break_even_note(summary["near_break_even"]))
    return "\n".join(lines)


def near_break_even_note(names: list[str]) -> str:
    return (f"note: {len(names)} factored linear(s) keep more than {FACTORED_BREAK_EVEN:.0%} of their dense "
            f"parameters (first: {names[0]}); on a CPU such a pair of products runs about as fast as the "
            "dense linear or slower (benchmarks/speed/factored_speed.py): they save memory, not time")
