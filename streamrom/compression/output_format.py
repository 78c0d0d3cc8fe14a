"""The compressed checkpoint's format: each block's tensors as stored, and the tail (final norm, head,
config.json with the "streamrom" section and per-block widths, the importance file, the remote code,
the tokenizer, the index last). checkpoint.CheckpointReader reads what this writes."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..model.architectures import UNITS
from ..storage.checkpoint import CheckpointReader, CheckpointWriter
from .config import CompressConfig
from ..model.families import FAMILIES
from ..storage.importance import load_block, write_importance
from ..model.modeling import FINAL_NORM, LM_HEAD, Block, block_prefix
from .plans import ModelPlan
from .progress import Progress

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
HF_MODELING_FILE = Path(__file__).parent.parent / "model" / "hf" / "modeling_streamrom.py"


def block_tensors(block: Block, index: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    prefix = block_prefix(index)
    return {prefix + key: value.to(dtype) for key, value in block.state_dict().items()}


def write_tail(reader: CheckpointReader, writer: CheckpointWriter, config: CompressConfig, layers: list[int],
                progress: Progress, dtype: torch.dtype, sequences: int, seqlen: int, work: Path) -> None:
    """The final norm and head, then config, tokenizer and the index (last: it marks the model complete)."""
    spec = reader.spec
    tail = [FINAL_NORM] + ([] if spec.tie_word_embeddings else [LM_HEAD])
    writer.write_shard(spec.num_layers + 2, {k: v.to(dtype) for k, v in reader.read(tail).items()}, scratch=work)
    out_config = dict(reader.config)
    out_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if "dtype" in out_config:  # transformers 5 writes "dtype"
        out_config["dtype"] = out_config["torch_dtype"]
    plan = ModelPlan.from_record(progress.ranks, spec.num_layers)  # what each block was compressed with
    ranks = plan.ranks()
    widths = {f"{block_prefix(index)}{name}": width for index, block in enumerate(plan.blocks)
              for name, width in block.widths.items() if width}
    out_config.update(layer_widths(spec, plan))
    out_config["streamrom"] = {
        "format_version": FORMAT_VERSION,
        "method": config.method,
        "centered": config.centered,  # factored linears' expand has a bias
        "allocate": config.allocate,
        "target_params": config.target_params,
        "target_size_gb": config.target_size_gb,
        "ratio": config.ratio,
        "rank": config.rank,
        "layers": layers,
        "dense_parameters": reader.parameter_count(),  # the source's (the config's widths may be narrowed)
        "ranks": ranks,
        **({"widths": widths} if widths else {}),
        "factor_tensors": {
            "reduce": "<linear>.reduce.weight: (rank, in) = Vᵀ W; <linear>.reduce.bias = Vᵀ b",
            "expand": "<linear>.expand.weight: (out, rank) = V; <linear>.expand.bias = (I − V Vᵀ) μ (centered only)",
        },
        "calibration": {"sequences": sequences, "seqlen": seqlen, "seed": config.calibration.seed},
    }
    write_importance_file(writer.folder, spec.num_layers, work)
    extra_files = [HF_MODELING_FILE]
    if not any(ranks.values()) and not any(unit.widths_key in out_config for unit in UNITS):
        # dense tensors of the source's shapes (one MLP width, no factors): a plain checkpoint of the
        # source architecture, which transformers loads without remote code
        out_config.pop("auto_map", None)
        out_config["architectures"] = [FAMILIES[spec.model_type].transformers_class]
        extra_files = []
    else:
        # transformers builds the factored model from the file beside it (trust_remote_code=True)
        model_class = FAMILIES[spec.model_type].remote_class
        out_config["auto_map"] = {"AutoModelForCausalLM": f"{HF_MODELING_FILE.stem}.{model_class}"}
        out_config["architectures"] = [model_class]
    writer.finish(out_config, [*reader.tokenizer_files(), *extra_files])


def importance_block_file(index: int) -> str:
    return f"importance-{index:05d}.npz"


def write_importance_file(output: Path, num_layers: int, work: Path) -> None:
    """importance.IMPORTANCE_FILE from every block's saved energies; left out (logged) where a block's
    are missing (a method without calibration, or blocks compressed by an older version)."""
    blocks = [load_block(work / importance_block_file(index)) for index in range(num_layers)]
    if all(block is not None for block in blocks):
        write_importance(output, blocks)
    else:
        log.info("no importance file: input energies were not summed for every block")


def layer_widths(spec, plan: ModelPlan) -> dict[str, object]:
    """config.json's per-block widths after structured ROM: intermediate_size itself where every block
    keeps one MLP width, else layer_intermediate_sizes; the head widths (layer_value_head_dims,
    layer_query_key_head_dims) where they narrowed."""
    found: dict[str, object] = {}
    narrowed = spec.narrowed(plan.block_widths())
    for unit in UNITS:
        per_block = [unit.features_of(narrowed, index) for index in range(spec.num_layers)]
        if all(width == unit.dense_features(spec) for width in per_block):
            continue
        if unit.uniform_key is not None and len(set(per_block)) == 1:
            found[unit.uniform_key] = per_block[0]  # what the source architecture reads itself
        else:
            found[unit.widths_key] = per_block
    if any(unit.per_head and unit.widths_key in found for unit in UNITS):
        found["head_dim"] = spec.head_dim  # the dense head's: it must not be derived from hidden/heads
    return found
