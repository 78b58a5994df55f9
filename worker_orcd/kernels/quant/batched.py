"""Fused dequantize + small-batch matmul on the tensor cores: y = x W^T for x [B, K], B of 2 to 64.

The GEMVs (`gemv`, `gemv_i8`) read the weight once per row of x. Here a program owns BLOCK_N
output rows and BLOCK_B rows of x (rows past M masked to zero) and walks K, or its share of a K
split: it loads a [BLOCK_N, 32] tile of the weight's planes, dequantizes it in registers, rounds it
to x's dtype and multiplies it with the [32, BLOCK_B] tile of x^T on the tensor cores (`tl.dot`),
accumulating [BLOCK_N, BLOCK_B] in float32. The weight is read once for every BLOCK_B rows of x,
so once per batch up to 64 rows, and never written out. The weight tile is the MMA's A operand
(its rows the many output rows) and x the B operand, so BLOCK_B can be as small as the 16 an MMA
needs; on Hopper a BLOCK_N of 64 or more lets Triton take the A operand from registers.

Each tile holds weights of one scale (and min) per row, so scales broadcast along the tile's
rows: 32 weights of a Q4_K/Q5_K sub-block or a Q8_0 block, 16 of a Q6_K sub-block, or the low or
high nibbles (16 weights) of a Q4_0/Q5_0 block. A program walks K in units (Q4_K/Q5_K: chunks of
two sub-blocks; Q6_K: halves of a super-block; the 32-element types: blocks), STEP units per
unrolled step. Plane layouts are in `formats`.

Dequantization, two integer ops and one FMA per weight: a b-bit quant q goes into the top
mantissa bits of 1.0 (f = 1 + q / 2**b, exact, a shift and an and-or), and w = a f + c with
a = 2**b * scale and c = -(a + min) per row (Q4_K/Q5_K), or c = -1.5 a for the formats with a
fixed zero point (Q6_K: q - 32 of 6 bits; Q8_0: q + 128 of 8 bits; Q4_0/Q5_0: q - 8 / q - 16).
Besides the product's own rounding this rounds c once, ~2**-24 of the largest weight of the block.

Rounding: the dequantized weight is rounded to x's dtype as the dequantize + cuBLAS path rounds
its scratch weight, then multiplied exactly and summed in float32; float32 x multiplies in IEEE
float32 (`F32_DOT`, no TF32). Triton's interpreter multiplies bf16 operands wrongly, so under it
`F32_DOT` is on for every dtype: the weight is still rounded to x's dtype first.

Rows past N read row N - 1 (valid memory, no masks on weight loads) and are not stored; blocks
past a split's range (32-element types, whose unit count a step need not divide) read the split's
last block against x = 0.
"""

from __future__ import annotations

import logging

import triton
import triton.language as tl

from worker_orcd.kernels.triton import pdl

logger = logging.getLogger(__name__)

# M (rows of x) and the split's length only bound loops and masks: one compiled kernel serves every
# batch size instead of one per divisibility class of each.
_kernel = triton.jit(do_not_specialize=["M", "SPLIT_UNITS"])


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


ONE = tl.constexpr(0x3F800000)  # 1.0f


@triton.jit
def _w(bits, a, c):
    """Weights w = a f + c [BN, T] from f = 1 + q / 2**b, q's b bits at the top of the mantissa
    in `bits` (int32 [BN, T], bits 23 and up clear); a, c float32 [BN] per row."""
    f = (bits | ONE).to(tl.float32, bitcast=True)
    return f * a[:, None] + c[:, None]


@triton.jit
def _xt(x_ptr, stride_xm, xr, xmask, col):
    """x^T tile [len(col), BLOCK_B]: columns `col` of rows `xr` of x (masked rows read 0)."""
    ptr = x_ptr + xr.to(tl.int64)[None, :] * stride_xm + col[:, None]
    return tl.load(ptr, mask=xmask[None, :], other=0.0)


@triton.jit
def _mma(acc, w, xt, F32_DOT: tl.constexpr):
    """acc + w xt: w [BLOCK_N, T] float32 dequantized weights, rounded to x's dtype first; xt
    [T, BLOCK_B] x^T."""
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


