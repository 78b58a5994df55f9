"""What test followers load: a real GGUFShard with a failure put into one rank's forward pass.

Importable in a spawned follower: keep the imports light (no transformers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from worker_orcd.engine.kv_cache import KVCache
from worker_orcd.engine.parallel import GGUFShard
from worker_orcd.model import CausalLM
from worker_orcd.parallel import Parallel


@dataclass(frozen=True, slots=True)
class FailingPass:
    """`inner`'s model, whose last MLP raises on rank `rank` (after the first all-reduces of a pass
    went through)."""

    inner: GGUFShard
    rank: int

    def __call__(self, parallel: Parallel, device: torch.device) -> tuple[CausalLM, KVCache]:
        model, kv = self.inner(parallel, device)
        if parallel.rank == self.rank:
            model.model.layers[-1].mlp.forward = _boom
        return model, kv


def _boom(*args: Any) -> torch.Tensor:
    raise RuntimeError("injected failure in this rank's MLP")


@dataclass(frozen=True, slots=True)
class RankSum:
    """Run on every rank: the all-reduced sum of rank + 1, and this rank's device type."""

    def __call__(self, parallel: Parallel, device: torch.device) -> tuple[float, str]:
        x = torch.tensor([parallel.rank + 1.0], device=device)
        return float(parallel.all_reduce(x)), device.type
