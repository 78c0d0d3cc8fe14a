"""Compression methods, one interface: what a method needs from a group of linears (statistics of
the value they read, or nothing), how it turns them into new modules for the group's linears at once,
and what those modules cost in parameters.

A new method is one class here (registered in METHODS) plus its tests; the pipeline, the allocation,
the memory and disk estimates and pass 1 ask the method, never its name.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..linalg import decompose
from ..linalg.allocation import factored_parameters
from ..model.architectures import UNIT_NAMES, StructuredUnit
from ..model.modeling import Block, LinearGroup, LowRankLinear
from .statistics import TextMoments
from .units import UNIT_COMPRESSION


def low_rank_module(factors: decompose.Factors) -> LowRankLinear:
    def tensor(array: np.ndarray | None) -> torch.Tensor | None:
        return None if array is None else torch.from_numpy(np.ascontiguousarray(array))

    return LowRankLinear.from_factors(tensor(factors.reduce_weight), tensor(factors.expand_weight),
                                      tensor(factors.reduce_bias), tensor(factors.expand_bias))


def _weight_and_bias(block: Block, name: str, work_dtype) -> tuple[np.ndarray, np.ndarray | None]:
    linear = block.linear(name)
    # float32: the block's own weight, no copy (the factors are new arrays)
    weight = linear.weight.detach().numpy().astype(work_dtype, copy=False)
    bias = linear.bias.detach().numpy().astype(work_dtype, copy=False) if linear.bias is not None else None
    return weight, bias


@dataclass(frozen=True)
class Method:
    """A low-rank method: each planned linear of a group becomes factors V·(VᵀW) of its planned rank."""

    name: str
    uses_calibration: bool  # needs the group's statistics (and so the calibration activations)
    priced_by_pass_one: bool = False  # pass 1 (spectrum, bayes) prices the directions this method keeps
    # the moments are centered: the basis fits the covariance, and an out-sized mean-correction bias
    # (I − V Vᵀ)μ is added to each factored linear
    centered: bool = False
    # the structured units (architectures.UNITS) it narrows where the plan gives them a width
    units: tuple[str, ...] = ()
    # the allocator chooses per group between dense, factored and structured (else: structured
    # wherever a unit's linears are all chosen, factored elsewhere)
    mixed: bool = False

    @property
    def structured(self) -> bool:
        return bool(self.units)

    def parameters(self, out_features: int, in_features: int, rank: int, bias: bool) -> int:
        """Parameters of a linear's replacement at `rank` (a bias b becomes Vᵀb, rank entries)."""
        return factored_parameters(out_features, in_features, rank, bias, self.extra_parameters(out_features))

    def extra_parameters(self, out_features: int) -> int:
        """What the method adds to every factored linear beyond its factors."""
        return out_features if self.centered else 0

    def compress_group(self, block: Block, group: LinearGroup, ranks: dict[str, int],
                       moments: TextMoments | None, at_output: bool, work_dtype, damping: float,
                       anchor: decompose.Anchor | None = None) -> None:
        """Replace each linear of `ranks` (all in `group`) by its factors. `moments`: of the value the
        group reads, or (`at_output`) of the lone linear's output; None for a method without calibration.
        `anchor`: the dense model's side of the same value (anchored fits)."""
        for name, rank in ranks.items():
            weight, bias = _weight_and_bias(block, name, work_dtype)
            factors = self.factors(weight, bias, rank, moments, at_output, damping, anchor)
            del weight, bias  # the dense weight (or its copy) goes before the next linear
            block.set_linear(name, low_rank_module(factors))
            del factors

    def factors(self, weight: np.ndarray, bias: np.ndarray | None, rank: int, moments: TextMoments | None,
                at_output: bool, damping: float, anchor: decompose.Anchor | None = None) -> decompose.Factors:
        raise NotImplementedError

    def compress_unit(self, block: Block, unit: StructuredUnit, width: int, moments: decompose.InputMoments,
                      selection: str | np.ndarray, damping: float, scratch: Path | None = None,
                      anchor: decompose.Anchor | None = None) -> None:
        """Narrow `unit` of the block to `width` units, from the moments of unit.reads (`scratch`: a
        folder for what waits on disk meanwhile; `anchor`: the dense model's side of the refit)."""
        UNIT_COMPRESSION[unit.name].narrow(block, width, moments, selection, damping, scratch, anchor)


