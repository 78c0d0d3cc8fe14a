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

RAM: one block, one chunk's autograd graph, the moments. Disk: L+3 activation files.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from . import decompose, structured
from .architectures import UNITS
from .activations import ActivationBuffer, chunk_ranges, embed_into, require_finite, run_block
from .checkpoint import CheckpointReader
from .errors import InputError, NumericalError, UsageError
from .head import LossHead
from .memory import release_freed_memory
from .modeling import EMBED, Block, BlockValues, Rotary, block_prefix
from .report import StageTimer
from .streaming import read_blocks
from .statistics import MomentAccumulator

log = logging.getLogger(__name__)

SPECTRA_FILE = "sensitivity-spectra.npz"
FINGERPRINT_KEY = "__made_for__"


def block_costs(block: Block, names: list[str], inputs: ActivationBuffer, output_grads: ActivationBuffer,
                input_grads: ActivationBuffer | None, cos: torch.Tensor, sin: torch.Tensor, chunk_sequences: int,
                centered: bool, work_dtype, timer: StageTimer, units: list[str] = (),
                neuron_selection: str = "obs", damping: float = 1e-6) -> dict[str, np.ndarray]:
    """Per chosen linear of this dense block, the loss cost of dropping each output direction (in the
    order ROM keeps them), and per chosen structured unit the cost of dropping each unit (in the order
    structured ROM keeps them); writes the loss gradient with respect to the block's inputs (unless None)."""
    product = torch.float64 if work_dtype == np.float64 else torch.float32
    groups = [group for group in block.GROUPS if any(name in names for name in group.linears)]
    observed = {group: group.observed(block) for group in groups}  # as compression takes them
    moments = {group: MomentAccumulator(width, product) for group, (_, width, _) in observed.items()}
    chosen_units = [unit for unit in UNITS if unit.name in units]
    # a unit is priced in the outputs of PRICED_IN's linears, from the moment of the value it reads
    unit_moments = {unit.name: MomentAccumulator(block.linear(unit.linears[-1]).weight.shape[1], product)
                    for unit in chosen_units}
    graded = list(dict.fromkeys([*names, *(name for unit in chosen_units for name in _priced_in(unit))]))
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
                for group, accumulator in moments.items():
                    accumulator.add(values[observed[group][0]].detach())
                for unit in chosen_units:
                    unit_moments[unit.name].add(values[unit.reads].detach())
            del x, values
    finally:
        for hook in hooks:
            hook.remove()
    # The autograd graph's freed tensors of up to 32 MiB stay on the malloc heap: hand them back
    # before the eigen work (at 7B shape, with each group's sums freed once used: −500 MiB there).
    release_freed_memory()

    costs: dict[str, np.ndarray] = {}
    with timer("eigen"):
        # units first: their wide moment (the MLP's) and its inverse go before the full-rank spectra of
        # the factored linears are taken (at 7B shape gate/up's, 1.3 GB)
        for unit in chosen_units:
            accumulator = unit_moments.pop(unit.name)
            if not accumulator.is_finite():
                raise NumericalError(f"NaN or Inf activations reach {', '.join(unit.linears)}")
            second = accumulator.second_moment_as(work_dtype)  # (a wide one handed over, not copied)
            mean = accumulator.mean().astype(work_dtype, copy=False)
            del accumulator
            # mean squared loss gradient of each output feature of the linears it is priced in
            sensitivity = {name: (squares[name] / tokens).numpy().astype(work_dtype) for name in _priced_in(unit)}
            costs[unit.name] = _unit_costs(unit.name, block, second, mean, sensitivity, work_dtype,
                                           neuron_selection, damping)
            del second, mean
            release_freed_memory()
        for group in list(moments):
            accumulator = moments.pop(group)  # each group's float64 sums go once its linears are priced
            if not accumulator.is_finite():
                raise NumericalError(f"NaN or Inf activations reach {', '.join(group.linears)}")
            second = accumulator.second_moment().astype(work_dtype, copy=False)
            mean = accumulator.mean().astype(work_dtype, copy=False)
            group_inputs = decompose.InputMoments(second, mean, centered)
            for name in group.linears:
                if name not in names:
                    continue
                linear = block.linear(name)
                if observed[group][2]:  # the output's moment was accumulated directly
                    values, vectors = decompose.top_eigenvectors(
                        decompose.output_moment(second, mean, centered), min(linear.weight.shape))
                    values = np.clip(values, 0.0, None)
                else:
                    bias = linear.bias.detach().numpy() if linear.bias is not None else None
                    values, vectors = decompose.output_eigenpairs(group_inputs, linear.weight.detach().numpy(), bias)
                sensitivity = (squares[name] / tokens).numpy().astype(vectors.dtype)
                costs[name] = decompose.sensitivity_weighted(values, vectors, sensitivity).astype(np.float64)
                del values, vectors
            del accumulator, second, mean, group_inputs
            release_freed_memory()
    return costs


