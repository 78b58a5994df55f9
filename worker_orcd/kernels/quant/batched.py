"""Fused dequantize + small-batch matmul on the tensor cores: y = x W^T for x [B, K], B of 2 to 64.

The GEMVs (`gemv`, `gemv_i8`) read the weight once per row of x. Here a program owns BLOCK_N
output rows and BLOCK_B rows of x (rows past M masked to zero) and walks K, or its share of a K
split: it loads a [BLOCK_N, 32] tile of the weight's planes, dequantizes it in registers, rounds it
to x's dtype and multiplies it with the [32, BLOCK_B] tile of x^T on the tensor cores (`tl.dot`),
accumulating [BLOCK_N, BLOCK_B] in float32. The weight is read once for every BLOCK_B rows of x,
so once per batch up to 64 rows, and never written out. The weight tile is the MMA's A operand
(its rows the many output rows) and x the B operand, so BLOCK_B can be as small as the 16 an MMA
needs; on Hopper a BLOCK_N of 64 or more lets Triton take the A operand from registers.

Each tile is 32 weights of one scale and one min per row, so scales broadcast along the tile's
rows: a K-quant sub-block (Q4_K/Q5_K), a block (Q8_0/Q4_0/Q5_0), or two 16-element sub-blocks
(Q6_K: one select per weight picks the scale). Plane layouts are in `formats`; K-quant kernels
step one super-block (8 tiles) at a time, the 32-element types BLOCKS blocks.

Rounding: the dequantized weight is rounded to x's dtype as the dequantize + cuBLAS path rounds
its scratch weight, then multiplied exactly and summed in float32; float32 x multiplies in IEEE
float32 (`F32_DOT`, no TF32). Triton's interpreter multiplies bf16 operands wrongly, so under it
`F32_DOT` is on for every dtype: the weight is still rounded to x's dtype first.

Rows past N read row N - 1 (valid memory, no masks on weight loads) and are not stored; blocks
past a split's range read the split's last block against x = 0.
"""

from __future__ import annotations

import logging

import triton
import triton.language as tl

from worker_orcd.kernels.quant.gemv import _to_f32
from worker_orcd.kernels.triton import pdl

logger = logging.getLogger(__name__)


