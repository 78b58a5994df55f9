"""Small kernels around a captured decode step: its per-token inputs from positions and block
tables, and the greedy pick that advances the inputs. A launch or two instead of a dozen torch
ops (a launch costs about as much as the work of any of them)."""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from worker_orcd.kernels.triton import pdl

logger = logging.getLogger(__name__)


@triton.jit
def _slots_kernel(
    pos_ptr, bt_ptr, slot_ptr, ctx_ptr, stride_bt, PAGE: tl.constexpr, PDL: tl.constexpr
):
    pdl.prologue(PDL)
    row = tl.program_id(0)
    pos = tl.load(pos_ptr + row)
    block = tl.load(bt_ptr + row.to(tl.int64) * stride_bt + pos // PAGE).to(tl.int64)
    tl.store(slot_ptr + row, block * PAGE + pos % PAGE)  # negative for a padding row
    tl.store(ctx_ptr + row, (pos + 1).to(tl.int32))


def slots_and_context_lens(
    positions: torch.Tensor,  # [B] int64
    block_tables: torch.Tensor,  # [B, max_blocks] int32
    slots: torch.Tensor,  # [B] int64, written
    context_lens: torch.Tensor,  # [B] int32, written
    block_size: int,
) -> None:
    """slot = block_tables[b, pos // block_size] * block_size + pos % block_size; ctx = pos + 1."""
    n = positions.shape[0]
    _slots_kernel[(n,)](
        positions,
        block_tables,
        slots,
        context_lens,
        block_tables.stride(0),
        PAGE=block_size,
        **pdl.launch(positions, n),
        num_warps=1,
    )


# Logits per program of the greedy pick's first pass.
_ARGMAX_BLOCK = 2048


@triton.jit
def _argmax_part_kernel(
    logits_ptr, val_ptr, idx_ptr, V, stride_l, CHUNKS, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    """The largest logit of one chunk of a row and its first index (NaN counts as the largest,
    as in torch.argmax)."""
    pdl.prologue(PDL)
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    i = chunk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(logits_ptr + row.to(tl.int64) * stride_l + i, mask=i < V, other=float("-inf"))
    x = tl.where(x != x, float("inf"), x)
    best = tl.max(x, axis=0)
    first = tl.min(tl.where(x == best, i, V), axis=0)
    tl.store(val_ptr + row * CHUNKS + chunk, best)
    tl.store(idx_ptr + row * CHUNKS + chunk, first)


@triton.jit
def _argmax_advance_kernel(
    val_ptr,
    idx_ptr,
    next_ptr,
    ids_ptr,
    pos_ptr,
    V,
    CHUNKS,
    BLOCK_C: tl.constexpr,
    PDL: tl.constexpr,
):
    """The row's argmax from its chunks' (first ties win), written as the next id and as the
    graph's next input; the position advances."""
    pdl.prologue(PDL)
    row = tl.program_id(0)
    c = tl.arange(0, BLOCK_C)
    vals = tl.load(val_ptr + row * CHUNKS + c, mask=c < CHUNKS, other=float("-inf"))
    idxs = tl.load(idx_ptr + row * CHUNKS + c, mask=c < CHUNKS, other=V)
    best = tl.max(vals, axis=0)
    pick = tl.min(tl.where(vals == best, idxs, V), axis=0)
    pick = tl.where(pick < V, pick, 0).to(tl.int64)  # every logit -inf: index 0, as torch
    tl.store(next_ptr + row, pick)
    tl.store(ids_ptr + row, pick)
    tl.store(pos_ptr + row, tl.load(pos_ptr + row) + 1)


def argmax_advance(
    logits: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor
) -> torch.Tensor:
    """next_ids = argmax(logits [B, V], -1) as torch computes it; token_ids = next_ids;
    positions += 1. Two launches where torch's reduction alone takes several microseconds."""
    n, v = logits.shape
    assert logits.stride(1) == 1
    chunks = triton.cdiv(v, _ARGMAX_BLOCK)
    vals = torch.empty((n, chunks), dtype=torch.float32, device=logits.device)
    idxs = torch.empty((n, chunks), dtype=torch.int32, device=logits.device)
    next_ids = torch.empty(n, dtype=torch.int64, device=logits.device)
    flags = pdl.launch(logits, n)
    _argmax_part_kernel[(n, chunks)](
        logits, vals, idxs, v, logits.stride(0), chunks, BLOCK=_ARGMAX_BLOCK, **flags, num_warps=4
    )
    _argmax_advance_kernel[(n,)](
        vals,
        idxs,
        next_ids,
        token_ids,
        positions,
        v,
        chunks,
        BLOCK_C=triton.next_power_of_2(chunks),
        **flags,
        num_warps=1,
    )
    return next_ids
