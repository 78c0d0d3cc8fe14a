"""A quantized GGUF file of a given size: each block linear's llama.cpp type (and, with an adapter, its
correction's rank) chosen by the loss it saves per byte. `export-gguf CKPT OUT.gguf --target-size GB`.

1. The checkpoint is exported once as f16, and llama.cpp's `llama-quantize` makes it once per candidate
   type with `--pure` (every matrix that type, or llama.cpp's fallback where its rows do not fit the
   type's blocks), with the importance matrix if there is one. Each candidate file gives every linear's
   bytes in that type, exactly as the final file will hold them.
2. One streamed forward and backward pass of the model (spectra.collect_spectra) gives each linear's
   input second moment C and the mean squared loss gradient s at its output; a linear stored in type t,
   its matrix read back from that type's file and dequantized, has the error E = W - Q_t(W), which costs
   about Σ_j s_j (E C Eᵀ)_jj of loss (the sum of what correction.error_prices assigns each direction of
   the error). With an adapter, the rank-r correction of that error saves its r largest directions'
   prices (correction.error_prices), for r·(out + in) values more.
3. Every linear's alternatives (type, rank) are reduced to their lower convex hull of (bytes, loss),
   and a greedy starts each linear at its cheapest and buys the upgrade that saves the most loss per
   byte until the file's bytes are spent (choose).
4. llama-quantize writes the file with those types (`--tensor-type-file`, the token embedding and output
   in one given type); with an adapter, `correct` fits the chosen ranks on that file (gguf.correction).

The work (the f16 export, the candidate files, pass 1's prices, the finished file and adapter) lies in a
hidden folder beside the output; the finished files are moved to their paths last, the adapter first, and
the folder removed (also when the run is refused). An interrupted or killed run leaves it for its rerun,
which reuses the files it finds complete and pass 1's prices if made from the same files and calibration,
or only finishes the moves (a folder made for another checkpoint, setting or path is removed).
"""
from __future__ import annotations

import hashlib
import heapq
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, OutputError, StreamromError, UsageError, write_failure
from ..linalg import allocation
from ..model.architectures import BLOCK_LINEARS, block_prefix
from ..report.report import StageTimer
from ..storage.checkpoint import CheckpointReader
from ..storage.layout import write_atomic
from ..stream.calibration import CalibrationConfig, calibration_tokens
from .correction import ADAPTER_TYPES, RANK_STEP, CorrectionConfig, correct, error_prices, priced_linears

log = logging.getLogger(__name__)

# ggml types a linear may get, and the llama-quantize file type whose --pure file is all that type
CANDIDATE_TYPES = {"q2_k": "Q2_K", "q3_k": "Q3_K_M", "q4_k": "Q4_K_M", "q5_k": "Q5_K_M", "q6_k": "Q6_K",
                   "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1"}
DEFAULT_CANDIDATES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0")
DEFAULT_EMBEDDING_TYPE = "q6_k"  # what llama.cpp's K-quant mixes give the output matrix
MAX_CORRECTION_RANK = 256  # the most a linear's correction is offered (capped at min(out, in))
# what an adapter file holds beyond its matrices: the header, metadata and each tensor's record and padding
ADAPTER_HEADER_BYTES, ADAPTER_TENSOR_BYTES = 16384, 256


@dataclass(frozen=True)
class SizingConfig:
    target_bytes: int  # the output file's, plus the adapter's when there is one
    candidates: tuple[str, ...] = DEFAULT_CANDIDATES
    embedding_type: str = DEFAULT_EMBEDDING_TYPE
    adapter: Path | None = None  # also spend bytes on corrections, written here as a llama.cpp LoRA adapter
    adapter_type: str = "f16"
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    chunk_tokens: int = 2048
    damping: float = 1e-6
    imatrix: Path | None = None
    own_imatrix: bool = True
    threads: int | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not self.target_bytes > 0:
            raise UsageError(f"--target-size must be positive, got {self.target_bytes / 1e9:g} GB")
        unknown = [t for t in (*self.candidates, self.embedding_type) if t not in CANDIDATE_TYPES]
        if unknown:
            raise UsageError(f"unknown type {unknown[0]!r} for --target-size: choose from {', '.join(CANDIDATE_TYPES)}")
        if len(set(self.candidates)) != len(self.candidates) or not self.candidates:
            raise UsageError("--candidate-types: give each type once")
        if self.adapter_type not in ADAPTER_TYPES:
            raise UsageError(f"unknown adapter type {self.adapter_type!r}: choose from {', '.join(ADAPTER_TYPES)}")