@triton.jit
def _tile(M, N, UNITS, SPLIT_UNITS, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr):
    """A program's share: (output rows [BLOCK_N], those rows clamped into [0, N) as int64, its
    rows of x [BLOCK_B], their mask, K units [lo, hi) of its split). Programs of one row tile
    and different tiles of x are neighbours, so they meet the weight tile in L2."""
    b_tiles = tl.cdiv(M, BLOCK_B)
    pid = tl.program_id(0)
    rows = (pid // b_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
    r64 = tl.minimum(rows, N - 1).to(tl.int64)
    xr = (pid % b_tiles) * BLOCK_B + tl.arange(0, BLOCK_B)
    lo = tl.program_id(1) * SPLIT_UNITS
    hi = tl.minimum(UNITS, lo + SPLIT_UNITS)
    return rows, r64, xr, xr < M, lo, hi


@triton.jit
def _xt(x_ptr, stride_xm, xr, xmask, col):
    """x^T tile [len(col), BLOCK_B]: columns `col` of rows `xr` of x (masked rows read 0)."""
    ptr = x_ptr + xr.to(tl.int64)[None, :] * stride_xm + col[:, None]
    return tl.load(ptr, mask=xmask[None, :], other=0.0)


@triton.jit
def _mma(acc, w, xt, F32_DOT: tl.constexpr):
    """acc + w xt: w [BLOCK_N, 32] float32 dequantized weights, rounded to x's dtype first."""
    w = w.to(xt.dtype)
    if F32_DOT:
        acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(w, xt, acc)
    return acc


@triton.jit
def _store(y_ptr, acc, rows, N, xr, xmask, stride_ym, stride_yk):
    """acc [BLOCK_N, BLOCK_B] into y[xr, rows] (of this split's partials when split)."""
    y_split = y_ptr + tl.program_id(1) * stride_yk
    ptr = y_split + xr.to(tl.int64)[None, :] * stride_ym + rows[:, None]
    tl.store(ptr, acc, mask=(rows < N)[:, None] & xmask[None, :])


@triton.jit
def mm_q8_0_kernel(
    x_ptr, d_ptr, qs_ptr, y_ptr, M, N, K, stride_xm, stride_ym, stride_yk, SPLIT_UNITS,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCKS: tl.constexpr, STAGES: tl.constexpr,
    F32_DOT: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # qs int8 [N, K], d f16 [N, K / 32]; tile [BLOCK_N rows, 32 weights of block blk]
    pdl.prologue(PDL)
    nb = K // 32
    rows, r64, xr, xmask, lo, hi = _tile(M, N, nb, SPLIT_UNITS, BLOCK_N, BLOCK_B)
    ll = tl.arange(0, 32)
    qs_row = qs_ptr + r64 * K
    acc = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
    for b0 in tl.range(lo, hi, BLOCKS, num_stages=STAGES):
        for i in tl.static_range(BLOCKS):
            blk = tl.minimum(b0 + i, hi - 1)  # past the range: a valid block times x = 0
            q = tl.load(qs_row[:, None] + blk * 32 + ll[None, :]).to(tl.int32)
            d = tl.load(d_ptr + r64 * nb + blk).to(tl.float32)
            w = _to_f32(q + 128, 128.0) * d[:, None]
            xt = _xt(x_ptr, stride_xm, xr, xmask & (xr * 0 + b0 + i < hi), blk * 32 + ll)
            acc = _mma(acc, w, xt, F32_DOT)
    _store(y_ptr, acc, rows, N, xr, xmask, stride_ym, stride_yk)


@triton.jit
def _mm_q4_q5_0(
    x_ptr, d_ptr, qh_ptr, qs_ptr, y_ptr, M, N, K, stride_xm, stride_ym, stride_yk, SPLIT_UNITS,
    HAS_QH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, BLOCKS: tl.constexpr,
    STAGES: tl.constexpr, F32_DOT: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # qs u8 [N, K / 2]: byte l of a block holds elements l (low nibble) and 16 + l (high); element
    # l of the tile reads byte l % 16 (the repeat comes from L1). Q5_0's re-laid qh word (formats)
    # has element e's fifth bit at bit 8 (e % 4) + 4 (e // 16) + (e % 16) // 4.
    pdl.prologue(PDL)
    nb = K // 32
    rows, r64, xr, xmask, lo, hi = _tile(M, N, nb, SPLIT_UNITS, BLOCK_N, BLOCK_B)
    ll = tl.arange(0, 32)
    low = (ll < 16)[None, :]
    qs_row = qs_ptr + r64 * (K // 2)
    acc = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
    for b0 in tl.range(lo, hi, BLOCKS, num_stages=STAGES):
        for i in tl.static_range(BLOCKS):
            blk = tl.minimum(b0 + i, hi - 1)  # past the range: a valid block times x = 0
            q = tl.load(qs_row[:, None] + blk * 16 + (ll % 16)[None, :]).to(tl.int32)
            q = tl.where(low, q & 15, q >> 4)
            if HAS_QH:
                h = tl.load(qh_ptr + r64 * nb + blk)  # [BN] int32
                sh = 8 * (ll % 4) + 4 * (ll // 16) + (ll % 16) // 4
                q = q | (((h[:, None] >> sh[None, :]) & 1) << 4)
                w = _to_f32(q, 16.0)
            else:
                w = _to_f32(q, 8.0)
            d = tl.load(d_ptr + r64 * nb + blk).to(tl.float32)
            xt = _xt(x_ptr, stride_xm, xr, xmask & (xr * 0 + b0 + i < hi), blk * 32 + ll)
            acc = _mma(acc, w * d[:, None], xt, F32_DOT)
    _store(y_ptr, acc, rows, N, xr, xmask, stride_ym, stride_yk)


@triton.jit
def _k4_scale_min(w0, w1, w2, J: tl.constexpr):
    """Six-bit scale and min of sub-block J (0..7) of the 12 scale bytes, read as three int32
    words [BN]: J < 4 from byte J of w0 (scale) and w1 (min); J >= 4 from the nibbles of byte
    J - 4 of w2 and the top two bits of byte J - 4 of w0 (scale) and w1 (min)."""
    if J < 4:
        sc = (w0 >> (8 * J)) & 63
        mn = (w1 >> (8 * J)) & 63
    else:
        sc = ((w2 >> (8 * J - 32)) & 15) | (((w0 >> (8 * J - 26)) & 3) << 4)
        mn = ((w2 >> (8 * J - 28)) & 15) | (((w1 >> (8 * J - 26)) & 3) << 4)
    return sc.to(tl.float32), mn.to(tl.float32)


@triton.jit
def _mm_q4_q5_k(
    x_ptr, dm_ptr, sc_ptr, qh_ptr, qs_ptr, y_ptr, M, N, K, stride_xm, stride_ym, stride_yk,
    SPLIT_UNITS,
    HAS_QH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, STAGES: tl.constexpr,
    F32_DOT: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # One super-block per step. Chunk c (qs bytes 32c..32c+31) holds sub-block 2c in its low
    # nibbles (elements 64c + l) and 2c + 1 in its high nibbles (64c + 32 + l); Q5_K's qh byte l
    # has the fifth bit of element l of sub-block j at bit j. sc int32 [N, ns * 3] (the 12 scale
    # bytes of each super-block), dm f16 [N, ns, 2].
    pdl.prologue(PDL)
    ns = K // 256
    rows, r64, xr, xmask, lo, hi = _tile(M, N, ns, SPLIT_UNITS, BLOCK_N, BLOCK_B)
    ll = tl.arange(0, 32)
    qs_row = qs_ptr + r64 * (K // 2)
    qh_row = qh_ptr + r64 * (K // 8)
    acc = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
    for sb in tl.range(lo, hi, num_stages=STAGES):
        sbi = r64 * ns + sb
        d = tl.load(dm_ptr + sbi * 2).to(tl.float32)
        dmin = tl.load(dm_ptr + sbi * 2 + 1).to(tl.float32)
        w0 = tl.load(sc_ptr + sbi * 3)
        w1 = tl.load(sc_ptr + sbi * 3 + 1)
        w2 = tl.load(sc_ptr + sbi * 3 + 2)
        if HAS_QH:
            h = tl.load(qh_row[:, None] + sb * 32 + ll[None, :]).to(tl.int32)  # [BN, 32]
        for c in tl.static_range(4):
            q = tl.load(qs_row[:, None] + sb * 128 + c * 32 + ll[None, :]).to(tl.int32)
            q_lo = q & 15
            q_hi = q >> 4
            if HAS_QH:
                q_lo = q_lo | (((h >> (2 * c)) & 1) << 4)
                q_hi = q_hi | (((h >> (2 * c + 1)) & 1) << 4)
            sc_lo, mn_lo = _k4_scale_min(w0, w1, w2, 2 * c)
            sc_hi, mn_hi = _k4_scale_min(w0, w1, w2, 2 * c + 1)
            w_lo = _to_f32(q_lo, 0.0) * (d * sc_lo)[:, None] - (dmin * mn_lo)[:, None]
            w_hi = _to_f32(q_hi, 0.0) * (d * sc_hi)[:, None] - (dmin * mn_hi)[:, None]
            col = sb * 256 + c * 64 + ll
            acc = _mma(acc, w_lo, _xt(x_ptr, stride_xm, xr, xmask, col), F32_DOT)
            acc = _mma(acc, w_hi, _xt(x_ptr, stride_xm, xr, xmask, col + 32), F32_DOT)
    _store(y_ptr, acc, rows, N, xr, xmask, stride_ym, stride_yk)


@triton.jit
def mm_q6_k_kernel(
    x_ptr, d_ptr, sc_ptr, qh_ptr, ql_ptr, y_ptr, M, N, K, stride_xm, stride_ym, stride_yk,
    SPLIT_UNITS,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, STAGES: tl.constexpr, F32_DOT: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    # One super-block per step: halves h of 128 elements, each four 32-element groups f read from
    # ql bytes a = ql[64h + l], b = ql[64h + 32 + l] and qh[32h + l]: (a low, b low, a high,
    # b high), with bits 2f..2f+1 of qh on top; group f has scales 8h + 2f (l < 16) and + 1.
    pdl.prologue(PDL)
    ns = K // 256
    rows, r64, xr, xmask, lo, hi = _tile(M, N, ns, SPLIT_UNITS, BLOCK_N, BLOCK_B)
    ll = tl.arange(0, 32)
    low = (ll < 16)[None, :]
    ql_row = ql_ptr + r64 * (K // 2)
    qh_row = qh_ptr + r64 * (K // 4)
    sc_row = sc_ptr + r64 * (K // 16)
    acc = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
    for sb in tl.range(lo, hi, num_stages=STAGES):
        d = tl.load(d_ptr + r64 * ns + sb).to(tl.float32)
        for hf in tl.static_range(2):
            qa = tl.load(ql_row[:, None] + sb * 128 + hf * 64 + ll[None, :]).to(tl.int32)
            qb = tl.load(ql_row[:, None] + sb * 128 + hf * 64 + 32 + ll[None, :]).to(tl.int32)
            qh = tl.load(qh_row[:, None] + sb * 64 + hf * 32 + ll[None, :]).to(tl.int32)
            for f in tl.static_range(4):
                if f == 0:
                    q = (qa & 15) | ((qh & 3) << 4)
                elif f == 1:
                    q = (qb & 15) | (((qh >> 2) & 3) << 4)
                elif f == 2:
                    q = (qa >> 4) | (((qh >> 4) & 3) << 4)
                else:
                    q = (qb >> 4) | (((qh >> 6) & 3) << 4)
                s0 = tl.load(sc_row + sb * 16 + hf * 8 + 2 * f).to(tl.float32)
                s1 = tl.load(sc_row + sb * 16 + hf * 8 + 2 * f + 1).to(tl.float32)
                scale = tl.where(low, (d * s0)[:, None], (d * s1)[:, None])  # [BN, 32]
                col = sb * 256 + hf * 128 + f * 32 + ll
                xt = _xt(x_ptr, stride_xm, xr, xmask, col)
                acc = _mma(acc, _to_f32(q, 32.0) * scale, xt, F32_DOT)
    _store(y_ptr, acc, rows, N, xr, xmask, stride_ym, stride_yk)
