"""Weight containers that keep GGUF blocks quantized on the device.

`QuantizedWeight` is one [n, k] tensor of one quant type, held as planes (`formats`).
`PackedWeight` is the weight of a fused projection (qkv, gate/up) whose shards may differ in type
(a Q4_K_M file mixes Q4_K and Q6_K, Qwen's also Q5_0 and Q8_0) or be plain float tensors: shards
of one type are concatenated into one weight, so the common case is a single kernel launch.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from worker_orcd.kernels.quant.formats import check_shape, planes_nbytes, to_planes
from worker_orcd.kernels.quant.ops import (
    SCRATCH,
    NormIn,
    RoundedX,
    dequantize_planes,
    dequantize_reference,
    fuses_norm,
    matmul_path,
    quant_matmul,
    takes_rounded_x,
)
from worker_orcd.kernels.shards import bytes_by_type, stack_rows
from worker_orcd.kernels.shards import nbytes as shard_nbytes
from worker_orcd.kernels.shards import rows as shard_rows

logger = logging.getLogger(__name__)


def _use_kernels(device: torch.device) -> bool:
    return matmul_path(1, device) != "reference"


@dataclass(slots=True)
class QuantizedWeight:
    """An [n, k] weight (n output rows of k inputs) kept in its GGUF block format."""

    qtype: GGMLQuantizationType
    n: int
    k: int
    planes: dict[str, torch.Tensor]

    @classmethod
    def from_gguf(
        cls,
        raw: torch.Tensor | np.ndarray,
        qtype: GGMLQuantizationType,
        shape: tuple[int, int],
        device: torch.device | str,
    ) -> QuantizedWeight:
        """`raw`: the tensor's GGUF bytes (any shape, uint8); `shape`: torch order [n, k]."""
        n, k = shape
        check_shape(qtype, n, k)
        if isinstance(raw, np.ndarray):
            raw = torch.from_numpy(np.ascontiguousarray(raw).view(np.uint8))
        raw = raw.reshape(-1).to(device)
        return cls(qtype, n, k, to_planes(raw, qtype, n, k))

    @property
    def device(self) -> torch.device:
        return next(iter(self.planes.values())).device

    @property
    def nbytes(self) -> int:
        return planes_nbytes(self.planes)

    @staticmethod
    def cat_rows(weights: list[QuantizedWeight]) -> QuantizedWeight:
        """Stack weights of one type and row length (e.g. q, k, v) into one [sum n, k] weight."""
        first = weights[0]
        for w in weights[1:]:
            if w.qtype != first.qtype or w.k != first.k:
                raise ValueError(
                    f"cannot stack {w.qtype.name} [{w.n}, {w.k}] under "
                    f"{first.qtype.name} [{first.n}, {first.k}]"
                )
        planes = {
            name: torch.cat([w.planes[name] for w in weights], dim=0) for name in first.planes
        }
        return QuantizedWeight(first.qtype, sum(w.n for w in weights), first.k, planes)

    def matmul(
        self,
        x: torch.Tensor,
        out: torch.Tensor | None = None,
        rounded: RoundedX | None = None,
        norm: NormIn | None = None,
    ) -> torch.Tensor:
        """x [..., k] -> [..., n] in x's dtype (float32 on CPU); `rounded`: x rounded by its
        producer, read where `takes_rounded_x`; `norm`: x normalized here (`fuses_norm`)."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.k)
        out2 = None if out is None else out.view(-1, self.n)
        y = quant_matmul(
            x2, self.planes, self.qtype, self.n, self.k, out=out2, rounded=rounded, norm=norm
        )
        return y.view(*lead, self.n)

    def embedding(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of the weight (an embedding table [vocab, hidden]), dequantized: [*ids, k]."""
        flat = ids.reshape(-1)
        if _use_kernels(self.device):
            rows = dequantize_planes(self.planes, self.qtype, self.n, self.k, ids=flat, dtype=dtype)
        else:
            rows = dequantize_reference(self.planes, self.qtype, self.n, self.k, ids=flat).to(dtype)
        return rows.view(*ids.shape, self.k)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if _use_kernels(self.device):
            return dequantize_planes(self.planes, self.qtype, self.n, self.k, dtype=dtype)
        return dequantize_reference(self.planes, self.qtype, self.n, self.k).to(dtype)


Shard = QuantizedWeight | torch.Tensor


