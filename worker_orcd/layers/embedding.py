"""Token embedding and the output head (which may share the embedding's weight).

With `quantized=True` the weight is a meta-device placeholder (shape only) and the loader puts the
GGUF blocks in `quantized` (PackedWeight on CUDA, CpuPackedWeight on the CPU); a tied head holds
the same Parameter, so the loader gives it the same packed weight. A quantized table dequantizes
only the rows looked up.
"""

from __future__ import annotations

import torch
from torch import nn

from worker_orcd import kernels
from worker_orcd.kernels.cpu.weights import CpuPackedWeight
from worker_orcd.kernels.quant.weights import PackedWeight
from worker_orcd.layers.linear import default_weight_loader


def _table(vocab_size: int, hidden_size: int, quantized: bool) -> nn.Parameter:
    data = torch.empty(vocab_size, hidden_size, device="meta" if quantized else None)
    p = nn.Parameter(data, requires_grad=False)
    p.weight_loader = default_weight_loader
    return p


class VocabEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int, *, quantized: bool = False) -> None:
        super().__init__()
        self.weight = _table(vocab_size, hidden_size, quantized)
        self.quantized: PackedWeight | CpuPackedWeight | None = None
        self.dtype = torch.get_default_dtype()  # of the looked-up rows (the build's compute dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.quantized is not None:
            return self.quantized.embedding(ids, self.dtype)  # [T] -> [T, D]
        return kernels.embedding(ids, self.weight)  # [T] -> [T, D]


class LMHead(nn.Module):
    """hidden [N, D] -> float32 logits [N, V]. Tied: reuses the embedding's Parameter."""

    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        tied_to: VocabEmbedding | None,
        *,
        quantized: bool = False,
    ) -> None:
        super().__init__()
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = _table(vocab_size, hidden_size, quantized)
        self.quantized: PackedWeight | CpuPackedWeight | None = None
        self.dtype = torch.get_default_dtype()  # of the looked-up rows (the build's compute dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if isinstance(self.quantized, CpuPackedWeight):  # logits of many rows stay float32
            return self.quantized.matmul(hidden, float32_out=True).float()
        if self.quantized is not None:
            return self.quantized.matmul(hidden).float()
        return kernels.linear(hidden, self.weight).float()
