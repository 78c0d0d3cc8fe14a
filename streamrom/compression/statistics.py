"""Per-block statistics: moments of the features a linear group sees, chunk by chunk.

Each chunk's Σ x xᵀ is one matrix product in `product_dtype` (float32 by default: half the time of
float64, the rate the forward pass runs at; a wide moment's lower block rows only, about half the
work); the chunks are summed in float64, so rounding does not grow with the token count, except for
moments wider than WIDE (structured ROM's MLP neurons), summed in the product dtype to halve their
memory.
"""
from __future__ import annotations

import numpy as np
import torch

from ..linalg import decompose


WIDE = 4096  # moments wider than this (the MLP's neurons at 7B shape) are summed and read in bands
BAND = 1024


class MomentAccumulator:
    """Running Σ x xᵀ, Σ x and the count, over any number of chunks of features: Σ x xᵀ in `sum_dtype`
    (float64 unless the caller only ranks with it) or, when wide, in the product dtype; Σ x in float64."""

    def __init__(self, size: int, product_dtype: torch.dtype = torch.float32, sum_dtype: torch.dtype = torch.float64):
        self.size = size
        self.product_dtype = product_dtype
        # A wide moment (the MLP's neurons: 11008² at 7B shape) is summed in the product dtype: in
        # float64 it alone would be 970 MB. A calibration set is some tens of chunks, so float32
        # rounding over the sum stays near float32's own (~1e-7 x the chunk count).
        wide_in_float32 = size > WIDE and product_dtype == torch.float32
        self.sum_outer = torch.zeros(size, size, dtype=torch.float32 if wide_in_float32 else sum_dtype)
        self.sum = torch.zeros(size, dtype=torch.float64)
        self.count = 0
        self.symmetric = True  # whether sum_outer's upper triangle is filled in

    def add(self, features: torch.Tensor) -> None:
        """One chunk. A wide moment sums only its lower block rows (about half the products: the
        upper triangle repeats them), filled in once when the moment is handed over."""
        rows = features.reshape(-1, self.size).to(self.product_dtype)
        if self.size <= WIDE:
            # the whole product in torch's GEMM: numpy/scipy's BLAS syrk (half the FLOPs) was measured
            # slower here, and its threads, called between torch's, slowed the forward passes too
            self.sum_outer += rows.T @ rows
            # Xᵀ X from a GEMM is not exactly symmetric with every BLAS kernel (float64 on AVX-512 MKL
            # differs in the last bit): the lower triangle is mirrored at hand-over, as for wide ones
            self.symmetric = False
        else:  # a full-width product would be another size² in float32 (485 MB at 11008)
            for start in range(0, self.size, BAND):
                stop = min(start + BAND, self.size)
                self.sum_outer[start:stop, :stop] += rows[:, start:stop].T @ rows[:, :stop]
            self.symmetric = False
        self.sum += rows.sum(dim=0, dtype=torch.float64)
        self.count += rows.shape[0]

    def _fill_upper(self) -> None:
        """Copy the summed lower triangle onto the upper one, band by band (no second size² array); the
        diagonal blocks too, whose two halves were separate dot products: the moment is exactly symmetric."""
        if not self.symmetric:
            for start in range(0, self.size, BAND):
                stop = min(start + BAND, self.size)
                self.sum_outer[start:stop, stop:] = self.sum_outer[stop:, start:stop].T
                block = self.sum_outer[start:stop, start:stop]
                block.copy_(torch.tril(block) + torch.tril(block, -1).T)
            self.symmetric = True

    def second_moment(self) -> np.ndarray:
        """E[x xᵀ] (uncentered)."""
        self._fill_upper()
        return (self.sum_outer / self.count).numpy()

    def second_moment_as(self, dtype) -> np.ndarray:
        """E[x xᵀ] in `dtype`, without a second float64 copy (wide moments: band by band). A wide
        float32 sum wanted in float32 is divided in place and handed over, so that no second copy
        (485 MB at 7B shape) lives beside it while the caller works: the accumulator is spent."""
        if self.size <= WIDE:
            return self.second_moment().astype(dtype, copy=False)
        self._fill_upper()
        if self.sum_outer.dtype == torch.float32 and np.dtype(dtype) == np.float32:
            moment = self.sum_outer.div_(self.count).numpy()
            self.sum_outer = None  # spent: the moment is the caller's now
            return moment
        result = np.empty((self.size, self.size), dtype=dtype)
        for start in range(0, self.size, BAND):
            result[start:start + BAND] = (self.sum_outer[start:start + BAND].double() / self.count).numpy()
        return result

    def mean(self) -> np.ndarray:
        return (self.sum / self.count).numpy()

    def is_finite(self) -> bool:
        # band by band: a mask of the whole sum would be size² bytes (121 MB at 11008, the run's peak)
        return bool(torch.isfinite(self.sum).all()) and all(
            bool(torch.isfinite(self.sum_outer[start:start + BAND]).all()) for start in range(0, self.size, BAND))


