"""Attention over the paged KV cache for a flat batch (see `worker_orcd.kernels.attention`).

Decode (one query token per sequence) is flash-decoding: the context of each (sequence, KV head) is
split into NUM_SPLITS ranges that run on separate programs, each writing a partial softmax state
(max, sum, weighted values); a second kernel merges them. (The merge can also run in the program of
the last split to finish, saving a launch, but that serialises the merge of a KV head's query heads
and measured slower on an H200; with one query head per KV head, Phi-3's, it was slower too, on an
H100: benchmarks/NOTES.md.) All query heads that share a KV head are handled by one program, so
GQA reads each cached key and value once. The split count depends only on the batch shape, and the
range each split covers is computed on the device from the context length, so one captured CUDA
graph serves every context length; splits that start past a short context return at once. For a
decode step of several sequences the kernel can also take q and this step's k, v as the qkv
projection gives them: it rotates them, writes k and v into the caches and attends
(`rope_store_attend`), one launch instead of two.

Prefill (any query length, causal, after any cached prefix) is a flash-attention loop per block of
query rows and query head. Both honour a sliding window W: a query at position p sees keys
p - W + 1 .. p.
"""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from worker_orcd.kernels.attention import AttentionMetadata
from worker_orcd.kernels.quant.gemv_i8 import asm_dp4a, store_rounded
from worker_orcd.kernels.quant.ops import RoundedX, round_x_reference
from worker_orcd.kernels.triton import arrivals, norm_in, pdl, rope

logger = logging.getLogger(__name__)

_LOG2E = 1.4426950408889634
# Programs per decode step: about four per multiprocessor (best of a sweep, benchmarks/NOTES.md).
_TARGET_PROGRAMS = 512
_MAX_SPLITS = 64
# Longest context (keys) decoded without splitting: a single program per KV head loops over it.
SHORT_CONTEXT = 128
# Longest context of one sequence split at most MID_SPLITS ways: beyond the short contexts, a
# few hundred keys fill only a few 64-key splits, and the rest of the batch shape's splits (up to
# 64 for Qwen's two KV heads) are programs that exit at once and partials the merge reads. One
# sequence only: at 8 Qwen streams the capped graph was 2-4% slower (H100, three runs, unexplained).
MID_CONTEXT = 256
MID_SPLITS = 4


