"""The streaming compressor, in four stages with data flowing one way:

    prepare (read headers, tokenize, fingerprint, size, estimate)  ─►  plan (compression/planning.py: allocation,
    pass 1, bayes)  ─►  execute (compression/execute.py: the streamed block loop)  ─►  report (evaluation, pictures)

`compress` runs them under the output's lock, resumable at every point; a bayes trial runs only the
execute stage (and its scoring) on what prepare holds.
"""
from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil
import torch

from ..report import plots
from . import time_estimate
from ..stream.activations import BlockCache
from ..stream.calibration import calibration_tokens, held_out_windows, spread_count
from ..storage.checkpoint import CheckpointReader, check_output_path, clear_folder
from ..storage.layout import check_free_disk, check_report_path
from ..storage.locking import private_folder
from .config import FIRST_PASS_ALLOCATIONS, PRECISIONS, CompressConfig, parse_layers  # noqa: F401 (the API)
from ..errors import InputError, OutputError, ResourceError, write_failure
from ..stream.evaluation import evaluate
from .execute import WORK_FOLDER, damaged_shards, write_model
from ..faults import fault_point
from ..report.memory import (RSSMonitor, current_rss_bytes, estimate_compress_memory, estimated_peak,
                             keep_large_buffers_off_the_heap)
from .methods import Method
from ..model.modeling import BLOCK_LINEARS, ModelSpec, block_class
from .plans import ModelPlan
from .units import UNIT_COMPRESSION
from .planning import (PROGRESS_ORDERS, STUDY_ORDERS, TrialScorer, active_units, join_study, model_plan, plan_ranks,
                       rank_plan, recorded_orders, search_space)
from .progress import (LOCK_FILE, PROGRESS_FILE, OutputLock, Progress, arguments_fingerprint, changed_source_file,
                       source_files, source_fingerprint)
from ..report.report import Report, StageTimer, memory_summary
from .spectra import read_saved as read_saved_spectra
from .statistics import WIDE

if TYPE_CHECKING:
    from ..linalg.bayes import SearchResult

log = logging.getLogger(__name__)

REPORT_FILE = "streamrom-report.json"
WORKER_FOLDER_PREFIX = "streamrom-worker-"  # a tune-worker's trial models, under --work-dir


@dataclass
class Prepared:
    """What the prepare stage found, read once and shared by every later stage (and every bayes trial)."""

    config: CompressConfig
    reader: CheckpointReader
    layers: list[int]
    tokens: np.ndarray  # (sequences, seqlen): the general text's sequences, then the target's
    target_from: int | None  # where the target text's sequences start (None: no target text)
    settings: dict[str, Any]
    fingerprint: dict[str, Any]
    dtype_bytes: int  # of the output tensors
    total_params: int
    sizing_plan: ModelPlan  # a plan of the run's size (uniform), before pass 1 prices directions
    memory_parts: dict[str, int]
    projected_seconds: dict[str, Any] = field(default_factory=dict)  # time_estimate.project, with its probe
    _held_out: np.ndarray | None = field(default=None, repr=False)

    @property
    def spec(self) -> ModelSpec:
        return self.reader.spec

    def held_out_windows(self) -> np.ndarray:
        """bayes: the calibration text's held-out windows that score a trial (tokenized once)."""
        if self._held_out is None:
            text = self.config.target_calibration or self.config.calibration
            self._held_out = held_out_windows(text, self.reader.folder, self.spec.vocab_size,
                                              self.config.bayes.held_out_windows)
        return self._held_out


