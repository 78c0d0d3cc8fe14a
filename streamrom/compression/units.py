"""Structured units on the compression side: for each unit of the model's registry (model/architectures.UNITS),
how pass 1 prices keeping each of its units (in loss units, in the order narrowing keeps them), how a block
is narrowed to a width of it, and what both take in time (for the projection before a run). One entry per unit
in UNIT_COMPRESSION, by the unit's name; the pipeline, pass 1, the methods and the time projection ask it and
never branch on a unit's name. (What the exporter pads back lives with the GGUF
layout, gguf/exporter.py.)
"""
from __future__ import annotations

import contextlib
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ..linalg import decompose, structured
from ..model.architectures import UNIT_BY_NAME, StructuredUnit
from ..model.modeling import Block, dense_linear
from ..stream.activations import read_into
from .time_estimate import MachineSpeed, Shapes, UnitWork


def _array(tensor: torch.Tensor, dtype) -> np.ndarray:
    return tensor.detach().numpy().astype(dtype, copy=False)


# Pricing: fetch(name) -> (weight, bias or None) of the block's linear as fresh arrays; heads = (query heads,
# KV heads, head_dim); second/mean: the moment of what the unit's features are computed from; sensitivity:
# each priced linear's mean squared loss gradient per output feature. `overwrite_moment`: the moment is not
# needed afterwards (the greedy removal may turn its buffer into the inverse).

def price_rotary_pairs(fetch, heads: tuple[int, int, int], second: np.ndarray, mean: np.ndarray,
                       sensitivity: dict[str, np.ndarray], neuron_selection: str, damping: float,
                       overwrite_moment: bool = False) -> np.ndarray:
    """Each rotary pair's cost: the output energy of its rows of q_proj and k_proj, weighted by their
    loss sensitivity, in the order the pairs' unweighted energies keep them."""
    num_heads, num_kv_heads, head_dim = heads
    energies, weighted = [], []
    for proj, count in (("self_attn.q_proj", num_heads), ("self_attn.k_proj", num_kv_heads)):
        weight, bias = fetch(proj)
        rows = structured.output_energies(weight, bias, second, mean)
        del weight, bias
        energies.append(structured.per_pair(rows, count, head_dim))
        weighted.append(structured.per_pair(rows * sensitivity[proj], count, head_dim))
    return structured.pair_costs(*weighted, structured.rotary_pair_order(*energies))


def _consumer_in_loss_units(fetch, name: str, sensitivity: dict[str, np.ndarray]) -> np.ndarray:
    """The consumer's weight with its rows scaled by the root mean squared loss gradient: the output
    error it measures is in loss units."""
    consumer, _ = fetch(name)
    consumer *= np.sqrt(sensitivity[name])[:, None]
    return consumer


def price_value_dims(fetch, heads, second, mean, sensitivity, neuron_selection, damping,
                     overwrite_moment=False) -> np.ndarray:
    """Each value dimension's cost: the error o_proj's refit leaves without it (structured.value_maps)."""
    num_heads, num_kv_heads, head_dim = heads
    consumer = _consumer_in_loss_units(fetch, "self_attn.o_proj", sensitivity)
    return structured.value_maps(second, consumer, num_heads, num_kv_heads, head_dim, head_dim, damping)[1]


def price_mlp_neurons(fetch, heads, second, mean, sensitivity, neuron_selection, damping,
                      overwrite_moment=False) -> structured.Removal:
    """Each neuron's cost and the order of removal (greedy structured OBS, or leverage), in down's output."""
    consumer = _consumer_in_loss_units(fetch, "mlp.down_proj", sensitivity)
    return structured.neuron_costs(second, consumer, neuron_selection, damping, decompose.RANK_MULTIPLE,
                                   overwrite_moment=overwrite_moment)


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
    the refit; an anchor's cross moment (180 MB) waits beside it. The moment is spent here: down alone
    reads the neurons, and the refit builds C[S,S] in its buffer."""
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
    refitted = torch.from_numpy(np.ascontiguousarray(
        structured.refit_columns(down, moment, kept, damping, anchor, overwrite_moment=True)))
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


# The projected time of each unit's pricing and narrowing (time_estimate.project adds them up): work(shapes,
# speed, ordered) -> UnitWork, `ordered` when pass 2 keeps pass 1's order of the units (--neuron-selection pass1).

def rotary_pairs_work(s: Shapes, speed: MachineSpeed, ordered: bool) -> UnitWork:
    """The output energies of q_proj's and k_proj's rows (the same products to price and to narrow)."""
    seconds = speed.products(s.heads * s.head_dim * s.hidden ** 2)
    return UnitWork(s.hidden, seconds, seconds)


def value_dims_work(s: Shapes, speed: MachineSpeed, ordered: bool) -> UnitWork:
    """Per KV head an eigen-solve of its values' moment, and o_proj's refit."""
    attention_width = s.heads * s.head_dim
    seconds = s.kv_heads * speed.eigen(s.head_dim) + speed.products(s.hidden * attention_width ** 2)
    return UnitWork(attention_width, seconds, seconds)


# The greedy structured-OBS removal at width n (its inverse, then batched rank-k updates of it and of the
# consumer's columns) costs about this many n³ multiply-adds at the product rate, whether it removes
# all but a few (pass 1's pricing) or a fifth to a half (the selection): measured at n = 11008.
OBS_CUBES = 2.0
# Up to IN_PLACE_FROM features the removal copies the live part of the inverse every round (about 32
# copies of the n x n inverse in all, down to a few features): seconds per element copied.
OBS_COPY_SECONDS = 1e-8


def mlp_neurons_work(s: Shapes, speed: MachineSpeed, ordered: bool) -> UnitWork:
    """The greedy removal (pass 1's pricing, and pass 2's selection unless pass 1's order is kept),
    then down's refit on the kept neurons (one damped solve)."""
    n = s.intermediate
    copies = 32 * n * n * OBS_COPY_SECONDS if n <= structured.IN_PLACE_FROM else 0.0
    removal = speed.products(OBS_CUBES * n ** 3 + s.hidden * n * n) + copies
    refit = speed.products(n ** 3 / 3 + s.hidden * n * n)
    return UnitWork(n, removal, refit if ordered else removal)


@dataclass(frozen=True)
class UnitCompression:
    """One structured unit's treatment: `priced_in`, the linears whose output its cost is measured in
    (its consumer, or for the query–key pairs both producers); `price`, pass 1's cost of each of its
    units; `narrow(block, width, moments, selection, damping, scratch, anchor)`, the block narrowed to
    `width` of them (moments of unit.reads; `scratch`: a folder for what waits on disk meanwhile;
    `anchor`: the dense model's side of the refit); `work`, the projected seconds of both (see above)."""

    unit: StructuredUnit
    priced_in: tuple[str, ...]
    price: Callable[..., np.ndarray | structured.Removal]
    narrow: Callable[..., None]
    work: Callable[[Shapes, MachineSpeed, bool], UnitWork]


UNIT_COMPRESSION: dict[str, UnitCompression] = {rules.unit.name: rules for rules in (
    UnitCompression(UNIT_BY_NAME["self_attn.rotary_pairs"], ("self_attn.q_proj", "self_attn.k_proj"),
                    price_rotary_pairs, narrow_query_key, rotary_pairs_work),
    UnitCompression(UNIT_BY_NAME["self_attn.value_dims"], ("self_attn.o_proj",), price_value_dims, narrow_values,
                    value_dims_work),
    UnitCompression(UNIT_BY_NAME["mlp.neurons"], ("mlp.down_proj",), price_mlp_neurons, narrow_mlp, mlp_neurons_work),
)}