class ReducedOrderModel(Method):
    """ROM: the top-`rank` eigenvectors of the output's moment (the best rank-r fit of W X), from the
    input's moment (Cy = W Cx Wᵀ) or, for a lone narrow-output linear, from the output's own."""

    def factors(self, weight, bias, rank, moments, at_output, damping, anchor=None):
        fitted = moments.for_linear(weight, bias, at_output)
        if anchor is not None:
            return self._anchored_factors(weight, bias, rank, fitted, at_output, anchor)
        if moments.selects:
            basis = moments.selected_basis(fitted, weight, bias, rank, at_output)
        elif at_output:
            basis = decompose.rom_basis_from_outputs(fitted.second_moment, fitted.mean, rank, self.centered, damping)
        else:
            basis = fitted.rom_basis(weight, bias, rank)
        output_mean = fitted.mean if at_output else decompose.output_mean_from_inputs(weight, bias, fitted.mean)
        return decompose.factorise(weight, bias, basis, output_mean if self.centered else None)


    def _anchored_factors(self, weight, bias, rank, fitted: decompose.InputMoments, at_output: bool,
                          anchor: decompose.Anchor) -> decompose.Factors:
        """The reduced-rank fit of the dense model's outputs from the compressed stream's inputs:
        ROM of the anchored map (decompose.anchored_map), or where the moments are the output's, the
        projection nearest the dense outputs (decompose.anchored_output_basis)."""
        if at_output:
            basis = decompose.anchored_output_basis(fitted, anchor, rank)
            factors = decompose.factorise(weight, bias, basis)
            if not self.centered:
                return factors
            own_mean = fitted.mean  # the compressed stream's output mean, ỹ = W x̃ + b
            target_mean = own_mean + anchor.strength * (anchor.mean - own_mean)
            # E[V Vᵀ ỹ + e] = target: e = target − V Vᵀ μ_ỹ
            return decompose.Factors(factors.reduce_weight, basis, factors.reduce_bias,
                                     target_mean - basis @ (basis.T @ own_mean))
        mapped, intercept, output_mean = decompose.anchored_map(fitted, anchor, weight, bias)
        # the intercept rides on the linear's own bias slot, if it has one; centered, the expand bias
        # takes what is left (with_output_mean), so no linear gains parameters
        slot = intercept if bias is not None else None
        factors = decompose.factorise(mapped, slot, fitted.rom_basis(mapped, slot, rank))
        return decompose.with_output_mean(factors, fitted.mean, output_mean) if self.centered else factors


class WeightSVD(Method):
    """Weight-space truncated SVD (a baseline): no calibration, nothing downstream needs outputs."""

    def factors(self, weight, bias, rank, moments, at_output, damping, anchor=None):
        return decompose.factorise(weight, bias, decompose.weight_svd_basis(weight, rank))


METHODS: dict[str, Method] = {
    "rom": ReducedOrderModel("rom", uses_calibration=True, priced_by_pass_one=True),
    "rom-centered": ReducedOrderModel("rom-centered", uses_calibration=True, priced_by_pass_one=True, centered=True),
    "svd": WeightSVD("svd", uses_calibration=False),
    # value dimensions and MLP neurons narrowed (linalg/structured.py), q and k factored as rom-centered: with
    # the query–key pairs narrowed instead (pass 1 sizing all three), 31.49 against 30.48 at 20 % smaller
    # on the real model, as a pair step (1/4 of a 64-wide head) left most blocks' q/k dense
    "structured": ReducedOrderModel("structured", uses_calibration=True, priced_by_pass_one=True, centered=True,
                                    units=("self_attn.value_dims", "mlp.neurons")),
    # per linear group, dense, factored (rom-centered) or structured (all three units, the query–key
    # pairs included): whichever pass 1 prices best
    "mixed": ReducedOrderModel("mixed", uses_calibration=True, priced_by_pass_one=True, centered=True,
                               units=UNIT_NAMES, mixed=True),
}