@_kernel
def mm_q8_0_kernel(
    x_ptr, d_ptr, qs_ptr, y_ptr, M, N, K, stride_xm, stride_ym, stride_yk, SPLIT_UNITS,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, STEP: tl.constexpr, STAGES: tl.constexpr,
    F32_DOT: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # qs u8 [N, K] (the int8 quants' bytes), d f16 [N, K / 32]; unit = block; w = d * q with
    # q + 128 = byte ^ 0x80 as 8 bits of f
    pdl.prologue(PDL)
    nb = K // 32
    rows, r64, xr, xmask, lo, hi = _tile(M, N, nb, SPLIT_UNITS, BLOCK_N, BLOCK_B)
    ll = tl.arange(0, 32)
    qs_row = qs_ptr + tl.multiple_of(r64 * K, 32)
    acc = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
    for b0 in tl.range(lo, hi, STEP, num_stages=STAGES):
        for i in tl.static_range(STEP):
            blk = tl.minimum(b0 + i, hi - 1)  # past the range: a valid block times x = 0
            q = tl.load(qs_row[:, None] + blk * 32 + ll[None, :]).to(tl.int32)
            a = 256.0 * tl.load(d_ptr + r64 * nb + blk).to(tl.float32)
            w = _w(((q << 15) & 0x7F8000) ^ 0x400000, a, -1.5 * a)
            xt = _xt(x_ptr, stride_xm, xr, xmask & (xr * 0 + b0 + i < hi), blk * 32 + ll)
            acc = _mma(acc, w, xt, F32_DOT)
    _store(y_ptr, acc, rows, N, xr, xmask, stride_ym, stride_yk)


@_kernel
def _mm_q4_q5_0(
    x_ptr, d_ptr, qh_ptr, qs_ptr, y_ptr, M, N, K, stride_xm, stride_ym, stride_yk, SPLIT_UNITS,
    HAS_QH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, STEP: tl.constexpr,
    STAGES: tl.constexpr, F32_DOT: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # qs u8 [N, K / 2]: byte l of a block holds elements l (low nibble) and 16 + l (high), two
    # tiles of 16; Q5_0's re-laid qh word (formats) has element e's fifth bit at bit
    # 8 (e % 4) + 4 (e // 16) + (e % 16) // 4. unit = block.
    pdl.prologue(PDL)
    nb = K // 32
    rows, r64, xr, xmask, lo, hi = _tile(M, N, nb, SPLIT_UNITS, BLOCK_N, BLOCK_B)
    ll = tl.arange(0, 16)
    sh = (8 * (ll % 4) + ll // 4)[None, :]  # fifth bit of element l; of 16 + l at sh + 4
    qs_row = qs_ptr + tl.multiple_of(r64 * (K // 2), 16)
    acc = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
    for b0 in tl.range(lo, hi, STEP, num_stages=STAGES):
        for i in tl.static_range(STEP):
            blk = tl.minimum(b0 + i, hi - 1)  # past the range: a valid block times x = 0
            q = tl.load(qs_row[:, None] + blk * 16 + ll[None, :]).to(tl.int32)  # [BN, 16]
            d = tl.load(d_ptr + r64 * nb + blk).to(tl.float32)
            if HAS_QH:
                h = tl.load(qh_ptr + r64 * nb + blk)[:, None]  # [BN, 1] int32
                a = 32.0 * d
                b_lo = ((q << 18) & 0x3C0000) | (((h >> sh) << 22) & 0x400000)
                b_hi = ((q << 14) & 0x3C0000) | (((h >> (sh + 4)) << 22) & 0x400000)
            else:
                a = 16.0 * d
                b_lo = (q << 19) & 0x780000
                b_hi = (q << 15) & 0x780000
            xm = xmask & (xr * 0 + b0 + i < hi)
            col = blk * 32 + ll
            acc = _mma(acc, _w(b_lo, a, -1.5 * a), _xt(x_ptr, stride_xm, xr, xm, col), F32_DOT)
            acc = _mma(acc, _w(b_hi, a, -1.5 * a), _xt(x_ptr, stride_xm, xr, xm, col + 16), F32_DOT)
    _store(y_ptr, acc, rows, N, xr, xmask, stride_ym, stride_yk)


@triton.jit
def _k4_scales_mins(w0, w1, w2, c):
    """Six-bit scales and mins (float32 [BN]) of sub-blocks 2c and 2c + 1 (chunk c, 0..3) from the
    12 scale bytes of a super-block read as int32 words w0, w1, w2 [BN]. Sub-block j < 4: byte j
    of w0 (scale) and w1 (min), low six bits; j >= 4: the nibbles of byte j - 4 of w2 with the top
    two bits of byte j - 4 of w0 (scale) or w1 (min) above them."""
    first = c < 2
    scw = tl.where(first, w0 & 0x3F3F3F3F, (w2 & 0x0F0F0F0F) | ((w0 >> 2) & 0x30303030))
    mnw = tl.where(first, w1 & 0x3F3F3F3F, ((w2 >> 4) & 0x0F0F0F0F) | ((w1 >> 2) & 0x30303030))
    sh = 16 * (c % 2)  # sub-block 2c is byte 2 (c % 2) of the word, 2c + 1 the byte above
    sc_lo = ((scw >> sh) & 63).to(tl.float32)
    sc_hi = ((scw >> (sh + 8)) & 63).to(tl.float32)
    mn_lo = ((mnw >> sh) & 63).to(tl.float32)
    mn_hi = ((mnw >> (sh + 8)) & 63).to(tl.float32)
    return sc_lo, mn_lo, sc_hi, mn_hi


@_kernel
def _mm_q4_q5_k(
    x_ptr, dm_ptr, sc_ptr, qh_ptr, qs_ptr, y_ptr, M, N, K, stride_xm, stride_ym, stride_yk,
    SPLIT_UNITS,
    HAS_QH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, STEP: tl.constexpr,
    STAGES: tl.constexpr, F32_DOT: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # Unit u = chunk c = u % 4 of super-block u // 4 (STEP chunks per step, dividing 4): qs bytes
    # 32c..32c+31 hold sub-block 2c in their low nibbles (elements 64c + l) and 2c + 1 in their
    # high nibbles (64c + 32 + l); Q5_K's qh byte l has the fifth bit of element l of sub-block
    # j at bit j. sc int32 [N, ns * 3] (the 12 scale bytes of each super-block), dm f16 [N, ns, 2].
    pdl.prologue(PDL)
    ns = K // 256
    rows, r64, xr, xmask, lo, hi = _tile(M, N, 4 * ns, SPLIT_UNITS, BLOCK_N, BLOCK_B)
    ll = tl.arange(0, 32)
    qs_row = qs_ptr + tl.multiple_of(r64 * (K // 2), 128)
    qh_row = qh_ptr + tl.multiple_of(r64 * (K // 8), 32)
    acc = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
    for u0 in tl.range(lo, hi, STEP, num_stages=STAGES):
        if HAS_QH and STEP == 4:  # a step is a whole super-block: its fifth bits once
            h_sb = tl.load(qh_row[:, None] + (u0 // 4) * 32 + ll[None, :]).to(tl.int32)
        for i in tl.static_range(STEP):
            u = u0 + i
            sb = u // 4
            if STEP == 4:  # chunk i of the step's super-block
                c = i
            else:
                c = u % 4
            q = tl.load(qs_row[:, None] + u * 32 + ll[None, :]).to(tl.int32)  # [BN, 32]
            sbi = r64 * ns + sb
            sc_lo, mn_lo, sc_hi, mn_hi = _k4_scales_mins(
                tl.load(sc_ptr + sbi * 3), tl.load(sc_ptr + sbi * 3 + 1),
                tl.load(sc_ptr + sbi * 3 + 2), c,
            )  # fmt: skip
            d = tl.load(dm_ptr + sbi * 2).to(tl.float32)
            dmin = tl.load(dm_ptr + sbi * 2 + 1).to(tl.float32)
            if HAS_QH:  # 5 bits: nibble at mantissa bits 18-21, the fifth bit at 22
                if STEP == 4:
                    h = h_sb
                else:
                    h = tl.load(qh_row[:, None] + sb * 32 + ll[None, :]).to(tl.int32)
                b_lo = ((q << 18) & 0x3C0000) | ((h << (22 - 2 * c)) & 0x400000)
                b_hi = ((q << 14) & 0x3C0000) | ((h << (21 - 2 * c)) & 0x400000)
                unit = 32.0
            else:  # 4 bits at mantissa bits 19-22
                b_lo = (q << 19) & 0x780000
                b_hi = (q << 15) & 0x780000
                unit = 16.0
            a_lo = unit * d * sc_lo
            a_hi = unit * d * sc_hi
            w_lo = _w(b_lo, a_lo, -(a_lo + dmin * mn_lo))
            w_hi = _w(b_hi, a_hi, -(a_hi + dmin * mn_hi))
            col = u * 64 + ll
            acc = _mma(acc, w_lo, _xt(x_ptr, stride_xm, xr, xmask, col), F32_DOT)
            acc = _mma(acc, w_hi, _xt(x_ptr, stride_xm, xr, xmask, col + 32), F32_DOT)
    _store(y_ptr, acc, rows, N, xr, xmask, stride_ym, stride_yk)


@_kernel
def mm_q6_k_kernel(
    x_ptr, d_ptr, sc_ptr, qh_ptr, ql_ptr, y_ptr, M, N, K, stride_xm, stride_ym, stride_yk,
    SPLIT_UNITS,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, STEP: tl.constexpr, STAGES: tl.constexpr,
    F32_DOT: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # Unit = half h of 128 elements (STEP halves per step): bytes a = ql[64h + l], b =
    # ql[64h + 32 + l] and qh[32h + l] (l < 32) give group f (elements 128h + 32f + l) as the low
    # (f < 2) or high nibble of a (f even) or b (f odd), with bits 2f..2f+1 of qh above it; each
    # group is two tiles of 16 (sub-blocks with scales 8h + 2f and 8h + 2f + 1 of the row).
    pdl.prologue(PDL)
    ns = K // 256
    rows, r64, xr, xmask, lo, hi = _tile(M, N, 2 * ns, SPLIT_UNITS, BLOCK_N, BLOCK_B)
    ll = tl.arange(0, 16)
    ql_row = ql_ptr + tl.multiple_of(r64 * (K // 2), 128)
    qh_row = qh_ptr + tl.multiple_of(r64 * (K // 4), 64)
    sc_row = sc_ptr + tl.multiple_of(r64 * (K // 16), 16)
    acc = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
    for h0 in tl.range(lo, hi, STEP, num_stages=STAGES):
        for i in tl.static_range(STEP):
            half = h0 + i
            d = tl.load(d_ptr + r64 * ns + half // 2).to(tl.float32)
            for t in tl.static_range(2):
                col = half * 64 + t * 16 + ll[None, :]
                qa = tl.load(ql_row[:, None] + col).to(tl.int32)  # [BN, 16]
                qb = tl.load(ql_row[:, None] + col + 32).to(tl.int32)
                qh = tl.load(qh_row[:, None] + half * 32 + t * 16 + ll[None, :]).to(tl.int32)
                for f in tl.static_range(4):
                    if f % 2 == 0:
                        q = qa
                    else:
                        q = qb
                    # 6 bits at mantissa bits 17-22: the nibble at 17-20, qh's two bits at 21-22
                    bits = (q << (17 - 4 * (f // 2))) & 0x1E0000
                    bits = bits | ((qh << (21 - 2 * f)) & 0x600000)
                    a = 64.0 * d * tl.load(sc_row + half * 8 + 2 * f + t).to(tl.float32)
                    xt = _xt(x_ptr, stride_xm, xr, xmask, half * 128 + f * 32 + t * 16 + ll)
                    acc = _mma(acc, _w(bits, a, -1.5 * a), xt, F32_DOT)
    _store(y_ptr, acc, rows, N, xr, xmask, stride_ym, stride_yk)
