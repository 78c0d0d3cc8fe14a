"""The streaming compressor: one decoder block in memory at a time, compressed group by group.

    reader ─(one block)─► Block ─► per group: statistics ─► eigen basis ─► LowRankLinear
    calibration tokens ─► embeddings ─► activation files ─(chunks)─► block ─► next activation file
    compressed block ─► its own shard; index and config written last
"""
from __future__ import annotations

import errno
import logging
import math
import os
import shutil
import signal
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import psutil
import torch

from . import allocation, bayes, decompose, plots
from .activations import ActivationBuffer, ActivationPair, BlockCache, chunk_ranges, embed_into, require_finite
from .bayes import BayesConfig
from .calibration import CalibrationConfig, calibration_tokens, held_out_windows
from .checkpoint import CheckpointReader, CheckpointWriter, check_output_path, clear_folder, shard_is_complete
from .errors import InputError, NumericalError, OutputError, ResourceError, UsageError
from .evaluation import evaluate
from .memory import RSSMonitor, current_rss_bytes, estimate_compress_memory, estimated_peak, release_freed_memory
from .progress import (LOCK_FILE, PROGRESS_FILE, OutputLock, Progress, arguments_fingerprint, changed_source_file,
                       source_files, source_fingerprint)
from .modeling import BLOCK_LINEARS, EMBED, FINAL_NORM, LM_HEAD, Block, BlockValues, ModelSpec, Rotary, block_prefix
from .report import Report, StageTimer, memory_summary
from .spectra import collect_spectra
from .spectra import read_saved as read_saved_spectra
from .methods import METHODS, Method
from .statistics import GroupStatistics

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
WORK_FOLDER = ".streamrom-work"
ALLOCATIONS = ("uniform", "last-n", "spectrum", "bayes")
FIRST_PASS_ALLOCATIONS = ("spectrum", "bayes")  # need spectrum's pass 1 (bayes starts from its plan)
# Half target, half general (each normalised to unit output energy first): until benchmarks/targeted.py
# measures otherwise, the mix that keeps both texts' directions in the basis.
DEFAULT_TARGET_WEIGHT = 0.5
# --ratio (uniform) factors a linear only where that saves more than this fraction of its parameters.
MIN_FACTOR_SAVING = 0.02
PRECISIONS = {"float32": np.float32, "float64": np.float64}
OUTPUT_DTYPES = {"source": None, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REPORT_FILE = "streamrom-report.json"
HF_MODELING_FILE = Path(__file__).parent / "hf" / "modeling_streamrom.py"
HF_MODEL_CLASSES = {"llama": "StreamromLlamaForCausalLM", "mistral": "StreamromMistralForCausalLM",
                    "qwen2": "StreamromQwen2ForCausalLM"}


@dataclass(frozen=True)
class CompressConfig:
    """How to compress. `ratio` is the fraction of each compressed linear's parameters kept."""

    ratio: float = 0.8
    rank: int | None = None  # a fixed rank for every chosen linear (capped at min(out, in))
    layers: str = "all"  # "all", "last:N", or indices and ranges like "0-3,7"
    modules: tuple[str, ...] = BLOCK_LINEARS
    method: str = "rom"  # rom (uncentered output PCA), rom-centered (+ mean-correction bias), svd (weights only)
    allocate: str = "uniform"  # uniform, last-n (ROM's scheme), spectrum (two-pass: output energy priced by the loss gradient)
    target_params: float | None = None  # whole-model parameter count after compression, as a fraction
    target_size_gb: float | None = None  # or as the output's tensor bytes, in GB (1e9 bytes)
    ranks: dict[str, int | None] | None = None  # an explicit plan ("model.layers.<i>.<name>": rank), e.g. a report's
    spectra_file: Path | None = None  # spectrum's pass 1: reused from here when made for the same inputs, else saved here
    damping: float = 1e-6  # relative to the mean eigenvalue; see decompose.damped
    chunk_tokens: int = 2048  # tokens per forward chunk: bounds activation memory
    precision: str = "float32"  # of the per-chunk moment products and the eigen work (sums: float64)
    dtype: str = "source"  # dtype of the output tensors: source, float32, float16 or bfloat16
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    # Task-targeted compression: the application's text, mixed with `calibration` (the general text)
    # per linear as α·C_target/E_target + (1−α)·C_general/E_general (α = target_weight; 1: target only).
    target_calibration: CalibrationConfig | None = None
    target_weight: float = DEFAULT_TARGET_WEIGHT
    # "mix": the mix's top-r eigenvectors; "select": the r directions keeping the most target output
    # energy among the mix's eigenvectors and the target's own top r (decompose.select_basis)
    target_basis: str = "mix"
    bayes: BayesConfig = field(default_factory=BayesConfig)  # --allocate bayes: trials, seed, held-out windows
    overwrite: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.ratio <= 1.0:
            raise UsageError(f"--ratio must be in (0, 1], got {self.ratio}")
        if self.rank is not None and self.rank < 1:
            raise UsageError(f"--rank must be at least 1, got {self.rank}")
        if self.allocate not in ALLOCATIONS:
            raise UsageError(f"unknown allocation {self.allocate!r}: choose from {', '.join(ALLOCATIONS)}")
        if self.target_params is not None and self.target_size_gb is not None:
            raise UsageError("give --target-params or --target-size, not both")
        if self.target_params is not None and not 0.0 < self.target_params <= 1.0:
            raise UsageError(f"--target-params must be in (0, 1], got {self.target_params}")
        if self.target_size_gb is not None and not (math.isfinite(self.target_size_gb) and self.target_size_gb > 0):
            raise UsageError(f"--target-size must be positive, got {self.target_size_gb}")
        if (self.rank is not None or self.ranks is not None) and (self.allocate != "uniform" or self.has_target):
            raise UsageError("--rank and --ranks-from fix the ranks: they do not combine with --allocate or a target")
        if not 0.0 <= self.target_weight <= 1.0:
            raise UsageError(f"--target-weight must be in [0, 1], got {self.target_weight}")
        if self.target_basis not in ("mix", "select"):
            raise UsageError(f"unknown --target-basis {self.target_basis!r}: choose mix or select")
        if self.target_basis == "select" and self.target_calibration is None:
            raise UsageError("--target-basis select needs --target-text")
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}: choose from {', '.join(METHODS)}")
        if self.target_calibration is not None:
            if not self.compression_method.uses_calibration:
                raise UsageError(f"--method {self.method} uses no calibration text, so no target text either")
            if self.target_calibration.seqlen != self.calibration.seqlen:
                raise UsageError("the target and general calibration sequences must have the same length")
        if not self.compression_method.priced_by_pass_one and self.allocate in FIRST_PASS_ALLOCATIONS:
            raise UsageError(f"--allocate {self.allocate} prices the directions ROM keeps; with --method "
                             f"{self.method} use uniform or last-n")
        if self.spectra_file is not None and self.allocate not in FIRST_PASS_ALLOCATIONS:
            raise UsageError("--spectra keeps the first pass of --allocate spectrum: use it with that allocation")
        unknown = [m for m in self.modules if m not in BLOCK_LINEARS]
        if unknown:
            raise UsageError(f"unknown module {unknown[0]!r}: choose from {', '.join(BLOCK_LINEARS)}")
        if self.damping < 0:
            raise UsageError(f"damping must be >= 0, got {self.damping}")
        if self.chunk_tokens < 1:
            raise UsageError(f"chunk tokens must be at least 1, got {self.chunk_tokens}")
        if self.precision not in PRECISIONS:
            raise UsageError(f"unknown precision {self.precision!r}: choose from {', '.join(PRECISIONS)}")
        if self.dtype not in OUTPUT_DTYPES:
            raise UsageError(f"unknown dtype {self.dtype!r}: choose from {', '.join(OUTPUT_DTYPES)}")

    def output_dtype(self, source_dtype: torch.dtype) -> torch.dtype:
        return source_dtype if self.dtype == "source" else OUTPUT_DTYPES[self.dtype]

    @property
    def compression_method(self) -> Method:
        return METHODS[self.method]

    @property
    def centered(self) -> bool:  # (pass 1 prices the directions of ROM's centered or uncentered fit)
        return self.compression_method.centered

    @property
    def has_target(self) -> bool:
        return self.target_params is not None or self.target_size_gb is not None


