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

K-quants on bf16 x (`PACKED`, the decode path): compiled plainly, the step above costs about seven
instructions a weight, a byte extracted, shifted and masked for every weight, and that count, not
the bytes, bounds these kernels at 8-64 rows. With PACKED the Q4_K/Q5_K/Q6_K kernels instead hand
one 32-bit word of quant bytes (four weights of the tile) to a PTX block that makes two weights
per lop3 (two nibbles under the exponent of bf16 128.0 in the two 16-bit lanes: bf16(128 + q),
exact), widens each lane to float32 with a shift or a mask, and computes w = a (128 + q) + c' in
float32 (c' = c - 128 a), rounded to bf16 in pairs: the same weights as above, about three and a
half instructions each (`_nibbles`, `_q6_weights`). For those words to be four adjacent bytes, the
tile's columns are put in the order of the MMA's A operand (a thread holds columns 2t, 2t + 1,
2t + 8 and 2t + 9 of each 16), and x^T's rows in the same order (`_mma_order`): the product is
unchanged. A word's four weights need not share a row (in the MMA operand's layout the last two
sit eight rows below the first two), so every weight takes its scales from its own lane. Triton's
interpreter runs the same reordering with the weights made elementwise, so the CPU tests check it.

`PAIRS` (`BatchedConfig.pairs`) makes those weights two at a time in the lanes of the bf16x2
registers that the MMA takes: a byte permute puts two bytes in the lanes of a word, a lop3 puts
their nibbles under bf16 128.0, an fma.bf16x2 takes off the 128 and the zero point (exact), a
second one makes w = a q + c: about two instructions a weight. Q6_K's weights stay the same bf16
values (scale and q6 - 32 are exact in bf16); Q4_K/Q5_K's a = d scale and c = -dmin min are
rounded to bf16 before the fma, ~2**-9 relative error each, where the float path rounds only w.

Every per-row load of a scale is a 4-byte word (Q4_K/Q5_K's d and dmin pair, Q6_K's eight scales
of a half as two words, an f16 d read through the word holding it: `words.f16_at`) so that the
pipeline prefetches it with the quants: a 2-byte load stays in the loop and its latency is paid on
every step.

Rounding: the dequantized weight is rounded to x's dtype as the dequantize + cuBLAS path rounds
its scratch weight, then multiplied exactly and summed in float32; float32 x multiplies in IEEE
float32 (`F32_DOT`, no TF32). Triton's interpreter multiplies bf16 operands wrongly, so under it
`F32_DOT` is on for every dtype: the weight is still rounded to x's dtype first. Q6_K is the
exception: its weights are rounded before d (scale (q6 - 32)), and d, one per super-block, scales
a step's float32 products after the MMAs (`mm_q6_k_kernel`), so each weight is still rounded
once, to the same relative precision.