@triton.jit
def _load_kv_block(cache_ptr, bt_row_ptr, p, p_mask, hk, HK, D, cols, d_mask, PAGE: tl.constexpr):
    """Keys or values of token positions p [BLOCK_N] of one KV head -> [BLOCK_N, BLOCK_D]."""
    block = tl.load(bt_row_ptr + p // PAGE, mask=p_mask, other=0).to(tl.int64)
    slot = block * PAGE + p % PAGE
    ptrs = cache_ptr + (slot * HK + hk)[:, None] * D + cols[None, :]
    # A negative block marks a padding row of a captured batch: it reads zeros.
    valid = p_mask & (block >= 0)
    return tl.load(ptrs, mask=valid[:, None] & d_mask[None, :], other=0.0)


@triton.jit
def _store_rounded_heads(
    y, heads, h_mask, t, H, D, xw_ptr, xdx_ptr, xs_ptr,
    BLOCK_D: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """y [R, BLOCK_D] float32, heads `heads` [R] of token t's output (as stored, in its dtype),
    also written rounded to int8 per 32 elements as the o projection's GEMV reads x
    (`store_rounded`, a RoundedX of [T, H D]): head h holds blocks h D / 32 .. (h + 1) D / 32."""
    NB: tl.constexpr = BLOCK_D // 32
    R: tl.constexpr = y.shape[0]
    jj = tl.arange(0, NB)
    blk = tl.reshape(heads[:, None] * (D // 32) + jj[None, :], (R * NB,))
    bmask = tl.reshape(h_mask[:, None] & (jj < D // 32)[None, :], (R * NB,))
    k = H * D
    store_rounded(
        tl.reshape(y, (R * NB, 32)), blk, bmask, xw_ptr + t * (k // 4), xdx_ptr + t * (k // 32),
        xs_ptr + t * (k // 16), ASM,
    )  # fmt: skip


@triton.jit
def _rotation(pos_ptr, cs_ptr, t, cols, d_mask, HALF):
    """NEOX RoPE of token t per head column cols [BLOCK_D]: (the column each pairs with, cos, sin,
    whether it is in the first half). Columns past the rotary dims 2 HALF pair with themselves
    at cos 1, sin 0: they pass through."""
    pos = tl.load(pos_ptr + t).to(tl.int64)
    first = cols < HALF
    rotary = cols < 2 * HALF
    i = tl.where(first, cols, cols - HALF)
    row = cs_ptr + pos * (2 * HALF)
    cos = tl.load(row + i, mask=rotary & d_mask, other=1.0)
    sin = tl.load(row + HALF + i, mask=rotary & d_mask, other=0.0)
    partner = tl.where(first, cols + HALF, tl.where(rotary, cols - HALF, cols))
    return partner, cos, sin, first


@triton.jit
def _rotated(row, b_row, cols, partner, cos, sin, first, mask, HAS_BIAS: tl.constexpr):
    """Columns cols of the head(s) at `row` (plus the bias at `b_row`, rounded to x's dtype
    first) rotated as the RoPE kernel rotates them, in float32: x1 cos - x2 sin in the first
    half, x2 cos + x1 sin in the second."""
    x = rope.load_biased(row, b_row, cols, mask, HAS_BIAS)
    xp = rope.load_biased(row, b_row, partner, mask, HAS_BIAS)
    return tl.where(first, x * cos - xp * sin, x * cos + xp * sin)


@triton.jit
def _decode_split_kernel(
    q_ptr,  # [T, H, D] (token stride stride_qt)
    kc_ptr,  # [S, Hk, D]
    vc_ptr,  # [S, Hk, D]
    bt_ptr,  # [B, max_blocks] int32
    ctx_ptr,  # [B] int32
    qs_ptr,  # [B + 1] int32
    part_ptr,  # [B, H, NUM_SPLITS, BLOCK_D] float32
    ml_ptr,  # [B, H, NUM_SPLITS, 2] float32: running max (log2 units), sum
    lock_ptr,  # [B, Hk] int32 arrival counters, zero between launches (FUSED_MERGE)
    o_ptr,  # [T, H, D] output (FUSED_MERGE)
    xw_ptr,  # ROUND: the output rounded to int8 (RoundedX of [T, H D]: words, steps, sums)
    xdx_ptr,
    xs_ptr,
    kn_ptr,  # ROPE: this step's k [T, Hk, D] before RoPE (token stride stride_kt)
    vn_ptr,  # ROPE: this step's v [T, Hk, D] (token stride stride_vt)
    pos_ptr,  # ROPE: positions [T]
    slot_ptr,  # ROPE: cache slots [T]
    cs_ptr,  # ROPE: cos/sin cache [P, 2 HALF]
    bias_ptr,  # ROPE and HAS_BIAS: the qkv bias [(H + 2 Hk) D]
    qk_scale,  # softmax scale * log2(e)
    H,
    HK,
    D,
    HALF,
    stride_qt,
    stride_kt,
    stride_vt,
    stride_bt,
    window,  # 0: none
    G: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
    FUSED_MERGE: tl.constexpr,
    ROUND: tl.constexpr,
    ROPE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ASM: tl.constexpr,
    PDL: tl.constexpr,
):
    b = tl.program_id(0)
    hk = tl.program_id(1)
    split = tl.program_id(2)
    # The step's lengths are written before its first layer (a host copy, or the decode graph's
    # first kernel), never by the kernel this one follows: read before the PDL wait, so that the
    # wait is followed by the loads of q and the block table, not by a chain through these.
    ctx = tl.load(ctx_ptr + b)
    t = tl.load(qs_ptr + b).to(tl.int64)
    lo = 0
    if window > 0:
        lo = tl.maximum(ctx - window, 0)
    chunk = tl.cdiv(tl.cdiv(ctx - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * chunk
    end = tl.minimum(start + chunk, ctx)
    if start >= end:  # a split past a short context: the merge reads only the n_active before it
        return
    g = tl.arange(0, BLOCK_G)
    g_mask = g < G
    cols = tl.arange(0, BLOCK_D)
    d_mask = cols < D
    heads = hk * G + g
    qm = g_mask[:, None] & d_mask[None, :]
    q_rows = q_ptr + t * stride_qt + heads[:, None] * D
    if ROPE:
        # Positions, slots, the cos/sin row and the bias are written before the step's first layer
        # (or are weights): read before the wait, like the lengths.
        partner, cos, sin, first = _rotation(pos_ptr, cs_ptr, t, cols, d_mask, HALF)
        slot = tl.load(slot_ptr + t).to(tl.int64)
        pdl.prologue(PDL)
        q_bias = bias_ptr + heads[:, None] * D
        q = _rotated(q_rows, q_bias, cols, partner, cos, sin, first, qm, HAS_BIAS)
        q = q.to(q_ptr.dtype.element_ty)  # [BLOCK_G, BLOCK_D], as the RoPE kernel stores it
        # This token's key and value sit at position ctx - 1, in the last split's range: that
        # split uses them from here and writes them into the caches (a negative slot: padding).
        last = end == ctx
        km = cols < tl.where(last, D, 0)
        kv_bias = bias_ptr + (H + hk) * D
        k_row = kn_ptr + t * stride_kt + hk * D
        k_new = _rotated(k_row, kv_bias, cols, partner, cos, sin, first, km, HAS_BIAS)
        k_new = k_new.to(kc_ptr.dtype.element_ty)
        v_row = vn_ptr + t * stride_vt + hk * D
        v_new = norm_in.norm_in(v_row, kv_bias + HK * D, cols, km, HAS_BIAS)
        v_new = v_new.to(vc_ptr.dtype.element_ty)
        if last & (slot >= 0):
            tl.store(kc_ptr + (slot * HK + hk) * D + cols, k_new, mask=d_mask)
            tl.store(vc_ptr + (slot * HK + hk) * D + cols, v_new, mask=d_mask)
    else:
        pdl.prologue(PDL)
        q = tl.load(q_rows + cols[None, :], mask=qm, other=0.0)  # [BLOCK_G, BLOCK_D]
    m_i = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    # ROPE: the last split's cached keys end before ctx - 1, whose key and value are this step's
    # own (the caches' copy may not be written yet): folded in after the loop, not patched into
    # the tiles, which would take the tensor-core operands through registers.
    hi = end
    if ROPE:
        hi = tl.where(last, ctx - 1, end)
    for n0 in range(start, hi, BLOCK_N):
        p = n0 + tl.arange(0, BLOCK_N)
        p_mask = p < hi
        k = _load_kv_block(kc_ptr, bt_row, p, p_mask, hk, HK, D, cols, d_mask, PAGE)
        v = _load_kv_block(vc_ptr, bt_row, p, p_mask, hk, HK, D, cols, d_mask, PAGE)
        s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_G, BLOCK_N]
        s = tl.where(p_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        prob = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(prob, axis=1)
        acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v)
        m_i = m_new
    if ROPE:
        if last:
            s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], axis=1) * qk_scale
            m_new = tl.maximum(m_i, s_new)
            alpha = tl.exp2(m_i - m_new)
            p_new = tl.exp2(s_new - m_new)
            l_i = l_i * alpha + p_new
            p_v = p_new.to(v_new.dtype).to(tl.float32)  # rounded as the loop's probabilities
            acc = acc * alpha[:, None] + p_v[:, None] * v_new.to(tl.float32)[None, :]
            m_i = m_new
    if NUM_SPLITS == 1:  # the whole context in this program: write the output directly
        out = (acc / l_i[:, None]).to(o_ptr.dtype.element_ty)
        o_rows = (t * H + heads.to(tl.int64)) * D
        tl.store(
            o_ptr + o_rows[:, None] + cols[None, :], out, mask=g_mask[:, None] & d_mask[None, :]
        )
        if ROUND:
            _store_rounded_heads(
                out.to(tl.float32), heads, g_mask, t, H, D, xw_ptr, xdx_ptr, xs_ptr, BLOCK_D, ASM
            )
        return
    out_row = (b * H + heads).to(tl.int64) * NUM_SPLITS + split  # [BLOCK_G]
    tl.store(part_ptr + out_row[:, None] * BLOCK_D + cols[None, :], acc, mask=g_mask[:, None])
    tl.store(ml_ptr + out_row * 2, m_i, mask=g_mask)
    tl.store(ml_ptr + out_row * 2 + 1, l_i, mask=g_mask)
    if FUSED_MERGE:
        # The last active split of this (sequence, KV head) to arrive merges all of them, then
        # re-arms the counter; acq_rel orders the other splits' stores before its loads.
        lock = lock_ptr + b * HK + hk
        n_active = tl.cdiv(ctx - lo, chunk)
        if tl.atomic_add(lock, 1, sem="acq_rel") == n_active - 1:
            for gi in range(G):
                _merge_head(
                    part_ptr,
                    ml_ptr,
                    o_ptr,
                    xw_ptr,
                    xdx_ptr,
                    xs_ptr,
                    b,
                    hk * G + gi,
                    t,
                    H,
                    D,
                    n_active,
                    NUM_SPLITS,
                    BLOCK_S,
                    BLOCK_D,
                    ROUND,
                    ASM,
                )
            tl.atomic_xchg(lock, 0)


@triton.jit
def _merge_head(
    part_ptr,
    ml_ptr,
    o_ptr,
    xw_ptr,
    xdx_ptr,
    xs_ptr,
    b,
    h,
    t,
    H,
    D,
    n_active,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROUND: tl.constexpr,
    ASM: tl.constexpr,
):
    """Combine the partial softmax states of head h of sequence b into its output row."""
    s = tl.arange(0, BLOCK_S)
    s_mask = s < n_active
    row = (b * H + h).to(tl.int64) * NUM_SPLITS + s  # [BLOCK_S]
    # .cg: in the program of the last split to arrive these are other programs' stores (L2)
    m = tl.load(ml_ptr + row * 2, mask=s_mask, other=float("-inf"), cache_modifier=".cg")
    l_s = tl.load(ml_ptr + row * 2 + 1, mask=s_mask, other=0.0, cache_modifier=".cg")
    m_all = tl.max(m, axis=0)
    w = tl.where(s_mask, tl.exp2(m - m_all), 0.0)
    cols = tl.arange(0, BLOCK_D)
    part = tl.load(
        part_ptr + row[:, None] * BLOCK_D + cols[None, :], mask=s_mask[:, None], other=0.0,
        cache_modifier=".cg",
    )  # fmt: skip
    out = (tl.sum(part * w[:, None], axis=0) / tl.sum(l_s * w, axis=0)).to(o_ptr.dtype.element_ty)
    tl.store(o_ptr + (t * H + h) * D + cols, out, mask=cols < D)
    if ROUND:
        one = tl.zeros((1,), dtype=tl.int32)
        _store_rounded_heads(
            out.to(tl.float32)[None, :], h + one, one == 0, t, H, D, xw_ptr, xdx_ptr, xs_ptr,
            BLOCK_D, ASM,
        )  # fmt: skip


@triton.jit
def _decode_merge_kernel(
    part_ptr,  # [B, H, NUM_SPLITS, BLOCK_D] float32
    ml_ptr,  # [B, H, NUM_SPLITS, 2] float32
    ctx_ptr,  # [B] int32
    qs_ptr,  # [B + 1] int32
    o_ptr,  # [T, H, D]
    xw_ptr,  # ROUND: as in _decode_split_kernel
    xdx_ptr,
    xs_ptr,
    H,
    D,
    window,
    NUM_SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ROUND: tl.constexpr,
    ASM: tl.constexpr,
    PDL: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.load(ctx_ptr + b)  # before the wait, as in _decode_split_kernel
    t = tl.load(qs_ptr + b).to(tl.int64)
    pdl.prologue(PDL)
    lo = 0
    if window > 0:
        lo = tl.maximum(ctx - window, 0)
    chunk = tl.cdiv(tl.cdiv(ctx - lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    n_active = tl.cdiv(ctx - lo, chunk)
    _merge_head(
        part_ptr, ml_ptr, o_ptr, xw_ptr, xdx_ptr, xs_ptr, b, h, t, H, D, n_active, NUM_SPLITS,
        BLOCK_S, BLOCK_D, ROUND, ASM,
    )  # fmt: skip


class FreshKV(NamedTuple):
    """This decode step's keys and values as the qkv projection gives them, for the attention to
    rotate and store (`decode_attention(fresh=...)`): k, v [T, Hk, D] (heads packed, any token
    stride), positions [T], the cos/sin cache [P, R], the cache slots [T] (negative: padding,
    not written) and the qkv bias [(H + 2 Hk) D] or None."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    cos_sin: torch.Tensor
    slots: torch.Tensor
    bias: torch.Tensor | None


_BOUND_SPLITS = {SHORT_CONTEXT: 1, MID_CONTEXT: MID_SPLITS}


def split_bounds(n_seqs: int) -> tuple[int, ...]:
    """The host bounds on the context (keys), ascending, up to which `num_splits` caps a step of
    n_seqs sequences: SHORT_CONTEXT (one split) and, for one sequence, MID_CONTEXT (MID_SPLITS).
    A captured decode step needs a graph per bound, and one for any context."""
    return (SHORT_CONTEXT, MID_CONTEXT) if n_seqs == 1 else (SHORT_CONTEXT,)


def num_splits(n_seqs: int, n_kv_heads: int, max_context: int | None = None) -> int:
    """Context splits per (sequence, KV head) of a decode step: from the batch shape, capped by
    the first of `split_bounds` that holds the host bound on the context. The bound, not the
    context, is what a captured graph freezes."""
    splits = max(1, min(_MAX_SPLITS, triton.cdiv(_TARGET_PROGRAMS, n_seqs * n_kv_heads)))
    if max_context is not None:
        bound = next((c for c in split_bounds(n_seqs) if max_context <= c), None)
        if bound is not None:
            splits = min(splits, _BOUND_SPLITS[bound])
    return splits


def decode_attention(
    q: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [S, Hk, D]
    v_cache: torch.Tensor,  # [S, Hk, D]
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    *,
    splits: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    fused_merge: bool = False,
    rounded: RoundedX | None = None,
    fresh: FreshKV | None = None,
) -> torch.Tensor:
    """One query token per sequence over its cached context -> [B, H, D]; `rounded`: also
    written, the output [B, H D] rounded to int8 for the o projection's GEMV (`RoundedX`).
    `fresh`: q and this step's k, v come from the qkv projection before RoPE; the kernel rotates
    them (after adding the bias), writes k and v into the caches and attends, as `rope_store_kv`
    and then this function would, with one launch fewer.
    `fused_merge`: the last split to finish merges, no merge launch (slower wherever measured:
    the module's docstring). Two pipeline stages: 2-6% faster than three at 1-32 sequences of
    129-256 and of 4,000 keys, and never slower (H100, `benchmarks/kernels.py stages`)."""
    n_tokens, n_heads, d = q.shape
    n_seqs = meta.num_seqs
    n_kv = k_cache.shape[1]
    group = n_heads // n_kv
    assert q.stride(2) == 1 and q.stride(1) == d and k_cache.is_contiguous()
    if rounded is not None:
        if d % 32:
            raise ValueError(f"heads of {d} are not whole 32-element blocks to round")
        rounded.check(n_tokens, n_heads * d)
    round_flags = {"ROUND": rounded is not None, "ASM": asm_dp4a(q.device.type)}
    xw, xdx, xs = rounded if rounded is not None else (q, q, q)
    if splits is None:
        # Short contexts: one program per (sequence, KV head), no merge launch; a few hundred
        # keys of one sequence: a few splits. The host bound max_context_len is frozen in a
        # captured graph; DecodeGraphs captures one graph per `split_bounds` entry.
        splits = num_splits(n_seqs, n_kv, meta.max_context_len)
    block_d = triton.next_power_of_2(d)
    part = torch.empty((n_seqs, n_heads, splits, block_d), dtype=torch.float32, device=q.device)
    ml = torch.empty((n_seqs, n_heads, splits, 2), dtype=torch.float32, device=q.device)
    out = torch.empty((n_tokens, n_heads, d), dtype=q.dtype, device=q.device)
    window = sliding_window or 0
    fused_merge = fused_merge and splits > 1
    lock = arrivals.counters(q.device, n_seqs * n_kv) if fused_merge else ml
    if fresh is not None:
        k_new, v_new, positions, cos_sin, slots, bias = fresh
        assert k_new.stride(2) == 1 and k_new.stride(1) == d and v_new.stride(1) == d
        rope_args = (k_new, v_new, positions, slots, cos_sin, bias if bias is not None else q)
        half, strides = cos_sin.shape[1] // 2, (k_new.stride(0), v_new.stride(0))
    else:
        rope_args, half, strides = (q, q, q, q, q, q), 0, (0, 0)
    _decode_split_kernel[(n_seqs, n_kv, splits)](
        q,
        k_cache,
        v_cache,
        meta.block_tables,
        meta.context_lens_t,
        meta.query_start_t,
        part,
        ml,
        lock,
        out,
        xw,
        xdx,
        xs,
        *rope_args,
        scale * _LOG2E,
        n_heads,
        n_kv,
        d,
        half,
        q.stride(0),
        *strides,
        meta.block_tables.stride(0),
        window,
        G=group,
        NUM_SPLITS=splits,
        PAGE=meta.block_size,
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        BLOCK_S=triton.next_power_of_2(splits),
        FUSED_MERGE=fused_merge,
        ROPE=fresh is not None,
        HAS_BIAS=fresh is not None and fresh.bias is not None,
        **round_flags,
        **pdl.launch(q, n_tokens),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if not fused_merge and splits > 1:
        _decode_merge_kernel[(n_seqs, n_heads)](
            part,
            ml,
            meta.context_lens_t,
            meta.query_start_t,
            out,
            xw,
            xdx,
            xs,
            n_heads,
            d,
            window,
            NUM_SPLITS=splits,
            BLOCK_N=block_n,
            BLOCK_S=triton.next_power_of_2(splits),
            BLOCK_D=block_d,
            **round_flags,
            **pdl.launch(out, n_tokens),
            num_warps=1,
        )
    return out


@triton.jit
def _prefill_block(
    q,
    kc_ptr,
    vc_ptr,
    bt_row,
    n0,
    hi,
    q_pos,
    window,
    m_i,
    l_i,
    acc,
    qk_scale,
    hk,
    HK,
    D,
    cols,
    d_mask,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
):
    """One key block of the online softmax; MASKED applies causality, the window and the end."""
    p = n0 + tl.arange(0, BLOCK_N)
    p_mask = p < hi
    k = _load_kv_block(kc_ptr, bt_row, p, p_mask, hk, HK, D, cols, d_mask, PAGE)
    v = _load_kv_block(vc_ptr, bt_row, p, p_mask, hk, HK, D, cols, d_mask, PAGE)
    s = tl.dot(q, tl.trans(k)) * qk_scale  # [BLOCK_M, BLOCK_N]
    if MASKED:
        visible = (p[None, :] <= q_pos[:, None]) & p_mask[None, :]
        if window > 0:
            visible = visible & (p[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row may see no key yet (padding rows, a window's first block): shift by 0, not -inf.
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    prob = tl.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(prob, axis=1)
    acc = acc * alpha[:, None] + tl.dot(prob.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _prefill_kernel(
    q_ptr,  # [T, H, D]
    kc_ptr,  # [S, Hk, D]
    vc_ptr,  # [S, Hk, D]
    bt_ptr,  # [B, max_blocks] int32
    ctx_ptr,  # [B] int32
    qs_ptr,  # [B + 1] int32
    o_ptr,  # [T, H, D] contiguous
    qk_scale,
    H,
    HK,
    D,
    stride_qt,
    stride_bt,
    window,
    G: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.prologue(PDL)
    m_block = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(qs_ptr + b)
    q_len = tl.load(qs_ptr + b + 1) - q_start
    m0 = m_block * BLOCK_M
    if m0 >= q_len:
        return
    hk = h // G
    ctx = tl.load(ctx_ptr + b)
    first_pos = ctx - q_len
    rows = m0 + tl.arange(0, BLOCK_M)
    r_mask = rows < q_len
    q_pos = first_pos + rows  # [BLOCK_M]
    cols = tl.arange(0, BLOCK_D)
    d_mask = cols < D
    tok = (q_start + rows).to(tl.int64)
    q = tl.load(
        q_ptr + tok[:, None] * stride_qt + h * D + cols[None, :],
        mask=r_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    hi = tl.minimum(ctx, first_pos + m0 + BLOCK_M)
    lo = 0
    if window > 0:
        lo = tl.maximum(first_pos + m0 - window + 1, 0) // BLOCK_N * BLOCK_N
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    # Key blocks that every row of this block sees in full need no mask; only the blocks on the
    # diagonal (and all of them under a sliding window) do.
    full_end = lo
    if window == 0:
        full_end = (first_pos + m0 + 1) // BLOCK_N * BLOCK_N
    for masked in tl.static_range(2):  # the full blocks unmasked, then the rest masked
        if masked == 0:
            start, end = lo, full_end
        else:
            start, end = full_end, hi
        for n0 in range(start, end, BLOCK_N):
            m_i, l_i, acc = _prefill_block(
                q, kc_ptr, vc_ptr, bt_row, n0, hi, q_pos, window, m_i, l_i, acc, qk_scale, hk,
                HK, D, cols, d_mask, PAGE, BLOCK_N, masked == 1,
            )  # fmt: skip
    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_i[:, None]
    tl.store(
        o_ptr + (tok[:, None] * H + h) * D + cols[None, :],
        out.to(o_ptr.dtype.element_ty),
        mask=r_mask[:, None] & d_mask[None, :],
    )


def prefill_attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    *,
    block_m: int | None = None,
    block_n: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    n_tokens, n_heads, d = q.shape
    n_kv = k_cache.shape[1]
    assert q.stride(2) == 1 and q.stride(1) == d and k_cache.is_contiguous()
    out = torch.empty((n_tokens, n_heads, d), dtype=q.dtype, device=q.device)
    block_m = block_m or (64 if meta.max_query_len > 16 else 16)
    block_d = triton.next_power_of_2(d)
    grid = (triton.cdiv(meta.max_query_len, block_m), meta.num_seqs, n_heads)
    _prefill_kernel[grid](
        q,
        k_cache,
        v_cache,
        meta.block_tables,
        meta.context_lens_t,
        meta.query_start_t,
        out,
        scale * _LOG2E,
        n_heads,
        n_kv,
        d,
        q.stride(0),
        meta.block_tables.stride(0),
        sliding_window or 0,
        G=n_heads // n_kv,
        PAGE=meta.block_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        **pdl.launch(q, n_tokens),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


def attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [S, Hk, D]
    v_cache: torch.Tensor,  # [S, Hk, D]
    meta: AttentionMetadata,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    rounded: RoundedX | None = None,
) -> torch.Tensor:
    """Causal attention of q over each sequence's cached context -> [T, H, D]; `rounded`: also
    written, the output rounded to int8 for the o projection (by the decode kernels themselves)."""
    scale = _checked_scale(q, k_cache, scale)
    if meta.is_decode:
        return decode_attention(q, k_cache, v_cache, meta, scale, sliding_window, rounded=rounded)
    if _is_fresh_prompt(meta, sliding_window):
        out = fresh_prompt_attention(q, k_cache, v_cache, meta, scale)
    else:
        out = prefill_attention(q, k_cache, v_cache, meta, scale, sliding_window)
    if rounded is not None:
        round_x_reference(out.reshape(out.shape[0], -1), out=rounded)
    return out


def _checked_scale(q: torch.Tensor, k_cache: torch.Tensor, scale: float | None) -> float:
    """The softmax scale (default 1 / sqrt(D)), once the query heads are known to group evenly
    over the KV heads."""
    n_heads, n_kv = q.shape[1], k_cache.shape[1]
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads are not a multiple of {n_kv} KV heads")
    return 1.0 / math.sqrt(q.shape[2]) if scale is None else scale


def rope_store_attend(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hk, D]
    v: torch.Tensor,  # [T, Hk, D]
    positions: torch.Tensor,  # [T]
    cos_sin: torch.Tensor,  # [P, R]
    k_cache: torch.Tensor,  # [S, Hk, D]
    v_cache: torch.Tensor,  # [S, Hk, D]
    meta: AttentionMetadata,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    bias: torch.Tensor | None = None,
    rounded: RoundedX | None = None,
) -> torch.Tensor:
    """`rope_store_kv` then `attention`: a decode step of several sequences in the attention
    kernel alone (it rotates q and this step's k, writes k and v into the caches and attends;
    `FreshKV`), any other step in the two launches. One sequence keeps the two: its attention
    has few programs, on the step's critical path, and the rotation and the fold of its own key
    made it longer than the RoPE launch it saves (H100, Q4_K_M-style: -1% at one stream on
    Qwen2.5-0.5B and Phi-3, +1.3-1.4% at eight; benchmarks/NOTES.md v12)."""
    if not meta.is_decode or meta.num_seqs == 1:
        q = rope.rope_store_kv(
            q, k, v, positions, cos_sin, k_cache, v_cache, meta.slot_mapping, bias
        )
        return attention(
            q, k_cache, v_cache, meta, scale=scale, sliding_window=sliding_window, rounded=rounded
        )
    scale = _checked_scale(q, k_cache, scale)
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert bias is None or bias.is_contiguous()
    fresh = FreshKV(k, v, positions, cos_sin, meta.slot_mapping, bias)
    return decode_attention(
        q, k_cache, v_cache, meta, scale, sliding_window, rounded=rounded, fresh=fresh
    )


def _is_fresh_prompt(meta: AttentionMetadata, sliding_window: int | None) -> bool:
    """One sequence whose whole context is this step's tokens, with no window cutting in."""
    if meta.num_seqs != 1 or meta.context_lens[0] != meta.num_tokens:
        return False
    return sliding_window is None or sliding_window >= meta.num_tokens


def fresh_prompt_attention(
    q: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [S, Hk, D]
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of a whole prompt through torch's flash kernel (faster than ours there).

    The keys and values are gathered back from the cache through the device-side slot mapping, so
    a CUDA graph of a prompt-length bucket stays valid for any placement of its blocks.
    """
    n, n_heads, d = q.shape
    # Padding tokens (negative slots) come after the prompt; what they read is never seen.
    slots = meta.slot_mapping.clamp(min=0)
    keys = k_cache.index_select(0, slots).transpose(0, 1)  # [Hk, T, D]
    values = v_cache.index_select(0, slots).transpose(0, 1)  # [Hk, T, D]
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None],
        keys[None],
        values[None],
        is_causal=True,
        scale=scale,
        enable_gqa=n_heads != k_cache.shape[1],
    )  # [1, H, T, D]
    return out[0].transpose(0, 1).contiguous()  # [T, H, D]
