"""Low-rank corrections of a llama.cpp-quantized model's error, shipped as a llama.cpp LoRA adapter.

`streamrom correct SOURCE BASE.gguf ADAPTER.gguf`: SOURCE is the checkpoint BASE was exported from
(`export-gguf`) and quantized by llama.cpp's own `llama-quantize`. Calibration text flows block by block
through the model as llama.cpp will run it: each linear is BASE's quantized matrix read back and
dequantized (exactly the values llama.cpp multiplies by), plus the corrections already fitted. Per
group of linears (Block.GROUPS, in order) the second moment of the input that this corrected stream
gives the group is summed, and each linear's error W − Q(W) gets the rank-r correction A·B that best
removes it on those inputs (decompose.error_correction: the activation-weighted truncated SVD of the
error, as LQER/QERA); the group then runs as Q(W) + A·B for the groups after it and the next block.
The factors go to a GGUF adapter that llama.cpp applies at run time on the quantized base
(`llama-cli -m BASE.gguf --lora ADAPTER.gguf`): lora_a = B, lora_b = A, one scale for all.

One block, its moments and the two activation files are what it holds; the adapter's factors (a few
percent of the base's bytes) are kept until the end, written once, atomically.
"""
from __future__ import annotations

import hashlib
import heapq
import json
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..linalg import decompose
from ..stream.activations import ActivationPair, chunk_ranges, embed_into, require_finite, run_block
from ..model.architectures import BLOCK_LINEARS, EMBED, block_prefix
from ..stream.calibration import CalibrationConfig, calibration_tokens
from ..storage.checkpoint import CheckpointReader
from ..errors import InputError, OutputError, UsageError, write_failure
from .importer import permute_rotary
from ..model.modeling import BlockValues, Rotary
from ..report.report import StageTimer
from ..compression.statistics import CrossAccumulator, MomentAccumulator
from ..stream.streaming import read_blocks

log = logging.getLogger(__name__)

ADAPTER_TYPES = {"f16": np.float16, "f32": np.float32}
# the anchored target's ridge, relative to the corrected inputs' mean eigenvalue: the quantized stream stays
# near the dense one, so the least-squares map needs far less damping than a compressed stream's
ANCHOR_RIDGE = 1e-4


@dataclass(frozen=True)
class CorrectionConfig:
    rank: int = 32  # of every linear's correction (capped at min(out, in))
    # or: the adapter's size in MiB, its ranks spread over the linears by the loss each step of rank saves
    # per byte (a first streamed forward and backward pass of the dense model prices every direction)
    adapter_mib: float | None = None
    ranks: dict[str, int] | None = None  # or each linear's rank (model.layers.<i>.<linear>; 0: none), given
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    chunk_tokens: int = 2048
    damping: float = 1e-6  # relative to the moment's mean eigenvalue (decompose.damped)
    adapter_type: str = "f16"  # of the adapter's tensors
    peft: Path | None = None  # also write the corrections as a PEFT LoRA adapter folder here
    # anchored fits: a dense stream beside the corrected one, and each correction's target moved from
    # the dense matrix on the corrected stream's inputs (0) to the dense model's own outputs (1)
    anchor: float = 0.0
    overwrite: bool = False

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise UsageError(f"--rank must be at least 1, got {self.rank}")
        if self.adapter_mib is not None and not (math.isfinite(self.adapter_mib) and self.adapter_mib > 0):
            raise UsageError(f"--adapter-size must be a positive number of MiB, got {self.adapter_mib}")
        if self.chunk_tokens < 1:
            raise UsageError(f"chunk tokens must be at least 1, got {self.chunk_tokens}")
        if not 0.0 <= self.anchor <= 1.0:
            raise UsageError(f"--anchor must be in [0, 1], got {self.anchor}")
        if self.adapter_type not in ADAPTER_TYPES:
            raise UsageError(f"unknown adapter type {self.adapter_type!r}: choose from {', '.join(ADAPTER_TYPES)}")