def parse_layers(text: str, num_layers: int) -> list[int]:
    """Block indices from "all", "last:N" (ROM's choice: the last N blocks) or "0-3,7"."""
    text = text.strip()
    if text == "all":
        return list(range(num_layers))
    if text.startswith("last:"):
        try:
            count = int(text[5:])
        except ValueError:
            raise UsageError(f"--layers {text!r}: expected last:N with an integer N") from None
        if not 0 <= count <= num_layers:
            raise UsageError(f"--layers {text!r}: the model has {num_layers} blocks")
        return list(range(num_layers - count, num_layers))
    chosen: set[int] = set()
    for part in text.split(","):
        try:
            if "-" in part:
                first, last = (int(v) for v in part.split("-", 1))
                if last < first:
                    raise UsageError(f"--layers {text!r}: the range {part} is empty (write it first-last)")
                chosen.update(range(first, last + 1))
            else:
                chosen.add(int(part))
        except ValueError:
            raise UsageError(f"--layers {text!r}: expected all, last:N, or indices like 0-3,7") from None
    if any(not 0 <= i < num_layers for i in chosen):
        raise UsageError(f"--layers {text!r}: indices must be in 0..{num_layers - 1}")
    return sorted(chosen)


def rank_plan(spec: ModelSpec, config: CompressConfig) -> dict[str, int | None]:
    """Rank per block linear at `config.ratio` (or `config.rank`); None keeps it dense (not chosen,
    or factors would not save)."""
    plan: dict[str, int | None] = {}
    for name in BLOCK_LINEARS:
        out_features, in_features = spec.linear_shape(name)
        if name not in config.modules:
            plan[name] = None
        elif config.rank is not None:
            plan[name] = min(config.rank, out_features, in_features)
        else:
            rank = decompose.rank_for(config.ratio, out_features, in_features)
            # near ratio 1 the factors keep about half the rank for a sliver of the parameters: not worth it
            saves = decompose.saves_parameters(rank, out_features, in_features, MIN_FACTOR_SAVING)
            plan[name] = rank if saves else None
    return plan


def allocation_slots(spec: ModelSpec, config: CompressConfig, layers: list[int]) -> list[allocation.Slot]:
    slots = []
    for index in layers:
        for name in BLOCK_LINEARS:
            if name in config.modules:
                out_features, in_features = spec.linear_shape(name)
                slots.append(allocation.Slot(f"{block_prefix(index)}{name}", index, out_features, in_features,
                                             spec.has_bias(name),
                                             config.compression_method.extra_parameters(out_features)))
    return slots