@dataclass(frozen=True)
class Alternative:
    bytes: int
    loss: float
    choice: tuple[str, int]  # (type, correction rank)


def lower_hull(alternatives: list[Alternative]) -> list[Alternative]:
    """The alternatives on the lower convex hull of (bytes, loss), cheapest first (allocation.lower_hull): a
    step to a point above the hull would be bought late for what a later point gives sooner."""
    return [alternatives[i] for i in allocation.lower_hull([a.bytes for a in alternatives], [a.loss for a in alternatives])]


def choose(alternatives: dict[str, list[Alternative]], budget: int) -> dict[str, Alternative]:
    """Each linear's alternative within `budget` bytes in all: every linear starts at its cheapest, then the
    step along its hull that saves the most loss per byte is bought while it fits (one that does not fit is
    passed over for cheaper steps elsewhere). InputError when even the cheapest of each does not fit."""
    hulls = {name: lower_hull(options) for name, options in alternatives.items()}
    position = {name: 0 for name in hulls}
    spent = sum(hull[0].bytes for hull in hulls.values())
    if spent > budget:
        raise InputError(f"the cheapest alternatives need {spent} bytes, more than the {budget} bytes given")
    heap: list[tuple[float, str]] = []

    def push(name: str) -> None:
        hull, at = hulls[name], position[name]
        if at + 1 < len(hull):
            step = hull[at + 1]
            heapq.heappush(heap, (-(hull[at].loss - step.loss) / (step.bytes - hull[at].bytes), name))

    for name in sorted(hulls):
        push(name)
    while heap:
        _, name = heapq.heappop(heap)
        hull, at = hulls[name], position[name]
        cost = hull[at + 1].bytes - hull[at].bytes
        if spent + cost <= budget:
            spent += cost
            position[name] = at + 1
            push(name)
    return {name: hulls[name][position[name]] for name in hulls}


def type_price(error: np.ndarray, second_moment: np.ndarray, sensitivity: np.ndarray) -> float:
    """Σ_j s_j (E C Eᵀ)_jj: the loss the error E of a linear costs, first order in the squared gradient s at
    its output and the second moment C of its input."""
    return float(np.einsum("ij,ij->i", error @ second_moment, error) @ sensitivity)


