"""Token embedding and the output head (which may share the embedding's weight).

With `quantized=True` the weight is a meta-device placeholder (shape only) and the loader puts the
GGUF blocks in `quantized` (PackedWeight on CUDA, CpuPackedWeight on the CPU); a tied head holds
the same Parameter, so the loader gives it the same packed weight. A quantized table dequantizes
only the rows looked up.

Tensor parallel: with a `parallel` of several ranks each rank holds the rows of its part of the
vocabulary (`Parallel.part`). The embedding looks up the ids in its part (zero rows for the others)
and all-reduces; the head computes the logits of its part and gathers every rank's.
"""

from __future__ import annotations

import torch
from torch import nn

from worker_orcd import kernels
from worker_orcd.kernels.cpu.weights import CpuPackedWeight
from worker_orcd.kernels.quant.weights import PackedWeight
from worker_orcd.layers.linear import default_weight_loader
from worker_orcd.parallel import SINGLE, Parallel, Partition


def _table(vocab_size: int, hidden_size: int, quantized: bool, parallel: Parallel) -> nn.Parameter:
    rows = len(parallel.part(vocab_size))
    data = torch.empty(rows, hidden_size, device="meta" if quantized else None)
    p = nn.Parameter(data, requires_grad=False)
    p.weight_loader = default_weight_loader
    if parallel.size > 1:
        p.partition = Partition(parallel, 0, ((None, vocab_size),))
    return p


class VocabEmbedding(nn.Module):
    def __init__(
        self,
        vocab_size: int,
        hidden_size: int,
        *,
        quantized: bool = False,
        parallel: Parallel = SINGLE,
    ) -> None:
        super().__init__()
        self.parallel = parallel
        self.vocab_range = parallel.part(vocab_size)  # the ids whose rows this rank holds
        self.weight = _table(vocab_size, hidden_size, quantized, parallel)
        self.quantized: PackedWeight | CpuPackedWeight | None = None
        self.dtype = torch.get_default_dtype()  # of the looked-up rows (the build's compute dtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.parallel.size == 1:
            return self._lookup(ids)  # [T] -> [T, D]
        first, end = self.vocab_range.start, self.vocab_range.stop
        mine = (ids >= first) & (ids < end)
        rows = self._lookup(torch.where(mine, ids - first, 0))  # [T, D]
        return self.parallel.all_reduce(rows.masked_fill_(~mine.unsqueeze(-1), 0))

    def _lookup(self, ids: torch.Tensor) -> torch.Tensor:
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
        parallel: Parallel = SINGLE,
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.parallel = parallel
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = _table(vocab_size, hidden_size, quantized, parallel)
        self.quantized: PackedWeight | CpuPackedWeight | None = None
        self.dtype = torch.get_default_dtype()  # of the looked-up rows (the build's compute dtype)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if isinstance(self.quantized, CpuPackedWeight):  # logits of many rows stay float32
            return self.quantized.matmul(hidden, float32_out=True).float()
        if self.quantized is not None:
            logits = self.quantized.matmul(hidden).float()
        else:
            logits = kernels.linear(hidden, self.weight).float()
        return self.parallel.all_gather(logits, self.vocab_size)  # [N, V]