@dataclass
class LinearCorrection:
    linear: str  # the checkpoint's name, e.g. model.layers.0.self_attn.q_proj
    gguf_name: str  # the base tensor's name, e.g. blk.0.attn_q.weight
    rotary_heads: int | None  # llama.cpp permuted the base's rows (llama's q/k) within this many heads
    expand: np.ndarray  # A (out x r), rows in the checkpoint's (Hugging Face's) layout
    reduce: np.ndarray  # B (r x in)
    removed: float  # the fraction of the input-weighted error energy the correction removes

    def gguf_expand(self) -> np.ndarray:
        """A with its rows in the base file's layout."""
        return self.expand if self.rotary_heads is None else permute_rotary(self.expand, self.rotary_heads)


RANK_STEP = 8  # the allocation's step of rank


def error_prices(error: np.ndarray, second_moment: np.ndarray, sensitivity: np.ndarray,
                 damping: float) -> np.ndarray:
    """The loss each direction of a linear's correction saves, in the order error_correction keeps them:
    direction k of the error's output, u_k with energy λ_k (of error·C·errorᵀ), saves about
    λ_k · Σ_j u_jk² E[g_j²], g the loss gradient at the linear's output (as pass 1 prices the
    directions a factored linear keeps: decompose.sensitivity_weighted)."""
    out_features, in_features = error.shape
    moment = decompose.damped(second_moment, damping)
    if out_features <= in_features:
        values, vectors = decompose.top_eigenvectors((error @ moment) @ error.T, out_features)
        return decompose.sensitivity_weighted(np.clip(values, 0.0, None), vectors, sensitivity)
    weighted = error @ decompose.moment_root(moment)[0]  # any F with F·Fᵀ = C serves
    _, vectors = decompose.top_eigenvectors(weighted.T @ weighted, in_features)
    directions = weighted @ vectors  # u_k·σ_k: its squared entries, weighted, are λ_k Σ_j u_jk² E[g_j²]
    return (directions ** 2).T @ sensitivity


def correction_ranks(prices: dict[str, np.ndarray], shapes: dict[str, tuple[int, int]], budget: int,
                     step: int = RANK_STEP) -> dict[str, int]:
    """Ranks within `budget` parameters (r·(out + in) each): a global greedy over steps of `step`
    directions, the step that saves the most loss per parameter first; a linear's last step may be
    shorter (its rank capped at min(out, in)); a step that saves nothing is never bought. A linear no
    step reached gets rank 0 (no correction)."""
    ranks = {name: 0 for name in prices}
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        rank, cap = ranks[name], min(shapes[name])
        if rank < cap:
            count = min(step, cap - rank)
            gain = float(np.sum(prices[name][rank:rank + count]))
            if gain > 0:  # a step that saves nothing buys nothing
                heapq.heappush(heap, (-gain / (count * sum(shapes[name])), name))

    for name in sorted(prices):
        push(name)
    left = budget
    while heap:
        _, name = heapq.heappop(heap)
        count = min(step, min(shapes[name]) - ranks[name])
        cost = count * sum(shapes[name])
        if cost <= left:
            ranks[name] += count
            left -= cost
            push(name)
    return ranks