def export_sized(checkpoint: str | Path, output: str | Path, config: SizingConfig,
                 llama_quantize: str | Path | None = None, densify: bool = False) -> dict[str, Any]:
    """Write `output` within config.target_bytes (with the adapter's bytes when config.adapter); returns what
    was chosen and written."""
    from .exporter import check_imatrix, export_gguf, find_llama_quantize, run_llama_quantize, write_llama_imatrix
    from .importer import GGUFModel
    from ..storage.layout import check_output_file

    checkpoint, output = Path(checkpoint), Path(output)
    quantizer = find_llama_quantize(llama_quantize, "a file of a --target-size")
    if config.imatrix is not None:
        check_imatrix(Path(config.imatrix))
    adapter = None if config.adapter is None else Path(config.adapter)
    if adapter is not None and adapter.resolve() == output.resolve():
        raise UsageError("--adapter names the output file: give the adapter another path")
    work = output.with_name(f".{output.name}.sizing")
    made_from = _fingerprint(checkpoint, config, densify, output, adapter)
    stamp, done = work / "made-from.json", work / "done.json"
    # The file and the adapter are made in the work folder and moved into place last, one after the other;
    # a run killed between the two moves left done.json (the summary), and its rerun finishes the moves.
    if done.is_file() and stamp.is_file() and stamp.read_text() == made_from:
        return _move_into_place(work, output, adapter, json.loads(done.read_text()))
    for path in (output, adapter):
        if path is None:
            continue
        check_output_file(checkpoint, path)
        if path.is_dir():
            raise OutputError(f"{path} is a folder: give the .gguf file's path")
        if path.exists() and not config.overwrite:
            raise OutputError(f"{path} exists (pass --overwrite to replace it)")
        if not path.parent.is_dir():
            raise OutputError(f"cannot write {path}: its folder {path.parent} does not exist")
    reader = CheckpointReader(checkpoint)
    spec = reader.spec
    timer = StageTimer()
    if work.is_dir() and (not stamp.is_file() or stamp.read_text() != made_from):
        shutil.rmtree(work)  # another checkpoint's or setting's, left by a killed run
    try:
        work.mkdir(exist_ok=True)
        write_atomic(stamp, made_from.encode())
        unquantized = work / "f16.gguf"
        if not unquantized.is_file():
            with timer("export"):
                export_gguf(checkpoint, unquantized, "f16", densify, overwrite=True)
        imatrix = None if config.imatrix is None else Path(config.imatrix)
        own = work / "imatrix.gguf"
        if imatrix is None and config.own_imatrix and (own.is_file() or write_llama_imatrix(checkpoint, own, densify)):
            imatrix = own
        kinds = list(dict.fromkeys([*config.candidates, config.embedding_type]))
        files = {}
        for kind in kinds:
            files[kind] = work / f"{kind}.gguf"
            if not files[kind].is_file():
                with timer("quantize"):
                    run_llama_quantize(quantizer, unquantized, files[kind], CANDIDATE_TYPES[kind], imatrix,
                                       config.threads, extra=["--pure"], warn_fallback=False)
        models = {kind: GGUFModel(path, derived_ok=True) for kind, path in files.items()}
        names = [f"{block_prefix(i)}{linear}" for i in range(spec.num_layers) for linear in BLOCK_LINEARS]
        tensors = {kind: _linear_tensors(model, names) for kind, model in models.items()}
        fixed = files[config.embedding_type].stat().st_size - sum(t.n_bytes for t in tensors[config.embedding_type].values())
        adapter_reserve = 0 if adapter is None else ADAPTER_HEADER_BYTES + 2 * ADAPTER_TENSOR_BYTES * len(names)
        # said before pass 1 (the long part): the candidate files' bytes alone tell
        smallest = fixed + adapter_reserve + sum(min(tensors[kind][name].n_bytes for kind in config.candidates)
                                                 for name in names)
        if smallest > config.target_bytes:
            raise InputError(f"the smallest file of these types is {smallest / 1e9:.4f} GB ({fixed / 1e9:.4f} GB of it "
                             f"the embedding and output in {config.embedding_type}, the norms and the metadata), "
                             f"over the {config.target_bytes / 1e9:.4f} GB of --target-size: give a larger size or "
                             "smaller --candidate-types or --embedding-type")
        prices = _prices(reader, models, tensors, config, work, timer)
        alternatives = _alternatives(spec, names, tensors, prices, config)
        chosen = choose(alternatives, config.target_bytes - fixed - adapter_reserve)
        plan = work / "tensor-types.txt"
        # the embedding and output as named tensors, not --token-embedding-type / --output-tensor-type: those
        # skip llama.cpp's fallback for rows that do not fit the type's blocks (and then fail to validate)
        types = {tensors[kind][name].gguf_name: kind for name, (kind, _) in ((n, a.choice) for n, a in chosen.items())}
        types.update({"token_embd.weight": config.embedding_type, "output.weight": config.embedding_type})
        plan.write_text("".join(f"^{name.replace('.', chr(92) + '.')}$={kind}\n" for name, kind in types.items()))
        extra = ["--pure", "--tensor-type-file", str(plan)]
        finished = work / "sized.gguf"
        with timer("quantize"):
            run_llama_quantize(quantizer, unquantized, finished, "Q8_0", imatrix, config.threads, extra=extra)
        # every tensor's bytes were measured in its type's file (alignment padding aside)
        predicted = fixed + sum(tensors[a.choice[0]][name].n_bytes for name, a in chosen.items())
        written = finished.stat().st_size
        ranks = {name: a.choice[1] for name, a in chosen.items()}
        corrected = None
        if adapter is not None and any(ranks.values()):
            with timer("correct"):
                corrected = correct(checkpoint, finished, work / "adapter.gguf", CorrectionConfig(
                    ranks=ranks, calibration=config.calibration, chunk_tokens=config.chunk_tokens,
                    damping=config.damping, adapter_type=config.adapter_type, overwrite=True))
        elif adapter is not None:
            log.warning("export-gguf: the size bought no correction: no adapter written")
        # what the file holds: a type whose blocks a linear's rows do not fit is stored in llama.cpp's fallback
        stored = {name: tensors[a.choice[0]][name].qtype.name.lower() for name, a in chosen.items()}
        summary = _summary(output, adapter, config, chosen, stored, written, predicted, corrected,
                           None if imatrix is None else ("checkpoint" if imatrix == own else "given"), timer)
        write_atomic(done, json.dumps(summary).encode())
    except StreamromError:  # a refusal: nothing to resume
        shutil.rmtree(work, ignore_errors=True)
        raise
    except OSError as exc:
        shutil.rmtree(work, ignore_errors=True)
        raise write_failure(exc, output.parent) from None
    # (interrupted, the folder stays for the rerun: its complete files and pass 1's prices are reused)
    return _move_into_place(work, output, adapter, summary)


