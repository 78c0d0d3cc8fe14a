"""Pass 1 of the spectrum allocation: what dropping each output direction of each chosen linear would
cost the loss, measured on the dense model in one streamed forward and one streamed backward pass.

Forward: the dense model runs block by block over the calibration tokens; every block's inputs stay
on disk (one file per block). At the top, the next-token loss (summed over the calibration tokens)
gives its gradient with respect to the last hidden states. Backward: from the last block down, each
block is read again, its forward recomputed on its stored inputs under autograd, and the gradient
pushed to its inputs (written to disk for the block below). On the way, per chosen linear, it
accumulates the moment of the linear's output features (as compression does) and the mean squared
loss gradient of each output feature. Each output moment is then eigendecomposed and every
direction priced: λ_k · Σ_j v_jk² E[g_j²] (decompose.sensitivity_weighted).

Energy alone (each linear's spectrum normalised to 1) was tried first and lost to a uniform
allocation: a fraction of one linear's output energy costs the loss very differently from the same
fraction of another's. The gradient puts every linear in the loss's units.

RAM: during the backward, one block, half a forward chunk's autograd graph and the moments of the
values the chosen groups and units read (float32 sums; the MLP neurons' wide moment is summed after
the backward, from the values it wrote to disk); during the pricing, no block: each weight is read
back from the checkpoint when priced, and gate/up are priced from in x in products
(decompose.direction_costs).
Disk: L+3 activation files, and during a block's backward one file of the MLP neurons' values
(the calibration tokens at the MLP's width).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..linalg import allocation, decompose, structured
from ..linalg.allocation import Slot
from ..model.architectures import UNITS, StructuredUnit
from ..stream.activations import ActivationBuffer, chunk_ranges, embed_into, require_finite, run_block
from ..storage.checkpoint import CheckpointReader
from ..errors import InputError, NumericalError, UsageError
from ..stream.head import LossHead
from ..report.memory import release_freed_memory
from ..model.modeling import EMBED, Block, BlockValues, LinearGroup, Rotary, block_prefix
from ..report.report import StageTimer
from ..stream.streaming import read_blocks
from .statistics import WIDE, MomentAccumulator
from .units import UNIT_COMPRESSION

log = logging.getLogger(__name__)

SPECTRA_FILE = "sensitivity-spectra.npz"
FINGERPRINT_KEY = "__made_for__"
# "keep-order.model.layers.<i>.mlp.neurons": the greedy removal's order of that MLP's neurons (most
# important first), saved beside its costs for --neuron-selection pass1
ORDER_PREFIX = "keep-order."
# "unit-always.model.layers.<i>.mlp.neurons": pass 1 showed from lower bounds that the mixed choice takes
# that unit at every price; the values saved for its linears' factored slots are those bounds
UNIT_ALWAYS_PREFIX = "unit-always."
PREFIXES = (ORDER_PREFIX, UNIT_ALWAYS_PREFIX)


def split_first_pass(found: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], set[str]]:
    """A first pass's costs, its keep orders (by unit key), and the units the mixed choice takes at
    every price (their factored slots' values are lower bounds), apart."""
    orders = {key[len(ORDER_PREFIX):]: values for key, values in found.items() if key.startswith(ORDER_PREFIX)}
    always = {key[len(UNIT_ALWAYS_PREFIX):] for key in found if key.startswith(UNIT_ALWAYS_PREFIX)}
    return {key: values for key, values in found.items() if not key.startswith(PREFIXES)}, orders, always


@dataclass
class Observation:
    """What pass 1 keeps of a dense block once its backward is through: the moment of every value a
    chosen group or unit reads (one accumulator per value, shared), the summed squared loss gradient of
    each output feature of the linears priced, and the attention's shape."""

    moments: dict[str, MomentAccumulator]
    groups: list[tuple[LinearGroup, str, bool]]  # (group, the value its moment is of, at its output)
    units: list[StructuredUnit]
    squares: dict[str, torch.Tensor]
    tokens: int
    heads: tuple[int, int, int]  # query heads, KV heads, head_dim


def observe_block(block: Block, names: list[str], units: list[str], inputs: ActivationBuffer,
                  output_grads: ActivationBuffer, input_grads: ActivationBuffer | None, cos: torch.Tensor,
                  sin: torch.Tensor, chunk_sequences: int, work_dtype, timer: StageTimer) -> Observation:
    """The block's backward, chunk by chunk, with the moments and gradient squares pass 1 prices from;
    writes the loss gradient with respect to the block's inputs (unless None)."""
    product = torch.float64 if work_dtype == np.float64 else torch.float32
    groups = []
    for group in block.GROUPS:
        if any(name in names for name in group.linears):
            value, _, at_output = group.observed(block)
            groups.append((group, value, at_output))
    chosen_units = [unit for unit in UNITS if unit.name in units]
    widths = {value: group.observed(block)[1] for group, value, _ in groups}
    # a unit reads its last linear's input (its consumer's, or q/k's own input for the rotary pairs)
    widths.update({unit.reads: block.linear(unit.linears[-1]).weight.shape[1] for unit in chosen_units})
    # Summed in the product dtype: pass 1 only ranks directions, and at 7B shape float64 sums of the
    # four 4096-wide moments alive beside the autograd graph would add 270 MB to its peak. A wide one
    # (the MLP neurons': 485 MB at 7B shape) is never summed beside the graph: its values are written
    # to a nameless file as the backward's forward computes them, and summed once the graph is gone
    # (a file of the calibration's tokens at that width, against a third forward of the block).
    moments = {value: MomentAccumulator(width, product, sum_dtype=product) for value, width in widths.items()
               if width <= WIDE}
    wide = {value: width for value, width in widths.items() if width > WIDE}
    folder = inputs.path if inputs.anonymous else inputs.path.parent
    spilled = {value: ActivationBuffer(folder, *inputs.shape[:2], width, anonymous=True) for value, width in wide.items()}
    priced_in = [name for unit in chosen_units for name in UNIT_COMPRESSION[unit.name].priced_in]
    graded = list(dict.fromkeys([*names, *priced_in]))
    squares = {name: torch.zeros(block.linear(name).weight.shape[0], dtype=torch.float64) for name in graded}

    def capture(name: str):
        def on_gradient(grad: torch.Tensor) -> None:  # returns None: the gradient flows on unchanged
            squares[name].add_(grad.detach().reshape(-1, grad.shape[-1]).pow(2).sum(0, dtype=torch.float64))

        def on_forward(module, args, output):
            output.register_hook(on_gradient)
        return on_forward

    hooks = [block.linear(name).register_forward_hook(capture(name)) for name in graded]
    tokens = 0
    try:
        for start, stop in chunk_ranges(inputs.shape[0], chunk_sequences):
            with timer("backward"), torch.enable_grad():
                x = inputs.read(start, stop).requires_grad_(True)
                values = BlockValues(block, cos, sin, {"x": lambda x=x: x})  # the block's steps, each value kept
                values["output"].backward(output_grads.read(start, stop))
            if input_grads is not None:
                input_grads.write(start, require_finite(x.grad, "in the loss gradient"))
            tokens += x.shape[0] * x.shape[1]
            with timer("statistics"):
                for value, accumulator in moments.items():
                    accumulator.add(values[value].detach())
                for value, buffer in spilled.items():
                    buffer.write(start, values[value])
            del x, values
            release_freed_memory()
        if spilled:
            release_freed_memory()  # the graph's freed tensors, before the wide sum is allocated
            moments.update({value: MomentAccumulator(width, product) for value, width in wide.items()})
            with timer("statistics"):  # one sequence at a time: its values beside the wide sum
                for start, stop in chunk_ranges(inputs.shape[0], 1):
                    for value, buffer in spilled.items():
                        moments[value].add(buffer.read(start, stop))
                    release_freed_memory()  # else the heap may creep sequence by sequence
    finally:
        for hook in hooks:
            hook.remove()
        for buffer in spilled.values():
            buffer.close()
    attention = block.self_attn
    return Observation(moments, groups, chosen_units, squares, tokens,
                       (attention.num_heads, attention.num_kv_heads, attention.head_dim))


def price_block(seen: Observation, names: list[str], fetch, centered: bool, work_dtype, timer: StageTimer,
                neuron_selection: str = "obs", damping: float = 1e-6,
                alternatives: Sequence[tuple[Slot, Sequence[Slot]]] = ()) -> dict[str, np.ndarray]:
    """Per chosen linear the loss cost of dropping each output direction (in the order ROM keeps them),
    and per chosen unit the cost of dropping each unit (in the order structured ROM keeps them).

    The block is gone by now: `fetch(name)` reads a linear's (weight, bias) back as numpy arrays in
    the work dtype, one at a time; each moment goes once its last reader is priced. The units come
    first (the MLP's wide moment is the largest thing held).

    `alternatives` (the mixed mode; slots keyed by the bare names): each unit with the factored slots of
    its linears. Their directions are first bounded from below by eigenvalues alone
    (PricingProblem.cost_lower_bound); where the bounds already show that the mixed choice takes the
    unit at every price (allocation.unit_dominates), the bounds stand in for the costs, the unit is
    marked (UNIT_ALWAYS_PREFIX) and no eigenvectors are computed for its linears: the allocation is the
    same as with the costs, at a fraction of the eigen work. Otherwise the costs are computed from the
    same products.
    """
    group_of = {name: (value, at_output) for group, value, at_output in seen.groups
                for name in group.linears if name in names}
    readers: dict[str, int] = {}
    for value in [unit.reads for unit in seen.units] + [value for value, _ in group_of.values()]:
        readers[value] = readers.get(value, 0) + 1
    sensitivity = {name: (squares / seen.tokens).numpy().astype(work_dtype) for name, squares in seen.squares.items()}
    taken: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    inputs: dict[str, decompose.InputMoments] = {}  # per value read by linears: C's factor made once

    def take(value: str) -> tuple[np.ndarray, np.ndarray]:
        if value not in taken:
            accumulator = seen.moments.pop(value)
            if not accumulator.is_finite():
                readers_of = [unit.name for unit in seen.units if unit.reads == value]
                readers_of += [name for name, (read, _) in group_of.items() if read == value]
                raise NumericalError(f"NaN or Inf activations reach {', '.join(readers_of)}")
            # a wide moment (the MLP's) is handed over, not copied, and read by one unit only
            taken[value] = (accumulator.second_moment_as(work_dtype), accumulator.mean().astype(work_dtype))
        return taken[value]

    def read_once(value: str) -> None:
        readers[value] -= 1
        if readers[value] == 0:
            taken.pop(value, None)
            inputs.pop(value, None)
            release_freed_memory()

    def problem(name: str) -> decompose.PricingProblem:
        value, at_output = group_of[name]
        second, mean = take(value)
        if at_output:  # the output's moment was accumulated directly
            found = decompose.output_pricing_problem(second, mean, centered, sensitivity[name])
        else:
            moments = inputs.setdefault(value, decompose.InputMoments(second, mean, centered))
            weight, bias = fetch(name)
            found = decompose.pricing_problem(moments, weight, bias, sensitivity[name])
            del weight, bias, moments
        del second, mean
        read_once(value)
        return found

    # The autograd graph's freed tensors of up to 32 MiB stay on the malloc heap: hand them back
    # before the eigen work.
    release_freed_memory()
    costs: dict[str, np.ndarray] = {}
    with timer("eigen"):
        for unit in seen.units:
            second, mean = take(unit.reads)
            found = UNIT_COMPRESSION[unit.name].price(fetch, seen.heads, second, mean, sensitivity,
                                                      neuron_selection, damping,
                                                      overwrite_moment=readers[unit.reads] == 1)
            del second, mean
            if isinstance(found, structured.Removal):  # the MLP's: its order too, free beside the costs
                costs[unit.name] = found.costs
                if neuron_selection != "leverage":
                    costs[ORDER_PREFIX + unit.name] = found.order
            else:
                costs[unit.name] = found
            del found
            read_once(unit.reads)
        for unit_slot, factored in alternatives:
            if unit_slot.key in costs and all(slot.key in group_of for slot in factored):
                costs.update(_price_alternative(unit_slot, factored, costs[unit_slot.key], problem, group_of,
                                                read_once))
        for name in group_of:  # the linears outside alternatives, group by group
            if name not in costs:
                costs[name] = problem(name).costs().astype(np.float64)
                release_freed_memory()
    return costs


def _price_alternative(unit: Slot, factored: Sequence[Slot], unit_costs: np.ndarray, problem, group_of,
                       read_once) -> dict[str, np.ndarray]:
    """The factored slots' values of one unit's alternative (price_block): lower bounds where they
    decide the choice for the unit, else the costs.

    Bounds are tried only where they could decide: not where the unit holds more parameters than its
    linears dense (it then loses at low prices whatever the values), nor where the unit loses somewhere
    even to an upper bound of the factored costs that the products give for free (each slot's total
    loss-weighted energy tr(S W̃ C W̃ᵀ) at every rank short of dense). Then the linears that read an
    output moment come first (their bound needs no product), and the bounds stop as soon as they decide.
    """
    ordered = sorted(factored, key=lambda slot: not group_of[slot.key][1])
    problems = {slot.key: problem(slot.key) for slot in ordered}
    found: dict[str, np.ndarray] = {}
    if not allocation.unit_loses_somewhere(unit, unit_costs, [(slot, problems[slot.key].total_cost())
                                                              for slot in factored]):
        bounds: dict[str, np.ndarray] = {}
        for slot in ordered:
            bound = problems[slot.key].cost_lower_bound()
            if bound is None:
                break
            bounds[slot.key] = bound
            trial = [(s, bounds.get(s.key, np.zeros(s.full_rank))) for s in factored]
            if allocation.unit_dominates(unit, unit_costs, trial):
                problems.clear()
                release_freed_memory()
                return {**{s.key: bounds.get(s.key, np.zeros(s.full_rank)) for s in factored},
                        UNIT_ALWAYS_PREFIX + unit.key: np.array(True)}
    for slot in ordered:
        found[slot.key] = problems.pop(slot.key).costs().astype(np.float64)
        release_freed_memory()
    return found


def _prefixed(name: str, prefix: str) -> str:
    """A block's key in the whole model's file: "keep-order.mlp.neurons" -> "keep-order.model.layers.3.mlp.neurons"."""
    marker = next((marker for marker in PREFIXES if name.startswith(marker)), "")
    return f"{marker}{prefix}{name[len(marker):]}"


def _weight_reader(reader: CheckpointReader, index: int, work_dtype):
    """fetch(name) -> (weight, bias or None) of block `index`'s linear, read from the checkpoint as
    numpy arrays in the work dtype (a fresh copy the caller may change)."""
    prefix = block_prefix(index)

    def fetch(name: str) -> tuple[np.ndarray, np.ndarray | None]:
        wanted = [f"{prefix}{name}.weight"] + [f"{prefix}{name}.bias"] * (f"{prefix}{name}.bias" in reader.weight_map)
        tensors = reader.read(wanted)
        weight, bias = (tensors[key].to(torch.float64 if work_dtype == np.float64 else torch.float32).numpy()
                        if key in tensors else None for key in (wanted[0], f"{prefix}{name}.bias"))
        return weight, bias
    return fetch


def read_saved(path: Path) -> dict[str, np.ndarray]:
    """A saved first pass, every array read (a damaged file fails here, with one line, not later)."""
    import zipfile

    if Path(path).is_file() and not zipfile.is_zipfile(path):  # (numpy would call it pickled data)
        raise InputError(f"cannot read the first-pass file {path}: not a .npz file (a zip archive of arrays)")
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {key: stored[key] for key in stored.files}
    except Exception as exc:  # numpy raises several types (BadZipFile, EOFError, ...) for damaged files
        raise InputError(f"cannot read the first-pass file {path}: {type(exc).__name__}: {exc}") from None


def collect_spectra(reader: CheckpointReader, tokens: np.ndarray, layers: list[int], names: list[str],
                    work: Path, chunk_tokens: int, centered: bool, work_dtype, timer: StageTimer,
                    saved: Path | None = None, fingerprint: str = "", units: list[str] = (),
                    neuron_selection: str = "obs", price=None,
                    alternatives: Sequence[tuple[Slot, Sequence[Slot]]] = ()) -> dict[str, np.ndarray]:
    """{"model.layers.<i>.<name>": loss cost of dropping each output direction} for every chosen block
    and linear, from one streamed forward and backward pass of the dense model.

    Saved (atomically) to `saved`, or to work/sensitivity-spectra.npz, with `fingerprint` (of the
    model, calibration tokens and settings it was made from), and reused from there when the
    fingerprint matches: by a resumed run, or by runs at other target sizes. `price(seen, chosen, index)`
    replaces price_block where the directions priced are another's (quant_correction: the error's).
    `alternatives` (mixed): each unit with its linears' factored slots, keyed by bare names (price_block).
    """
    path = Path(saved) if saved is not None else Path(work) / SPECTRA_FILE
    if path.is_file():
        found = read_saved(path)
        made_for = str(found.pop(FINGERPRINT_KEY, ""))
        if made_for != fingerprint:
            raise UsageError(f"{path} was made for another model, calibration or method; remove it or name "
                             "another file")
        log.info("pass 1 reused from %s", path)
        return found
    spec = reader.spec
    sequences, seqlen = tokens.shape
    chunk_sequences = max(1, chunk_tokens // seqlen)
    # The backward's chunk holds the block's values under autograd (about twice a forward chunk's
    # activations, beside every moment): half the tokens of a forward chunk.
    backward_sequences = max(1, chunk_tokens // (2 * seqlen))
    folder = Path(work) / "spectra-pass"
    folder.mkdir(parents=True, exist_ok=True)
    first = min(layers)
    block_inputs = {index: ActivationBuffer(folder / f"inputs-{index:03d}.f32", sequences, seqlen, spec.hidden_size)
                    for index in range(first, spec.num_layers + 1)}
    grads = [ActivationBuffer(folder / name, sequences, seqlen, spec.hidden_size) for name in ("grad-a.f32", "grad-b.f32")]
    costs: dict[str, np.ndarray] = {}
    try:
        cos, sin = Rotary(spec).cos_sin(seqlen)
        # Forward: the blocks below the first chosen one need no gradient; their outputs share a pair.
        below = [ActivationBuffer(folder / name, sequences, seqlen, spec.hidden_size) for name in ("below-a.f32", "below-b.f32")]
        try:
            with timer("read"):
                embedding = reader.tensor(EMBED)
            with timer("forward"):
                embed_into(embedding, tokens, block_inputs[0] if first == 0 else below[0], chunk_sequences,
                           spec.embedding_scale)
            del embedding
            for index, block in read_blocks(reader, range(spec.num_layers), timer, "spectra forward"):
                source = block_inputs[index] if index >= first else below[index % 2]
                destination = block_inputs[index + 1] if index + 1 >= first else below[(index + 1) % 2]
                with timer("forward"):
                    run_block(block, source, destination, cos, sin, chunk_sequences)
                del block
        finally:
            for buffer in below:
                buffer.close(remove=True)

        with timer("read"):
            head = LossHead(reader)
        total_nll = 0.0
        with timer("backward"):
            for begin, end in chunk_ranges(sequences, 1):
                hidden = block_inputs[spec.num_layers].read(begin, end)
                targets = torch.from_numpy(np.ascontiguousarray(tokens[begin:end, 1:], dtype=np.int64))
                grad = torch.zeros_like(hidden)  # the last position predicts nothing: no gradient
                loss, grad[:, :-1] = head.loss_and_gradient(hidden[:, :-1], targets)
                total_nll += loss
                grads[0].write(begin, grad)
        del head
        log.info("spectra: dense calibration loss %.4f per token", total_nll / (sequences * (seqlen - 1)))

        backward = read_blocks(reader, range(spec.num_layers - 1, first - 1, -1), timer, "spectra backward")
        for step, (index, block) in enumerate(backward):
            chosen = names if index in layers else []
            output_grads, input_grads = grads[step % 2], grads[(step + 1) % 2]
            seen = observe_block(block, chosen, list(units) if index in layers else [], block_inputs[index],
                                 output_grads, input_grads if index > first else None, cos, sin,
                                 backward_sequences, work_dtype, timer)
            # The pricing reads each weight back when its turn comes, one at a time. The streaming loop
            # holds the module until its next turn: its tensors go now (the block is spent).
            block.to(device="meta")
            del block
            found = (price_block(seen, chosen, _weight_reader(reader, index, work_dtype), centered, work_dtype,
                                 timer, neuron_selection, alternatives=alternatives if index in layers else ())
                     if price is None else price(seen, chosen, index))
            del seen
            costs.update({_prefixed(name, block_prefix(index)): values for name, values in found.items()})
            block_inputs.pop(index + 1).close(remove=True)  # its gradient is through; the file is done
    finally:
        for buffer in [*block_inputs.values(), *grads]:
            buffer.close(remove=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(temporary, **costs, **{FINGERPRINT_KEY: np.array(fingerprint)})
    temporary.replace(path)
    return costs
