"""Perplexity as torchmetrics: summed token negative log-likelihood, synchronised across processes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchmetrics import Metric


class TokenPerplexity(Metric):
    """``exp(sum NLL / tokens)`` of next-token prediction.

    Cross-entropy is computed in float32 whatever the logits' dtype (a bf16 softmax over the
    vocabulary is ~2 % off; fp16 overflows), and padding (``mask == 0``) is ignored.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> None:
        """``logits [B, T, V]`` predicting ``input_ids [B, T]`` shifted by one; ``attention_mask [B, T]``."""
        targets = input_ids[:, 1:]
        nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="none")
        weight = torch.ones_like(nll) if attention_mask is None else attention_mask[:, 1:].flatten().to(nll.dtype)
        if attention_mask is not None:
            weight = weight * attention_mask[:, :-1].flatten().to(nll.dtype)
        self.nll += (nll * weight).sum().double()
        self.tokens += weight.sum().double()

    def compute(self) -> torch.Tensor:
        return torch.exp(self.nll / self.tokens.clamp_min(1))
