"""KVCache: the K and V tensors of every layer, one paged pool shared by all sequences.

The pool is allocated once at load, in the compute dtype; blocks of it are handed to sequences as
they grow (block_manager.py). On CPU it is left unwritten (`torch.empty`): the OS commits its pages
as sequences first write them, so resident memory grows with use. On CUDA it is zeroed.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from worker_orcd.config import ModelConfig
from worker_orcd.errors import InsufficientVramError, ModelLoadError

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
        make = torch.empty if torch.device(device).type == "cpu" else torch.zeros
        k = make(shape, dtype=dtype, device=device)
        v = make(shape, dtype=dtype, device=device)
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


# What a forward pass needs beside the weights and the cache, as a multiple of the largest
# activations counted below (norms, projections, attention, logits and the sampler's copies), plus
# a fixed part for the CUDA context's own work and the graphs' pool.
_WORK_FACTOR = 3
_WORK_FIXED = 1 << 30


def work_bytes(config: ModelConfig, max_batch_tokens: int, max_num_seqs: int) -> int:
    """An upper estimate of the memory a forward pass and the sampler take (bytes)."""
    width = 4 * config.hidden_size + 2 * config.intermediate_size
    width += (config.n_heads + 2 * config.n_kv_heads) * config.head_dim
    acts = max_batch_tokens * width * 4  # float32 at most
    logits = max_num_seqs * config.vocab_size * 4 * 6  # logits, filtered, sorted, order, probs
    return _WORK_FACTOR * (acts + logits) + _WORK_FIXED


def plan_kv_tokens(
    config: ModelConfig,
    context: int,
    *,
    dtype: torch.dtype,
    device: torch.device,
    max_num_seqs: int,
    max_batch_tokens: int,
    kv_cache_tokens: int | None,
    gpu_memory_utilization: float,
    weights_to_come: int = 0,
    block_size: int = BLOCK_SIZE,
) -> int:
    """Slots of the shared cache: kv_cache_tokens if given; else on CUDA what the device's free
    memory allows within gpu_memory_utilization of its total, less the work estimate and the bytes
    of weights not loaded yet; else (CPU) one full-length sequence. Never more than max_num_seqs
    sequences of `context` tokens use."""
    cap = max_num_seqs * context
    if kv_cache_tokens is not None:
        if kv_cache_tokens < block_size:
            raise ModelLoadError(
                f"kv_cache_tokens {kv_cache_tokens} is below one block of {block_size} tokens"
            )
        return kv_cache_tokens
    if device.type != "cuda":
        return context
    free, total = torch.cuda.mem_get_info(device)
    per_token = KVCache.bytes_for(config, 1, dtype)
    spare = free - (1.0 - gpu_memory_utilization) * total
    budget = int(spare) - work_bytes(config, max_batch_tokens, max_num_seqs) - weights_to_come
    tokens = min(cap, budget // per_token // block_size * block_size)
    if tokens < block_size:
        raise InsufficientVramError(
            f"no room for a KV cache on {device}: {free / 2**30:.2f} GiB free of "
            f"{total / 2**30:.2f} GiB, gpu_memory_utilization {gpu_memory_utilization} keeps "
            f"{(1 - gpu_memory_utilization) * total / 2**30:.2f} GiB back and a forward pass needs "
            f"~{work_bytes(config, max_batch_tokens, max_num_seqs) / 2**30:.2f} GiB"
        )
    logger.info(
        "KV cache: %d tokens (%.2f GiB) from %.2f GiB free, gpu_memory_utilization %.2f",
        tokens,
        tokens * per_token / 2**30,
        free / 2**30,
        gpu_memory_utilization,
    )
    return tokens