def model_plan(spec: ModelSpec, config: CompressConfig, layers: list[int], total_params: int, dtype_bytes: int,
               spectra: dict[str, np.ndarray] | None = None) -> dict[str, int | None]:
    """Rank of every block linear of the model ("model.layers.<i>.<name>"; None: dense).

    Without a target, `uniform` is `rank_plan` in every chosen block; `last-n` and `spectrum`
    spend what that plan would. With a target, the chosen allocation meets the whole-model
    parameter count within one rank step.
    """
    if config.ranks is not None:
        return _checked_ranks(spec, config.ranks)
    per_block = rank_plan(spec, config)
    plan = {f"{block_prefix(i)}{name}": (per_block[name] if i in layers else None)
            for i in range(spec.num_layers) for name in BLOCK_LINEARS}
    if config.rank is not None or (config.allocate == "uniform" and not config.has_target):
        return plan
    slots = allocation_slots(spec, config, layers)
    budget = slot_budget(slots, config, total_params, dtype_bytes, plan)
    if config.allocate == "uniform":
        ranks = allocation.uniform_ranks(slots, budget)
    elif config.allocate == "last-n":
        ranks = allocation.last_n_ranks(slots, budget, config.ratio, spec.num_layers)
    else:
        ranks = allocation.spectrum_ranks(slots, spectra or {}, budget)
    return {key: ranks.get(key) for key in plan}


