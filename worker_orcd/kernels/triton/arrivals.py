"""Arrival counters: int32 words, zero between launches, that let the last program of a group to
finish do the group's final step (merge split attention, sum split-K partials) instead of a
second launch. A kernel bumps a counter with an acq_rel atomic and the program that sees the
group's last count re-arms it to zero, so a CUDA graph replays with them ready. Kernels of one
stream run one after another (launched as programmatic dependents they still wait for their
predecessor before touching memory: `pdl`), so one buffer per device serves them all. Also the
host side of a K split: its lengths (`split_len`) and its partials and counters (`partials`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def split_len(total: int, splits: int, step: int) -> tuple[int, int]:
    """(length of each split, splits used) for `total` (K, or units of it) split `splits` ways in
    whole `step`s, so that every split but the last walks full steps; fewer splits where the
    steps run out."""
    per = triton.cdiv(triton.cdiv(total, splits), step) * step
    return per, triton.cdiv(total, per)


def partials(out: torch.Tensor, splits: int, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 partials [splits, M, N], arrival counters of `tiles` output tiles) for a launch
    writing out [M, N] with K split and summed by the last split (`store_split`); with no split,
    out for both (the kernel never touches them)."""
    if splits == 1:
        return out, out
    m, n = out.shape
    ws = torch.empty((splits, m, n), dtype=torch.float32, device=out.device)
    return ws, counters(out.device, tiles)


def counters(device: torch.device, n: int) -> torch.Tensor:
    """At least n zeroed counters on `device`. Buffers only grow (a smaller one may still be
    referenced by a captured graph), so call once outside capture with the largest n first."""
    held = _COUNTERS.setdefault(device, [])
    if not held or held[-1].numel() < n:
        held.append(torch.zeros(max(n, 1024), dtype=torch.int32, device=device))
    return held[-1]


@triton.jit
def store_split(
    y_ptr, ws_ptr, lock_ptr, acc, rows, M, N, xr, xmask, stride_ym, SPLITS: tl.constexpr
):  # fmt: skip
    """acc [BLOCK_N, BLOCK_B] into y[xr, rows] (rounded to y's dtype), for a program of output
    tile program_id(0) and K split program_id(1). With the K split in SPLITS, into this split's
    partials ws [SPLITS, M, N] (float32) instead; the last program of the tile to arrive (a
    counter per tile, `lock_ptr` + program_id(0)) sums them in split order, so the result does
    not depend on which arrives last, and writes y: no summing launch."""
    mask = (rows < N)[:, None] & xmask[None, :]
    y = y_ptr + xr.to(tl.int64)[None, :] * stride_ym + rows[:, None]
    if SPLITS == 1:
        tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        cell = xr.to(tl.int64)[None, :] * N + rows[:, None]  # in one split's [M, N]
        tl.store(ws_ptr + tl.program_id(1) * M * N + cell, acc, mask=mask)
        lock = lock_ptr + tl.program_id(0)
        if tl.atomic_add(lock, 1, sem="acq_rel") == SPLITS - 1:
            total = tl.zeros_like(acc)
            for s in tl.static_range(SPLITS):
                part = ws_ptr + s * M * N + cell
                total += tl.load(part, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(y, total.to(y_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock, 0)
