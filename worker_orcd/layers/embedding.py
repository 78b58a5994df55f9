"""Token embedding and the output head (which may share the embedding's weight)."""

from __future__ import annotations

import torch
from torch import nn

from worker_orcd import kernels
from worker_orcd.layers.linear import default_weight_loader


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = default_weight_loader

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return kernels.embedding(ids, self.weight)  # [T] -> [T, D]


class LMHead(nn.Module):
    """hidden [N, D] -> float32 logits [N, V]. Tied: reuses the embedding's Parameter."""

    def __init__(self, vocab_size: int, hidden_size: int, tied_to: VocabEmbedding | None) -> None:
        super().__init__()
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
            self.weight.weight_loader = default_weight_loader

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return kernels.linear(hidden, self.weight).float()
