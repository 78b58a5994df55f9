"""Small kernels around a captured decode step: its per-token inputs from positions and block
tables, and advancing the inputs after the greedy pick. One launch each instead of a dozen torch
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


@triton.jit
def _advance_kernel(next_ptr, ids_ptr, pos_ptr, PDL: tl.constexpr):
    pdl.prologue(PDL)
    row = tl.program_id(0)
    tl.store(ids_ptr + row, tl.load(next_ptr + row))
    tl.store(pos_ptr + row, tl.load(pos_ptr + row) + 1)


def advance(next_ids: torch.Tensor, token_ids: torch.Tensor, positions: torch.Tensor) -> None:
    """token_ids = next_ids; positions += 1 (all [B] int64)."""
    _advance_kernel[(next_ids.shape[0],)](
        next_ids, token_ids, positions, num_warps=1, **pdl.launch(next_ids, next_ids.shape[0])
    )
