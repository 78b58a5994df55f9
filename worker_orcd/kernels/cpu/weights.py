"""Quantized weights on the CPU: GGUF blocks left where the file's memory map has them.

`CpuQuantizedWeight` is one [n, k] tensor of one quant type, its bytes a uint8 [n, row_bytes] view
of the map (no copy: the pages are the page cache's, shared and read on first use).
`CpuPackedWeight` is a fused projection (qkv, gate/up) whose shards may differ in type or be dense
float tensors; its quantized shards run in one call of the kernels (`ops.linear`), each writing its
own columns, so nothing is concatenated (which would copy the map).

Both offer what the layers call on `PackedWeight` (kernels/quant/weights.py): matmul, embedding,
nbytes, quant_mix, takes_rounded_x.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from worker_orcd.kernels.cpu import ops
from worker_orcd.kernels.shards import bytes_by_type, stack_rows
from worker_orcd.kernels.shards import nbytes as shard_nbytes

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class CpuQuantizedWeight:
    """An [n, k] weight (n output rows of k inputs) as GGUF blocks: uint8 [n, row_bytes]."""

    qtype: GGMLQuantizationType
    n: int
    k: int
    blocks: torch.Tensor

    @classmethod
    def from_gguf(
        cls, raw: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, int]
    ) -> CpuQuantizedWeight:
        """`raw`: the tensor's GGUF bytes (uint8 CPU tensor, e.g. a view of the file's map),
        kept as they are; `shape`: torch order [n, k]."""
        n, k = shape
        if qtype not in ops.SUPPORTED:
            raise ValueError(f"no CPU quantized kernel for {qtype.name}")
        blocks = raw.reshape(n, -1) if raw.is_contiguous() else raw.contiguous().reshape(n, -1)
        w = cls(qtype, n, k, blocks)
        ops.check_part(ops.Part(qtype, blocks, 0), k)
        return w

    @property
    def nbytes(self) -> int:
        return self.blocks.numel()

    @property
    def device(self) -> torch.device:
        return self.blocks.device

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., k] -> [..., n] in x's dtype."""
        return CpuPackedWeight([(0, self)], self.n, self.k).matmul(x)

    def embedding(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the table, dequantized (only those rows): [*ids, k]."""
        rows = ops.dequantize_rows(self.blocks, self.qtype, self.k, ids)
        return rows.to(dtype).view(*ids.shape, self.k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return ops.dequantize_rows(self.blocks, self.qtype, self.k).to(dtype)


CpuShard = CpuQuantizedWeight | torch.Tensor


@dataclass(slots=True)
class CpuPackedWeight:
    """Rows of a fused projection: parts (row offset, weight) in order, together [n, k]."""

    parts: list[tuple[int, CpuShard]]
    n: int
    k: int
    # the kernels' arguments for the quantized parts, checked once (a decode step makes ~100
    # matmuls, and per-call checks in Python cost more than the smaller ones)
    _quant: list[ops.Part] = field(init=False, repr=False)
    _specs: tuple[tuple[int, int, int, int, int], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._quant = [
            ops.Part(s.qtype, s.blocks, row)
            for row, s in self.parts
            if isinstance(s, CpuQuantizedWeight)
        ]
        self._specs = ops.kernel_specs(self._quant, self.k, self.n)

    @classmethod
    def pack(cls, shards: list[CpuShard]) -> CpuPackedWeight:
        """Shards in row order (each kept as it is)."""
        parts, n, k = stack_rows(shards)
        return cls(parts, n, k)

    @property
    def nbytes(self) -> int:
        return sum(shard_nbytes(s) for _, s in self.parts)

    def quant_mix(self) -> Counter[str]:
        """Bytes per storage type ("Q5_0", "float32", ...)."""
        return bytes_by_type(self.parts)

    def takes_rounded_x(self, m: int, device: torch.device) -> bool:
        """The CPU kernels round x themselves (once per call): never."""
        return False

    def fuses_norm(self, m: int, device: torch.device) -> bool:
        """The norm before a CPU matmul is its own kernel: never inside."""
        return False

    def embedding(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of a single-part weight (an embedding table), dequantized: [*ids, k]."""
        if len(self.parts) != 1:
            raise ValueError("embedding lookup needs a weight of one part")
        s = self.parts[0][1]
        if isinstance(s, CpuQuantizedWeight):
            return s.embedding(ids, dtype)
        return F.embedding(ids, s).to(dtype)

    def matmul(
        self,
        x: torch.Tensor,
        bias: torch.Tensor | None = None,
        rounded: object = None,
        *,
        float32_out: bool = False,
    ) -> torch.Tensor:
        """x [..., k] -> [..., n] in x's dtype (computed in float32); `rounded` is ignored (the
        kernels round x themselves); `float32_out`: prompts keep a float32 result (logits; see
        ops.linear's bf16-f32 path)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.k)
        xf = x2 if x2.dtype == torch.float32 and x2.stride(1) == 1 else x2.float().contiguous()
        m = xf.shape[0]
        y = torch.empty((m, self.n), dtype=torch.float32)
        b = None if bias is None else bias.float().contiguous()
        if len(self._quant) == len(self.parts):  # all quantized: one call, bias included
            ops.linear_specs(xf, self._quant, self._specs, y, b, float32_out=float32_out)
        else:
            if self._quant:
                ops.linear_specs(xf, self._quant, self._specs, y, None, float32_out=float32_out)
            for row, s in self.parts:
                if not isinstance(s, CpuQuantizedWeight):
                    y[:, row : row + s.shape[0]] = F.linear(xf, s.float())
            if b is not None:
                y += b
        return (y if x.dtype == torch.float32 else y.to(x.dtype)).view(*lead, self.n)
