"""Loading a (compressed) checkpoint back as a torch module for inference."""
from __future__ import annotations

from pathlib import Path

import torch

from .storage.checkpoint import CheckpointReader
from .model.modeling import EMBED, FINAL_NORM, LM_HEAD, CausalLM, block_class


def load(checkpoint: str | Path, dtype: torch.dtype | None = None) -> CausalLM:
    """The whole model in memory: `model(input_ids) -> logits` (float32); low-rank linears stay
    factored, narrowed blocks narrow. `dtype`: of the weights, None keeps the stored one (a bf16
    checkpoint stays bf16, one copy of each tensor as read); torch.float32 on request."""
    reader = CheckpointReader(checkpoint)
    spec = reader.spec

    def cast(tensor: torch.Tensor) -> torch.Tensor:
        return tensor if dtype is None else tensor.to(dtype)

    blocks = [block_class(spec).from_tensors(spec, reader.block_tensors(i), i, dtype) for i in range(spec.num_layers)]
    head = None if spec.tie_word_embeddings else cast(reader.tensor(LM_HEAD))
    model = CausalLM(spec, blocks, cast(reader.tensor(EMBED)), cast(reader.tensor(FINAL_NORM)), head)
    return model.eval()
