"""Tensor parallelism: what part of the model one rank holds, and the collectives between ranks.

A model split over N ranks is the same model on every rank, built with `Parallel(rank, N)`. The
attention heads and KV heads, the FFN and the vocabulary are cut into N contiguous parts and rank r
holds part r (Megatron-style):

    qkv_proj, gate_up_proj   rows (output features) by head / FFN unit; each packed shard (q, k, v;
                             gate, up) is cut on its own, so a rank holds its q|k|v and gate|up
    o_proj, down_proj        columns (input features), then one all-reduce of the partial outputs
    embed_tokens, lm_head    vocabulary rows: a masked lookup and an all-reduce; the head's logits
                             of every rank are gathered

Every parameter that is cut carries a `Partition` telling the loader which rows or columns of the
file's tensor this rank reads. Collectives run on torch.distributed's default group (NCCL on CUDA,
gloo on CPU), which engine/parallel.py sets up; with one rank they are no-ops.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Hashable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from worker_orcd.config import ModelConfig
from worker_orcd.errors import ModelLoadError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Parallel:
    """This process's place among the ranks of one model: rank in [0, size)."""

    rank: int = 0
    size: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.size:
            raise ValueError(f"rank {self.rank} is outside [0, {self.size})")

    def part(self, n: int) -> range:
        """This rank's part of n rows: contiguous parts of ceil(n / size), the last one shorter
        when size does not divide n."""
        per = -(-n // self.size)
        return range(min(n, self.rank * per), min(n, (self.rank + 1) * per))

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over the ranks, in place."""
        if self.size > 1:
            dist.all_reduce(x)
        return x

    def all_gather(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """x [..., len(part(n))] of every rank -> [..., n] on every rank, parts in rank order."""
        if self.size == 1:
            return x
        per = -(-n // self.size)
        if x.shape[-1] < per:  # the last part may be shorter
            x = F.pad(x, (0, per - x.shape[-1]))
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x)
        return torch.cat(parts, dim=-1)[..., :n]


SINGLE = Parallel()


@dataclass(frozen=True, slots=True)
class Partition:
    """How a rank's parameter is cut from the file's tensor along `dim` (0: rows, 1: columns).

    `parts` are the packed shards along that dim with their full sizes, in order (("q", 896),
    ("k", 128), ("v", 128)), or one (None, n) for an unpacked tensor. A source tensor that fills one
    shard is cut to this rank's part of it; a source tensor that holds every shard (Phi-3's fused
    attn_qkv, ffn_up) is cut to this rank's part of each shard, concatenated in the same order.
    """

    parallel: Parallel
    dim: int
    parts: tuple[tuple[Hashable, int], ...]

    def ranges(self, shard: Hashable) -> list[range]:
        """Indices along dim of the source tensor filling `shard` (None: a tensor holding every
        part) that this rank reads, in the order its parameter holds them."""
        if shard is not None or len(self.parts) == 1:
            return [self.parallel.part(dict(self.parts)[shard])]
        out, offset = [], 0
        for _, n in self.parts:
            own = self.parallel.part(n)
            out.append(range(offset + own.start, offset + own.stop))
            offset += n
        return out

    def local(self, shard: Hashable) -> int:
        """This rank's size along dim of what the source tensor filling `shard` holds."""
        return sum(len(r) for r in self.ranges(shard))

    def source_shape(self, shard: Hashable, local_shape: tuple[int, ...]) -> tuple[int, ...]:
        """Shape the file's tensor filling `shard` must have, given this rank's shape of it."""
        full = sum(n for _, n in self.parts) if shard is None else dict(self.parts)[shard]
        return tuple(full if d == self.dim else n for d, n in enumerate(local_shape))


def split_linear(
    parallel: Parallel,
    split: str | None,
    in_features: int,
    out_features: int,
    shards: dict[Hashable, int] | None,
) -> Partition | None:
    """The Partition of a linear weight [out, in] cut by `split`: "out" its rows (each shard on its
    own), "in" its columns; None when it is not cut (one rank, or no split)."""
    if parallel.size == 1 or split is None:
        return None
    if split == "out":
        return Partition(parallel, 0, tuple((shards or {None: out_features}).items()))
    if split == "in":
        return Partition(parallel, 1, ((None, in_features),))
    raise ValueError(f"split must be 'out', 'in' or None, got {split!r}")


def check_divisible(config: ModelConfig, size: int, source: object) -> None:
    """ModelLoadError unless `size` ranks can each hold whole attention heads, whole KV heads and
    an equal part of the FFN of `config` (read from `source`, named in the error)."""
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ModelLoadError(f"tensor_parallel_size must be a positive integer (got {size!r})")
    counts = {
        "attention heads": config.n_heads,
        "KV heads": config.n_kv_heads,
        "FFN size": config.intermediate_size,
    }
    bad = [f"{what} = {n}" for what, n in counts.items() if n % size]
    if bad:
        listed = bad[0] if len(bad) == 1 else f"{', '.join(bad[:-1])} and {bad[-1]}"
        verb = "is not a multiple" if len(bad) == 1 else "are not multiples"
        raise ModelLoadError(
            f"{source}: tensor_parallel_size {size} does not split this {config.architecture} "
            f"model: every rank needs whole heads and an equal part of the FFN, but {listed} "
            f"{verb} of {size}"
        )
    if config.vocab_size < size:
        raise ModelLoadError(
            f"{source}: tensor_parallel_size {size} exceeds the vocabulary of {config.vocab_size}"
        )


def rank_config(config: ModelConfig, parallel: Parallel) -> ModelConfig:
    """`config` with the head counts and FFN size of one rank: what its KV cache is sized by."""
    if parallel.size == 1:
        return config
    return dataclasses.replace(
        config,
        n_heads=config.n_heads // parallel.size,
        n_kv_heads=config.n_kv_heads // parallel.size,
        intermediate_size=config.intermediate_size // parallel.size,
    )
