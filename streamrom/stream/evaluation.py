"""Perplexity, streamed block by block with the same memory bound as compression; with a reference
model (the dense one), also how far the compressed model's next-token distribution moved from it:
the mean KL divergence KL(P_reference ‖ P_model) per predicted token, and the share of positions
whose most likely token is the same (what llama.cpp's perplexity tool reports for quantised models).
Both models run through the same windows one after the other, each one block at a time; only their
last hidden states stay (on disk) for the comparison at the head."""
from __future__ import annotations

import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .activations import ActivationPair, chunk_ranges, embed_into
from .calibration import load_tokenizer, text_windows
from ..storage.checkpoint import CheckpointReader
from ..errors import OutputError, UsageError
from ..report.memory import RSSMonitor
from .head import LossHead
from ..storage.layout import check_free_disk
from ..model.modeling import EMBED, Rotary
from ..report.report import Report, StageTimer, memory_summary
from .streaming import forward_blocks

log = logging.getLogger(__name__)

def _check_disk(folder: Path, needed: int) -> None:
    """The two activation files must fit before the work starts."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        check_free_disk(folder, {"activations": needed})
    except OSError as exc:
        raise OutputError(f"cannot use {folder} for the activation files: {exc.strerror}") from None


def _final_hidden(reader: CheckpointReader, windows: np.ndarray, folder: Path, chunk_sequences: int,
                  timer: StageTimer, stage: str) -> tuple[ActivationPair, torch.Tensor]:
    """The windows through every block of `reader`'s model: the pair whose inputs hold the last hidden
    states (nameless files, gone when closed), and the token embedding (a tied head reuses it)."""
    spec = reader.spec
    seqlen = windows.shape[1]
    activations = ActivationPair(folder, len(windows), seqlen, spec.hidden_size, anonymous=True)
    try:
        with timer("read"):
            embedding = reader.tensor(EMBED)
        with timer("forward"):
            embed_into(embedding, windows, activations.inputs, chunk_sequences, spec.embedding_scale)
        if not spec.tie_word_embeddings:
            embedding = None
        forward_blocks(reader, activations, *Rotary(spec).cos_sin(seqlen), chunk_sequences, timer, stage)
    except BaseException:
        activations.close()
        raise
    return activations, embedding


def closeness(head: LossHead, hidden: torch.Tensor, reference_head: LossHead,
              reference_hidden: torch.Tensor) -> tuple[float, int]:
    """Summed KL(P_reference ‖ P_model) over the positions of `hidden` (batch, positions, hidden) and
    how many positions agree on their most likely next token."""
    divergence, agree = 0.0, 0
    for part in head.slices(hidden.shape[1]):
        model = head.log_probs(hidden[:, part])
        reference = reference_head.log_probs(reference_hidden[:, part])
        divergence += F.kl_div(model, reference, log_target=True, reduction="sum").item()
        agree += int((model.argmax(-1) == reference.argmax(-1)).sum())
    return divergence, agree


@torch.no_grad()
def evaluate(checkpoint: str | Path, text_files: list[Path] | tuple[Path, ...], seqlen: int = 512,
             max_windows: int | None = None, chunk_tokens: int = 2048,
             work_dir: str | Path | None = None, report_path: str | Path | None = None,
             windows: np.ndarray | None = None, reference: str | Path | None = None) -> Report:
    """Perplexity of a (dense or compressed) checkpoint over non-overlapping `seqlen` windows.

    Every window predicts its tokens 1..L-1 from the ones before; the perplexity is exp of the mean
    negative log-likelihood over all predicted tokens. `windows` (sequences x length token ids)
    replaces the text files' windows where given. With `reference` (a checkpoint of the same
    vocabulary, e.g. the dense source), the report's evaluation also holds the mean KL divergence of
    this model's next-token distribution from the reference's and their top-1 agreement.
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
            reference_reader = CheckpointReader(reference) if reference is not None else None
        spec = reader.spec
        if reference_reader is not None and reference_reader.spec.vocab_size != spec.vocab_size:
            raise UsageError(f"the reference {reference} has a vocabulary of {reference_reader.spec.vocab_size} "
                             f"tokens, {checkpoint} one of {spec.vocab_size}: they cannot be compared")
        if windows is None:
            with timer("tokenize"):
                windows = text_windows(load_tokenizer(checkpoint), text_files, spec.vocab_size, seqlen, max_windows,
                                       f"the tokenizer of {checkpoint}")
        seqlen = windows.shape[1]
        chunk_sequences = max(1, chunk_tokens // seqlen)
        folder = Path(work_dir) if work_dir is not None else Path(tempfile.gettempdir())
        models = 2 if reference_reader is None else 2 + 2 * reference_reader.spec.hidden_size / spec.hidden_size
        _check_disk(folder, int(models * windows.size * spec.hidden_size * 4))
        compared = None
        if reference_reader is not None:  # the reference first: only its last hidden states stay
            compared = _final_hidden(reference_reader, windows, folder, chunk_sequences, timer, "eval reference")
        try:
            activations, embedding = _final_hidden(reader, windows, folder, chunk_sequences, timer, "eval")
            try:
                with timer("read"):
                    head = LossHead(reader, embedding)
                    reference_head = None if compared is None else LossHead(reference_reader, compared[1])
                    del embedding
                total_nll, count, divergence, agree = 0.0, 0, 0.0, 0
                with timer("forward"):
                    for begin, end in chunk_ranges(len(windows), 1):  # one window at a time: the logits are large
                        targets = torch.from_numpy(np.ascontiguousarray(windows[begin:end, 1:], dtype=np.int64))
                        hidden = activations.inputs.read(begin, end)[:, :-1]
                        total_nll += head.loss(hidden, targets)
                        count += targets.numel()
                        if reference_head is not None:
                            window_kl, window_agree = closeness(head, hidden, reference_head,
                                                                compared[0].inputs.read(begin, end)[:, :-1])
                            divergence += window_kl
                            agree += window_agree
            finally:
                activations.close()
        finally:
            if compared is not None:
                compared[0].close()
    perplexity = math.exp(total_nll / count)
    report = Report(
        command="eval", source=str(checkpoint), model_type=spec.model_type, num_layers=spec.num_layers,
        method=(reader.config.get("streamrom") or {}).get("method", "dense"),
        ranks=(reader.config.get("streamrom") or {}).get("ranks", {}),
        parameters_after=reader.parameter_count(), perplexity=perplexity,
        evaluation={"text_files": [str(p) for p in text_files], "seqlen": seqlen,
                    "windows": len(windows), "predicted_tokens": count,
                    "mean_nll": total_nll / count,
                    **({} if reference is None else {"reference": str(reference), "mean_kl": divergence / count,
                                                     "top1_agreement": agree / count})},
        stage_seconds=timer.seconds, wall_seconds=time.perf_counter() - start,
        memory={**memory_summary(monitor), "source_bytes_on_disk": reader.size_on_disk()},
    )
    if report_path is not None:
        report.write(Path(report_path))
    return report
