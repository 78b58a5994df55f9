"""KVCache: the K and V tensors of every layer, allocated once up front in the compute dtype."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from worker_orcd.config import ModelConfig

logger = logging.getLogger(__name__)

BLOCK_SIZE = 16


@dataclass(slots=True)
class KVCache:
    """k, v [n_layers, num_slots, Hk, D]; layer i uses the contiguous views k[i], v[i]."""

    k: torch.Tensor
    v: torch.Tensor
    block_size: int

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        n_tokens: int,
        *,
        dtype: torch.dtype,
        device: torch.device,
        block_size: int = BLOCK_SIZE,
    ) -> KVCache:
        """Room for n_tokens tokens, rounded up to whole blocks."""
        n_blocks = -(-n_tokens // block_size)
        shape = (config.n_layers, n_blocks * block_size, config.n_kv_heads, config.head_dim)
        k = torch.zeros(shape, dtype=dtype, device=device)
        v = torch.zeros(shape, dtype=dtype, device=device)
        return cls(k, v, block_size)

    @staticmethod
    def bytes_for(config: ModelConfig, n_tokens: int, dtype: torch.dtype) -> int:
        per_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim
        return per_token * n_tokens * torch.empty(0, dtype=dtype).element_size()

    @property
    def num_slots(self) -> int:
        return self.k.shape[1]

    @property
    def num_blocks(self) -> int:
        return self.num_slots // self.block_size

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
