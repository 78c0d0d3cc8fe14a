"""Pass 1 of the spectrum allocation: stream the dense model once and keep, for every chosen linear,
the eigenvalues of its output moment (min(out, in) numbers each; a few MB for a 7B model).

The model is dense in this pass, so a block's four groups need no sequential order: one forward
per chunk feeds all four moments at once (four moment matrices in RAM instead of one). The block
outputs go to the next block through the same disk-backed activation files as compression.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from . import decompose
from .activations import ActivationPair, chunk_ranges, embed_into, require_finite
from .checkpoint import CheckpointReader
from .errors import NumericalError
from .modeling import EMBED, LINEAR_GROUPS, Block, Rotary, block_prefix
from .report import StageTimer
from .statistics import MomentAccumulator

log = logging.getLogger(__name__)

DOWN = LINEAR_GROUPS[3][0]


@torch.no_grad()
def block_spectra(block: Block, names: list[str], inputs, outputs, cos: torch.Tensor, sin: torch.Tensor,
                  chunk_sequences: int, centered: bool, work_dtype, timer: StageTimer) -> dict[str, np.ndarray]:
    """Output-moment eigenvalues of `names` in this dense block; writes its outputs (unless None)."""
    groups = [g for g, group in enumerate(LINEAR_GROUPS) if any(n in names for n in group)]
    product = torch.float64 if work_dtype == np.float64 else torch.float32
    down = block.linear(DOWN)
    sizes = {0: block.linear(LINEAR_GROUPS[0][0]).weight.shape[1], 1: block.linear(LINEAR_GROUPS[1][0]).weight.shape[1],
             2: block.linear(LINEAR_GROUPS[2][0]).weight.shape[1], 3: down.weight.shape[0]}
    moments = {g: MomentAccumulator(sizes[g], product) for g in groups}
    for start, stop in chunk_ranges(inputs.shape[0], chunk_sequences):
        with timer("forward"):
            x = inputs.read(start, stop)
            attention = block.attention_output(x, cos, sin)
            residual = block.after_attention(x, attention)
            activations = block.mlp_activations(residual)
            features = {0: block.input_layernorm(x), 1: attention, 2: block.post_attention_layernorm(residual)}
            if 3 in moments:
                features[3] = down(activations)
        with timer("statistics"):
            for g, accumulator in moments.items():
                accumulator.add(features[g])
        if outputs is not None:
            with timer("forward"):
                outputs.write(start, require_finite(block.block_output(residual, activations), "leave a block"))
    spectra: dict[str, np.ndarray] = {}
    with timer("eigen"):
        for g, accumulator in moments.items():
            if not accumulator.is_finite():
                raise NumericalError(f"NaN or Inf activations reach {', '.join(LINEAR_GROUPS[g])}")
            second = accumulator.second_moment().astype(work_dtype, copy=False)
            mean = accumulator.mean().astype(work_dtype, copy=False)
            group_inputs = decompose.InputMoments(second, mean, centered)
            for name in LINEAR_GROUPS[g]:
                if name not in names:
                    continue
                if g == 3:  # down's output moment was accumulated directly
                    values = np.linalg.eigvalsh(decompose.output_moment(second, mean, centered))[::-1]
                    spectra[name] = np.clip(values[:min(down.weight.shape)], 0.0, None)
                else:
                    linear = block.linear(name)
                    bias = linear.bias.detach().numpy() if linear.bias is not None else None
                    spectra[name] = decompose.output_spectrum(group_inputs, linear.weight.detach().numpy(), bias)
    return spectra


def collect_spectra(reader: CheckpointReader, tokens: np.ndarray, layers: list[int], names: list[str],
                    work: Path, chunk_tokens: int, centered: bool, work_dtype, timer: StageTimer) -> dict[str, np.ndarray]:
    """{"model.layers.<i>.<name>": eigenvalues} for every chosen block and linear, in one dense pass.

    Saved to work/spectra.npz (atomically) and reused from there by a resumed run.
    """
    path = Path(work) / "spectra.npz"
    if path.is_file():
        with np.load(path) as saved:
            return {key: saved[key] for key in saved.files}
    spec = reader.spec
    sequences, seqlen = tokens.shape
    chunk_sequences = max(1, chunk_tokens // seqlen)
    pair = ActivationPair(Path(work) / "spectra-pass", sequences, seqlen, spec.hidden_size)
    spectra: dict[str, np.ndarray] = {}
    try:
        with timer("read"):
            embedding = reader.tensor(EMBED)
        with timer("forward"):
            embed_into(embedding, tokens, pair.inputs, chunk_sequences)
        del embedding
        cos, sin = Rotary(spec).cos_sin(seqlen)
        last = max(layers)
        for index in range(last + 1):
            with timer("read"):
                block = Block.from_tensors(spec, reader.block_tensors(index))
            chosen = names if index in layers else []
            found = block_spectra(block, chosen, pair.inputs, pair.outputs if index < last else None, cos, sin,
                                  chunk_sequences, centered, work_dtype, timer)
            spectra.update({f"{block_prefix(index)}{name}": values for name, values in found.items()})
            pair.swap()
            del block
            log.info("spectra: block %d/%d", index + 1, last + 1, extra={"progress": (index + 1, last + 1, "spectra")})
    finally:
        pair.close(remove=True)
    temporary = path.with_name(".spectra.tmp.npz")
    np.savez(temporary, **spectra)
    temporary.replace(path)
    return spectra