def _priced_in(unit) -> tuple[str, ...]:
    """The linears whose output a unit's cost is measured in: its consumer (down, o_proj), or for the
    query–key pairs both producers."""
    return unit.linears if unit.name == "self_attn.rotary_pairs" else unit.linears[-1:]


def _unit_costs(name: str, block: Block, second: np.ndarray, mean: np.ndarray, sensitivity: dict[str, np.ndarray],
                work_dtype, neuron_selection: str, damping: float) -> np.ndarray:
    """What keeping each unit is worth in loss units, in the order structured ROM keeps them: the
    error its removal leaves in the priced outputs, each output feature weighted by its mean
    squared loss gradient."""
    attention = block.self_attn

    def array(tensor):
        return None if tensor is None else tensor.detach().numpy().astype(work_dtype)

    if name == "self_attn.rotary_pairs":
        energies, weighted = [], []
        for proj, heads in (("q_proj", attention.num_heads), ("k_proj", attention.num_kv_heads)):
            linear = getattr(attention, proj)
            rows = structured.output_energies(array(linear.weight), array(linear.bias), second, mean)
            energies.append(structured.per_pair(rows, heads, attention.head_dim))
            weighted.append(structured.per_pair(rows * sensitivity[f"self_attn.{proj}"], heads, attention.head_dim))
        return structured.pair_costs(*weighted, structured.rotary_pair_order(*energies))
    consumer_name = "self_attn.o_proj" if name == "self_attn.value_dims" else "mlp.down_proj"
    consumer = array(block.linear(consumer_name).weight)
    # rows scaled by the root mean squared loss gradient: the output error in loss units
    consumer *= np.sqrt(sensitivity[consumer_name])[:, None]
    if name == "mlp.neurons":
        return structured.neuron_costs(second, consumer, neuron_selection, damping, decompose.RANK_MULTIPLE)
    return structured.value_maps(second, consumer, attention.num_heads, attention.num_kv_heads, attention.head_dim,
                                 attention.head_dim, damping)[1]


def read_saved(path: Path) -> dict[str, np.ndarray]:
    """A saved first pass, every array read (a damaged file fails here, with one line, not later)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            return {key: stored[key] for key in stored.files}
    except Exception as exc:  # numpy raises several types (BadZipFile, EOFError, ...) for damaged files
        raise InputError(f"cannot read the first-pass file {path}: {type(exc).__name__}: {exc}") from None


def collect_spectra(reader: CheckpointReader, tokens: np.ndarray, layers: list[int], names: list[str],
                    work: Path, chunk_tokens: int, centered: bool, work_dtype, timer: StageTimer,
                    saved: Path | None = None, fingerprint: str = "", units: list[str] = (),
                    neuron_selection: str = "obs") -> dict[str, np.ndarray]:
    """{"model.layers.<i>.<name>": loss cost of dropping each output direction} for every chosen block
    and linear, from one streamed forward and backward pass of the dense model.

    Saved (atomically) to `saved`, or to work/sensitivity-spectra.npz, with `fingerprint` (of the
    model, calibration tokens and settings it was made from), and reused from there when the
    fingerprint matches: by a resumed run, or by runs at other target sizes.
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
            found = block_costs(block, chosen, block_inputs[index], output_grads,
                                input_grads if index > first else None, cos, sin, chunk_sequences, centered,
                                work_dtype, timer, list(units) if index in layers else [], neuron_selection)
            costs.update({f"{block_prefix(index)}{name}": values for name, values in found.items()})
            del block
            block_inputs.pop(index + 1).close(remove=True)  # its gradient is through; the file is done
    finally:
        for buffer in [*block_inputs.values(), *grads]:
            buffer.close(remove=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.tmp.npz")
    np.savez(temporary, **costs, **{FINGERPRINT_KEY: np.array(fingerprint)})
    temporary.replace(path)
    return costs
