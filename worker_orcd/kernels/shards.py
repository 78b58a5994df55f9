"""The parts of a fused projection's weight, for both back ends' packed weights
(`quant.weights.PackedWeight`, `cpu.weights.CpuPackedWeight`): each part is a quantized weight
(`n`, `k`, `qtype`, `nbytes`) or a plain float tensor [n, k]."""

from __future__ import annotations

from collections import Counter
from typing import Protocol, TypeVar

import torch
from gguf import GGMLQuantizationType


class Quantized(Protocol):
    n: int
    k: int
    qtype: GGMLQuantizationType

    @property
    def nbytes(self) -> int: ...


S = TypeVar("S", bound="Quantized | torch.Tensor")


def rows(s: Quantized | torch.Tensor) -> int:
    return s.shape[0] if isinstance(s, torch.Tensor) else s.n


def cols(s: Quantized | torch.Tensor) -> int:
    return s.shape[1] if isinstance(s, torch.Tensor) else s.k


def nbytes(s: Quantized | torch.Tensor) -> int:
    return s.numel() * s.element_size() if isinstance(s, torch.Tensor) else s.nbytes


def stack_rows(shards: list[S]) -> tuple[list[tuple[int, S]], int, int]:
    """Shards in row order -> (each with its first row, rows in all, the columns they share)."""
    k = cols(shards[0])
    parts: list[tuple[int, S]] = []
    row = 0
    for s in shards:
        if cols(s) != k:
            raise ValueError(f"shards of a packed weight must share k={k}, got {cols(s)}")
        parts.append((row, s))
        row += rows(s)
    return parts, row, k


def bytes_by_type(parts: list[tuple[int, S]]) -> Counter[str]:
    """Bytes per storage type ("Q4_K", "bfloat16", ...)."""
    mix: Counter[str] = Counter()
    for _, s in parts:
        name = str(s.dtype).removeprefix("torch.") if isinstance(s, torch.Tensor) else s.qtype.name
        mix[name] += nbytes(s)
    return mix
