"""Fused dequantize + matrix-vector Triton kernels on a float x: y[m] = W x[m], W kept quantized.

Decode uses the int8-activation kernels of `gemv_i8` by default; these are the exact-x path
(`GemvConfig(int8_x=False)`) and hold the split-K summing kernel both use.

One program computes BLOCK_N output rows for one activation row and walks K; every weight byte is
read once per activation row (for a handful of rows, the repeats come from L2: programs of the same
rows are launched next to each other). Plane layouts are in `formats`.

The K-quant kernels reduce before they scale: for a sub-block with scale s and min m,
    sum_i (d*s*q_i - dmin*m) x_i = d*s * sum_i q_i x_i - dmin*m * sum_i x_i,
so each weight costs a nibble extract, a convert and one FMA; scales are applied per sub-block.
Accumulation is float32; x may be fp32, fp16 or bf16; y is written in y's dtype.
"""

from __future__ import annotations

import logging

import triton
import triton.language as tl

from worker_orcd.kernels.triton import pdl

logger = logging.getLogger(__name__)


@triton.jit
def _to_f32(q, offset: tl.constexpr):
    """float(q - offset) for int32 0 <= q < 2**23, exact: the bits of 2**23 + q read as a float,
    minus 2**23 + offset. One logic op and one add, instead of the quarter-rate int-to-float
    conversion that would otherwise bound these kernels below the memory bandwidth."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + offset)


@triton.jit
def _k4_scale_min(ptr, base, j, mask):
    """Six-bit scale and min of sub-blocks `j` (0..7) from the 12 scale bytes at `ptr + base`."""
    low = j < 4
    a = tl.load(ptr + base + j, mask=mask, other=0).to(tl.int32)  # q[j]
    b = tl.load(ptr + base + j + 4, mask=mask, other=0).to(tl.int32)  # q[j + 4]
    c = tl.load(ptr + base + tl.where(low, j, j - 4), mask=mask, other=0).to(tl.int32)  # q[j - 4]
    sc = tl.where(low, a & 63, (b & 15) | ((c >> 6) << 4))
    mn = tl.where(low, b & 63, (b >> 4) | ((a >> 6) << 4))
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def gemv_q8_0_kernel(
    x_ptr, d_ptr, qs_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
    stride_yk, SPLIT_UNITS,
    BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # tile [BLOCK_N rows, BLOCKS blocks, 32 weights]
    pdl.prologue(PDL)
    pid_m = tl.program_id(0) % M  # programs of the same rows are neighbours (L2 reuse)
    pid_k = tl.program_id(1)  # split of K: units [lo, hi) of this program
    rows = (tl.program_id(0) // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    r64 = rows.to(tl.int64)
    nb = K // 32
    b = tl.arange(0, BLOCKS)
    ll = tl.arange(0, 32)
    x_row = x_ptr + pid_m * stride_xm
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    lo_u = pid_k * SPLIT_UNITS
    hi_u = tl.minimum(nb, lo_u + SPLIT_UNITS)
    for b0 in range(lo_u, hi_u, BLOCKS):
        blk = b0 + b
        bmask = blk < hi_u
        m2 = rmask[:, None] & bmask[None, :]
        q = tl.load(
            qs_ptr + r64[:, None, None] * K + (blk * 32)[None, :, None] + ll[None, None, :],
            mask=m2[:, :, None], other=0,
        )  # fmt: skip
        d = tl.load(d_ptr + r64[:, None] * nb + blk[None, :], mask=m2, other=0.0)
        xv = tl.load(x_row + (blk * 32)[:, None] + ll[None, :], mask=bmask[:, None], other=0.0)
        part = tl.sum(_to_f32(q.to(tl.int32) + 128, 128.0) * xv.to(tl.float32)[None], axis=2)
        acc += tl.sum(part * d.to(tl.float32), axis=1)
    tl.store(y_ptr + pid_k * stride_yk + pid_m * stride_ym + rows, acc, mask=rmask)


@triton.jit
def _gemv_q4_q5_0(
    x_ptr, d_ptr, qh_ptr, qs_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
    stride_yk, SPLIT_UNITS,
    HAS_QH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # tile [BLOCK_N rows, BLOCKS blocks, 16 bytes]; byte l holds elements l (low) and l + 16 (high)
    pdl.prologue(PDL)
    pid_m = tl.program_id(0) % M  # programs of the same rows are neighbours (L2 reuse)
    pid_k = tl.program_id(1)  # split of K: units [lo, hi) of this program
    rows = (tl.program_id(0) // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    r64 = rows.to(tl.int64)
    nb = K // 32
    b = tl.arange(0, BLOCKS)
    ll = tl.arange(0, 16)
    x_row = x_ptr + pid_m * stride_xm
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    lo_u = pid_k * SPLIT_UNITS
    hi_u = tl.minimum(nb, lo_u + SPLIT_UNITS)
    for b0 in range(lo_u, hi_u, BLOCKS):
        blk = b0 + b
        bmask = blk < hi_u
        m2 = rmask[:, None] & bmask[None, :]
        q = tl.load(
            qs_ptr + r64[:, None, None] * (K // 2) + (blk * 16)[None, :, None] + ll[None, None, :],
            mask=m2[:, :, None], other=0,
        ).to(tl.int32)  # fmt: skip
        lo = q & 15
        hi = q >> 4
        if HAS_QH:
            # re-laid qh (formats): element l's fifth bit at 8 (l % 4) + l // 4, l + 16's at + 4
            h = tl.load(qh_ptr + r64[:, None] * nb + blk[None, :], mask=m2, other=0)[:, :, None]
            sh = (8 * (ll % 4) + ll // 4)[None, None, :]
            lo = lo | (((h >> sh) & 1) << 4)
            hi = hi | (((h >> (sh + 4)) & 1) << 4)
            flo = _to_f32(lo, 16.0)
            fhi = _to_f32(hi, 16.0)
        else:
            flo = _to_f32(lo, 8.0)
            fhi = _to_f32(hi, 8.0)
        d = tl.load(d_ptr + r64[:, None] * nb + blk[None, :], mask=m2, other=0.0)
        xoff = (blk * 32)[:, None] + ll[None, :]
        xlo = tl.load(x_row + xoff, mask=bmask[:, None], other=0.0).to(tl.float32)
        xhi = tl.load(x_row + xoff + 16, mask=bmask[:, None], other=0.0).to(tl.float32)
        part = tl.sum(flo * xlo[None] + fhi * xhi[None], axis=2)
        acc += tl.sum(part * d.to(tl.float32), axis=1)
    tl.store(y_ptr + pid_k * stride_yk + pid_m * stride_ym + rows, acc, mask=rmask)


@triton.jit
def _gemv_q4_q5_k(
    x_ptr, dm_ptr, scales_ptr, qh_ptr, qs_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
    stride_yk, SPLIT_UNITS,
    HAS_QH: tl.constexpr, BLOCK_N: tl.constexpr, SUPER: tl.constexpr, ONE_PLUS: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    # tile [BLOCK_N rows, SUPER super-blocks, 4 chunks, 32 bytes]; chunk c holds sub-block 2c in its
    # low nibbles (elements 64c + l) and 2c + 1 in its high nibbles (elements 64c + 32 + l)
    pdl.prologue(PDL)
    pid_m = tl.program_id(0) % M  # programs of the same rows are neighbours (L2 reuse)
    pid_k = tl.program_id(1)  # split of K: units [lo, hi) of this program
    rows = (tl.program_id(0) // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    r64 = rows.to(tl.int64)
    ns = K // 256
    s = tl.arange(0, SUPER)
    c = tl.arange(0, 4)
    ll = tl.arange(0, 32)
    x_row = x_ptr + pid_m * stride_xm
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    lo_u = pid_k * SPLIT_UNITS
    hi_u = tl.minimum(ns, lo_u + SPLIT_UNITS)
    for s0 in range(lo_u, hi_u, SUPER):
        sb = s0 + s
        smask = sb < hi_u
        m2 = rmask[:, None] & smask[None, :]  # [BN, S]
        m3 = m2[:, :, None]
        q = tl.load(
            qs_ptr + r64[:, None, None, None] * (K // 2) + (sb * 128)[None, :, None, None]
            + (c * 32)[None, None, :, None] + ll[None, None, None, :],
            mask=m3[:, :, :, None], other=0,
        ).to(tl.int32)  # fmt: skip
        if ONE_PLUS and not HAS_QH:
            # nibbles straight into the top mantissa bits of 1.0: shift + and-or per weight
            flo = (((q << 19) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
            fhi = (((q << 15) & 0x780000) | 0x3F800000).to(tl.float32, bitcast=True)
        lo = q & 15
        hi = q >> 4
        if HAS_QH:
            # qh[l] of a super-block: bit j is the fifth bit of element l of sub-block j
            hb = tl.load(
                qh_ptr + r64[:, None, None, None] * (K // 8) + (sb * 32)[None, :, None, None]
                + ll[None, None, None, :],
                mask=m3[:, :, :, None], other=0,
            ).to(tl.int32)  # fmt: skip
            lo = lo | (((hb >> (2 * c)[None, None, :, None]) & 1) << 4)
            hi = hi | (((hb >> (2 * c + 1)[None, None, :, None]) & 1) << 4)
        xoff = (sb * 256)[:, None, None] + (c * 64)[None, :, None] + ll[None, None, :]  # [S, 4, 32]
        xm = smask[:, None, None]
        xlo = tl.load(x_row + xoff, mask=xm, other=0.0).to(tl.float32)
        xhi = tl.load(x_row + xoff + 32, mask=xm, other=0.0).to(tl.float32)
        slo = tl.sum(xlo, axis=2)[None]  # [1, S, 4]
        shi = tl.sum(xhi, axis=2)[None]
        if ONE_PLUS:
            # f = 1 + q / 2**B (exact), so sum(q x) = 2**B * (sum(f x) - sum(x))
            if HAS_QH:
                flo = ((lo << 18) | 0x3F800000).to(tl.float32, bitcast=True)
                fhi = ((hi << 18) | 0x3F800000).to(tl.float32, bitcast=True)
                unit = 32.0
            else:
                unit = 16.0
            dlo = (tl.sum(flo * xlo[None], axis=3) - slo) * unit  # [BN, S, 4]
            dhi = (tl.sum(fhi * xhi[None], axis=3) - shi) * unit
        else:
            dlo = tl.sum(_to_f32(lo, 0.0) * xlo[None], axis=3)  # [BN, S, 4]
            dhi = tl.sum(_to_f32(hi, 0.0) * xhi[None], axis=3)
        sbi = r64[:, None] * ns + sb[None, :]  # [BN, S] super-block index
        sbase = (sbi * 12)[:, :, None]
        sc_lo, mn_lo = _k4_scale_min(scales_ptr, sbase, (2 * c)[None, None, :], m3)
        sc_hi, mn_hi = _k4_scale_min(scales_ptr, sbase, (2 * c + 1)[None, None, :], m3)
        d = tl.load(dm_ptr + sbi * 2, mask=m2, other=0.0).to(tl.float32)
        dmin = tl.load(dm_ptr + sbi * 2 + 1, mask=m2, other=0.0).to(tl.float32)
        t = d * tl.sum(sc_lo * dlo + sc_hi * dhi, axis=2) - dmin * tl.sum(
            mn_lo * slo + mn_hi * shi, axis=2
        )
        acc += tl.sum(t, axis=1)
    tl.store(y_ptr + pid_k * stride_yk + pid_m * stride_ym + rows, acc, mask=rmask)


@triton.jit
def gemv_q6_k_kernel(
    x_ptr, d_ptr, scales_ptr, qh_ptr, ql_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
    stride_yk, SPLIT_UNITS,
    BLOCK_N: tl.constexpr, HALVES: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # tile [BLOCK_N rows, HALVES half-super-blocks of 128, 2, 16]: l = 16t + u in 0..31, and the
    # four 32-element groups f of a half are (ql[l] low, ql[l+32] low, ql[l] high, ql[l+32] high)
    # with 2-bit fields f of qh[l]; 16-element sub-block of (f, t) is 2f + t within the half.
    pdl.prologue(PDL)
    pid_m = tl.program_id(0) % M  # programs of the same rows are neighbours (L2 reuse)
    pid_k = tl.program_id(1)  # split of K: units [lo, hi) of this program
    rows = (tl.program_id(0) // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < N
    r64 = rows.to(tl.int64)
    nh = K // 128
    h = tl.arange(0, HALVES)
    t = tl.arange(0, 2)
    u = tl.arange(0, 16)
    lu = (t * 16)[:, None] + u[None, :]  # [2, 16]
    x_row = x_ptr + pid_m * stride_xm
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    lo_u = pid_k * SPLIT_UNITS
    hi_u = tl.minimum(nh, lo_u + SPLIT_UNITS)
    for h0 in range(lo_u, hi_u, HALVES):
        hh = h0 + h
        hmask = hh < hi_u
        m2 = rmask[:, None] & hmask[None, :]  # [BN, H]
        m4 = m2[:, :, None, None]
        qoff = r64[:, None, None, None] * (K // 2) + (hh * 64)[None, :, None, None] + lu[None, None]
        qa = tl.load(ql_ptr + qoff, mask=m4, other=0).to(tl.int32)
        qb = tl.load(ql_ptr + qoff + 32, mask=m4, other=0).to(tl.int32)
        hoff = r64[:, None, None, None] * (K // 4) + (hh * 32)[None, :, None, None] + lu[None, None]
        qh = tl.load(qh_ptr + hoff, mask=m4, other=0).to(tl.int32)
        q0 = _to_f32((qa & 15) | ((qh & 3) << 4), 32.0)
        q1 = _to_f32((qb & 15) | (((qh >> 2) & 3) << 4), 32.0)
        q2 = _to_f32((qa >> 4) | (((qh >> 4) & 3) << 4), 32.0)
        q3 = _to_f32((qb >> 4) | ((qh >> 6) << 4), 32.0)
        xoff = (hh * 128)[:, None, None] + lu[None]  # [H, 2, 16]
        xm = hmask[:, None, None]
        x0 = tl.load(x_row + xoff, mask=xm, other=0.0).to(tl.float32)[None]
        x1 = tl.load(x_row + xoff + 32, mask=xm, other=0.0).to(tl.float32)[None]
        x2 = tl.load(x_row + xoff + 64, mask=xm, other=0.0).to(tl.float32)[None]
        x3 = tl.load(x_row + xoff + 96, mask=xm, other=0.0).to(tl.float32)[None]
        sbase = (r64[:, None] * (K // 16) + (hh * 8)[None, :])[:, :, None] + t[None, None, :]
        m3 = m2[:, :, None]
        s0 = tl.load(scales_ptr + sbase, mask=m3, other=0).to(tl.float32)  # [BN, H, 2]
        s1 = tl.load(scales_ptr + sbase + 2, mask=m3, other=0).to(tl.float32)
        s2 = tl.load(scales_ptr + sbase + 4, mask=m3, other=0).to(tl.float32)
        s3 = tl.load(scales_ptr + sbase + 6, mask=m3, other=0).to(tl.float32)
        tot = (
            s0 * tl.sum(q0 * x0, axis=3)
            + s1 * tl.sum(q1 * x1, axis=3)
            + s2 * tl.sum(q2 * x2, axis=3)
            + s3 * tl.sum(q3 * x3, axis=3)
        )  # [BN, H, 2]
        d = tl.load(d_ptr + r64[:, None] * (K // 256) + (hh // 2)[None, :], mask=m2, other=0.0)
        acc += tl.sum(d.to(tl.float32) * tl.sum(tot, axis=2), axis=1)
    tl.store(y_ptr + pid_k * stride_yk + pid_m * stride_ym + rows, acc, mask=rmask)


@triton.jit
def splitk_sum_kernel(
    ws_ptr, y_ptr, M, N, stride_ym, SPLIT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr
):
    """y[m, n] = sum over s of ws[s, m, n] (float32 partials [SPLIT, M, N]), in y's dtype."""
    pdl.prologue(PDL)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s in tl.static_range(SPLIT):
        acc += tl.load(ws_ptr + s * M * N + offs, mask=mask, other=0.0)
    tl.store(y_ptr + (offs // N) * stride_ym + offs % N, acc, mask=mask)