def prepare(source: Path, config: CompressConfig, timer: StageTimer, runtime_bytes: int) -> Prepared:
    """Headers, calibration tokens, the settings record and fingerprint, the run's size and memory estimate."""
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
    settings = config.record(layers, sequences, seqlen, target_from)
    dtype_bytes = torch.finfo(config.output_dtype(reader.weight_dtype)).bits // 8
    source_bytes = torch.finfo(reader.weight_dtype).bits // 8
    total_params = reader.parameter_count()
    # The spectrum plan needs pass 1; a uniform plan of the same budget has its size within a step.
    sizing_config = (replace(config, allocate="uniform", spectra_file=None, neuron_selection="obs",
                             pass1_tokens=None, bayes=replace(config.bayes, study=None, study_name=None))
                     if config.allocate in FIRST_PASS_ALLOCATIONS else config)
    sizing_plan = model_plan(spec, sizing_config, layers, total_params, dtype_bytes)
    widest = {name: (min(spec.linear_shape(name)) if config.allocate != "uniform" else rank)
              for name, rank in rank_plan(spec, config).items() if name in BLOCK_LINEARS}
    memory_parts = estimate_compress_memory(spec, widest, source_bytes, config.chunk_tokens, seqlen,
                                            runtime_bytes, np.dtype(PRECISIONS[config.precision]).itemsize,
                                            first_pass=config.allocate in FIRST_PASS_ALLOCATIONS
                                            and not (config.spectra_file and Path(config.spectra_file).is_file()),
                                            unit_width=max((unit.read_width(spec) for unit in active_units(spec, config)),
                                                           default=0),
                                            anchored=config.anchored, refined=config.refine_steps > 0,
                                            unit_order_given=config.neuron_selection == "pass1")
    projected = projected_time(spec, config, layers, tokens.shape, reader.size_on_disk())
    log.info("projected: about %s on this machine (%s); memory peak about %.2f GiB",
             _duration(projected["seconds"]["total"]),
             ", ".join(f"{stage} {_duration(value)}" for stage, value in projected["seconds"].items()
                       if stage != "total" and value >= 1), estimated_peak(memory_parts) / 2 ** 30)
    return Prepared(config, reader, layers, tokens, target_from, settings, config.fingerprint(settings, target_from),
                    dtype_bytes, total_params, sizing_plan, memory_parts, projected)


SHORT_NAMES = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v", "self_attn.o_proj": "o",
               "mlp.gate_proj": "gate", "mlp.up_proj": "up", "mlp.down_proj": "down"}


