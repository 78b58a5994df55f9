"""Triton dequantization of planes (`formats`) into a dense [R, K] buffer.

Used for prefill (a layer's weight into a reused bf16 scratch buffer, then cuBLAS) and for embedding
lookup (only the looked-up rows: `ids` selects the weight rows, output row r is weight row ids[r]).
Grid: (row tiles, column tiles); each program writes BLOCK_R rows x one tile of blocks, no loop.
"""

from __future__ import annotations

import logging

import triton
import triton.language as tl

from worker_orcd.kernels.quant.gemv import _k4_scale_min
from worker_orcd.kernels.triton import pdl

logger = logging.getLogger(__name__)


@triton.jit
def _rows(ids_ptr, R, HAS_IDS: tl.constexpr, BLOCK_R: tl.constexpr):
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = r < R
    if HAS_IDS:
        src = tl.load(ids_ptr + r, mask=rmask, other=0).to(tl.int64)
    else:
        src = r.to(tl.int64)
    return r.to(tl.int64), src, rmask


@triton.jit
def dequant_q8_0_kernel(
    ids_ptr, d_ptr, qs_ptr, out_ptr, R, K, stride_o,
    HAS_IDS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCKS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl.prologue(PDL)
    r, src, rmask = _rows(ids_ptr, R, HAS_IDS, BLOCK_R)
    nb = K // 32
    blk = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    ll = tl.arange(0, 32)
    m2 = rmask[:, None] & (blk < nb)[None, :]
    m3 = m2[:, :, None]
    col = (blk * 32)[None, :, None] + ll[None, None, :]
    q = tl.load(qs_ptr + src[:, None, None] * K + col, mask=m3, other=0).to(tl.float32)
    d = tl.load(d_ptr + src[:, None] * nb + blk[None, :], mask=m2, other=0.0).to(tl.float32)
    tl.store(out_ptr + r[:, None, None] * stride_o + col, q * d[:, :, None], mask=m3)


@triton.jit
def _dequant_q4_q5_0(
    ids_ptr, d_ptr, qh_ptr, qs_ptr, out_ptr, R, K, stride_o,
    HAS_QH: tl.constexpr, HAS_IDS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCKS: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pdl.prologue(PDL)
    r, src, rmask = _rows(ids_ptr, R, HAS_IDS, BLOCK_R)
    nb = K // 32
    blk = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    ll = tl.arange(0, 16)
    m2 = rmask[:, None] & (blk < nb)[None, :]
    m3 = m2[:, :, None]
    q = tl.load(
        qs_ptr + src[:, None, None] * (K // 2) + (blk * 16)[None, :, None] + ll[None, None, :],
        mask=m3, other=0,
    ).to(tl.int32)  # fmt: skip
    lo = q & 15
    hi = q >> 4
    if HAS_QH:
        # re-laid qh (formats): element l's fifth bit at 8 (l % 4) + l // 4, l + 16's at + 4
        h = tl.load(qh_ptr + src[:, None] * nb + blk[None, :], mask=m2, other=0)[:, :, None]
        sh = (8 * (ll % 4) + ll // 4)[None, None, :]
        lo = (lo | (((h >> sh) & 1) << 4)) - 16
        hi = (hi | (((h >> (sh + 4)) & 1) << 4)) - 16
    else:
        lo = lo - 8
        hi = hi - 8
    d = tl.load(d_ptr + src[:, None] * nb + blk[None, :], mask=m2, other=0.0).to(tl.float32)
    d = d[:, :, None]
    col = (blk * 32)[None, :, None] + ll[None, None, :]
    o = out_ptr + r[:, None, None] * stride_o + col
    tl.store(o, d * lo.to(tl.float32), mask=m3)
    tl.store(o + 16, d * hi.to(tl.float32), mask=m3)


@triton.jit
def _dequant_q4_q5_k(
    ids_ptr, dm_ptr, scales_ptr, qh_ptr, qs_ptr, out_ptr, R, K, stride_o,
    HAS_QH: tl.constexpr, HAS_IDS: tl.constexpr, BLOCK_R: tl.constexpr, SUPER: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    pdl.prologue(PDL)
    r, src, rmask = _rows(ids_ptr, R, HAS_IDS, BLOCK_R)
    ns = K // 256
    sb = tl.program_id(1) * SUPER + tl.arange(0, SUPER)
    c = tl.arange(0, 4)
    ll = tl.arange(0, 32)
    m2 = rmask[:, None] & (sb < ns)[None, :]
    m3 = m2[:, :, None]
    m4 = m3[:, :, :, None]
    q = tl.load(
        qs_ptr + src[:, None, None, None] * (K // 2) + (sb * 128)[None, :, None, None]
        + (c * 32)[None, None, :, None] + ll[None, None, None, :],
        mask=m4, other=0,
    ).to(tl.int32)  # fmt: skip
    lo = q & 15
    hi = q >> 4
    if HAS_QH:
        # qh[l] of a super-block: bit j is the fifth bit of element l of sub-block j
        hb = tl.load(
            qh_ptr + src[:, None, None, None] * (K // 8) + (sb * 32)[None, :, None, None]
            + ll[None, None, None, :],
            mask=m4, other=0,
        ).to(tl.int32)  # fmt: skip
        lo = lo | (((hb >> (2 * c)[None, None, :, None]) & 1) << 4)
        hi = hi | (((hb >> (2 * c + 1)[None, None, :, None]) & 1) << 4)
    sbi = src[:, None] * ns + sb[None, :]
    sbase = (sbi * 12)[:, :, None]
    sc_lo, mn_lo = _k4_scale_min(scales_ptr, sbase, (2 * c)[None, None, :], m3)
    sc_hi, mn_hi = _k4_scale_min(scales_ptr, sbase, (2 * c + 1)[None, None, :], m3)
    d = tl.load(dm_ptr + sbi * 2, mask=m2, other=0.0).to(tl.float32)[:, :, None]
    dmin = tl.load(dm_ptr + sbi * 2 + 1, mask=m2, other=0.0).to(tl.float32)[:, :, None]
    col = (sb * 256)[None, :, None, None] + (c * 64)[None, None, :, None] + ll[None, None, None, :]
    o = out_ptr + r[:, None, None, None] * stride_o + col
    w_lo = (d * sc_lo)[:, :, :, None] * lo.to(tl.float32) - (dmin * mn_lo)[:, :, :, None]
    w_hi = (d * sc_hi)[:, :, :, None] * hi.to(tl.float32) - (dmin * mn_hi)[:, :, :, None]
    tl.store(o, w_lo, mask=m4)
    tl.store(o + 32, w_hi, mask=m4)


@triton.jit
def dequant_q6_k_kernel(
    ids_ptr, d_ptr, scales_ptr, qh_ptr, ql_ptr, out_ptr, R, K, stride_o,
    HAS_IDS: tl.constexpr, BLOCK_R: tl.constexpr, HALVES: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    pdl.prologue(PDL)
    r, src, rmask = _rows(ids_ptr, R, HAS_IDS, BLOCK_R)
    nh = K // 128
    hh = tl.program_id(1) * HALVES + tl.arange(0, HALVES)
    t = tl.arange(0, 2)
    u = tl.arange(0, 16)
    lu = (t * 16)[:, None] + u[None, :]  # [2, 16]
    m2 = rmask[:, None] & (hh < nh)[None, :]
    m3 = m2[:, :, None]
    m4 = m3[:, :, :, None]
    qoff = src[:, None, None, None] * (K // 2) + (hh * 64)[None, :, None, None] + lu[None, None]
    qa = tl.load(ql_ptr + qoff, mask=m4, other=0).to(tl.int32)
    qb = tl.load(ql_ptr + qoff + 32, mask=m4, other=0).to(tl.int32)
    hoff = src[:, None, None, None] * (K // 4) + (hh * 32)[None, :, None, None] + lu[None, None]
    qh = tl.load(qh_ptr + hoff, mask=m4, other=0).to(tl.int32)
    q0 = ((qa & 15) | ((qh & 3) << 4)) - 32
    q1 = ((qb & 15) | (((qh >> 2) & 3) << 4)) - 32
    q2 = ((qa >> 4) | (((qh >> 4) & 3) << 4)) - 32
    q3 = ((qb >> 4) | ((qh >> 6) << 4)) - 32
    d = tl.load(d_ptr + src[:, None] * (K // 256) + (hh // 2)[None, :], mask=m2, other=0.0)
    d = d.to(tl.float32)[:, :, None]
    sbase = (src[:, None] * (K // 16) + (hh * 8)[None, :])[:, :, None] + t[None, None, :]
    s0 = (d * tl.load(scales_ptr + sbase, mask=m3, other=0).to(tl.float32))[:, :, :, None]
    s1 = (d * tl.load(scales_ptr + sbase + 2, mask=m3, other=0).to(tl.float32))[:, :, :, None]
    s2 = (d * tl.load(scales_ptr + sbase + 4, mask=m3, other=0).to(tl.float32))[:, :, :, None]
    s3 = (d * tl.load(scales_ptr + sbase + 6, mask=m3, other=0).to(tl.float32))[:, :, :, None]
    o = (
        out_ptr
        + r[:, None, None, None] * stride_o
        + (hh * 128)[None, :, None, None]
        + lu[None, None]
    )
    tl.store(o, s0 * q0.to(tl.float32), mask=m4)
    tl.store(o + 32, s1 * q1.to(tl.float32), mask=m4)
    tl.store(o + 64, s2 * q2.to(tl.float32), mask=m4)
    tl.store(o + 96, s3 * q3.to(tl.float32), mask=m4)


@triton.jit
def matmul_q4_k_kernel(
    a_ptr, dm_ptr, scales_ptr, qs_ptr, c_ptr, M, N, K, stride_am, stride_cm,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """C = A W^T with W Q4_K, dequantized tile by tile inside the matmul (the fused prefill option).

    K is walked one super-block at a time; the low- and high-nibble halves of the tile are two dots
    over the same permutation of A's columns, so the weights never need reordering in registers.
    """
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    group = GROUP_M * grid_n
    first_m = (pid // group) * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % size_m
    pid_n = (pid % group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < N
    rn64 = tl.where(nmask, rn, 0).to(tl.int64)
    ns = K // 256
    c = tl.arange(0, 4)
    ll = tl.arange(0, 32)
    col = tl.reshape((c * 64)[:, None] + ll[None, :], (128,))  # A columns of the low nibbles
    qcol = tl.reshape((c * 32)[:, None] + ll[None, :], (128,))
    a_rows = a_ptr + rm.to(tl.int64)[:, None] * stride_am
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for sb in range(0, ns):
        q = tl.load(qs_ptr + rn64[:, None] * (K // 2) + sb * 128 + qcol[None, :]).to(tl.int32)
        sbi = rn64 * ns + sb
        sbase = (sbi * 12)[:, None]
        sc_lo, mn_lo = _k4_scale_min(scales_ptr, sbase, (2 * c)[None, :], nmask[:, None])
        sc_hi, mn_hi = _k4_scale_min(scales_ptr, sbase, (2 * c + 1)[None, :], nmask[:, None])
        d = tl.load(dm_ptr + sbi * 2).to(tl.float32)[:, None]
        dmin = tl.load(dm_ptr + sbi * 2 + 1).to(tl.float32)[:, None]
        # per-element scale and min, [BN, 4] -> [BN, 128] (32 elements per sub-block)
        s_lo = tl.reshape(
            tl.broadcast_to((d * sc_lo)[:, :, None], (BLOCK_N, 4, 32)), (BLOCK_N, 128)
        )
        s_hi = tl.reshape(
            tl.broadcast_to((d * sc_hi)[:, :, None], (BLOCK_N, 4, 32)), (BLOCK_N, 128)
        )
        o_lo = tl.reshape(
            tl.broadcast_to((dmin * mn_lo)[:, :, None], (BLOCK_N, 4, 32)), (BLOCK_N, 128)
        )
        o_hi = tl.reshape(
            tl.broadcast_to((dmin * mn_hi)[:, :, None], (BLOCK_N, 4, 32)), (BLOCK_N, 128)
        )
        w_lo = (s_lo * (q & 15).to(tl.float32) - o_lo).to(a_ptr.dtype.element_ty)
        w_hi = (s_hi * (q >> 4).to(tl.float32) - o_hi).to(a_ptr.dtype.element_ty)
        a_lo = tl.load(a_rows + sb * 256 + col[None, :], mask=mmask[:, None], other=0.0)
        a_hi = tl.load(a_rows + sb * 256 + 32 + col[None, :], mask=mmask[:, None], other=0.0)
        acc = tl.dot(a_lo, tl.trans(w_lo), acc)
        acc = tl.dot(a_hi, tl.trans(w_hi), acc)
    c_ptrs = c_ptr + rm.to(tl.int64)[:, None] * stride_cm + rn[None, :]
    tl.store(c_ptrs, acc, mask=mmask[:, None] & nmask[None, :])