def dense_linear(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Any linear of a block (dense or factored) as its dense weight (out x in) and bias."""
    if isinstance(module, nn.Linear):
        return module.weight.detach(), None if module.bias is None else module.bias.detach()
    in_features = next(module.parameters()).shape[1]  # a factored linear: its reduce's columns
    with torch.no_grad():
        bias = module(torch.zeros(1, in_features))[0]
        weight = (module(torch.eye(in_features)) - bias).T.contiguous()
    return weight, bias if bool(bias.any()) else None


def _linear_module(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    module.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        module.bias = nn.Parameter(bias.clone(), requires_grad=False)
    return module


def _base_tensors(reader: CheckpointReader, base):
    """BASE's tensor of each of SOURCE's linears, checked to be the same matrix in HF's layout."""
    from ..model.families import FAMILIES

    spec = reader.spec
    expected = FAMILIES[spec.model_type].gguf_writes_as
    if expected != base.arch:
        raise InputError(f"{base.path} is a {base.arch} model and {reader.folder} a {spec.model_type} "
                         f"({expected or 'no llama.cpp architecture'}): give the GGUF exported from it")
    by_name = {tensor.hf_name: tensor for tensor in base.tensors}
    found: dict[str, object] = {}
    for index in range(spec.num_layers):
        for linear in BLOCK_LINEARS:
            key = f"{block_prefix(index)}{linear}.weight"
            tensor, shape = by_name.get(key), tuple(spec.linear_shape(linear, index))
            if tensor is None or tuple(tensor.shape) != shape:
                raise InputError(f"{base.path} has no {key} of shape {shape} (it has "
                                 f"{'none' if tensor is None else tuple(tensor.shape)}): give the GGUF exported "
                                 f"from {reader.folder} (structured models with per-block widths are not "
                                 "supported yet)")
            found[key] = tensor
    if EMBED not in by_name or tuple(by_name[EMBED].shape) != (spec.vocab_size, spec.hidden_size):
        raise InputError(f"{base.path} has no token embedding of {spec.vocab_size} x {spec.hidden_size}")
    return found, by_name[EMBED]


def correct(source: str | Path, base: str | Path, output: str | Path,
            config: CorrectionConfig = CorrectionConfig()) -> dict:
    """Fit the corrections and write the adapter; returns a summary (ranks, bytes, error removed)."""
    try:
        import gguf
    except ImportError:
        raise UsageError("correct needs the gguf package: pip install 'streamrom[convert]'") from None
    from .importer import GGUFModel

    source, base, output = Path(source), Path(base), Path(output)
    if output.is_dir():
        raise OutputError(f"{output} is a folder: give the adapter's .gguf path")
    if output.exists() and not config.overwrite:
        raise OutputError(f"{output} exists (pass --overwrite to replace it)")
    if not base.is_file():
        raise InputError(f"base GGUF not found: {base}")
    peft = None if config.peft is None else Path(config.peft)
    if peft is not None and peft.exists() and (not peft.is_dir() or any(peft.iterdir())) and not config.overwrite:
        raise OutputError(f"{peft} exists and is not an empty folder (pass --overwrite to replace it)")
    reader = CheckpointReader(source)
    spec = reader.spec
    model = GGUFModel(base, derived_ok=True)  # a Llama 3 base's rope_freqs: set aside
    linears, embedding_tensor = _base_tensors(reader, model)
    tokens = calibration_tokens(config.calibration, source, spec.vocab_size)
    sequences, seqlen = tokens.shape
    chunk_sequences = max(1, config.chunk_tokens // seqlen)
    timer = StageTimer()
    work = output.with_name(f".{output.name}.work")
    temporary = output.with_name(f".{output.name}.tmp")
    corrections: list[LinearCorrection] = []
    dense = None
    try:
        activations = ActivationPair(work, sequences, seqlen, spec.hidden_size, anonymous=True)
        if config.anchor > 0:
            dense = ActivationPair(work, sequences, seqlen, spec.hidden_size, anonymous=True)
    except OSError as exc:
        raise write_failure(exc, output.parent) from None
    handle = os.open(base, os.O_RDONLY)
    ranks = None
    try:
        if config.ranks is not None:
            ranks = _given_ranks(config.ranks, spec)
        elif config.adapter_mib is not None:
            ranks = _allocate(reader, model, handle, linears, tokens, work, config, timer)
        with timer("read"):
            embedding = torch.from_numpy(model.dequantized(embedding_tensor, handle))
        embed_into(embedding, tokens, activations.inputs, chunk_sequences, spec.embedding_scale)
        if dense is not None:
            embed_into(reader.tensor(EMBED), tokens, dense.inputs, chunk_sequences, spec.embedding_scale)
        del embedding
        cos, sin = Rotary(spec).cos_sin(seqlen)
        for index, block in read_blocks(reader, range(spec.num_layers), timer, "correct"):
            dense_inputs = None
            if dense is not None:
                with timer("dense stream"):
                    dense_inputs = _dense_values(block, dense, work, cos, sin, chunk_sequences)
            try:
                corrections += _correct_block(spec, block, index, linears, model, handle, activations, cos, sin,
                                              chunk_sequences, config, timer, dense_inputs, ranks)
            finally:
                for buffer in (dense_inputs or {}).values():
                    buffer.close()
            with timer("forward"):
                run_block(block, activations.inputs, activations.outputs, cos, sin, chunk_sequences)
            activations.swap()
            del block
        summary = _write_adapter(gguf, model.arch, corrections, temporary, config.adapter_type)
        if peft is not None:
            _write_peft(corrections, peft, config.adapter_type)
        os.replace(temporary, output)
    except OSError as exc:
        raise write_failure(exc, output.parent) from None
    finally:
        os.close(handle)
        activations.close()
        if dense is not None:
            dense.close()
        temporary.unlink(missing_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    summary.update({"rank": config.rank} if ranks is None else {"adapter_mib": config.adapter_mib, "ranks": ranks})
    summary.update(source=str(source), base=str(base), output=str(output),
                   base_bytes=base.stat().st_size, seconds={k: round(v, 2) for k, v in timer.seconds.items()},
                   calibration={"sequences": sequences, "seqlen": seqlen})
    return summary


def _allocate(reader: CheckpointReader, model, handle: int, linears: dict, tokens: np.ndarray, work: Path,
              config: CorrectionConfig, timer: StageTimer) -> dict[str, int]:
    """Every linear's rank within the adapter's bytes: pass 1's streamed forward and backward of the
    dense model (spectra.collect_spectra) gives each linear's input moment and the loss gradient's
    square at its output; each direction of its quantization error is priced by the loss it saves
    (error_prices), and the budget goes to the steps that save the most per byte (correction_ranks)."""
    from ..compression.spectra import FINGERPRINT_KEY, collect_spectra, read_saved

    spec = reader.spec

    def price(seen, chosen: list[str], index: int) -> dict[str, np.ndarray]:
        prefix = block_prefix(index)
        found = {}
        with timer("eigen"):
            for name, weight, moment, sensitivity in priced_linears(reader, seen, chosen, index):
                quantized = model.dequantized(linears[f"{prefix}{name}.weight"], handle)
                found[name] = error_prices(weight - quantized, moment, sensitivity, config.damping)
                del weight, quantized
        return found

    # a killed run's prices are reused by its rerun only if made from the same base and calibration
    made = Path(model.path).stat()
    fingerprint = hashlib.sha256(f"{Path(model.path).resolve()}:{made.st_size}:{made.st_mtime_ns}:".encode()
                                 + tokens.tobytes() + repr(config.damping).encode()).hexdigest()
    saved = work / "error-prices.npz"
    if saved.is_file() and str(read_saved(saved).get(FINGERPRINT_KEY, "")) != fingerprint:
        saved.unlink()  # another base's or calibration's, left by a killed run
    prices = collect_spectra(reader, tokens, list(range(spec.num_layers)), list(BLOCK_LINEARS), work,
                             config.chunk_tokens, False, np.float32, timer, saved=saved,
                             fingerprint=fingerprint, units=["mlp.neurons"], price=price)
    shapes = {name: tuple(spec.linear_shape(_linear_of(name), _block_of(name))) for name in prices}
    budget = int(config.adapter_mib * 2**20 / np.dtype(ADAPTER_TYPES[config.adapter_type]).itemsize)
    ranks = correction_ranks(prices, shapes, budget)
    log.info("correct: %d of %d linears corrected within %.1f MiB, ranks %d..%d", sum(r > 0 for r in ranks.values()),
             len(ranks), config.adapter_mib, min(ranks.values()), max(ranks.values()))
    return ranks


def priced_linears(reader: CheckpointReader, seen, chosen: list[str], index: int):
    """For a pass-1 price callback (spectra.collect_spectra's `price`): each chosen linear of block `index`
    as (name, its dense matrix, the second moment of its input, the mean squared loss gradient at its
    output), float32; the linears that read one value share its moment, made once."""
    reads = {name: group.reads for group, _, _ in seen.groups for name in group.linears}
    moments: dict[str, np.ndarray] = {}
    for name in chosen:
        if reads[name] not in moments:
            moments[reads[name]] = seen.moments[reads[name]].second_moment_as(np.float32)
        sensitivity = (seen.squares[name] / seen.tokens).numpy().astype(np.float32)
        yield name, dense_weight(reader, index, name), moments[reads[name]], sensitivity


def _given_ranks(ranks: dict[str, int], spec) -> dict[str, int]:
    """CorrectionConfig.ranks, checked: every linear named once, each rank within 0..min(out, in)."""
    expected = {f"{block_prefix(i)}{linear}" for i in range(spec.num_layers) for linear in BLOCK_LINEARS}
    if set(ranks) != expected:
        missing = sorted(expected - set(ranks)) or sorted(set(ranks) - expected)
        raise UsageError(f"the given ranks do not name every linear of the model once (e.g. {missing[0]})")
    for name, rank in ranks.items():
        cap = min(spec.linear_shape(_linear_of(name), _block_of(name)))
        if not (isinstance(rank, int) and 0 <= rank <= cap):
            raise UsageError(f"rank {rank!r} for {name}: give 0..{cap}")
    return dict(ranks)


def _block_of(name: str) -> int:
    return int(name.split(".")[2])


def _linear_of(name: str) -> str:
    return name.split(".", 3)[3]


def dense_weight(reader: CheckpointReader, index: int, linear: str) -> np.ndarray:
    """A linear's dense matrix read from the checkpoint (a factored one multiplied back), float32."""
    prefix = f"{block_prefix(index)}{linear}"
    if f"{prefix}.weight" in reader.weight_map:
        return reader.read([f"{prefix}.weight"])[f"{prefix}.weight"].float().numpy()
    factors = reader.read([f"{prefix}.expand.weight", f"{prefix}.reduce.weight"])
    return (factors[f"{prefix}.expand.weight"].float() @ factors[f"{prefix}.reduce.weight"].float()).numpy()


def _dense_values(block, dense: ActivationPair, work: Path, cos, sin, chunk_sequences: int) -> dict:
    """The dense block (untouched yet) on the dense stream: each group's input, on disk for the fits,
    and the block's output as the dense stream's next input."""
    from ..stream.activations import ActivationBuffer

    sequences, length, _ = dense.inputs.shape
    widths = {}
    for start, stop in chunk_ranges(sequences, chunk_sequences):
        values = BlockValues(block, cos, sin, {"x": lambda start=start, stop=stop: dense.inputs.read(start, stop)})
        for group in block.GROUPS:
            features = values[group.reads]
            if group.reads not in widths:
                widths[group.reads] = ActivationBuffer(work, sequences, length, features.shape[-1], anonymous=True)
            widths[group.reads].write(start, features)
        dense.outputs.write(start, require_finite(values["output"], "leave a dense block"))
        del values
    dense.swap()
    return widths


def _correct_block(spec, block, index: int, linears: dict, model, handle: int, activations: ActivationPair,
                   cos, sin, chunk_sequences: int, config: CorrectionConfig,
                   timer: StageTimer, dense_inputs: dict | None = None,
                   ranks: dict[str, int] | None = None) -> list[LinearCorrection]:
    """Group by group (Block.GROUPS, in order), the corrections fitted on the inputs the corrected
    stream gives the group, and the group's linears replaced by quantized + correction. A group's
    input depends only on the groups before it, all replaced by then: the dense matrices of the
    others wait in the block (no copy beside it)."""
    prefix = block_prefix(index)
    found: list[LinearCorrection] = []
    inputs = activations.inputs
    for group in block.GROUPS:
        width = spec.linear_shape(group.linears[0], index)[1]
        moment = MomentAccumulator(width)
        cross = CrossAccumulator(width, width) if dense_inputs is not None else None
        with timer("forward"):
            for start, stop in chunk_ranges(inputs.shape[0], chunk_sequences):
                values = BlockValues(block, cos, sin, {"x": lambda start=start, stop=stop: inputs.read(start, stop)})
                features = require_finite(values[group.reads], f"reach block {index}'s {group.reads}")
                with timer("statistics"):
                    moment.add(features.reshape(-1, width))
                    if cross is not None:
                        cross.add(dense_inputs[group.reads].read(start, stop), features)
                del values, features
        mean = moment.mean().astype(np.float32)
        second = moment.second_moment_as(np.float32)  # symmetric: damped in place, shared by the group
        del moment
        second[np.diag_indices_from(second)] += config.damping * float(np.mean(np.diag(second)))
        anchor = cross.anchor(config.anchor, np.float32) if cross is not None else None
        del cross
        for name in group.linears:
            tensor = linears[f"{prefix}{name}.weight"]
            weight, bias = dense_linear(block.linear(name))
            with timer("read"):
                quantized = torch.from_numpy(model.dequantized(tensor, handle))
            target = weight.float().numpy()
            if anchor is not None:  # what the dense model's outputs ask of the corrected stream's inputs
                anchor_copy = decompose.Anchor(anchor.cross, anchor.mean, anchor.strength)
                target = decompose.anchored_map(decompose.InputMoments(second, mean), anchor_copy, target, None,
                                                ridge=ANCHOR_RIDGE)[0]
            error = target - quantized.numpy()
            del weight, target
            rank = config.rank if ranks is None else ranks[f"{prefix}{name}"]
            if rank == 0:  # the budget bought this linear no correction: it runs quantized
                block.set_linear(name, _linear_module(quantized, None if bias is None else bias.float()))
                del error, quantized
                continue
            with timer("eigen"):
                expand, reduce, values, total = decompose.error_correction(error, second, rank, None)
            removed = float(values.sum()) / total if total > 0 else 1.0
            del error
            quantized += torch.from_numpy(expand @ reduce)
            block.set_linear(name, _linear_module(quantized, None if bias is None else bias.float()))
            del quantized
            found.append(LinearCorrection(f"{prefix}{name}", tensor.gguf_name, tensor.rotary_heads, expand, reduce,
                                          removed))
            log.debug("%s: rank %d removes %.1f %% of the weighted error", tensor.gguf_name, reduce.shape[0],
                      100 * removed)
        del second, anchor
    return found


PEFT_PREFIX = "base_model.model."  # where PEFT's LoraModel keeps the model it wraps


def _write_peft(corrections: list[LinearCorrection], folder: Path, adapter_type: str) -> None:
    """The corrections as a PEFT LoRA adapter (adapter_config.json, adapter_model.safetensors), for a
    transformers model of the base (e.g. `from_pretrained(..., gguf_file=BASE)`, which dequantizes it):
    lora_A = B (r x in), lora_B = A (out x r) in Hugging Face's row order, lora_alpha = r so PEFT's
    scale alpha/r is 1; a linear whose rank was capped lower is named in rank_pattern. Written into a
    temporary folder beside `folder`, then renamed into place."""
    from safetensors.numpy import save_file

    dtype = ADAPTER_TYPES[adapter_type]
    ranks = {c.linear: c.reduce.shape[0] for c in corrections}
    rank = max(ranks.values())
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
              "target_modules": sorted({c.linear.rsplit(".", 1)[1] for c in corrections}),
              "rank_pattern": {name: r for name, r in ranks.items() if r != rank},
              "alpha_pattern": {name: r for name, r in ranks.items() if r != rank},
              "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "modules_to_save": None,
              "base_model_name_or_path": None, "revision": None}
    tensors = {}
    for c in corrections:
        tensors[f"{PEFT_PREFIX}{c.linear}.lora_A.weight"] = np.ascontiguousarray(c.reduce.astype(dtype))
        tensors[f"{PEFT_PREFIX}{c.linear}.lora_B.weight"] = np.ascontiguousarray(c.expand.astype(dtype))
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        save_file(tensors, str(staging / "adapter_model.safetensors"))
        (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_adapter(gguf, architecture: str, corrections: list[LinearCorrection], path: Path,
                   adapter_type: str) -> dict:
    """The adapter as llama.cpp reads it (llama-adapter.cpp): general.type "adapter", adapter.type
    "lora", per base tensor `<name>.lora_a` (r x in, numpy order) and `<name>.lora_b` (out x r);
    alpha 0: llama.cpp then scales every pair by the --lora scale alone, whatever its rank."""
    dtype = ADAPTER_TYPES[adapter_type]
    writer = gguf.GGUFWriter(path, architecture)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)
    parameters = 0
    for correction in corrections:
        writer.add_tensor(f"{correction.gguf_name}.lora_a", correction.reduce.astype(dtype))
        writer.add_tensor(f"{correction.gguf_name}.lora_b",
                          np.ascontiguousarray(correction.gguf_expand().astype(dtype)))
        parameters += correction.reduce.size + correction.expand.size
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    removed = [c.removed for c in corrections]
    return {"adapter_parameters": int(parameters), "adapter_bytes": path.stat().st_size,
            "linears": len(corrections), "error_removed": {"mean": float(np.mean(removed)),
                                                           "min": float(np.min(removed))}}