def slot_budget(slots: list[allocation.Slot], config: CompressConfig, total_params: int, dtype_bytes: int,
                plan: dict[str, int | None]) -> int:
    """Parameters the factorable linears may use: the target's, less everything else in the model
    (without a target, what `plan` — uniform at --ratio — spends)."""
    fixed = total_params - sum(slot.dense for slot in slots)
    if config.target_params is not None:
        return int(config.target_params * total_params) - fixed
    if config.target_size_gb is not None:
        return int(config.target_size_gb * 1e9 // dtype_bytes) - fixed
    return allocation.total_params(slots, plan)


def _checked_ranks(spec: ModelSpec, ranks: dict[str, int | None]) -> dict[str, int | None]:
    plan = {f"{block_prefix(i)}{name}": None for i in range(spec.num_layers) for name in BLOCK_LINEARS}
    for key, rank in ranks.items():
        if key not in plan:
            raise UsageError(f"ranks name {key!r}, which is not a block linear of this model")
        if rank is not None and not (isinstance(rank, int) and 0 < rank <= min(spec.linear_shape(key.split(".", 3)[3]))):
            raise UsageError(f"rank of {key} must be a positive integer up to min(out, in), got {rank!r}")
        plan[key] = rank
    return plan


def block_plan(plan: dict[str, int | None], index: int) -> dict[str, int | None]:
    return {name: plan.get(f"{block_prefix(index)}{name}") for name in BLOCK_LINEARS}


@torch.no_grad()
def compress_block(block: Block, plan: dict[str, int | None], inputs: ActivationBuffer,
                   outputs: ActivationBuffer | None, cache: BlockCache, cos: torch.Tensor, sin: torch.Tensor,
                   config: CompressConfig, chunk_sequences: int, timer: StageTimer,
                   block_label: str = "", target_from: int | None = None) -> None:
    """Replace the planned linears of `block` by ROM factors, one group after the other, and write
    the compressed block's outputs for `inputs` to `outputs` (unless None).

    Each group's statistics are gathered with the groups before it already compressed, so later
    factors compensate for the error of earlier ones. Pass g computes the block up to group g's
    input from the intermediates pass g-1 left in `cache`, so all passes together cost one forward.

    With `target_from`, the sequences from that index on are the target text's and those before it
    the general text's: their moments are kept apart and mixed per linear (decompose.mixture_weights
    with config.target_weight).
    """
    method = config.compression_method
    work_dtype = PRECISIONS[config.precision]
    if not method.uses_calibration:  # weight space: no statistics, and nothing downstream needs outputs
        with timer("eigen"):
            for group in block.GROUPS:
                ranks = {name: plan[name] for name in group.linears if plan[name] is not None}
                method.compress_group(block, group, ranks, None, False, work_dtype, config.damping)
        return
    work = [{name: plan[name] for name in group.linears if plan[name] is not None} for group in block.GROUPS]
    last = max((g for g, todo in enumerate(work) if todo), default=-1)
    cached: list[str] = []  # values of the passes so far, on disk for all chunks

    def chunk_values(start: int, stop: int) -> BlockValues:
        given = {"x": lambda: inputs.read(start, stop)}
        given.update({name: (lambda name=name: cache[name].read(start, stop)) for name in cached})
        return BlockValues(block, cos, sin, given)

    def keep(values: BlockValues, start: int) -> list[str]:
        """Write what this pass computed and later passes read instead of computing again."""
        new = [name for name in values.computed if name in cache and name not in cached]
        for name in new:
            cache[name].write(start, values.computed[name])
        return new

    for group, todo in zip(block.GROUPS[:last + 1], work):
        if not todo:
            continue  # what this group's pass would compute, the next one computes on its way
        out_features, in_features = block.linear(next(iter(todo))).weight.shape
        at_output = group.observes_output(out_features, in_features)
        statistics = GroupStatistics(out_features if at_output else in_features,
                                     torch.float64 if config.precision == "float64" else torch.float32,
                                     target_from, config.target_weight, config.target_basis)
        written: list[str] = []
        for start, stop in chunk_ranges(inputs.shape[0], chunk_sequences, target_from):
            with timer("forward"):
                values = chunk_values(start, stop)
                features = values[group.writes if at_output else group.reads]
                written = keep(values, start)
            with timer("statistics"):
                statistics.add(features, start)
        cached.extend(written)
        if not statistics.is_finite():
            raise NumericalError(f"NaN or Inf activations reach {block_label}{', '.join(todo)} "
                                 "(overflow in the source weights or in the layers before)")
        with timer("eigen"):
            moments = statistics.moments(work_dtype, method.centered, config.damping)
            method.compress_group(block, group, todo, moments, at_output, work_dtype, config.damping)
            del moments, statistics
        release_freed_memory()
    if outputs is not None:
        with timer("forward"):
            for start, stop in chunk_ranges(inputs.shape[0], chunk_sequences):
                result = chunk_values(start, stop)["output"]
                outputs.write(start, require_finite(result, f"leave {block_label.rstrip('.')}"))


def _block_tensors(block: Block, index: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    prefix = block_prefix(index)
    return {prefix + key: value.to(dtype) for key, value in block.state_dict().items()}


def _fault_point(name: str) -> None:
    """Test hook: STREAMROM_FAULT=<name> kills the process here with SIGKILL, as a crash would;
    STREAMROM_FAULT=sigint:<name> sends it SIGINT, as Ctrl-C would; stop:<name> stops it (SIGSTOP)."""
    fault = os.environ.get("STREAMROM_FAULT")
    if fault == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif fault == f"sigint:{name}":
        os.kill(os.getpid(), signal.SIGINT)
    elif fault == f"stop:{name}":  # held there (SIGSTOP) until the test sends SIGCONT
        os.kill(os.getpid(), signal.SIGSTOP)


def _output_bytes(spec: ModelSpec, plan: dict[str, int | None], dtype_bytes: int, method: Method) -> int:
    """Size of the compressed checkpoint's tensors, from the model's rank plan."""
    params = sum(math.prod(shape) for shape in spec.global_shapes().values())
    dense = spec.dense_block_shapes()
    for index in range(spec.num_layers):
        for name, shape in dense.items():
            linear, _, kind = name.rpartition(".")
            rank = plan.get(f"{block_prefix(index)}{linear}")
            if not rank:
                params += math.prod(shape)
            elif kind == "weight":  # the linear's replacement, its bias included
                params += method.parameters(*shape, rank, f"{linear}.bias" in dense)
    return params * dtype_bytes


def check_resources(output: Path, disk_needed: dict[str, int], memory_parts: dict[str, int]) -> None:
    """Fail before the long work when the disk or the memory cannot hold the run."""
    gib = 2 ** 30
    free = shutil.disk_usage(output).free
    needed = sum(disk_needed.values())
    if needed > free:
        detail = ", ".join(f"{k} {v / gib:.2f} GiB" for k, v in disk_needed.items())
        raise ResourceError(f"not enough free disk space in {output}: need {needed / gib:.2f} GiB "
                            f"({detail}), have {free / gib:.2f} GiB")
    peak = estimated_peak(memory_parts)
    available = psutil.virtual_memory().available + memory_parts["runtime"]
    if peak > available:
        raise ResourceError(f"not enough memory: the run needs about {peak / gib:.2f} GiB, "
                            f"{available / gib:.2f} GiB is available; lower --chunk-tokens")


def _start_or_resume(output: Path, overwrite: bool, arguments: str, source: str, files: dict[str, list[int]],
                     keep: tuple[str, ...] = ()) -> Progress:
    """A fresh Progress, or the one of an interrupted run of the same arguments and unchanged source.

    `keep`: names in the folder that are not a previous run's (the run's own log file)."""
    ignored = (LOCK_FILE, *keep)
    if overwrite:
        clear_folder(output, keep=ignored)
        return Progress(arguments=arguments, source=source, source_files=files)
    previous = Progress.load(output)
    if previous is not None:
        if previous.source != source:
            raise OutputError(f"{output} holds an unfinished run of a different source checkpoint; "
                              "pass --overwrite to start over")
        changed = changed_source_file(previous.source_files, files) if previous.source_files else None
        if changed is not None:
            raise OutputError(f"source file {changed} changed since the interrupted run in {output} (its size, "
                              "modification time or inode differ); pass --overwrite to start over")
        if previous.arguments != arguments:
            raise OutputError(f"{output} holds an unfinished run with other arguments or calibration data; "
                              "rerun with the same ones to resume, or pass --overwrite to start over")
        if previous.stage == "written":
            log.info("resuming %s: the model is written; finishing the steps after it", output)
        else:
            log.info("resuming %s after block %d", output, previous.blocks_done)
        return previous
    if any(p.name not in ignored for p in output.iterdir()):
        raise OutputError(f"output folder is not empty: {output} (pass --overwrite to replace it)")
    return Progress(arguments=arguments, source=source, source_files=files)


def check_report_path(path: Path) -> None:
    """Fail before the work when the report cannot be written where asked."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputError(f"--report {path} is a folder; give a file path")
    if not folder.is_dir():
        raise OutputError(f"--report {path}: its folder {folder} does not exist or is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise OutputError(f"--report {path} cannot be written (permission denied)")


def compress(source: str | Path, output: str | Path, config: CompressConfig = CompressConfig(),
             report_path: str | Path | None = None, eval_text: list[Path] | tuple[Path, ...] = (),
             eval_seqlen: int = 512, eval_max_windows: int | None = None,
             keep_files: tuple[Path, ...] = ()) -> Report:
    """Compress the checkpoint at `source` into `output`, one block in memory at a time.

    An interrupted run (crash, kill, Ctrl-C) resumes when called again with the same arguments; one
    interrupted after the model was written only finishes what was left (clean-up, evaluation, report).
    With `eval_text`, the result's perplexity on it (streamed, as `evaluate`) goes into the report.
    Returns the run's Report, also written as JSON to `report_path` (default: inside `output`).
    `keep_files`: files of this run that may lie inside `output` (its log file); never deleted.
    """
    source, output = Path(source), Path(output)
    for path in eval_text:  # found missing now, not after an hour of compression
        if not Path(path).is_file():
            raise InputError(f"evaluation text not found: {path}")
    report_file = Path(report_path) if report_path else output / REPORT_FILE
    if report_path:
        check_report_path(report_file)
    if config.spectra_file is not None and Path(config.spectra_file).is_file():
        read_saved_spectra(config.spectra_file)
    timer = StageTimer()
    start = time.perf_counter()
    runtime_bytes = current_rss_bytes()
    with RSSMonitor() as monitor:
        with timer("read"):
            reader = CheckpointReader(source)
        spec = reader.spec
        layers = parse_layers(config.layers, spec.num_layers)
        with timer("calibration"):
            tokens = calibration_tokens(config.calibration, source, spec.vocab_size)
            target_from = None  # general sequences first, then the target's
            if config.target_calibration is not None:
                target_from = len(tokens)
                tokens = np.concatenate([tokens, calibration_tokens(config.target_calibration, source, spec.vocab_size)])
        sequences, seqlen = tokens.shape
        max_positions = reader.config.get("max_position_embeddings")
        if isinstance(max_positions, int) and seqlen > max_positions:
            log.warning("--calib-seqlen %d is longer than the model's max_position_embeddings %d: its statistics "
                        "come from positions it was not trained for", seqlen, max_positions)
        settings = {"ratio": config.ratio, "rank": config.rank, "layers": layers,
                    "modules": list(config.modules), "method": config.method, "allocate": config.allocate,
                    "target_params": config.target_params, "target_size_gb": config.target_size_gb,
                    "damping": config.damping, "chunk_tokens": config.chunk_tokens, "dtype": config.dtype,
                    "precision": config.precision, "ranks": config.ranks,
                    "calibration": {"files": [str(p) for p in config.calibration.text_files] or ["(default)"],
                                    "token_file": str(config.calibration.token_file or ""),
                                    "sequences": sequences, "seqlen": seqlen,
                                    "seed": config.calibration.seed},
                    "target": None if target_from is None else {
                        "files": [str(p) for p in config.target_calibration.text_files],
                        "token_file": str(config.target_calibration.token_file or ""),
                        "sequences": sequences - target_from, "general_sequences": target_from,
                        "target_weight": config.target_weight}}
        if config.allocate == "bayes":
            settings["bayes"] = {"trials": config.bayes.trials, "seed": config.bayes.seed,
                                 "held_out_windows": config.bayes.held_out_windows}
        fingerprint = {k: v for k, v in settings.items() if k not in ("calibration", "target")}
        fingerprint["target"] = None if target_from is None else [target_from, config.target_weight]
        dtype_bytes = torch.finfo(config.output_dtype(reader.weight_dtype)).bits // 8
        source_bytes = torch.finfo(reader.weight_dtype).bits // 8
        total_params = reader.parameter_count()
        # The spectrum plan needs pass 1; a uniform plan of the same budget has its size within a step.
        sizing_config = (replace(config, allocate="uniform", spectra_file=None)
                         if config.allocate in FIRST_PASS_ALLOCATIONS else config)
        sizing_plan = model_plan(spec, sizing_config, layers, total_params, dtype_bytes)
        widest = {name: (min(spec.linear_shape(name)) if config.allocate != "uniform" else rank)
                  for name, rank in rank_plan(spec, config).items()}
        memory_parts = estimate_compress_memory(spec, widest, source_bytes, config.chunk_tokens, seqlen,
                                                runtime_bytes, np.dtype(PRECISIONS[config.precision]).itemsize,
                                                first_pass=config.allocate in FIRST_PASS_ALLOCATIONS
                                                and not (config.spectra_file and Path(config.spectra_file).is_file()))
        created = not output.exists()
        check_output_path(source, output)
        keep = tuple(p.name for p in map(Path, keep_files) if p.absolute().parent == output.absolute())
        try:
            with OutputLock(output):  # held until the last step that touches the folder
                progress = _start_or_resume(output, config.overwrite, arguments_fingerprint(fingerprint, tokens),
                                            source_fingerprint(reader), source_files(reader), keep)
                if progress.stage != "written":
                    _plan_and_run(reader, output, tokens, layers, config, progress, timer, monitor, target_from,
                                  runtime_bytes, memory_parts, dtype_bytes, total_params, sizing_plan)
                shutil.rmtree(output / WORK_FOLDER, ignore_errors=True)
                _fault_point("after-index")
                report = _write_report(reader, output, config, settings, progress, timer, monitor, start,
                                       memory_parts, report_file, eval_text, eval_seqlen, eval_max_windows)
                (output / PROGRESS_FILE).unlink(missing_ok=True)
        finally:
            if created:  # a run refused before it wrote anything leaves no folder behind
                _remove_if_empty(output)
    return report


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _plan_and_run(reader: CheckpointReader, output: Path, tokens: np.ndarray, layers: list[int],
                  config: CompressConfig, progress: Progress, timer: StageTimer, monitor: RSSMonitor,
                  target_from: int | None, runtime_bytes: int, memory_parts: dict[str, int], dtype_bytes: int,
                  total_params: int, sizing_plan: dict[str, int | None]) -> None:
    """Resources, the plan (pass 1, bayes) and the block loop, for a run whose model is not yet written."""
    spec = reader.spec
    damaged = damaged_shards(output, progress) if progress.blocks_done >= 0 else []
    activation_bytes = BlockCache.bytes_needed(tokens.size, Block.cached_widths(spec))
    if progress.blocks_done < 0:  # a resumed run has its two activation files already
        activation_bytes += 2 * tokens.size * spec.hidden_size * 4
    if damaged:  # redone from fresh activations beside the resumed run's
        activation_bytes += 2 * tokens.size * spec.hidden_size * 4
    if config.allocate in FIRST_PASS_ALLOCATIONS and not progress.plan:
        # pass 1 keeps every block's inputs from the first chosen block up, plus two gradient files
        activation_bytes += (spec.num_layers - min(layers) + 3) * tokens.size * spec.hidden_size * 4
    written = sum(p.stat().st_size for p in output.glob("model-*.safetensors"))
    check_resources(output, {"output": max(0, _output_bytes(spec, sizing_plan, dtype_bytes, config.compression_method) - written),
                             "activations": activation_bytes}, memory_parts)
    progress.save(output)  # from here on, a failed run's leftovers are resumable, not foreign
    try:
        _plan(reader, output, tokens, layers, config, progress, timer, target_from, dtype_bytes, total_params,
              sizing_plan)
        _run(reader, output, tokens, progress.plan, layers, config, progress, timer, monitor, target_from, damaged)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise ResourceError(f"no space left writing {exc.filename or output}: {exc.strerror}; "
                                "free some and rerun the same command to resume") from None
        raise OutputError(f"cannot write {exc.filename or output}: {exc.strerror}") from None


def _plan(reader: CheckpointReader, output: Path, tokens: np.ndarray, layers: list[int], config: CompressConfig,
          progress: Progress, timer: StageTimer, target_from: int | None, dtype_bytes: int, total_params: int,
          sizing_plan: dict[str, int | None]) -> None:
    """Every block linear's rank, fixed once (pass 1 and bayes when the allocation needs them) and
    recorded in the progress file, so that a resumed run keeps it."""
    spec, source = reader.spec, reader.folder
    if not progress.plan:
        spectra = None
        if config.allocate in FIRST_PASS_ALLOCATIONS:
            log.info("pass 1: output spectra of %d blocks", len(layers))
            pass_one = {"source": source_fingerprint(reader), "layers": layers, "modules": list(config.modules),
                        "centered": config.centered, "precision": config.precision}
            # with a target text, directions are priced by the target's statistics and loss alone
            priced_on = tokens if target_from is None else tokens[target_from:]
            spectra = collect_spectra(reader, priced_on, layers, list(config.modules), output / WORK_FOLDER,
                                      config.chunk_tokens, config.centered, PRECISIONS[config.precision], timer,
                                      saved=config.spectra_file,
                                      fingerprint=arguments_fingerprint(pass_one, priced_on))
        plan = (model_plan(spec, config, layers, total_params, dtype_bytes, spectra)
                if spectra is not None else sizing_plan)
        if config.allocate == "bayes":
            log.info("bayes: %d trials, each a compression scored on held-out calibration text", config.bayes.trials)
            slots = allocation_slots(spec, config, layers)
            plan = _bayes_plan(source, output, config, plan, spec, slots,
                               slot_budget(slots, config, total_params, dtype_bytes, sizing_plan), progress.trials)
        progress.plan = plan
        progress.save(output)


def _write_report(reader: CheckpointReader, output: Path, config: CompressConfig, settings: dict,
                  progress: Progress, timer: StageTimer, monitor: RSSMonitor, start: float,
                  memory_parts: dict[str, int], report_file: Path, eval_text, eval_seqlen: int,
                  eval_max_windows: int | None) -> Report:
    spec = reader.spec
    report = Report(
        command="compress", source=str(reader.folder), output=str(output), model_type=spec.model_type,
        num_layers=spec.num_layers, method=config.method, settings=settings, ranks=progress.ranks,
        parameters_before=reader.parameter_count(),
        parameters_after=CheckpointReader(output).parameter_count(),
        stage_seconds=timer.seconds, wall_seconds=time.perf_counter() - start,
        memory={**memory_summary(monitor), "source_bytes_on_disk": reader.size_on_disk(),
                "estimate": memory_parts, "estimated_peak_bytes": estimated_peak(memory_parts)},
    )
    if progress.trials:
        settings["bayes"]["scores"] = progress.trials
    log.info("compressed %s -> %s: parameters %.3f of the original",
             reader.folder, output, report.parameter_ratio or 0.0)
    if eval_text:
        evaluation = evaluate(output, eval_text, seqlen=eval_seqlen, max_windows=eval_max_windows,
                              chunk_tokens=config.chunk_tokens, work_dir=output / WORK_FOLDER)
        shutil.rmtree(output / WORK_FOLDER, ignore_errors=True)
        report.perplexity, report.evaluation = evaluation.perplexity, evaluation.evaluation
        report.stage_seconds["evaluate"] = evaluation.wall_seconds
        report.memory["evaluate_peak_rss_bytes"] = evaluation.memory["peak_rss_bytes"]
    _fault_point("after-evaluation")
    full_ranks = {name: min(spec.linear_shape(name)) for name in BLOCK_LINEARS}
    try:
        report.pictures = plots.report_pictures(report.to_dict(), full_ranks, report_file.parent, report_file.stem)
    except Exception as exc:  # a picture is never worth failing a finished compression for
        log.warning("could not draw the report's pictures: %s", exc)
    try:
        report.write(report_file)
    except OSError as exc:
        raise OutputError(f"cannot write the report {report_file}: {exc.strerror}") from None
    return report


def _bayes_plan(source: Path, output: Path, config: CompressConfig, base: dict[str, int | None], spec: ModelSpec,
                slots: list[allocation.Slot], budget: int, trials_out: list) -> dict[str, int | None]:
    """bayes.search over group multipliers of the spectrum plan `base`; each trial a streamed
    compression into the work folder, scored by streamed perplexity on the held-out calibration slice."""
    text = config.target_calibration or config.calibration
    held = held_out_windows(text, source, spec.vocab_size, config.bayes.held_out_windows)
    trial_folder = output / WORK_FOLDER / "bayes-trial"

    def score(ranks: dict[str, int | None]) -> float:
        trial = replace(config, allocate="uniform", target_params=None, target_size_gb=None, spectra_file=None,
                        ranks={**base, **ranks}, overwrite=True)
        compress(source, trial_folder, trial, report_path=output / WORK_FOLDER / "bayes-trial.json")
        return evaluate(trial_folder, (), windows=held, chunk_tokens=config.chunk_tokens,
                        work_dir=output / WORK_FOLDER).perplexity

    result = bayes.search(slots, budget, {slot.key: base[slot.key] for slot in slots}, score, config.bayes,
                          spec.num_layers)
    shutil.rmtree(trial_folder, ignore_errors=True)
    trials_out.extend(result.trials)
    return {**base, **result.ranks}


def damaged_shards(output: Path, progress: Progress) -> list[int]:
    """Numbers of the shards an interrupted run recorded as written that are now missing or truncated
    (1: the embedding; i + 2: block i), found before any work so that only they are redone."""
    damaged = []
    for name in sorted(set(progress.weight_map.values())):
        if not shard_is_complete(output / name):
            log.warning("shard %s of the interrupted run is missing or damaged: it is redone", name)
            damaged.append(int(name.split("-")[1]))
    return damaged


def _remove_stray_temporaries(output: Path) -> None:
    """Temporary files of a write that a kill interrupted (earlier versions wrote them beside the shards)."""
    for path in output.glob(".*tmp*"):
        if path.is_file():
            path.unlink()


def _run(reader: CheckpointReader, output: Path, tokens: np.ndarray, plan: dict[str, int | None],
         layers: list[int], config: CompressConfig, progress: Progress, timer: StageTimer,
         monitor: RSSMonitor, target_from: int | None = None, damaged: list[int] = ()) -> None:
    """The block loop. After every block, its shard and the next block's inputs are on disk before
    the progress record says so; a rerun picks up from there. Ends with the index in place and the
    progress record at stage "written"."""
    spec = reader.spec
    dtype = config.output_dtype(reader.weight_dtype)
    sequences, seqlen = tokens.shape
    chunk_sequences = max(1, config.chunk_tokens // seqlen)
    work = output / WORK_FOLDER
    writer = CheckpointWriter(output, spec.num_layers + 2, progress.weight_map)
    resuming = progress.blocks_done >= 0
    if resuming:
        _remove_stray_temporaries(output)
    cos, sin = Rotary(spec).cos_sin(seqlen)
    steps = _BlockSteps(reader, plan, config, chunk_sequences, timer, target_from, cos, sin, work)

    def record(blocks_done: int, inputs_file: str) -> None:
        progress.blocks_done = blocks_done
        progress.inputs_file = inputs_file
        progress.weight_map = dict(writer.weight_map)
        progress.save(output)

    if 1 in damaged:
        with timer("write"):
            writer.write_shard(1, {EMBED: reader.tensor(EMBED).to(dtype)}, scratch=work)
    redo = sorted(number - 2 for number in damaged if 2 <= number < spec.num_layers + 2)
    if redo:
        _redo_blocks(steps, writer, redo, tokens, dtype)
        record(progress.blocks_done, progress.inputs_file)
    if progress.blocks_done < spec.num_layers:
        activations = ActivationPair(work, sequences, seqlen, spec.hidden_size,
                                     inputs_name=progress.inputs_file if resuming else None)
        finished = False
        try:
            if not resuming:
                with timer("read"):
                    embedding = reader.tensor(EMBED)
                with timer("write"):
                    writer.write_shard(1, {EMBED: embedding.to(dtype)}, scratch=work)
                if config.compression_method.uses_calibration:
                    with timer("forward"):
                        embed_into(embedding, tokens, activations.inputs, chunk_sequences)
                        activations.inputs.sync()
                del embedding
                record(0, activations.inputs.path.name)
            log.info("compressing blocks %d..%d", progress.blocks_done + 1, spec.num_layers,
                     extra={"progress": (progress.blocks_done, spec.num_layers, "compress")})
            for index in range(progress.blocks_done, spec.num_layers):
                monitor.mark(f"block {index}")
                block = steps.compress(index, activations)
                with timer("write"):
                    writer.write_shard(index + 2, _block_tensors(block, index, dtype), scratch=work,
                                       before_rename=lambda: _fault_point(f"writing-block-{index}"))
                for name, rank in block_plan(plan, index).items():
                    progress.ranks[f"{block_prefix(index)}{name}"] = rank
                record(index + 1, activations.inputs.path.name)
                _fault_point(f"after-block-{index}")
                del block
                release_freed_memory()
                log.info("block %d/%d done", index + 1, spec.num_layers,
                         extra={"progress": (index + 1, spec.num_layers, "compress")})
            finished = True
        finally:
            # Kept on failure or interruption: the activations are what a rerun resumes from.
            activations.close(remove=finished)
            steps.close()
    steps.close()
    with timer("write"):
        _write_tail(reader, writer, config, layers, progress, dtype, sequences, seqlen, work)
    _fault_point("after-tail")
    progress.weight_map = dict(writer.weight_map)
    progress.stage = "written"
    progress.save(output)


class _BlockSteps:
    """Compressing one block of the source: read it, compress it group by group on its inputs (when the
    method needs calibration), and hand its outputs on as the next block's inputs."""

    def __init__(self, reader: CheckpointReader, plan: dict[str, int | None], config: CompressConfig,
                 chunk_sequences: int, timer: StageTimer, target_from: int | None, cos: torch.Tensor,
                 sin: torch.Tensor, work: Path):
        self.reader, self.plan, self.config = reader, plan, config
        self.chunk_sequences, self.timer, self.target_from = chunk_sequences, timer, target_from
        self.cos, self.sin, self.work = cos, sin, work
        self._cache: BlockCache | None = None

    def cache(self, shape: tuple[int, int]) -> BlockCache:
        if self._cache is None:
            spec = self.reader.spec
            self._cache = BlockCache(self.work, *shape, Block.cached_widths(spec))
        return self._cache

    def compress(self, index: int, activations: ActivationPair | None) -> Block:
        spec = self.reader.spec
        with self.timer("read"):
            block = Block.from_tensors(spec, self.reader.block_tensors(index))
        # the last block's outputs feed nothing; nor do any, for weight-space SVD
        uses_calibration = self.config.compression_method.uses_calibration
        has_next = activations is not None and index + 1 < spec.num_layers and uses_calibration
        inputs = activations.inputs if activations is not None else None
        cache = self.cache(inputs.shape[:2]) if inputs is not None and uses_calibration else None
        compress_block(block, block_plan(self.plan, index), inputs, activations.outputs if has_next else None,
                       cache, self.cos, self.sin, self.config, self.chunk_sequences, self.timer,
                       block_label=block_prefix(index), target_from=self.target_from)
        _fault_point(f"during-block-{index}")
        if has_next:
            activations.outputs.sync()
            activations.swap()
        return block

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()
            self._cache = None


def _redo_blocks(steps: _BlockSteps, writer: CheckpointWriter, redo: list[int], tokens: np.ndarray,
                 dtype: torch.dtype) -> None:
    """Rewrite the shards of the blocks in `redo` (finished before, lost since). Each block's inputs
    come from compressing the blocks before it again, from the embeddings up (deterministic: the same
    bytes as before); only the lost shards are written."""
    reader, config = steps.reader, steps.config
    log.info("redoing block(s) %s (their shards were lost)", ", ".join(map(str, redo)))
    activations = None
    if config.compression_method.uses_calibration:
        sequences, seqlen = tokens.shape
        activations = ActivationPair(steps.work / "redo", sequences, seqlen, reader.spec.hidden_size)
        with steps.timer("forward"):
            embed_into(reader.tensor(EMBED), tokens, activations.inputs, steps.chunk_sequences)
    try:
        for index in (redo if activations is None else range(max(redo) + 1)):
            block = steps.compress(index, activations)
            if index in redo:
                with steps.timer("write"):
                    writer.write_shard(index + 2, _block_tensors(block, index, dtype), scratch=steps.work)
            del block
    finally:
        if activations is not None:
            activations.close(remove=True)
        steps.close()
        shutil.rmtree(steps.work / "redo", ignore_errors=True)


def _write_tail(reader: CheckpointReader, writer: CheckpointWriter, config: CompressConfig, layers: list[int],
                progress: Progress, dtype: torch.dtype, sequences: int, seqlen: int, work: Path) -> None:
    """The final norm and head, then config, tokenizer and the index (last: it marks the model complete)."""
    spec = reader.spec
    tail = [FINAL_NORM] + ([] if spec.tie_word_embeddings else [LM_HEAD])
    writer.write_shard(spec.num_layers + 2, {k: v.to(dtype) for k, v in reader.read(tail).items()}, scratch=work)
    out_config = dict(reader.config)
    out_config["torch_dtype"] = str(dtype).removeprefix("torch.")
    if "dtype" in out_config:  # transformers 5 writes "dtype"
        out_config["dtype"] = out_config["torch_dtype"]
    out_config["streamrom"] = {
        "format_version": FORMAT_VERSION,
        "method": config.method,
        "allocate": config.allocate,
        "target_params": config.target_params,
        "target_size_gb": config.target_size_gb,
        "ratio": config.ratio,
        "rank": config.rank,
        "layers": layers,
        "ranks": progress.ranks,
        "factor_tensors": {
            "reduce": "<linear>.reduce.weight: (rank, in) = Vᵀ W; <linear>.reduce.bias = Vᵀ b",
            "expand": "<linear>.expand.weight: (out, rank) = V; <linear>.expand.bias = (I − V Vᵀ) μ (centered only)",
        },
        "calibration": {"sequences": sequences, "seqlen": seqlen, "seed": config.calibration.seed},
    }
    # transformers builds the factored model from the file beside it (trust_remote_code=True)
    model_class = HF_MODEL_CLASSES[spec.model_type]
    out_config["auto_map"] = {"AutoModelForCausalLM": f"{HF_MODELING_FILE.stem}.{model_class}"}
    out_config["architectures"] = [model_class]
    writer.finish(out_config, [*reader.tokenizer_files(), HF_MODELING_FILE])
