"""Perplexity, streamed block by block with the same memory bound as compression."""
from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .activations import ActivationPair, chunk_ranges, embed_into
from .calibration import check_vocabulary, evaluation_windows, load_tokenizer, tokenize_files
from .checkpoint import CheckpointReader
from .errors import OutputError, UsageError
from .memory import RSSMonitor
from .head import LossHead
from .layout import check_free_disk
from .modeling import EMBED, Rotary
from .report import Report, StageTimer, memory_summary
from .streaming import forward_blocks

log = logging.getLogger(__name__)

def _check_disk(folder: Path, needed: int) -> None:
    """The two activation files must fit before the work starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        check_free_disk(folder, {"activations": needed})
    except OSError as exc:
        raise OutputError(f"cannot use {folder} for the activation files: {exc.strerror}") from None


@torch.no_grad()
def evaluate(checkpoint: str | Path, text_files: list[Path] | tuple[Path, ...], seqlen: int = 512,
             max_windows: int | None = None, chunk_tokens: int = 2048,
             work_dir: str | Path | None = None, report_path: str | Path | None = None,
             windows: np.ndarray | None = None) -> Report:
    """Perplexity of a (dense or compressed) checkpoint over non-overlapping `seqlen` windows.

    Every window predicts its tokens 1..L-1 from the ones before; the perplexity is exp of the mean
    negative log-likelihood over all predicted tokens. `windows` (sequences x length token ids)
    replaces the text files' windows where given.
    """
    if seqlen < 2:
        raise UsageError(f"--seqlen must be at least 2, got {seqlen}")
    if max_windows is not None and max_windows < 1:
        raise UsageError(f"--max-windows must be at least 1, got {max_windows}")
    checkpoint = Path(checkpoint)
    timer = StageTimer()
    start = time.perf_counter()
    with RSSMonitor() as monitor:
        with timer("read"):
            reader = CheckpointReader(checkpoint)
        spec = reader.spec
        if windows is None:
            with timer("tokenize"):
                stream = check_vocabulary(tokenize_files(load_tokenizer(checkpoint), text_files),
                                          spec.vocab_size, f"the tokenizer of {checkpoint}")
                windows = evaluation_windows(stream, seqlen, max_windows)
        seqlen = windows.shape[1]
        chunk_sequences = max(1, chunk_tokens // seqlen)
        folder = Path(work_dir) if work_dir is not None else Path(tempfile.gettempdir())
        _check_disk(folder, 2 * windows.size * spec.hidden_size * 4)
        activations = ActivationPair(folder, len(windows), seqlen, spec.hidden_size, anonymous=True)
        try:
            with timer("read"):
                embedding = reader.tensor(EMBED)
            with timer("forward"):
                embed_into(embedding, windows, activations.inputs, chunk_sequences, spec.embedding_scale)
            if not spec.tie_word_embeddings:
                del embedding
            cos, sin = Rotary(spec).cos_sin(seqlen)
            forward_blocks(reader, activations, cos, sin, chunk_sequences, timer, "eval")
            with timer("read"):
                head = LossHead(reader, embedding if spec.tie_word_embeddings else None)
            total_nll, count = 0.0, 0
            with timer("forward"):
                for begin, end in chunk_ranges(len(windows), 1):  # one window at a time: the logits are large
                    targets = torch.from_numpy(np.ascontiguousarray(windows[begin:end, 1:], dtype=np.int64))
                    total_nll += head.loss(activations.inputs.read(begin, end)[:, :-1], targets)
                    count += targets.numel()
        finally:
            activations.close()
    perplexity = math.exp(total_nll / count)
    report = Report(
        command="eval", source=str(checkpoint), model_type=spec.model_type, num_layers=spec.num_layers,
        method=(reader.config.get("streamrom") or {}).get("method", "dense"),
        ranks=(reader.config.get("streamrom") or {}).get("ranks", {}),
        parameters_after=reader.parameter_count(), perplexity=perplexity,
        evaluation={"text_files": [str(p) for p in text_files], "seqlen": seqlen,
                    "windows": len(windows), "predicted_tokens": count,
                    "mean_nll": total_nll / count},
        stage_seconds=timer.seconds, wall_seconds=time.perf_counter() - start,
        memory={**memory_summary(monitor), "source_bytes_on_disk": reader.size_on_disk()},
    )
    if report_path is not None:
        report.write(Path(report_path))
    return report