@dataclass(slots=True)
class PackedWeight:
    """Rows of a fused projection: parts (row offset, weight) in order, together [n, k]."""

    n: int
    k: int
    parts: list[tuple[int, Shard]]

    @classmethod
    def pack(cls, shards: list[Shard]) -> PackedWeight:
        """Shards in row order; neighbours of one quant type become one weight."""
        merged: list[Shard] = []
        for s in shards:
            prev = merged[-1] if merged else None
            if (
                isinstance(s, QuantizedWeight)
                and isinstance(prev, QuantizedWeight)
                and prev.qtype == s.qtype
                and prev.k == s.k
            ):
                merged[-1] = QuantizedWeight.cat_rows([prev, s])
            else:
                merged.append(s)
        parts, n, k = stack_rows(merged)
        return cls(n, k, parts)

    @property
    def nbytes(self) -> int:
        return sum(shard_nbytes(s) for _, s in self.parts)

    def quant_mix(self) -> Counter[str]:
        """Bytes per storage type ("Q4_K", "bfloat16", ...)."""
        return bytes_by_type(self.parts)

    def embedding(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows `ids` of a single-part weight (an embedding table), dequantized: [*ids, k]."""
        if len(self.parts) != 1:
            raise ValueError("embedding lookup needs a weight of one part")
        s = self.parts[0][1]
        if isinstance(s, QuantizedWeight):
            return s.embedding(ids, dtype)
        return F.embedding(ids, s).to(dtype)

    def takes_rounded_x(self, m: int, device: torch.device) -> bool:
        """Whether a matmul of m rows on `device` reads x rounded to int8 once (`RoundedX`), so
        that the kernel producing x should round it as well."""
        return any(
            isinstance(s, QuantizedWeight) and takes_rounded_x(s.qtype, s.n, s.k, m, device)
            for _, s in self.parts
        )

    def fuses_norm(self, m: int, device: torch.device) -> bool:
        """Whether `norm_matmul` of m rows normalizes its input inside the GEMVs (every part's
        GEMV reads a short row and rounds it itself: Qwen's 896-wide weights at decode)."""
        return all(
            isinstance(s, QuantizedWeight) and fuses_norm(s.qtype, s.n, s.k, m, device)
            for _, s in self.parts
        )

    def norm_matmul(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        norm_weight: torch.Tensor,
        eps: float,
        bias: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(matmul(rms_norm(x + residual) * norm_weight) + bias, x + residual) for x [M, k]
        where `fuses_norm`: the add_rms_norm kernel's work done by the GEMVs (the first part's
        launch writes x + residual), the same bits without its launch."""
        m = x.shape[0]
        summed = None if residual is None else torch.empty_like(x)
        y = torch.empty((m, self.n), dtype=x.dtype, device=x.device)
        for i, (row, s) in enumerate(self.parts):
            norm = NormIn(residual, norm_weight, eps, summed if i == 0 else None)
            s.matmul(x, out=y[:, row : row + s.n], norm=norm)
        if bias is not None:
            y += bias
        return y, x if summed is None else summed

    def matmul(
        self, x: torch.Tensor, bias: torch.Tensor | None = None, rounded: RoundedX | None = None
    ) -> torch.Tensor:
        """x [..., k] -> [..., n] in x's dtype; `rounded`: x rounded by its producer (see
        `takes_rounded_x`), shared by the parts that read it."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.k)
        m = x2.shape[0]
        if len(self.parts) == 1:
            y = _matmul_part(x2, self.parts[0][1], None, rounded)
        elif matmul_path(m, x.device) == "dense":
            # prefill: every part into one scratch weight, then one cuBLAS matmul
            w = SCRATCH.get((self.n, self.k), x.dtype, x.device)
            for row, s in self.parts:
                dst = w[row : row + shard_rows(s)]
                if isinstance(s, QuantizedWeight):
                    dequantize_planes(s.planes, s.qtype, s.n, s.k, out=dst)
                else:
                    dst.copy_(s)
            y = F.linear(x2, w)
        else:
            y = torch.empty((m, self.n), dtype=x.dtype, device=x.device)
            for row, s in self.parts:
                _matmul_part(x2, s, y[:, row : row + shard_rows(s)], rounded)
        if bias is not None:
            y += bias
        return y.view(*lead, self.n)


def _matmul_part(
    x: torch.Tensor, s: Shard, out: torch.Tensor | None, rounded: RoundedX | None = None
) -> torch.Tensor:
    if isinstance(s, QuantizedWeight):
        return s.matmul(x, out=out, rounded=rounded)
    y = F.linear(x, s.to(x.dtype))
    if out is None:
        return y
    return out.copy_(y)
