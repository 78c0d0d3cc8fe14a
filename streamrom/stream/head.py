"""The top of the model, once: the final norm, the output head and the next-token loss.

Logits (positions x vocabulary floats) are the largest tensor of a forward pass: each position's loss
depends on its own hidden state only, so positions go through the head in slices, exactly.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..report import memory
from ..storage.checkpoint import CheckpointReader
from ..model.modeling import EMBED, FINAL_NORM, LM_HEAD, norm


class LossHead:
    """Final norm and output head of a checkpoint (float32), and the summed next-token loss."""

    def __init__(self, reader: CheckpointReader, embedding: torch.Tensor | None = None):
        """`embedding`: the input embedding if already read (a tied head reuses it)."""
        spec = reader.spec
        self.norm = norm(spec)
        self.norm.weight.data = reader.tensor(FINAL_NORM).float()
        if spec.tie_word_embeddings:
            self.weight = (embedding if embedding is not None else reader.tensor(EMBED)).float()
        else:
            self.weight = reader.tensor(LM_HEAD).float()

    def slices(self, positions: int):
        step = memory.HEAD_POSITIONS  # (the memory estimate counts one slice of logits)
        for first in range(0, positions, step):
            yield slice(first, min(first + step, positions))

    @torch.no_grad()
    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> float:
        """Summed negative log-likelihood of `targets` (batch, positions) given the hidden states of the
        positions before them (batch, positions, hidden)."""
        total = 0.0
        for part in self.slices(hidden.shape[1]):
            logits = F.linear(self.norm(hidden[:, part]), self.weight)
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, part].reshape(-1),
                                     reduction="sum").item()
        return total

    @torch.no_grad()
    def log_probs(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token log-probabilities of a few positions (batch, positions, vocabulary): call it on
        one of `slices` at a time."""
        return F.log_softmax(F.linear(self.norm(hidden), self.weight), dim=-1)

    def loss_and_gradient(self, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[float, torch.Tensor]:
        """The same loss, and its gradient with respect to `hidden`."""
        total, grad = 0.0, torch.zeros_like(hidden)
        for part in self.slices(hidden.shape[1]):
            with torch.enable_grad():
                piece = hidden[:, part].clone().requires_grad_(True)
                logits = F.linear(self.norm(piece), self.weight)
                loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[:, part].reshape(-1),
                                       reduction="sum")
                loss.backward()
            grad[:, part] = piece.grad
            total += loss.item()
        return total, grad
