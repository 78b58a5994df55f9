"""Attention over a paged KV cache for a flat batch of tokens from several sequences (torch
reference).

A forward pass carries T tokens belonging to B sequences, laid out one sequence after another.
Sequence b owns tokens [query_start[b], query_start[b+1]) of the batch; after this step its KV cache
holds context_lens[b] tokens, the last (query_start[b+1] - query_start[b]) of which are the ones in
the batch. Prefill (a whole prompt or a chunk of it after earlier chunks) and decode (one token per
sequence) are the same computation with different query lengths.

The cache of one layer is two tensors [num_slots, Hk, D]; slot s lives in block s // block_size.
Sequence b's blocks are block_tables[b]; the new tokens are written to slot_mapping[t] before
attention reads them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from worker_orcd.kernels.quant.ops import RoundedX, round_x_reference

# Query rows per step of the reference kernel: bounds the [Hk, G, rows, C] score tensor for long
# prompts.
_QUERY_CHUNK = 512


@dataclass(slots=True)
class AttentionMetadata:
    """Where every token of a flat batch sits: built once per forward by the model runner.

    Device tensors (what a GPU kernel reads): slot_mapping [T] int64, query_start_t [B+1] int32,
    context_lens_t [B] int32, block_tables [B, max_blocks] int32. Host copies of the lengths let the
    reference path loop without device syncs; kv_slots[b] is sequence b's context slots in order, as
    a slice when they are contiguous (batch 1 on a fresh cache) or an index tensor otherwise.
    """

    slot_mapping: torch.Tensor
    query_start: list[int]
    context_lens: list[int]
    kv_slots: list[slice | torch.Tensor]
    query_start_t: torch.Tensor
    context_lens_t: torch.Tensor
    block_tables: torch.Tensor
    block_size: int
    max_query_len: int
    max_context_len: int

    @property
    def num_seqs(self) -> int:
        return len(self.context_lens)

    @property
    def num_tokens(self) -> int:
        return self.query_start[-1]

    @property
    def is_decode(self) -> bool:
        return self.max_query_len == 1


def store_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write k, v [T, Hk, D] into the caches [S, Hk, D] at slot_mapping [T]."""
    k_cache.index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    rounded: RoundedX | None = None,
) -> torch.Tensor:
    """Causal attention of q [T, H, D] over each sequence's cached context -> [T, H, D];
    `rounded`: filled with the output [T, H D] rounded to int8 as the quantized GEMVs read it.

    Any number of query heads per KV head (H % Hk == 0; MHA is G = 1). With a sliding window W, a
    query at position p sees keys at positions p - W + 1 .. p (W keys including itself), as
    transformers does.
    """
    n_tokens, n_heads, head_dim = q.shape
    n_kv = k_cache.shape[1]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads are not a multiple of {n_kv} KV heads")
    group = n_heads // n_kv
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    out = torch.empty_like(q)
    for b in range(meta.num_seqs):
        start, end = meta.query_start[b], meta.query_start[b + 1]
        n_ctx = meta.context_lens[b]
        slots = meta.kv_slots[b]
        keys = k_cache[slots].permute(1, 0, 2).unsqueeze(1)  # [Hk, 1, C, D]
        values = v_cache[slots].permute(1, 0, 2).unsqueeze(1)  # [Hk, 1, C, D]
        first_pos = n_ctx - (end - start)
        for s in range(start, end, _QUERY_CHUNK):
            e = min(s + _QUERY_CHUNK, end)
            rows = e - s
            qb = q[s:e].view(rows, n_kv, group, head_dim).permute(1, 2, 0, 3)  # [Hk, G, L, D]
            scores = torch.matmul(qb, keys.transpose(-1, -2)).float() * scale  # [Hk, G, L, C]
            mask = _mask(first_pos + s - start, rows, n_ctx, sliding_window, q.device)
            if mask is not None:
                scores.masked_fill_(mask, float("-inf"))
            probs = torch.softmax(scores, dim=-1).to(values.dtype)
            o = torch.matmul(probs, values)  # [Hk, G, L, D]
            out[s:e] = o.permute(2, 0, 1, 3).reshape(rows, n_heads, head_dim)
    if rounded is not None:
        round_x_reference(out.reshape(n_tokens, -1), out=rounded)
    return out


def _mask(
    first_pos: int, rows: int, n_ctx: int, window: int | None, device: torch.device
) -> torch.Tensor | None:
    """True where a query (rows starting at position first_pos) must not see a key; None if none."""
    last_pos = first_pos + rows - 1
    needs_causal = last_pos < n_ctx - 1 or rows > 1
    needs_window = window is not None and first_pos - window + 1 > 0
    if not needs_causal and not needs_window:
        return None
    q_pos = torch.arange(first_pos, first_pos + rows, device=device)[:, None]  # [L, 1]
    k_pos = torch.arange(n_ctx, device=device)[None, :]  # [1, C]
    mask = k_pos > q_pos
    if window is not None:
        mask |= k_pos <= q_pos - window
    return mask  # [L, C], broadcast over [Hk, G]
