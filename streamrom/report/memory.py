"""Measured memory: resident set size sampled in a thread, plus the operating system's own peak."""
from __future__ import annotations

import math
import resource
import sys
import threading
import time

import psutil

HEAD_POSITIONS = 128  # positions per slice of logits (stream/head.py): 128 x vocabulary floats


def vm_hwm_bytes(pid: int | str = "self") -> int | None:
    """The kernel's peak RSS of a process's current image (Linux VmHWM), or None where there is none."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def os_peak_rss_bytes() -> int:
    """The kernel's record of this process's peak RSS.

    VmHWM where Linux has it: ru_maxrss also counts the image before exec, i.e. a fork of whatever
    launched us (a benchmark's parent with torch loaded would inflate a small command's peak).
    Elsewhere ru_maxrss (KiB on Linux, bytes on macOS).
    """
    hwm = vm_hwm_bytes()
    if hwm is not None:
        return hwm
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


def _glibc(function: str):
    try:
        import ctypes

        return getattr(ctypes.CDLL("libc.so.6"), function)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to tune
        return None


_MALLOC_TRIM = _glibc("malloc_trim") if sys.platform.startswith("linux") else None
_MALLOPT = _glibc("mallopt") if sys.platform.startswith("linux") else None
_M_MMAP_THRESHOLD = -3  # glibc's malloc.h
# Buffers from this size up get their own mapping, returned to the OS when freed
LARGE_BUFFER_BYTES = 4 * 2 ** 20


def keep_large_buffers_off_the_heap() -> None:
    """Fix glibc's mmap threshold at LARGE_BUFFER_BYTES for this process.

    glibc raises the threshold to the size of each mapped buffer it frees, so after the first few
    activation chunks and factors every later one lands on the brk heap, where the space freed between
    live allocations cannot be handed back (malloc_trim returns only whole free pages, and the heap's
    holes are scattered): at 7B shape that heap raised the peak of a narrowed MLP's moment gather. A
    fixed threshold maps each such buffer and unmaps it when freed, at the cost of fresh pages for each
    (the pair is in docs/results/scale.md). Outputs are the same byte for byte.
    """
    if _MALLOPT is not None:
        _MALLOPT(_M_MMAP_THRESHOLD, LARGE_BUFFER_BYTES)


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc malloc_trim).

    Tensors of a few MB (activation chunks) live on the malloc heap; block after block it
    fragments and RSS creeps up (measured at 7B shape: +8% from block 0 to block 2) unless freed
    pages are returned. Called between blocks and groups; costs milliseconds.
    """
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def estimate_compress_memory(spec, plan: dict, source_bytes: int, chunk_tokens: int, seqlen: int,
                             runtime_bytes: int, work_bytes: int = 4, first_pass: bool = False,
                             unit_width: int = 0, anchored: bool = False, refined: bool = False,
                             unit_order_given: bool = False) -> dict[str, int]:
    """The parts of a compression's peak RSS, from shapes alone (bytes).

    runtime: the interpreter, torch and the tokenizer, as measured before the run;
    block: one block's weights in the float32 working dtype;
    read: the block as read in the source dtype, alive while its working copy is made;
    statistics: the float64 moment being summed and one chunk's product (`work_bytes` each entry);
    activations: one chunk of tokens through the block's widest intermediate tensors;
    decomposition: the largest linear's eigen work: W·L and the basis (out x in, out x rank), and
    some n x n matrices (moment, its damped copy, root, Aᵀ A, eigenvectors, solver workspace);
    embedding: the token embedding as read, while the first activations are computed.

    With `unit_width` (structured ROM: the widest features a unit reads, intermediate_size for the
    MLP's neurons), its moment C (unit_width²) is summed in float32 when wider than 4096
    (statistics.WIDE), beside half a chunk's activations ("wide_statistics"); the greedy removal then
    turns C's own buffer into its inverse (C parked on disk meanwhile) beside down's columns and their
    updates, and the refit holds C's rows of the kept features times down (C[S,S] is factored in C's
    own buffer; linalg/structured.py): "decomposition" takes the larger of that and the factored
    linears' eigen work. With `unit_order_given` (--neuron-selection pass1) there is no removal in the
    compressing pass, only the refit.

    With `anchored` (--anchor), the cross moment of the dense stream's value with the compressed one's
    is summed beside each factored group's moment (its width squared in float64; a unit's refit is not
    anchored), and a factored linear's anchored map (out x in) is formed before its eigen work.

    With `refined` (--refine-steps): "refinement", the block's gradients (as large as the dense block
    at most), one mini-batch (half a forward chunk) under autograd, as pass 1's backward holds it, and
    the optimiser's step on the largest linear: Adafactor's state is factored and small, but its
    step forms the full-size second-moment estimate and a full-size temporary beside the gradient.

    With `first_pass` (the spectrum and bayes allocations' pass 1, compression/spectra.py), three more parts:
    pass1_autograd: one backward chunk (half a forward chunk's tokens) through the block under
    autograd: the tensors kept for the backward (norms' inputs and scales, q/k/v before and after
    rotation, attention output, gate, up, SwiGLU and its parts) and the largest gradients alive at once;
    pass1_statistics: the moments of the four values the groups read (and the units with them), summed
    in the work dtype, and the MLP neurons' wide moment;
    pass1_decomposition: after the backward the block is gone and each weight is read back when priced:
    the largest of the neurons' greedy removal (C turned into its inverse in place, down read back
    and its refitted copy) and a factored linear's pricing (the weight read back and a few in x in
    products: no out x in basis, decompose.direction_costs), beside the narrow moments;
    head: the output head in float32 (and as read) with one slice of logits, their softmax and its
    gradient, at the top between the forward and the backward.
    """
    hidden, inter = spec.hidden_size, spec.intermediate_size
    q_width = spec.num_heads * spec.head_dim
    block_params = sum(math.prod(shape) for shape in spec.dense_block_shapes().values())
    moment_size = max(hidden, q_width) + 1  # inputs of q/k/v, o, gate/up; outputs of down
    chosen = [(spec.linear_shape(n), r) for n, r in plan.items() if r]
    (out_f, in_f), rank = max(chosen, default=((0, 0), 0), key=lambda item: item[0][0] * item[0][1])
    float64_copy = out_f * in_f * 8 if work_bytes == 8 else 0  # float32 work uses the weight itself
    chunk = max(seqlen, (chunk_tokens // seqlen) * seqlen)
    sequences_per_chunk = chunk // seqlen
    parts = {
        "runtime": runtime_bytes,
        "block": block_params * 4,
        "read": block_params * source_bytes if source_bytes != 4 else 0,
        "statistics": max((max(hidden, q_width) + 1) ** 2 * (8 + work_bytes),
                          unit_width ** 2 * (8 + work_bytes) if unit_width <= 4096 else 0),
        # residual, normed input, q, k, v (repeated), attention, gate, up, SwiGLU
        "activations": chunk * (6 * hidden + 3 * q_width + 4 * inter) * 4
        + sequences_per_chunk * spec.num_heads * seqlen * seqlen * 4,
        "decomposition": max((out_f * in_f + out_f * rank + 6 * (max(hidden, q_width) + 1) ** 2) * work_bytes
                             + float64_copy,
                             # C's buffer (the statistics' sum, handed over), holding its inverse or
                             # C[S,S]; down's columns and their update, or the refit's C[S,:]·Wᵀ
                             (unit_width ** 2 + (1 if unit_order_given else 3) * hidden * unit_width)
                             * work_bytes),
        "embedding": spec.vocab_size * hidden * source_bytes + chunk * hidden * 4,
    }
    if unit_width > 4096:  # a unit's wide moment: summed in float32 (statistics.WIDE), 1024-row bands, beside
        # half a chunk's activations (block_compression.compress_block)
        parts["wide_statistics"] = unit_width ** 2 * 4 + 1024 * unit_width * 4
    if anchored:
        parts["statistics"] += (max(hidden, q_width) + 1) ** 2 * 8
        parts["decomposition"] += out_f * in_f * work_bytes
    backward_chunk = max(seqlen, (chunk_tokens // (2 * seqlen)) * seqlen)
    # the tensors autograd keeps (above), the largest gradients alive at once, and the attention's
    # scores, their softmax and its gradient (heads x seqlen per token each)
    autograd = (backward_chunk * (4 * hidden + 6 * q_width + 5 * inter) * 4 + 2 * backward_chunk * inter * 4
                + backward_chunk * 3 * spec.num_heads * seqlen * 4)
    if refined:
        largest_linear = max(math.prod(shape) for shape in spec.dense_block_shapes().values())
        parts["refinement"] = block_params * 4 + autograd + 2 * largest_linear * 4
    if first_pass:
        parts["pass1_autograd"] = autograd
        narrow_moments = 4 * moment_size ** 2 * work_bytes
        wide_moment = unit_width ** 2 * (4 if unit_width > 4096 else work_bytes)
        parts["pass1_statistics"] = narrow_moments + wide_moment
        # out_f x in_f: the widest linear of `plan`, which for pass 1 holds every linear at full rank
        parts["pass1_decomposition"] = narrow_moments + max((out_f * in_f + 6 * moment_size ** 2) * work_bytes,
                                                            wide_moment + 2 * hidden * unit_width * work_bytes)
        parts["head"] = spec.vocab_size * hidden * (4 + source_bytes) + 3 * HEAD_POSITIONS * spec.vocab_size * 4
    return parts


def estimated_peak(parts: dict[str, int]) -> int:
    """The largest sum of parts alive together: reading a block, gathering statistics with the
    block and a chunk's activations, or decomposing; before the first block, the embedding."""
    working = parts["block"] + max(parts["statistics"] + parts["activations"], parts["decomposition"],
                                   parts.get("wide_statistics", 0) + parts["activations"] // 2)
    if "refinement" in parts:
        working = max(working, parts["block"] + parts["refinement"])
    if "pass1_autograd" in parts:  # pass 1: the backward's chunk with every moment, the pricing, or the head
        working = max(working, parts["block"] + parts["pass1_statistics"] + parts["pass1_autograd"],
                      parts["pass1_decomposition"])
        working = max(working, parts["head"])
    return parts["runtime"] + max(working, parts["block"] + parts["read"], parts["embedding"] + parts["activations"])
