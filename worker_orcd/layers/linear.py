"""Linear layers that own their weight format and know how to place (fused) shards into it.

Every parameter carries a `weight_loader(param, tensor, shard_id)` and, when it packs several source
tensors, `shard_slices` mapping each shard id to its rows. The loader reads only these two
attributes. A layer built with `quantized=True` keeps its weight's shape and shard slices on the
meta device (so the load plan still checks every shard) and holds the real weight in `quantized`,
a packed weight of GGUF blocks that the loader fills (PackedWeight on CUDA, CpuPackedWeight, over
the file's memory map, on the CPU); a parameter whose file tensors are all dense is materialised
by the loader instead and the layer runs as a plain one.

Tensor parallel (worker_orcd/parallel.py): built with a `parallel` of several ranks and a `split`, a
layer holds this rank's part of its weight and its parameters carry a `partition` that tells the
loader which rows or columns of the file's tensor to read.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from worker_orcd import kernels
from worker_orcd.kernels.cpu.weights import CpuPackedWeight
from worker_orcd.kernels.quant.ops import RoundedX
from worker_orcd.kernels.quant.weights import PackedWeight
from worker_orcd.parallel import SINGLE, Parallel, split_linear

logger = logging.getLogger(__name__)

ShardId = str | int | None


def shard_shape(param: torch.Tensor, shard_id: ShardId) -> tuple[int, ...]:
    """Shape a source tensor must have to fill shard `shard_id` of `param` (None: the whole
    param)."""
    if shard_id is None:
        return tuple(param.shape)
    rows = param.shard_slices[shard_id]
    return (rows.stop - rows.start, *param.shape[1:])


def default_weight_loader(
    param: nn.Parameter, loaded: torch.Tensor, shard_id: ShardId = None
) -> None:
    """Copy `loaded` into `param` (or into its rows for `shard_id`), converting dtype and device."""
    expected = shard_shape(param, shard_id)
    if tuple(loaded.shape) != expected:
        raise ValueError(f"expected shape {expected}, got {tuple(loaded.shape)}")
    target = param.data if shard_id is None else param.data[param.shard_slices[shard_id]]
    with torch.no_grad():
        target.copy_(loaded)


def _param(*shape: int, meta: bool = False) -> nn.Parameter:
    data = torch.empty(*shape, device="meta") if meta else torch.empty(*shape)
    p = nn.Parameter(data, requires_grad=False)
    p.weight_loader = default_weight_loader
    return p


class Linear(nn.Module):
    """y = x W^T + b with W [out, in]; output rows may be packed from several named shards.

    Sizes are given whole; with `parallel` over several ranks, split="out" keeps this rank's part
    of every shard's rows (column-parallel), split="in" its part of the columns (row-parallel: the
    caller all-reduces the partial outputs). in_features and out_features are then this rank's.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = False,
        shards: dict[ShardId, int] | None = None,
        quantized: bool = False,
        parallel: Parallel = SINGLE,
        split: str | None = None,
    ) -> None:
        super().__init__()
        partition = split_linear(parallel, split, in_features, out_features, shards)
        if partition is not None and partition.dim == 1:
            if bias:
                raise ValueError("a bias on a weight split along its inputs would be added N times")
            in_features = partition.local(None)
        elif partition is not None:
            shards = {s: partition.local(s) for s in shards} if shards else None
            out_features = partition.local(None)
        self.in_features = in_features
        self.out_features = out_features
        self.weight = _param(out_features, in_features, meta=quantized)
        self.quantized: PackedWeight | CpuPackedWeight | None = None
        self.bias = _param(out_features) if bias else None
        if shards:
            if sum(shards.values()) != out_features:
                raise ValueError(f"shard sizes {shards} do not add up to {out_features}")
            slices: dict[ShardId, slice] = {}
            offset = 0
            for name, size in shards.items():
                slices[name] = slice(offset, offset + size)
                offset += size
            for p in (self.weight, self.bias):
                if p is not None:
                    p.shard_slices = slices
        for p in (self.weight, self.bias):
            if p is not None and partition is not None:
                p.partition = partition

    def forward(self, x: torch.Tensor, rounded: RoundedX | None = None) -> torch.Tensor:
        """[T, in] -> [T, out]; `rounded`: x rounded to int8 by its producer, for a quantized
        weight whose GEMV reads it (`PackedWeight.takes_rounded_x`)."""
        if self.quantized is not None:
            return self.quantized.matmul(x, self.bias, rounded)
        return kernels.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}"


class QKVLinear(Linear):
    """Fused q/k/v projection: rows are q (H*D), then k (Hk*D), then v (Hk*D); shards "q", "k",
    "v"."""

    def __init__(
        self,
        hidden_size: int,
        n_heads: int,
        n_kv_heads: int,
        head_dim: int,
        *,
        bias: bool,
        quantized: bool = False,
        parallel: Parallel = SINGLE,
    ) -> None:
        q_size, kv_size = n_heads * head_dim, n_kv_heads * head_dim
        sizes = {"q": q_size, "k": kv_size, "v": kv_size}
        super().__init__(
            hidden_size,
            sum(sizes.values()),
            bias=bias,
            shards=sizes,
            quantized=quantized,
            parallel=parallel,
            split="out",
        )
        self.q_size = len(parallel.part(q_size))  # this rank's
        self.kv_size = len(parallel.part(kv_size))


class GateUpLinear(Linear):
    """Fused gate/up projection: rows are gate (I) then up (I); shards 0 (gate) and 1 (up)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        quantized: bool = False,
        parallel: Parallel = SINGLE,
    ) -> None:
        super().__init__(
            hidden_size,
            2 * intermediate_size,
            shards={0: intermediate_size, 1: intermediate_size},
            quantized=quantized,
            parallel=parallel,
            split="out",
        )
