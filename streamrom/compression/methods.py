"""Compression methods, one interface: what a method needs from a group of linears (statistics of
the value they read, or nothing), how it turns them into new modules for the group's linears at once,
and what those modules cost in parameters.

A new method is one class here (registered in METHODS) plus its tests; the pipeline, the allocation,
the memory and disk estimates and pass 1 ask the method, never its name.
"""
from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..linalg import decompose, structured
from ..stream.activations import read_into
from ..linalg.allocation import factored_parameters
from ..model.architectures import UNIT_NAMES, StructuredUnit
from ..model.modeling import Block, LinearGroup, LowRankLinear, dense_linear
from .statistics import TextMoments


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
        NARROWERS[unit.name](block, width, moments, selection, damping, scratch, anchor)


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


def _array(tensor: torch.Tensor, dtype) -> np.ndarray:
    return tensor.detach().numpy().astype(dtype, copy=False)


def narrow_query_key(block: Block, width: int, moments: decompose.InputMoments, selection: str,
                     damping: float, scratch: Path | None = None, anchor: decompose.Anchor | None = None) -> None:
    """Keep `width` rotary pairs per KV head: their rows of q_proj (every query head of the group) and
    k_proj as they are, chosen by the scores they carry (structured.rotary_pair_order). Nothing is
    refitted (the scores are bilinear in the kept rows), so nothing is anchored."""
    attention = block.self_attn
    dtype = moments.second_moment.dtype
    energies = []
    for linear, heads in ((attention.q_proj, attention.num_heads), (attention.k_proj, attention.num_kv_heads)):
        bias = None if linear.bias is None else _array(linear.bias, dtype)
        energies.append(structured.pair_energies(_array(linear.weight, dtype), bias, moments.second_moment,
                                                 moments.mean, heads, attention.head_dim))
    pairs = np.sort(structured.rotary_pair_order(*energies)[:, :width], axis=1)
    for name, heads in (("q_proj", attention.num_heads), ("k_proj", attention.num_kv_heads)):
        linear = getattr(attention, name)
        rows = torch.from_numpy(structured.kept_pair_rows(pairs, attention.head_dim, heads))
        setattr(attention, name, dense_linear(linear.weight[rows], None if linear.bias is None else linear.bias[rows]))
    attention.keep_rotary_pairs(torch.from_numpy(pairs.astype(np.float32)))


def narrow_mlp(block: Block, width: int, moments: decompose.InputMoments, selection: str | np.ndarray,
               damping: float, scratch: Path | None = None, anchor: decompose.Anchor | None = None) -> None:
    """Keep `width` neurons (chosen by `selection`, or the first `width` of an order given: pass 1's):
    their rows of gate and up as they are, down refitted on them (`anchor`:
    toward its target, the dense block's output less the compressed residual stream: see
    anchoring.anchor_points). With `scratch` (a folder) a wide moment (the MLP's at 7B shape: 485 MB)
    waits there on disk while its own buffer holds the greedy removal's inverse, and is read back for
    the refit; an anchor's cross moment (180 MB) waits beside it."""
    moment = moments.second_moment
    mlp = block.mlp
    down = _array(mlp.down_proj.weight, moment.dtype)
    spill = (scratch is not None and isinstance(selection, str) and selection == "obs"
             and moment.shape[0] > structured.IN_PLACE_FROM
             and moment.flags.c_contiguous)
    with tempfile.TemporaryFile(dir=scratch) if spill else contextlib.nullcontext() as parked:
        if spill:
            moment.tofile(parked)
            if anchor is not None:  # the anchored refit's cross moment (180 MB at 7B) waits there too
                cross = anchor.take_cross()
                cross_shape, cross_dtype = cross.shape, cross.dtype
                np.ascontiguousarray(cross).tofile(parked)
                del cross
        kept = structured.select_neurons(moment, down, width, selection, damping, overwrite_moment=spill)
        if spill:  # the inverse is done with: C back into its own buffer
            parked.seek(0)
            read_into(parked, moment, "the parked moment")
            if anchor is not None:
                anchor.cross = np.empty(cross_shape, dtype=cross_dtype)
                read_into(parked, anchor.cross, "the parked cross moment")
    refitted = torch.from_numpy(np.ascontiguousarray(structured.refit_columns(down, moment, kept, damping, anchor)))
    rows = torch.from_numpy(kept)
    for name in ("gate_proj", "up_proj"):
        linear = getattr(mlp, name)
        setattr(mlp, name, dense_linear(linear.weight[rows], None if linear.bias is None else linear.bias[rows]))
    mlp.down_proj = dense_linear(refitted, mlp.down_proj.bias)


def narrow_values(block: Block, width: int, moments: decompose.InputMoments, selection: str, damping: float,
                  scratch: Path | None = None, anchor: decompose.Anchor | None = None) -> None:
    """Narrow each KV head's values to `width` dimensions (v_proj rows), o_proj refitted on them
    (`anchor`: toward its target, the dense residual stream after attention less the compressed
    block's input: see anchoring.anchor_points)."""
    moment = moments.second_moment
    attention = block.self_attn
    head_dim, kv_heads = attention.value_head_dim, attention.num_kv_heads
    o_weight = _array(attention.o_proj.weight, moment.dtype)
    maps, _ = structured.value_maps(moment, o_weight, attention.num_heads, kv_heads, head_dim, width, damping)
    o_new = structured.refit_output(o_weight, moment, maps, attention.num_heads, head_dim, damping, anchor)
    v_weight = _array(attention.v_proj.weight, moment.dtype)
    v_rows = [maps[g].T @ v_weight[g * head_dim:(g + 1) * head_dim] for g in range(kv_heads)]
    v_bias = None
    if attention.v_proj.bias is not None:
        bias = _array(attention.v_proj.bias, moment.dtype)
        v_bias = torch.from_numpy(np.concatenate([maps[g].T @ bias[g * head_dim:(g + 1) * head_dim]
                                                  for g in range(kv_heads)]))
    attention.v_proj = dense_linear(torch.from_numpy(np.ascontiguousarray(np.vstack(v_rows))), v_bias)
    attention.o_proj = dense_linear(torch.from_numpy(np.ascontiguousarray(o_new)), attention.o_proj.bias)
    attention.value_head_dim = width


# each structured unit's narrowing (architectures.UNITS), by the unit's name
NARROWERS = {"self_attn.rotary_pairs": narrow_query_key, "self_attn.value_dims": narrow_values,
             "mlp.neurons": narrow_mlp}

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