def projected_time(spec: ModelSpec, config: CompressConfig, layers: list[int], token_shape: tuple[int, int],
                   source_bytes: int) -> dict[str, Any]:
    """time_estimate.project for this run: the linears pass 2 factors and the units it narrows in each
    chosen block (mixed: every unit, its usual choice at sizes that pay), what pass 1 prices, after a
    probe of this machine's speed."""
    method = config.compression_method
    units = [unit.name for unit in active_units(spec, config)] if method.uses_calibration else []
    in_units = {name for unit in active_units(spec, config) for name in unit.linears} if units else set()
    modules = [SHORT_NAMES[name] for name in config.modules if name in SHORT_NAMES]
    factored = [] if method.mixed else [SHORT_NAMES[name] for name in config.modules
                                        if name in SHORT_NAMES and name not in in_units]
    first_pass = (config.allocate in FIRST_PASS_ALLOCATIONS
                  and not (config.spectra_file and Path(config.spectra_file).is_file()))
    priced = modules if method.mixed else factored
    shapes = time_estimate.Shapes(spec.hidden_size, spec.intermediate_size, spec.num_heads, spec.num_kv_heads,
                                  spec.head_dim, spec.vocab_size, spec.num_layers, len(layers),
                                  token_shape[0] * token_shape[1], token_shape[1], source_bytes,
                                  spread_count(*token_shape, config.pass1_tokens) * token_shape[1])
    speed = time_estimate.probe(spec.hidden_size, PRECISIONS[config.precision])
    ordered = config.neuron_selection == "pass1"
    unit_work = [UNIT_COMPRESSION[name].work(shapes, speed, ordered) for name in units]
    # the refinement's mini-batch: half a forward chunk (block_compression.compress_block)
    refine = {"refine_steps": config.refine_steps,
              "refine_batch_tokens": max(1, max(1, config.chunk_tokens // token_shape[1]) // 2) * token_shape[1]}
    seconds = time_estimate.project(shapes, speed, factored, unit_work, first_pass, priced, **refine)
    if config.allocate == "bayes":  # every trial compresses again (pass 2) and scores a few windows
        trials = config.bayes.trials
        second = time_estimate.project(shapes, speed, factored, unit_work, False, priced, **refine)
        seconds = {stage: value + (trials - 1) * second[stage] for stage, value in seconds.items()}
    return {"seconds": {stage: round(value, 3) for stage, value in seconds.items()},
            "probe": {"multiply_adds_per_second": speed.multiply_adds_per_second,
                      "eigen_seconds": speed.eigen_seconds, "eigen_size": speed.eigen_size}}


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def tune_worker(storage: str, study_name: str, source: str | Path | None = None,
                work_dir: str | Path | None = None, wait_seconds: float = 0) -> tuple["SearchResult", int]:
    """Join the shared bayes study `study_name` on `storage` (made by `compress` with --study) and run its
    trials until the search has all of them. The settings, calibration and base plan come from the
    study; the source checkpoint from the path the study records unless `source` says where it lies on
    this machine. Trials are written in a temporary folder under `work_dir` (default: the system's).
    `wait_seconds`: how long to wait for the study to appear (workers started before the compress command).
    Returns the study's result and how many trials this process ran."""
    from .config import config_from_json
    from .study import SharedSearch

    timer = StageTimer()
    runtime_bytes = current_rss_bytes()
    record = SharedSearch(storage, study_name, create=False, wait_seconds=wait_seconds).wait_for_record()
    config = config_from_json(record["config"])
    config = replace(config, spectra_file=None, overwrite=False,
                     bayes=replace(config.bayes, study=storage, study_name=study_name))
    source = Path(source) if source is not None else Path(record["source"])
    if not source.is_dir():
        raise InputError(f"the study's source checkpoint {source} is not on this machine: give its path with --source")
    with RSSMonitor() as monitor:
        prepared = prepare(source, config, timer, runtime_bytes)
        shared = join_study(prepared, create=False, name=study_name)
        with private_folder(work_dir, WORKER_FOLDER_PREFIX) as work:
            base = ModelPlan.from_record(record["base"], prepared.spec.num_layers)
            scorer = TrialScorer(prepared, work, base, monitor,
                                 recorded_orders(prepared, record.get("orders", {}), STUDY_ORDERS))
            shared.run(search_space(prepared, base), scorer)
        return shared.result(), len(scorer.seconds)


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
    if config.bayes.study and config.allocate == "bayes":  # a bad URL is said before the output exists
        from .study import check_storage

        check_storage(config.bayes.study)
    keep_large_buffers_off_the_heap()
    timer = StageTimer()
    start = time.perf_counter()
    runtime_bytes = current_rss_bytes()
    with RSSMonitor() as monitor:
        prepared = prepare(source, config, timer, runtime_bytes)
        created = not output.exists()
        check_output_path(source, output)
        keep = tuple(p.name for p in map(Path, keep_files) if p.absolute().parent == output.absolute())
        try:
            with OutputLock(output):  # held until the last step that touches the folder
                progress = _start_or_resume(output, config.overwrite,
                                            arguments_fingerprint(prepared.fingerprint, prepared.tokens),
                                            source_fingerprint(prepared.reader), source_files(prepared.reader), keep)
                if progress.stage != "written":
                    _plan_and_execute(prepared, output, progress, timer, monitor)
                shutil.rmtree(output / WORK_FOLDER, ignore_errors=True)
                fault_point("after-index")
                report = _write_report(prepared, output, progress, timer, monitor, start, report_file,
                                       eval_text, eval_seqlen, eval_max_windows)
                (output / PROGRESS_FILE).unlink(missing_ok=True)
        finally:
            if created:  # a run refused before it wrote anything leaves no folder behind
                _remove_if_empty(output)
    return report


def _plan_and_execute(prepared: Prepared, output: Path, progress: Progress, timer: StageTimer,
                      monitor: RSSMonitor) -> None:
    """Resources, then the plan and the block loop, for a run whose model is not yet written."""
    spec, config, tokens = prepared.spec, prepared.config, prepared.tokens
    damaged = damaged_shards(output, progress) if progress.blocks_done >= 0 else []
    activation_bytes = BlockCache.bytes_needed(tokens.size, block_class(spec).cached_widths(spec))
    if progress.blocks_done < 0:  # a resumed run has its two activation files already
        activation_bytes += 2 * tokens.size * spec.hidden_size * 4
    if damaged:  # redone from fresh activations beside the resumed run's
        activation_bytes += 2 * tokens.size * spec.hidden_size * 4
    if config.anchored:
        # the dense stream: one block's anchored values, its two activation files (a resumed run has
        # them; lost shards need a second pair)
        pair = 2 * tokens.size * spec.hidden_size * 4
        activation_bytes += (_dense_stream_bytes(spec, tokens) - pair + pair * (progress.blocks_done < 0)
                             + pair * bool(damaged))
    if config.allocate in FIRST_PASS_ALLOCATIONS and not progress.plan:
        # pass 1 keeps every block's inputs from the first chosen block up, plus two gradient files
        activation_bytes += (spec.num_layers - min(prepared.layers) + 3) * tokens.size * spec.hidden_size * 4
        # and, during a block's backward, the values of each moment too wide to sum beside the graph
        # (the most there can be: the attention's and the MLP's inputs, o_proj's and down's)
        widths = (spec.hidden_size, spec.num_heads * spec.head_dim, spec.hidden_size, spec.intermediate_size)
        activation_bytes += tokens.size * sum(width for width in widths if width > WIDE) * 4
    written = sum(p.stat().st_size for p in output.glob("model-*.safetensors"))
    output_bytes = _output_bytes(spec, prepared.sizing_plan, prepared.dtype_bytes, config.compression_method)
    check_resources(output, {"output": max(0, output_bytes - written), "activations": activation_bytes},
                    prepared.memory_parts)
    progress.save(output)  # from here on, a failed run's leftovers are resumable, not foreign
    try:
        plan_ranks(prepared, output, progress, timer, monitor)
        write_model(prepared.reader, output, tokens, ModelPlan.from_record(progress.plan, spec.num_layers),
                    prepared.layers, config, progress, timer, monitor, prepared.target_from, damaged,
                    recorded_orders(prepared, progress.orders, PROGRESS_ORDERS))
    except OSError as exc:
        raise write_failure(exc, output, "; free some and rerun the same command to resume") from None


def _dense_stream_bytes(spec: ModelSpec, tokens: np.ndarray) -> int:
    """The anchored fits' disk: the dense stream's two activation files and one block's anchored values
    (the inputs of q/k/v, o and gate/up, and down's output, or the block's where down is narrowed)."""
    return tokens.size * (2 * spec.hidden_size + 3 * spec.hidden_size + spec.num_heads * spec.head_dim) * 4


def _output_bytes(spec: ModelSpec, plan: ModelPlan, dtype_bytes: int, method: Method) -> int:
    """Size of the compressed checkpoint's tensors, from the model's rank plan (and unit widths)."""
    params = sum(math.prod(shape) for shape in spec.global_shapes().values())
    narrowed = spec.narrowed(plan.block_widths())
    for index in range(spec.num_layers):
        dense = narrowed.dense_block_shapes(index)
        for name, shape in dense.items():
            linear, _, kind = name.rpartition(".")
            rank = plan.blocks[index].ranks.get(linear)
            if not rank:
                params += math.prod(shape)
            elif kind == "weight":  # the linear's replacement, its bias included
                params += method.parameters(*shape, rank, f"{linear}.bias" in dense)
    return params * dtype_bytes


def check_resources(output: Path, disk_needed: dict[str, int], memory_parts: dict[str, int]) -> None:
    """Fail before the long work when the disk or the memory cannot hold the run."""
    gib = 2 ** 30
    check_free_disk(output, disk_needed)
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
    Progress.discard_unplaced(output)
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


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:
        pass


def _write_report(prepared: Prepared, output: Path, progress: Progress, timer: StageTimer, monitor: RSSMonitor,
                  start: float, report_file: Path, eval_text, eval_seqlen: int, eval_max_windows: int | None) -> Report:
    reader, config, settings, spec = prepared.reader, prepared.config, prepared.settings, prepared.spec
    memory_parts = prepared.memory_parts
    report = Report(
        command="compress", source=str(reader.folder), output=str(output), model_type=spec.model_type,
        num_layers=spec.num_layers, method=config.method, settings=settings, ranks=progress.ranks,
        parameters_before=prepared.total_params,
        parameters_after=CheckpointReader(output).parameter_count(),
        stage_seconds=timer.seconds, wall_seconds=time.perf_counter() - start,
        projected_seconds=prepared.projected_seconds,
        memory={**memory_summary(monitor), "source_bytes_on_disk": reader.size_on_disk(),
                "estimate": memory_parts, "estimated_peak_bytes": estimated_peak(memory_parts)},
    )
    if config.anchored:
        report.disk["dense_stream_bytes"] = _dense_stream_bytes(spec, prepared.tokens)
    if "bayes" in settings:  # (a record edited to hold trials of another run's kind says nothing here)
        if progress.trials:
            settings["bayes"]["scores"] = progress.trials
        if progress.study:
            settings["bayes"]["study_name"] = progress.study
    log.info("compressed %s -> %s: parameters %.3f of the original",
             reader.folder, output, report.parameter_ratio or 0.0)
    if eval_text:
        evaluation = evaluate(output, eval_text, seqlen=eval_seqlen, max_windows=eval_max_windows,
                              chunk_tokens=config.chunk_tokens, work_dir=output / WORK_FOLDER)
        shutil.rmtree(output / WORK_FOLDER, ignore_errors=True)
        report.perplexity, report.evaluation = evaluation.perplexity, evaluation.evaluation
        report.stage_seconds["evaluate"] = evaluation.wall_seconds
        report.memory["evaluate_peak_rss_bytes"] = evaluation.memory["peak_rss_bytes"]
    fault_point("after-evaluation")
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
