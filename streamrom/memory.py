"""Measured memory: resident set size sampled in a thread, plus the operating system's own peak."""
from __future__ import annotations

import math
import resource
import sys
import threading
import time

import psutil


def os_peak_rss_bytes() -> int:
    """The kernel's record of this process's peak RSS (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


class RSSMonitor:
    """Samples RSS every `interval` seconds while running; keeps the peak and a (time, bytes) timeline."""

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.marks: list[tuple[float, str]] = []
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-monitor", daemon=True)
        self._start = 0.0

    def __enter__(self) -> "RSSMonitor":
        self._start = time.perf_counter()
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def mark(self, label: str) -> None:
        """Note an event (e.g. a block boundary) on the timeline."""
        self.marks.append((time.perf_counter() - self._start, label))

    def _sample(self) -> None:
        self.samples.append((time.perf_counter() - self._start, self._process.memory_info().rss))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    @property
    def peak_bytes(self) -> int:
        return max(rss for _, rss in self.samples) if self.samples else 0


def current_rss_bytes() -> int:
    return psutil.Process().memory_info().rss


def estimate_compress_memory(spec, plan: dict, source_bytes: int, chunk_tokens: int, seqlen: int,
                             runtime_bytes: int) -> dict[str, int]:
    """The parts of a compression's peak RSS, from shapes alone (bytes).

    runtime: the interpreter, torch and the tokenizer, as measured before the run;
    block: one block's weights as read (source dtype) plus its float32 working copy;
    moments: the largest float64 moment matrix with the eigen-solver's copies of it;
    activations: one chunk of tokens through the block's widest intermediate tensors;
    embedding: the token embedding as read, while the first activations are computed.
    """
    hidden, inter = spec.hidden_size, spec.intermediate_size
    q_width = spec.num_heads * spec.head_dim
    block_params = sum(math.prod(shape) for shape in spec.dense_block_shapes().values())
    moment_size = max(hidden, q_width) + 1  # inputs of q/k/v, o, gate/up; outputs of down (+1: bias)
    widest = max(((o, i) for o, i in (spec.linear_shape(n) for n, r in plan.items() if r)), default=(0, 0),
                 key=lambda shape: shape[0] * shape[1])
    chunk = max(seqlen, (chunk_tokens // seqlen) * seqlen)
    sequences_per_chunk = chunk // seqlen
    return {
        "runtime": runtime_bytes,
        "block": block_params * (source_bytes + 4),
        # accumulator + moment + output moment + eigenvectors, and for a wide linear W and W·L in float64
        "moments": 4 * moment_size ** 2 * 8 + 2 * widest[0] * widest[1] * 8,
        # residual, normed input, q, k, v (repeated), attention, gate, up, SwiGLU, float64 statistics copy
        "activations": chunk * (6 * hidden + 3 * q_width + 4 * inter) * 4 + chunk * max(hidden, inter) * 8
        + sequences_per_chunk * spec.num_heads * seqlen * seqlen * 4,
        "embedding": spec.vocab_size * hidden * source_bytes + chunk * hidden * 4,
    }


def estimated_peak(parts: dict[str, int]) -> int:
    """The embedding is freed before the first block is read: the larger of the two counts."""
    steady = parts["runtime"] + max(parts["block"] + parts["moments"], parts["embedding"])
    return steady + parts["activations"]