def _move_into_place(work: Path, output: Path, adapter: Path | None, summary: dict[str, Any]) -> dict[str, Any]:
    """The finished file and adapter renamed to their paths (the adapter first: a model file is never there
    without the adapter it was sized with), then the work folder removed."""
    try:
        if adapter is not None and (work / "adapter.gguf").is_file():
            os.replace(work / "adapter.gguf", adapter)
        elif adapter is not None and summary.get("adapter") is None:
            adapter.unlink(missing_ok=True)  # an earlier adapter (--overwrite) does not belong to this file
        if (work / "sized.gguf").is_file():
            os.replace(work / "sized.gguf", output)
    except OSError as exc:
        raise write_failure(exc, output.parent) from None
    shutil.rmtree(work, ignore_errors=True)
    if summary["total_bytes"] > summary["target_bytes"]:  # (the adapter's records are reserved generously)
        log.warning("export-gguf: %d bytes written, over the %d asked", summary["total_bytes"], summary["target_bytes"])
    return summary


def _summary(output: Path, adapter: Path | None, config: SizingConfig, chosen: dict[str, Alternative],
             stored: dict[str, str], written: int, predicted: int, corrected: dict | None, imatrix: str | None,
             timer: StageTimer) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for alternative in chosen.values():
        counts[alternative.choice[0]] = counts.get(alternative.choice[0], 0) + 1
    stored_counts: dict[str, int] = {}
    for kind in stored.values():
        stored_counts[kind] = stored_counts.get(kind, 0) + 1
    total = written + (0 if corrected is None else corrected["adapter_bytes"])
    summary = {"output": str(output), "bytes": written, "predicted_bytes": predicted,
               "target_bytes": config.target_bytes, "total_bytes": total,
               "types": {name: a.choice[0] for name, a in chosen.items()}, "stored_types": stored,
               "type_counts": counts, "stored_type_counts": stored_counts,
               "embedding_type": config.embedding_type, "candidates": list(config.candidates), "imatrix": imatrix,
               "predicted_loss": float(sum(a.loss for a in chosen.values())),
               "seconds": {k: round(v, 2) for k, v in timer.seconds.items()}}
    if adapter is not None:
        summary.update(adapter=None if corrected is None else str(adapter),
                       ranks={name: a.choice[1] for name, a in chosen.items()},
                       adapter_bytes=0 if corrected is None else corrected["adapter_bytes"],
                       error_removed=None if corrected is None else corrected["error_removed"])
    return summary