Rows past N read row N - 1 (valid memory, no masks on weight loads) and are not stored; blocks
past a split's range (32-element types, whose unit count a step need not divide) read the split's
last block against x = 0.
"""

from __future__ import annotations

import logging

import triton
import triton.language as tl

from worker_orcd.kernels.quant import ptx
from worker_orcd.kernels.quant.words import byte_at, f16_at, f16_bits
from worker_orcd.kernels.triton import arrivals, pdl

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


@_kernel
def mm_q8_0_kernel(
    x_ptr, d_ptr, qs_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, stride_xm, stride_ym, SPLIT_UNITS,
    D_WORDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, STEP: tl.constexpr,
    STAGES: tl.constexpr, F32_DOT: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr,
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
            a = 256.0 * f16_at(d_ptr, r64 * nb + blk, D_WORDS)
            w = _w(((q << 15) & 0x7F8000) ^ 0x400000, a, -1.5 * a)
            xt = _xt(x_ptr, stride_xm, xr, xmask & (xr * 0 + b0 + i < hi), blk * 32 + ll)
            acc = _mma(acc, w, xt, F32_DOT)
    arrivals.store_split(y_ptr, ws_ptr, lock_ptr, acc, rows, M, N, xr, xmask, stride_ym, SPLITS)


@_kernel
def _mm_q4_q5_0(
    x_ptr, d_ptr, qh_ptr, qs_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, stride_xm, stride_ym,
    SPLIT_UNITS,
    HAS_QH: tl.constexpr, D_WORDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr,
    STEP: tl.constexpr, STAGES: tl.constexpr, F32_DOT: tl.constexpr, SPLITS: tl.constexpr,
    PDL: tl.constexpr,
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
            d = f16_at(d_ptr, r64 * nb + blk, D_WORDS)
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
    arrivals.store_split(y_ptr, ws_ptr, lock_ptr, acc, rows, M, N, xr, xmask, stride_ym, SPLITS)


NIBBLES_Q4 = tl.constexpr(ptx.nibbles_ptx(False))
NIBBLES_Q5 = tl.constexpr(ptx.nibbles_ptx(True))
NIBBLES_Q4_PAIRS = tl.constexpr(ptx.pair_nibbles_ptx(False))
NIBBLES_Q5_PAIRS = tl.constexpr(ptx.pair_nibbles_ptx(True))
Q6_G0 = tl.constexpr(ptx.q6_ptx(0))
Q6_G1 = tl.constexpr(ptx.q6_ptx(1))
Q6_G0_PAIRS = tl.constexpr(ptx.pair_q6_ptx(0))
Q6_G1_PAIRS = tl.constexpr(ptx.pair_q6_ptx(1))


@triton.jit
def _nibbles(
    q, h, n2, a_lo, c_lo, a_hi, c_hi, BLOCK_N: tl.constexpr, HAS_QH: tl.constexpr,
    ASM: tl.constexpr, PAIRS: tl.constexpr,
):  # fmt: skip
    """bf16 weights (low nibbles, high nibbles) of a [BLOCK_N, 32] tile of quant bytes q (u8),
    w = a q + c per row (a, c float32 [BLOCK_N]); with HAS_QH the fifth bits are bit n2 (low
    nibbles) and n2 + 1 (high) of h (u8 [BLOCK_N, 32]). ASM: four weights of each nibble per PTX
    block: made in float32 as a (128 + q) + (c - 128 a) and rounded once (`ptx.nibbles_ptx`,
    about three and a half instructions a weight where the float path takes seven; c - 128 a
    rounds by ~2**-24 of 128 a), or with PAIRS two at a time in bf16 from a and c rounded to bf16
    (`ptx.pair_nibbles_ptx`, about two); otherwise (Triton's interpreter) the same values
    elementwise."""
    shape: tl.constexpr = (BLOCK_N, 32)
    if PAIRS:
        a_lo = a_lo.to(tl.bfloat16)
        c_lo = c_lo.to(tl.bfloat16)
        a_hi = a_hi.to(tl.bfloat16)
        c_hi = c_hi.to(tl.bfloat16)
        base: tl.constexpr = 0  # w = a q + c
    else:
        c_lo = c_lo - 128.0 * a_lo
        c_hi = c_hi - 128.0 * a_hi
        base: tl.constexpr = 128  # w = a (128 + q) + c - 128 a
    if ASM:
        args = [
            tl.broadcast_to(a_lo[:, None], shape), tl.broadcast_to(c_lo[:, None], shape),
            tl.broadcast_to(a_hi[:, None], shape), tl.broadcast_to(c_hi[:, None], shape),
        ]  # fmt: skip
        if HAS_QH and PAIRS:  # rotation counts bringing bit n2 (n2 + 1) of a lane's byte to bit 4
            r_lo = tl.zeros(shape, tl.int32) + (4 - n2)
            r_hi = tl.zeros(shape, tl.int32) + (3 - n2)
            w_lo, w_hi = tl.inline_asm_elementwise(
                NIBBLES_Q5_PAIRS, "=r,=r,=r,=r" + ",r" * 18, [q, h, r_lo, r_hi] + args,
                dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4,
            )  # fmt: skip
        elif HAS_QH:
            n = tl.zeros(shape, tl.int32) + n2
            w_lo, w_hi = tl.inline_asm_elementwise(
                NIBBLES_Q5, "=r,=r,=r,=r" + ",r" * 22, [q, h, n] + args,
                dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4,
            )  # fmt: skip
        elif PAIRS:
            w_lo, w_hi = tl.inline_asm_elementwise(
                NIBBLES_Q4_PAIRS, "=r,=r,=r,=r" + ",r" * 9, [q] + args,
                dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4,
            )  # fmt: skip
        else:
            w_lo, w_hi = tl.inline_asm_elementwise(
                NIBBLES_Q4, "=r,=r,=r,=r" + ",r" * 17, [q] + args,
                dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=4,
            )  # fmt: skip
    else:
        q = q.to(tl.int32)
        lo = base + (q & 15)
        hi = base + ((q >> 4) & 15)
        if HAS_QH:
            h = h.to(tl.int32)
            lo += ((h >> n2) & 1) << 4
            hi += ((h >> (n2 + 1)) & 1) << 4
        w_lo = lo.to(tl.float32) * a_lo.to(tl.float32)[:, None] + c_lo.to(tl.float32)[:, None]
        w_hi = hi.to(tl.float32) * a_hi.to(tl.float32)[:, None] + c_hi.to(tl.float32)[:, None]
        w_lo = w_lo.to(tl.bfloat16)
        w_hi = w_hi.to(tl.bfloat16)
    return w_lo, w_hi


@triton.jit
def _q6_scale(sw0, sw1, J: tl.constexpr):
    """Float32 [BN] of a half's scale J (0..7): byte J of its two int32 words, sign-extended."""
    if J < 4:
        sc = byte_at(sw0, J)
    else:
        sc = byte_at(sw1, J - 4)
    return sc


@triton.jit
def _halves(v0, v1, BLOCK_N: tl.constexpr):
    """[BLOCK_N, 32]: v0 [BLOCK_N] in the first 16 columns, v1 in the rest. Built by a join and a
    broadcast: a tl.where on the column index gives the same tile, but Triton then cannot give it
    the MMA operand's layout, and the weights made from it reach the MMA through shared memory."""
    t = tl.broadcast_to(tl.join(v0, v1)[:, :, None], (BLOCK_N, 2, 16))
    return tl.reshape(t, (BLOCK_N, 32))


@triton.jit
def _q6_weights(
    q, qh, sw0, sw1, G: tl.constexpr, BLOCK_N: tl.constexpr, ASM: tl.constexpr,
    PAIRS: tl.constexpr,
):  # fmt: skip
    """bf16 weights, before d, of Q6_K groups G and G + 2 of a half from [BLOCK_N, 32] tiles of ql
    bytes q and qh bytes qh (u8): six bits, the nibble of q (low for group G, high for G + 2)
    under bits 2f, 2f + 1 of qh; w = a (q6 - 32) with a the scale of the sub-block (2f for the
    first 16 columns, 2f + 1 for the rest; sw0, sw1 the half's scale words). ASM: four weights
    of each group per PTX block (`ptx.q6_ptx`, in float32; with PAIRS `ptx.pair_q6_ptx`, two at
    a time in bf16: the same values, as a and q6 - 32 are exact in bf16); otherwise (Triton's
    interpreter) the same values elementwise."""
    a0_lo = _q6_scale(sw0, sw1, 2 * G)
    a1_lo = _q6_scale(sw0, sw1, 2 * G + 1)
    a0_hi = _q6_scale(sw0, sw1, 2 * G + 4)
    a1_hi = _q6_scale(sw0, sw1, 2 * G + 5)
    a_lo = _halves(a0_lo, a1_lo, BLOCK_N)
    a_hi = _halves(a0_hi, a1_hi, BLOCK_N)
    if ASM and PAIRS:
        args = [q, qh, a_lo.to(tl.bfloat16), a_hi.to(tl.bfloat16)]
        cons_p: tl.constexpr = "=r,=r,=r,=r" + ",r" * 6
        if G == 0:
            w_lo, w_hi = tl.inline_asm_elementwise(
                Q6_G0_PAIRS, cons_p, args, (tl.bfloat16, tl.bfloat16), True, 4
            )
        else:
            w_lo, w_hi = tl.inline_asm_elementwise(
                Q6_G1_PAIRS, cons_p, args, (tl.bfloat16, tl.bfloat16), True, 4
            )
    elif ASM:
        c_lo = _halves(-160.0 * a0_lo, -160.0 * a1_lo, BLOCK_N)  # w = a (128 + q6) + c
        c_hi = _halves(-160.0 * a0_hi, -160.0 * a1_hi, BLOCK_N)
        args = [q, qh, a_lo, c_lo, a_hi, c_hi]
        cons: tl.constexpr = "=r,=r,=r,=r" + ",r" * 18
        if G == 0:
            w_lo, w_hi = tl.inline_asm_elementwise(
                Q6_G0, cons, args, (tl.bfloat16, tl.bfloat16), True, 4
            )
        else:
            w_lo, w_hi = tl.inline_asm_elementwise(
                Q6_G1, cons, args, (tl.bfloat16, tl.bfloat16), True, 4
            )
    else:
        q = q.to(tl.int32)
        qh = qh.to(tl.int32)
        q6_lo = (q & 15) | (((qh >> (2 * G)) & 3) << 4)
        q6_hi = ((q >> 4) & 15) | (((qh >> (2 * G + 4)) & 3) << 4)
        w_lo = ((q6_lo - 32).to(tl.float32) * a_lo).to(tl.bfloat16)
        w_hi = ((q6_hi - 32).to(tl.float32) * a_hi).to(tl.bfloat16)
    return w_lo, w_hi


@triton.jit
def _mma_order(t, BLOCK_N: tl.constexpr):
    """t [BLOCK_N, 32] with its columns reordered: column 16 b + 8 h + 2 t + l holds column
    16 b + 4 t + 2 h + l, so that a thread's A-operand columns of each 16 (2t, 2t + 1, 2t + 8,
    2t + 9) are four adjacent bytes of the row (4t .. 4t + 3): one word for the PTX that turns
    them into weights."""
    t = tl.permute(tl.reshape(t, (BLOCK_N, 2, 4, 2, 2)), (0, 1, 3, 2, 4))
    return tl.reshape(t, (BLOCK_N, 32))


@triton.jit
def _perm32(p):
    """Source column of position p (0..31) in `_mma_order`."""
    return (p // 16) * 16 + ((p // 2) % 4) * 4 + ((p // 8) % 2) * 2 + p % 2


@triton.jit
def _xt_mma(x_ptr, stride_xm, xr, xmask, col0, BLOCK_B: tl.constexpr):
    """x^T tile [32, BLOCK_B] of columns col0 .. col0 + 31, its rows in `_mma_order`'s order. Up
    to 32 rows of x it is loaded at the permuted addresses (pairs of bf16: 4-byte copies), so
    that it goes from its pipeline buffer straight to the wgmma; permuted in registers instead,
    Triton moves it through shared memory with a barrier before every wgmma. At 64 rows the
    4-byte copies of the larger tile cost more than that round trip (H100: Phi-3's gate_up at
    B = 64, 40.6 -> 52.0 us, against 36.0 -> 33.9 at B = 8), so there it is loaded in order."""
    l32 = tl.arange(0, 32)
    if BLOCK_B <= 32:
        return _xt(x_ptr, stride_xm, xr, xmask, col0 + _perm32(l32))
    xt = tl.reshape(_xt(x_ptr, stride_xm, xr, xmask, col0 + l32), (2, 4, 2, 2, BLOCK_B))
    return tl.reshape(tl.permute(xt, (0, 2, 1, 3, 4)), (32, BLOCK_B))


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


@triton.jit
def _k4_weights(q8, h8, c, d, dmin, sc_lo, mn_lo, sc_hi, mn_hi, HAS_QH: tl.constexpr):
    """Float32 weights (low nibbles, high nibbles) of a [BN, 32] Q4_K/Q5_K tile of chunk c, one
    weight at a time: q8 (u8) the quant bytes, h8 (u8) Q5_K's qh bytes (fifth bits 2c, 2c + 1)."""
    q = q8.to(tl.int32)
    if HAS_QH:  # 5 bits: nibble at mantissa bits 18-21, the fifth bit at 22
        h = h8.to(tl.int32)
        b_lo = ((q << 18) & 0x3C0000) | ((h << (22 - 2 * c)) & 0x400000)
        b_hi = ((q << 14) & 0x3C0000) | ((h << (21 - 2 * c)) & 0x400000)
        unit = 32.0
    else:  # 4 bits at mantissa bits 19-22
        b_lo = (q << 19) & 0x780000
        b_hi = (q << 15) & 0x780000
        unit = 16.0
    a_lo = unit * d * sc_lo
    a_hi = unit * d * sc_hi
    return _w(b_lo, a_lo, -(a_lo + dmin * mn_lo)), _w(b_hi, a_hi, -(a_hi + dmin * mn_hi))


@_kernel
def _mm_q4_q5_k(
    x_ptr, dm_ptr, sc_ptr, qh_ptr, qs_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, stride_xm, stride_ym,
    SPLIT_UNITS,
    HAS_QH: tl.constexpr, PACKED: tl.constexpr, ASM: tl.constexpr, PAIRS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, STEP: tl.constexpr, STAGES: tl.constexpr,
    F32_DOT: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # Unit u = chunk c = u % 4 of super-block u // 4 (STEP chunks per step, dividing 4, so a step
    # stays in one super-block): qs bytes 32c..32c+31 hold sub-block 2c in their low nibbles
    # (elements 64c + l) and 2c + 1 in their high nibbles (64c + 32 + l); Q5_K's qh byte l has the
    # fifth bit of element l of sub-block j at bit j. sc int32 [N, ns * 3] (the 12 scale bytes of
    # each super-block), dm int32 [N, ns] (d in the low half, dmin in the high half, f16 each):
    # every per-row load is a word, so the pipeline prefetches it with the quants.
    pdl.prologue(PDL)
    ns = K // 256
    rows, r64, xr, xmask, lo, hi = _tile(M, N, 4 * ns, SPLIT_UNITS, BLOCK_N, BLOCK_B)
    ll = tl.arange(0, 32)
    qs_row = qs_ptr + tl.multiple_of(r64 * (K // 2), 128)
    qh_row = qh_ptr + tl.multiple_of(r64 * (K // 8), 32)
    acc = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
    for u0 in tl.range(lo, hi, STEP, num_stages=STAGES):
        sb = u0 // 4
        sbi = r64 * ns + sb
        w0 = tl.load(sc_ptr + sbi * 3)
        w1 = tl.load(sc_ptr + sbi * 3 + 1)
        w2 = tl.load(sc_ptr + sbi * 3 + 2)
        dm = tl.load(dm_ptr + sbi)
        d = f16_bits(dm)
        dmin = f16_bits(dm >> 16)
        if HAS_QH:
            h8 = tl.load(qh_row[:, None] + sb * 32 + ll[None, :])
        else:
            h8 = None
        for i in tl.static_range(STEP):
            u = u0 + i
            if STEP == 4:  # chunk i of the step's super-block
                c = i
            else:
                c = u % 4
            q8 = tl.load(qs_row[:, None] + u * 32 + ll[None, :])  # [BN, 32] u8
            sc_lo, mn_lo, sc_hi, mn_hi = _k4_scales_mins(w0, w1, w2, c)
            if PACKED:  # a word of quants at a time, x's columns in the tiles' order
                if HAS_QH:
                    hp = _mma_order(h8, BLOCK_N)
                else:
                    hp = None
                w_lo, w_hi = _nibbles(
                    _mma_order(q8, BLOCK_N), hp, 2 * c, d * sc_lo, -(dmin * mn_lo), d * sc_hi,
                    -(dmin * mn_hi), BLOCK_N, HAS_QH, ASM, PAIRS,
                )  # fmt: skip
                xt_lo = _xt_mma(x_ptr, stride_xm, xr, xmask, u * 64, BLOCK_B)
                xt_hi = _xt_mma(x_ptr, stride_xm, xr, xmask, u * 64 + 32, BLOCK_B)
            else:
                w_lo, w_hi = _k4_weights(q8, h8, c, d, dmin, sc_lo, mn_lo, sc_hi, mn_hi, HAS_QH)
                xt_lo = _xt(x_ptr, stride_xm, xr, xmask, u * 64 + ll)
                xt_hi = _xt(x_ptr, stride_xm, xr, xmask, u * 64 + 32 + ll)
            acc = _mma(acc, w_lo, xt_lo, F32_DOT)
            acc = _mma(acc, w_hi, xt_hi, F32_DOT)
    arrivals.store_split(y_ptr, ws_ptr, lock_ptr, acc, rows, M, N, xr, xmask, stride_ym, SPLITS)


@_kernel
def mm_q6_k_kernel(
    x_ptr, d_ptr, sc_ptr, qh_ptr, ql_ptr, y_ptr, ws_ptr, lock_ptr, M, N, K, stride_xm, stride_ym,
    SPLIT_UNITS,
    D_WORDS: tl.constexpr, PACKED: tl.constexpr, ASM: tl.constexpr, PAIRS: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_B: tl.constexpr, STEP: tl.constexpr, STAGES: tl.constexpr,
    F32_DOT: tl.constexpr, SPLITS: tl.constexpr, PDL: tl.constexpr,
):  # fmt: skip
    # Unit = half h of 128 elements (STEP halves per step, one or two: a step stays in one
    # super-block): bytes a = ql[64h + l], b = ql[64h + 32 + l] and qh[32h + l] (l < 32) give
    # group f (elements 128h + 32f + l) as the low (f < 2) or high nibble of a (f even) or b
    # (f odd), with bits 2f..2f+1 of qh above it; each group is two tiles of 16 (sub-blocks with
    # scales 8h + 2f and 8h + 2f + 1 of the row). sc int32 [N, K / 64]: a half's eight int8
    # scales are words 2h and 2h + 1. The weights are made without d (w / d = scale (q6 - 32));
    # a step's products are scaled by its super-block's d after the MMAs, so that d's f16 (taken
    # from the word holding it by a shift that varies along K) stays out of the MMA operand.
    pdl.prologue(PDL)
    ns = K // 256
    rows, r64, xr, xmask, lo, hi = _tile(M, N, 2 * ns, SPLIT_UNITS, BLOCK_N, BLOCK_B)
    ll = tl.arange(0, 16)
    ql_row = ql_ptr + tl.multiple_of(r64 * (K // 2), 128)
    qh_row = qh_ptr + tl.multiple_of(r64 * (K // 4), 64)
    sc_row = sc_ptr + r64 * (K // 64)
    acc = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)
    for h0 in tl.range(lo, hi, STEP, num_stages=STAGES):
        part = tl.zeros([BLOCK_N, BLOCK_B], dtype=tl.float32)  # the step's products / d
        for i in tl.static_range(STEP):
            half = h0 + i
            sw0 = tl.load(sc_row + 2 * half)
            sw1 = tl.load(sc_row + 2 * half + 1)
            if PACKED:  # [BN, 32] tiles of both sub-blocks of a group, a word of four at a time
                l32 = tl.arange(0, 32)
                qh = _mma_order(tl.load(qh_row[:, None] + half * 32 + l32[None, :]), BLOCK_N)
                for g in tl.static_range(2):  # ql bytes a (g = 0) or b: groups g and g + 2
                    q = tl.load(ql_row[:, None] + half * 64 + g * 32 + l32[None, :])
                    w_lo, w_hi = _q6_weights(
                        _mma_order(q, BLOCK_N), qh, sw0, sw1, g, BLOCK_N, ASM, PAIRS
                    )
                    for j in tl.static_range(2):
                        col0 = half * 128 + (g + 2 * j) * 32
                        xt = _xt_mma(x_ptr, stride_xm, xr, xmask, col0, BLOCK_B)
                        if j == 0:
                            part = _mma(part, w_lo, xt, F32_DOT)
                        else:
                            part = _mma(part, w_hi, xt, F32_DOT)
            else:  # [BN, 16] tiles, one scale each
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
                        # 6 bits at mantissa bits 17-22: the nibble at 17-20, qh's two bits at
                        # 21-22
                        bits = (q << (17 - 4 * (f // 2))) & 0x1E0000
                        bits = bits | ((qh << (21 - 2 * f)) & 0x600000)
                        a = 64.0 * _q6_scale(sw0, sw1, 2 * f + t)
                        xt = _xt(x_ptr, stride_xm, xr, xmask, half * 128 + f * 32 + t * 16 + ll)
                        part = _mma(part, _w(bits, a, -1.5 * a), xt, F32_DOT)
        acc += part * f16_at(d_ptr, r64 * ns + h0 // 2, D_WORDS)[:, None]
    arrivals.store_split(y_ptr, ws_ptr, lock_ptr, acc, rows, M, N, xr, xmask, stride_ym, SPLITS)
