"""Loading a (compressed) checkpoint back as a torch module for inference."""
from __future__ import annotations

from pathlib import Path

from .checkpoint import CheckpointReader
from .modeling import EMBED, FINAL_NORM, LM_HEAD, CausalLM, block_class


def load(checkpoint: str | Path) -> CausalLM:
    """The whole model in memory: `model(input_ids) -> logits`; low-rank linears stay factored."""
    reader = CheckpointReader(checkpoint)
    spec = reader.spec
    blocks = [block_class(spec).from_tensors(spec, reader.block_tensors(i), i) for i in range(spec.num_layers)]
    head = None if spec.tie_word_embeddings else reader.tensor(LM_HEAD)
    model = CausalLM(spec, blocks, reader.tensor(EMBED), reader.tensor(FINAL_NORM), head)
    return model.eval()