def _fingerprint(checkpoint: Path, config: SizingConfig, densify: bool, output: Path, adapter: Path | None) -> str:
    """What the work folder's files are made from and for: the checkpoint's files (names, sizes, times), the
    importance matrix's, the settings and the paths."""
    parts = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(checkpoint.iterdir()) if p.is_file()]
    matrix = None if config.imatrix is None else Path(config.imatrix)
    if matrix is not None:
        parts.append((str(matrix.resolve()), matrix.stat().st_size, matrix.stat().st_mtime_ns))
    settings = {key: str(value) for key, value in vars(config).items() if key not in ("threads", "overwrite")}
    return json.dumps({"checkpoint": str(checkpoint.resolve()), "files": parts, "densify": densify,
                       "settings": settings, "output": str(output.resolve()),
                       "adapter": None if adapter is None else str(adapter.resolve())}, sort_keys=True)


def _linear_tensors(model, names: list[str]) -> dict:
    by_name = {tensor.hf_name: tensor for tensor in model.tensors}
    missing = [name for name in names if f"{name}.weight" not in by_name]
    if missing:
        raise InputError(f"{model.path} has no {missing[0]}.weight: --target-size needs every block's linears "
                         "as matrices (structured models with per-block widths are not supported yet)")
    return {name: by_name[f"{name}.weight"] for name in names}


def _prices(reader: CheckpointReader, models: dict, tensors: dict, config: SizingConfig, work: Path,
            timer: StageTimer) -> dict[str, np.ndarray]:
    """Per linear: "<name>" the loss of its error in each candidate type (config.candidates' order); with an
    adapter, "<name>@<type>" the loss each direction of that error's correction saves, largest first."""
    from ..compression.spectra import collect_spectra

    spec = reader.spec
    tokens = calibration_tokens(config.calibration, reader.folder, spec.vocab_size)
    handles = {kind: os.open(model.path, os.O_RDONLY) for kind, model in models.items()}

    def price(seen, chosen: list[str], index: int) -> dict[str, np.ndarray]:
        prefix = block_prefix(index)
        found = {}
        with timer("price"):
            for name, weight, moment, sensitivity in priced_linears(reader, seen, chosen, index):
                losses = []
                for kind in config.candidates:
                    error = weight - models[kind].dequantized(tensors[kind][f"{prefix}{name}"], handles[kind])
                    losses.append(type_price(error, moment, sensitivity))
                    if config.adapter is not None:
                        found[f"{name}@{kind}"] = error_prices(error, moment, sensitivity, config.damping)
                found[name] = np.asarray(losses, dtype=np.float64)
        return found

    fingerprint = hashlib.sha256(json.dumps({"files": {k: [m.path.name, m.path.stat().st_size, m.path.stat().st_mtime_ns]
                                                       for k, m in models.items()},
                                             "candidates": list(config.candidates), "adapter": config.adapter is not None,
                                             "damping": config.damping}, sort_keys=True).encode()
                                 + tokens.tobytes()).hexdigest()
    try:
        return collect_spectra(reader, tokens, list(range(spec.num_layers)), list(BLOCK_LINEARS), work,
                               config.chunk_tokens, False, np.float32, timer, saved=work / "prices.npz",
                               fingerprint=fingerprint, units=["mlp.neurons"], price=price)
    finally:
        for handle in handles.values():
            os.close(handle)


def _alternatives(spec, names: list[str], tensors: dict, prices: dict[str, np.ndarray],
                  config: SizingConfig) -> dict[str, list[Alternative]]:
    itemsize = np.dtype(ADAPTER_TYPES[config.adapter_type]).itemsize
    found = {}
    for name in names:
        out_features, in_features = tensors[config.candidates[0]][name].shape
        options = []
        for position, kind in enumerate(config.candidates):
            size, loss = int(tensors[kind][name].n_bytes), float(prices[name][position])
            options.append(Alternative(size, loss, (kind, 0)))
            if config.adapter is None:
                continue
            saved = np.cumsum(np.clip(prices[f"{name}@{kind}"], 0.0, None))
            cap = min(out_features, in_features, MAX_CORRECTION_RANK)
            for rank in range(RANK_STEP, cap + 1, RANK_STEP):
                options.append(Alternative(size + rank * (out_features + in_features) * itemsize,
                                           max(loss - float(saved[rank - 1]), 0.0), (kind, rank)))
        found[name] = options
    return found