class GroupStatistics:
    """One group's moments over the calibration chunks, one accumulator per calibration text: [general,
    target] with a target text (the sequences from `target_from` on), else one. The task-targeted mix
    and basis selection (decompose.mix_moments, decompose.select_basis) live here, per linear."""

    def __init__(self, size: int, product_dtype: torch.dtype, target_from: int | None = None,
                 target_weight: float = 0.5, target_basis: str = "mix"):
        self.parts = [MomentAccumulator(size, product_dtype) for _ in range(2 if target_from else 1)]
        self.target_from, self.target_weight, self.target_basis = target_from, target_weight, target_basis

    def add(self, features: torch.Tensor, start: int) -> None:
        """A chunk of features whose first sequence is `start` (chunks never straddle the texts)."""
        self.parts[1 if self.target_from and start >= self.target_from else 0].add(features)

    def is_finite(self) -> bool:
        return all(part.is_finite() for part in self.parts)

    def moments(self, work_dtype, centered: bool, damping: float) -> "TextMoments":
        """The float64 sums, handed over as moments in `work_dtype` (the accumulators are freed)."""
        parts = []
        while self.parts:  # each float64 sum goes as soon as it is handed over
            part = self.parts.pop(0)
            parts.append(decompose.InputMoments(part.second_moment_as(work_dtype),
                                                part.mean().astype(work_dtype, copy=False), centered, damping))
            del part
        return TextMoments(parts, self.target_weight, self.target_basis)


class TextMoments:
    """A group's moments per calibration text, and what one linear's basis is fitted to."""

    def __init__(self, parts: list[decompose.InputMoments], target_weight: float, target_basis: str):
        self.parts, self.target_weight, self.target_basis = parts, target_weight, target_basis

    def for_linear(self, weight: np.ndarray, bias: np.ndarray | None, at_output: bool) -> decompose.InputMoments:
        """The moments alone, or the mix of [general, target], each part normalised by its output energy
        (`at_output`: the moments are of the linear's output itself)."""
        if len(self.parts) == 1:
            return self.parts[0]
        general, target = self.parts
        if at_output:
            energies = [float(np.trace(decompose.output_moment(p.second_moment, p.mean, p.centered)))
                        for p in (target, general)]
        else:
            energies = [decompose.output_energy(p, weight, bias) for p in (target, general)]
        return decompose.mix_moments(target, general, decompose.mixture_weights(*energies, self.target_weight))

    @property
    def selects(self) -> bool:
        return len(self.parts) == 2 and self.target_basis == "select"

    def selected_basis(self, mixed: decompose.InputMoments, weight: np.ndarray, bias: np.ndarray | None,
                       rank: int, at_output: bool) -> np.ndarray:
        """Basis selection: among all of the mix's output eigenvectors and the target's own top `rank`,
        the `rank` directions that keep the most target output energy."""
        target = self.parts[1]
        if at_output:  # the moments are of the output itself (out x out)
            size = mixed.second_moment.shape[0]
            candidates = decompose.top_eigenvectors(
                decompose.output_moment(mixed.second_moment, mixed.mean, mixed.centered, mixed.damping), size)[1]
            values, vectors = decompose.top_eigenvectors(
                decompose.output_moment(target.second_moment, target.mean, target.centered), size)
            factor = vectors * np.sqrt(np.clip(values, 0.0, None))
            extra = vectors[:, :rank]
        else:
            candidates = decompose.output_eigenpairs(mixed, weight, bias)[1]
            w_tilde, with_bias = target.augmented_weight(weight, bias)
            factor = w_tilde @ target.root(with_bias)
            extra = target.rom_basis(weight, bias, rank)
        return decompose.select_basis(candidates, factor, rank, extra)


class CrossAccumulator:
    """Running Σ t x̃ᵀ and Σ t of the dense stream's value t against the compressed stream's x̃, over
    chunks, and whether the two were equal on every chunk (then an anchored fit is the plain one, and
    the plain one is taken: bit for bit where nothing upstream was compressed)."""

    def __init__(self, rows: int, columns: int, product_dtype: torch.dtype = torch.float32):
        self.rows, self.columns, self.product_dtype = rows, columns, product_dtype
        # like a wide moment, a cross moment with a wide side (down's output against the MLP's
        # neurons: 4096 x 11008 at 7B shape) is summed in the product dtype
        wide_in_float32 = max(rows, columns) > WIDE and product_dtype == torch.float32
        self.sum_outer = torch.zeros(rows, columns, dtype=torch.float32 if wide_in_float32 else torch.float64)
        self.sum = torch.zeros(rows, dtype=torch.float64)
        self.count = 0

    def add(self, target: torch.Tensor, features: torch.Tensor) -> None:
        t = target.reshape(-1, self.rows).to(self.product_dtype)
        x = features.reshape(-1, self.columns).to(self.product_dtype)
        for start in range(0, self.columns, BAND):  # no full-size product beside the sum
            self.sum_outer[:, start:start + BAND] += t.T @ x[:, start:start + BAND]
        self.sum += t.sum(dim=0, dtype=torch.float64)
        self.count += t.shape[0]

    def is_finite(self) -> bool:
        return bool(torch.isfinite(self.sum).all()) and all(
            bool(torch.isfinite(self.sum_outer[:, start:start + BAND]).all()) for start in range(0, self.columns, BAND))

    def anchor(self, strength: float, dtype, target_is_output: bool = False) -> decompose.Anchor:
        """E[t x̃ᵀ] and E[t] in `dtype` (the accumulator is spent: its sum is handed over where it can be)."""
        if self.sum_outer.dtype == torch.float32 and np.dtype(dtype) == np.float32:
            cross = self.sum_outer.div_(self.count).numpy()
        else:
            cross = (self.sum_outer / self.count).numpy().astype(dtype, copy=False)
        self.sum_outer = None
        return decompose.Anchor(cross, (self.sum / self.count).numpy().astype(dtype), strength, target_is_output)
