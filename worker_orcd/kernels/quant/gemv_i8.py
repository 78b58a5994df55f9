"""Fused dequantize + GEMV on an int8 activation: integer dot products of four weights at a time.

The float kernels in `gemv` spend 4-6 instructions per weight (byte unpack, nibble extract,
convert, FMA, reductions), which bounds them at 15-30% of the memory bandwidth on mid-size
weights. Here, as in llama.cpp's mmvq, each program rounds its slice of x to int8 per 32-element
block (x ~ dx * xq, dx = max|x| / 127, round to nearest), reads the quants as 32-bit words and
multiplies four 4- to 8-bit weights with four int8 activations per `dp4a` instruction. A Q4_K word
(8 weights) costs two logic ops and two dp4a; block scales, mins and x's steps are applied once per
sub-block in float32.

Rounding x to int8 is the only approximation: y is the exact product of the dequantized weight
with the rounded x, off the float32 product by ~5e-3 of ||y|| for Gaussian x (the step of a
32-element block is ~2.3 sigma / 127). The mins of Q4_K/Q5_K multiply dx * sum(xq) (the rounded
x), so the error stays a sum of w_i * (rounding of x_i) for every type.

Layouts (see `formats`): every quant plane is read as int32 words. In a word of Q4_K/Q5_K qs,
byte b of word t of 32-byte chunk c holds element 4t + b of sub-block 2c (low nibble) and of
sub-block 2c + 1 (high nibble); Q5_K's qh word t holds in byte b the fifth bits of element 4t + b
of all 8 sub-blocks (bit j: sub-block j), so a shift and a mask place them in bit 4 of each byte.
`ASM` is off only under Triton's interpreter, which cannot run PTX: the dp4a is then spelled out.
`STAGES` > 1 software-pipelines the walk along K (the next steps' quants and x are copied into
shared memory asynchronously while this step computes).

`PREQ` (x rounded once): every program of a GEMV otherwise rounds the whole of its x slice itself,
up to a few thousand programs rounding the same x (load, block max, rounding, packing, and a
layout conversion through shared memory on every step). With `PREQ`, `quantize_x_kernel` rounds x
once into int32 words (the layout of a Q8_0 block's quants: byte i of word t of a 32-element block
is element 4t + i), the step of each block and the sums of xq per 16 elements, and the GEMV reads
those; the rounding is the same, so y is bit-for-bit that of the in-kernel path.

`EARLY` (short walks along K): the first step's weight words are read before the PDL wait. No
kernel writes them, so their latency runs under the previous kernel's tail, as the bf16 GEMV's
first tile does. That pays where a program walks a few steps (Qwen2.5-0.5B's K = 896 rows and its
896-row down projection: +5% at one Q4_K_M stream on an H100) and costs where it walks many
(Phi-3's K = 3072-8192 rows: -2.5%), so `ops.gemv_config` sets it by shape.
"""

from __future__ import annotations

import logging

import triton
import triton.language as tl

from worker_orcd.kernels.quant.words import byte_at, f16_at, f16_bits
from worker_orcd.kernels.triton import norm_in, pdl

logger = logging.getLogger(__name__)

M4 = tl.constexpr(0x0F0F0F0F)  # low nibble of every byte
H4 = tl.constexpr(-0x0F0F0F10)  # 0xF0F0F0F0 as int32: high nibble of every byte, kept in place
BIT4 = tl.constexpr(0x10101010)  # bit 4 of every byte: where a fifth quant bit goes
BITS45 = tl.constexpr(0x30303030)  # bits 4-5 of every byte: Q6_K's two high bits


@triton.jit
def _dp4a(a, b, c, SIGNED_A: tl.constexpr, ASM: tl.constexpr):
    """c + sum over the 4 bytes of a_i * b_i; b's bytes are signed, a's unsigned (or signed)."""
    if ASM:
        if SIGNED_A:
            r = tl.inline_asm_elementwise(
                "dp4a.s32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                dtype=tl.int32, is_pure=True, pack=1,
            )  # fmt: skip
        else:
            r = tl.inline_asm_elementwise(
                "dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c],
                dtype=tl.int32, is_pure=True, pack=1,
            )  # fmt: skip
    else:
        r = c
        for i in tl.static_range(4):
            if SIGNED_A:
                ai = (a << (24 - 8 * i)) >> 24
            else:
                ai = (a >> (8 * i)) & 255
            r += ai * ((b << (24 - 8 * i)) >> 24)
    return r


@triton.jit
def _round_x(xf, ASM: tl.constexpr):
    """xf [A, 32] float32 (A blocks of 32) rounded to int8 per block: (xq [A, 32] int32 in
    -127..127, dx [A] float32 step, dx * sum(xq) [A]). The rounding is exactly
    `ops.int8_x_reference`'s: an IEEE float32 quotient inv = 127 / max|x|, then the exact product
    x * inv rounded half to even."""
    amax = tl.max(tl.abs(xf), axis=1)
    inv = tl.div_rn(tl.full(amax.shape, 127.0, tl.float32), tl.maximum(amax, 1e-30))
    if ASM:
        # fma: the exact product plus 1.5 * 2**23, rounded once; its low mantissa bits are then
        # round-half-even(x * inv) (|x * inv| <= 127)
        r = tl.fma(xf, inv[:, None], tl.full(xf.shape, 12582912.0, tl.float32))
        xq = r.to(tl.int32, bitcast=True) - 0x4B400000
    else:
        # the interpreter rounds each numpy op: the exact product in float64, then 1.5 * 2**52
        r = xf.to(tl.float64) * inv.to(tl.float64)[:, None] + 6755399441055744.0
        xq = (r.to(tl.int64, bitcast=True) - 0x4338000000000000).to(tl.int32)
    dx = amax * (1.0 / 127.0)
    return xq, dx, tl.sum(xq, axis=1).to(tl.float32) * dx


@triton.jit
def _quant_x(x_row, offs, mask, ASM: tl.constexpr):
    """x[offs] ([A, 32]) rounded as `_round_x` rounds it; masked elements count as 0."""
    xf = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    return _round_x(xf, ASM)


@triton.jit
def _quant_x_in(
    x_row, r_row, g_ptr, rstd, offs, mask,
    NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """`_quant_x`, or with NORM the same rounding of rms_norm(x + residual) * g at offs."""
    if NORM:
        xf = norm_in.normed(x_row, r_row, g_ptr, offs, mask, rstd, HAS_RESIDUAL)
    else:
        xf = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
    return _round_x(xf, ASM)


@triton.jit
def _norm_rstd(
    x_row, r_ptr, s_ptr, pid_m, M, K, stride_rm, eps,
    NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, WRITE_SUM: tl.constexpr,
    NORM_BLOCK: tl.constexpr,
):  # fmt: skip
    """With NORM, (residual row, 1 / rms of x + residual) for a program's activation row, the
    first program of the row (first rows of the weight, first split) writing x + residual when
    WRITE_SUM; without, (x_row, 0.0), unused."""
    r_row = x_row
    rstd = 0.0
    if NORM:
        if WRITE_SUM:
            first = (tl.program_id(0) < M) & (tl.program_id(1) == 0)
        else:
            first = tl.program_id(0) < 0
        r_row = r_ptr + pid_m * stride_rm
        cols = tl.arange(0, NORM_BLOCK)
        rstd = norm_in.row_rstd(
            x_row, r_row, s_ptr + pid_m * K, K, cols, eps, first, NORM_BLOCK, HAS_RESIDUAL
        )
    return r_row, rstd


@triton.jit
def store_rounded(xf, blk, bmask, words_row, dx_row, sums_row, ASM: tl.constexpr):
    """Blocks `blk` [A] of one row of x (xf [A, 32] float32; blocks where `bmask` is off are not
    stored) rounded as the GEMVs round x and stored as `quantize_x_kernel` stores them: for the
    kernels that produce x, so that the GEMVs after them need no rounding launch."""
    xq, dx, _ = _round_x(xf, ASM)
    words = _pack4(tl.reshape(xq, (xf.shape[0], 8, 4)))
    tl.store(words_row + (blk * 8)[:, None] + tl.arange(0, 8)[None, :], words, mask=bmask[:, None])
    tl.store(dx_row + blk, dx, mask=bmask)
    xs = tl.sum(tl.reshape(xq, (xf.shape[0], 2, 16)), axis=2).to(tl.float32)
    tl.store(sums_row + (blk * 2)[:, None] + tl.arange(0, 2)[None, :], xs, mask=bmask[:, None])


@triton.jit
def _pack4(xq):
    """[..., 4] int32 bytes -> [...] int32 words (byte i of the word = element i)."""
    return tl.sum((xq & 255) << (tl.arange(0, 4) * 8), axis=-1)


@triton.jit
def quantize_x_kernel(
    x_ptr, xw_ptr, dx_ptr, xs_ptr, K, stride_xm, BLOCKS: tl.constexpr, ASM: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    """x [M, K] -> words int32 [M, K / 4] (int8 xq, block by block), dx float32 [M, K / 32] (the
    step of each block), xs float32 [M, K / 16] (sum of xq over each 16 elements, exact)."""
    pdl.prologue(PDL)
    m = tl.program_id(0)
    blk = tl.program_id(1) * BLOCKS + tl.arange(0, BLOCKS)
    bmask = blk < K // 32
    xoff = (blk * 32)[:, None] + tl.arange(0, 32)[None, :]
    xf = tl.load(x_ptr + m * stride_xm + xoff, mask=bmask[:, None], other=0.0).to(tl.float32)
    store_rounded(
        xf, blk, bmask, xw_ptr + m * (K // 4), dx_ptr + m * (K // 32), xs_ptr + m * (K // 16), ASM
    )


@triton.jit
def _tile(x_ptr, stride_xm, M, N, UNITS, SPLIT_UNITS, BLOCK_N: tl.constexpr):
    """A program's share of the GEMV: (activation row pid_m, its x (PREQ: x's int32 words,
    stride_xm = K / 4), output rows, their mask, rows clamped into [0, N) as int64, zeros [BLOCK_N],
    K units [lo, hi) of its split). Rows past N read row N - 1 (valid memory, no masks on weight
    loads); only their store is masked. The zeros index x words per row of the tile: with PREQ,
    each row loads the x words next to its own quant words (L1 hits), so that no layout
    conversion moves them between threads."""
    pid_m = tl.program_id(0) % M  # programs of the same rows are neighbours (L2 reuse)
    rows = (tl.program_id(0) // M) * BLOCK_N + tl.arange(0, BLOCK_N)
    r64 = tl.minimum(rows, N - 1).to(tl.int64)
    lo = tl.program_id(1) * SPLIT_UNITS
    hi = tl.minimum(UNITS, lo + SPLIT_UNITS)
    return pid_m, x_ptr + pid_m * stride_xm, rows, rows < N, r64, r64 * 0, lo, hi


@triton.jit
def _store_y(y_ptr, acc, pid_m, rows, rmask, stride_ym, stride_yk):
    """The program's outputs (acc [BLOCK_N, ...] summed over its other axis) into its split's
    row of y (or of the float32 partials)."""
    y = tl.sum(acc, axis=1)
    tl.store(y_ptr + tl.program_id(1) * stride_yk + pid_m * stride_ym + rows, y, mask=rmask)


@triton.jit
def _q8_0_tiles(qs_row, d_ptr, r64, nb, b0, hi_u, b, t, D_WORDS: tl.constexpr):
    """One step's weight words of `gemv_q8_0_i8_kernel`: quants [BN, B, 8] and scales [BN, B]."""
    bc = tl.minimum(b0 + b, hi_u - 1)  # past the range: a valid block times x = 0
    q = tl.load(qs_row[:, None, None] + tl.multiple_of(bc * 8, 8)[:, None] + t)
    return q, f16_at(d_ptr, r64[:, None] * nb + bc[None, :], D_WORDS)


@triton.jit
def _q8_0_step(
    acc, q, d, b0, hi_u, b, x_row, r_row, g_ptr, rstd, zr, xdx_ptr, pid_m, nb,
    PREQ: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    blk = b0 + b
    bmask = blk < hi_u
    bc = tl.minimum(blk, hi_u - 1)
    if PREQ:  # past the range: a valid block times a step of 0
        xw = tl.load(x_row + zr[:, None, None] + (bc * 8)[:, None] + tl.arange(0, 8))  # [BN, B, 8]
        dx = tl.where(bmask, tl.load(xdx_ptr + pid_m * nb + bc), 0.0)
    else:
        xoff = (blk * 32)[:, None] + tl.arange(0, 32)[None, :]  # [B, 32]
        xq, dx, _ = _quant_x_in(
            x_row, r_row, g_ptr, rstd, xoff, bmask[:, None], NORM, HAS_RESIDUAL, ASM
        )
        xw = _pack4(tl.reshape(xq, (b.shape[0], 8, 4)))[None]
    dot = tl.sum(_dp4a(q, xw, tl.zeros_like(q), True, ASM), axis=2)  # [BN, B]
    return acc + d * dx[None, :] * dot.to(tl.float32)


@triton.jit
def gemv_q8_0_i8_kernel(
    x_ptr, xdx_ptr, xs_ptr, d_ptr, qs_ptr, y_ptr, M, N, K, stride_xm, stride_ym, stride_yk,
    SPLIT_UNITS,
    BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr, ASM: tl.constexpr, STAGES: tl.constexpr,
    PREQ: tl.constexpr, D_WORDS: tl.constexpr, PDL: tl.constexpr,
    r_ptr=None, g_ptr=None, s_ptr=None, stride_rm=0, eps=0.0, NORM: tl.constexpr = False,
    HAS_RESIDUAL: tl.constexpr = False, WRITE_SUM: tl.constexpr = False,
    NORM_BLOCK: tl.constexpr = 1024, EARLY: tl.constexpr = False,
):  # fmt: skip
    # qs int32 [N, K / 4]; tile [BLOCK_N rows, BLOCKS blocks, 8 words]. With NORM the input is
    # rms_norm(x + residual) * g (`ops.NormIn`), computed here (K <= NORM_BLOCK).
    nb = K // 32
    pid_m, x_row, rows, rmask, r64, zr, lo_u, hi_u = _tile(
        x_ptr, stride_xm, M, N, nb, SPLIT_UNITS, BLOCK_N
    )
    b = tl.arange(0, BLOCKS)
    t = tl.arange(0, 8)
    qs_row = qs_ptr + tl.multiple_of(r64 * (K // 4), 8)  # rows of 32-byte blocks
    if EARLY:
        q, d = _q8_0_tiles(qs_row, d_ptr, r64, nb, lo_u, hi_u, b, t, D_WORDS)
    pdl.prologue(PDL)
    r_row, rstd = _norm_rstd(
        x_row, r_ptr, s_ptr, pid_m, M, K, stride_rm, eps, NORM, HAS_RESIDUAL, WRITE_SUM, NORM_BLOCK
    )
    acc = tl.zeros([BLOCK_N, BLOCKS], dtype=tl.float32)
    start = lo_u
    if EARLY:
        acc = _q8_0_step(
            acc, q, d, lo_u, hi_u, b, x_row, r_row, g_ptr, rstd, zr, xdx_ptr, pid_m, nb, PREQ,
            NORM, HAS_RESIDUAL, ASM,
        )  # fmt: skip
        start = lo_u + BLOCKS
    for b0 in tl.range(start, hi_u, BLOCKS, num_stages=STAGES):
        q, d = _q8_0_tiles(qs_row, d_ptr, r64, nb, b0, hi_u, b, t, D_WORDS)
        acc = _q8_0_step(
            acc, q, d, b0, hi_u, b, x_row, r_row, g_ptr, rstd, zr, xdx_ptr, pid_m, nb,
            PREQ, NORM, HAS_RESIDUAL, ASM,
        )  # fmt: skip
    _store_y(y_ptr, acc, pid_m, rows, rmask, stride_ym, stride_yk)


@triton.jit
def _q4_q5_0_tiles(qs_row, qh_ptr, r64, nb, b0, hi_u, b, t, HAS_QH: tl.constexpr):
    """One step's bulk weight words of `_gemv_q4_q5_0_i8`: quants [BN, B, 4] and Q5_0's fifth
    bits [BN, B, 1] (HAS_QH; else the quants again, unused). The step reads the scales."""
    bc = tl.minimum(b0 + b, hi_u - 1)
    q = tl.load(qs_row[:, None, None] + tl.multiple_of(bc * 4, 4)[:, None] + t)
    if HAS_QH:
        h = tl.load(qh_ptr + r64[:, None] * nb + bc[None, :])[:, :, None]
    else:
        h = q
    return q, h


@triton.jit
def _q4_q5_0_step(
    acc, q, h, b0, hi_u, b, t, x_row, r_row, g_ptr, rstd, zr, xdx_ptr, xs_ptr, d_ptr, r64, pid_m,
    nb, HAS_QH: tl.constexpr, PREQ: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    ASM: tl.constexpr, D_WORDS: tl.constexpr,
):  # fmt: skip
    blk = b0 + b
    bc = tl.minimum(blk, hi_u - 1)
    lo = q & M4
    hi = (q >> 4) & M4
    if HAS_QH:
        lo = lo | ((h << (4 - t)[None, None, :]) & BIT4)
        hi = hi | ((h >> t[None, None, :]) & BIT4)
    bmask = blk < hi_u
    if PREQ:  # past the range: a valid block times a step of 0
        xlo = tl.load(x_row + zr[:, None, None] + (bc * 8)[:, None] + t)  # [BN, B, 4]
        xhi = tl.load(x_row + zr[:, None, None] + (bc * 8 + 4)[:, None] + t)
        dx = tl.where(bmask, tl.load(xdx_ptr + pid_m * nb + bc), 0.0)
        xsr = xs_ptr + pid_m * 2 * nb + 2 * bc
        xs = tl.load(xsr) + tl.load(xsr + 1)
    else:
        xoff = (blk * 32)[:, None] + tl.arange(0, 32)[None, :]  # [B, 32]
        xq, dx, _ = _quant_x_in(
            x_row, r_row, g_ptr, rstd, xoff, bmask[:, None], NORM, HAS_RESIDUAL, ASM
        )
        xs = tl.sum(xq, axis=1).to(tl.float32)
        xw = tl.permute(_pack4(tl.reshape(xq, (b.shape[0], 2, 4, 4))), (0, 2, 1))  # [B, 4, 2]
        xlo, xhi = tl.split(xw)
        xlo = xlo[None]
        xhi = xhi[None]
    dot = _dp4a(lo, xlo, tl.zeros_like(q), False, ASM)
    dot = tl.sum(_dp4a(hi, xhi, dot, False, ASM), axis=2)  # [BN, B]
    if HAS_QH:  # quants are q - off: sum (q - off) xq = dot - off * sum xq
        off = 16
    else:
        off = 8
    d = f16_at(d_ptr, r64[:, None] * nb + bc[None, :], D_WORDS)
    return acc + d * dx[None, :] * (dot.to(tl.float32) - off * xs[None, :])


@triton.jit
def _gemv_q4_q5_0_i8(
    x_ptr, xdx_ptr, xs_ptr, d_ptr, qh_ptr, qs_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
    stride_yk, SPLIT_UNITS,
    HAS_QH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKS: tl.constexpr, ASM: tl.constexpr,
    STAGES: tl.constexpr, PREQ: tl.constexpr, D_WORDS: tl.constexpr, PDL: tl.constexpr,
    r_ptr=None, g_ptr=None, s_ptr=None, stride_rm=0, eps=0.0, NORM: tl.constexpr = False,
    HAS_RESIDUAL: tl.constexpr = False, WRITE_SUM: tl.constexpr = False,
    NORM_BLOCK: tl.constexpr = 1024, EARLY: tl.constexpr = False,
):  # fmt: skip
    # qs int32 [N, K / 8]: word t of a block holds elements 4t + i (low nibbles) and 16 + 4t + i
    # (high); Q5_0's qh word per block has their fifth bits at bits 8i + t and 8i + 4 + t. NORM:
    # as in gemv_q8_0_i8_kernel.
    nb = K // 32
    pid_m, x_row, rows, rmask, r64, zr, lo_u, hi_u = _tile(
        x_ptr, stride_xm, M, N, nb, SPLIT_UNITS, BLOCK_N
    )
    b = tl.arange(0, BLOCKS)
    t = tl.arange(0, 4)
    qs_row = qs_ptr + tl.multiple_of(r64 * (K // 8), 4)  # rows of 16-byte blocks
    if EARLY:
        q, h = _q4_q5_0_tiles(qs_row, qh_ptr, r64, nb, lo_u, hi_u, b, t, HAS_QH)
    pdl.prologue(PDL)
    r_row, rstd = _norm_rstd(
        x_row, r_ptr, s_ptr, pid_m, M, K, stride_rm, eps, NORM, HAS_RESIDUAL, WRITE_SUM, NORM_BLOCK
    )
    acc = tl.zeros([BLOCK_N, BLOCKS], dtype=tl.float32)
    start = lo_u
    if EARLY:
        acc = _q4_q5_0_step(
            acc, q, h, lo_u, hi_u, b, t, x_row, r_row, g_ptr, rstd, zr, xdx_ptr, xs_ptr, d_ptr, r64,
            pid_m, nb, HAS_QH, PREQ, NORM, HAS_RESIDUAL, ASM, D_WORDS,
        )  # fmt: skip
        start = lo_u + BLOCKS
    for b0 in tl.range(start, hi_u, BLOCKS, num_stages=STAGES):
        q, h = _q4_q5_0_tiles(qs_row, qh_ptr, r64, nb, b0, hi_u, b, t, HAS_QH)
        acc = _q4_q5_0_step(
            acc, q, h, b0, hi_u, b, t, x_row, r_row, g_ptr, rstd, zr, xdx_ptr, xs_ptr, d_ptr, r64,
            pid_m, nb, HAS_QH, PREQ, NORM, HAS_RESIDUAL, ASM, D_WORDS,
        )  # fmt: skip
    _store_y(y_ptr, acc, pid_m, rows, rmask, stride_ym, stride_yk)


@triton.jit
def _q4k_tiles(qs_row, qh_row, s0, hi_u, g, c, t, HAS_QH: tl.constexpr):
    """The bulk weight words of one step of `_gemv_q4_q5_k_i8` (super-blocks from s0): quants
    and fifth bits (HAS_QH; else q again, unused). The scale words are read by the step, after its
    dot products, as the plain loop reads them: read here, they changed the kernel's layouts (and
    Q5_K's last bits with x rounded once)."""
    sbc = tl.minimum(s0 + g // 4, hi_u - 1)  # past the range: a valid super-block times x = 0
    q = tl.load(qs_row[:, None, None] + tl.multiple_of(sbc * 32 + c * 8, 8)[:, None] + t)
    if HAS_QH:
        h = tl.load(qh_row[:, None, None] + tl.multiple_of(sbc * 8, 8)[:, None] + t)
    else:
        h = q
    return q, h


@triton.jit
def _q4k_step(
    acc, q, h, s0, hi_u, x_row, zr, xdx_ptr, xs_ptr, sc_ptr, dm_ptr, r64, ns, pid_m, K, g, c, t,
    i32, HAS_QH: tl.constexpr, PREQ: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    """acc + one step's products of `_gemv_q4_q5_k_i8`, from its weight words (`_q4k_tiles`)."""
    G: tl.constexpr = g.shape[0]
    sb = s0 + g // 4  # [G] super-block of each chunk
    gmask = sb < hi_u
    sbc = tl.minimum(sb, hi_u - 1)
    if HAS_QH:
        sh = (2 * c)[None, :, None]
        lo = (q & M4) | (((h >> sh) << 4) & BIT4)
        hi = ((q >> 4) & M4) | (((h >> (sh + 1)) << 4) & BIT4)
        hi_unit = 1.0
    else:
        lo = q & M4
        hi = q & H4  # 16 * the high nibbles
        hi_unit = 1.0 / 16.0
    if PREQ:  # blocks 2c, 2c + 1 of x's 8 in super-block sb; past the range: steps of 0
        xb = sbc * 8 + 2 * c  # [G]
        x_lo = tl.load(x_row + zr[:, None, None] + (xb * 8)[:, None] + t)  # [BN, G, 8]
        x_hi = tl.load(x_row + zr[:, None, None] + (xb * 8 + 8)[:, None] + t)
        dxr = xdx_ptr + pid_m * (K // 32) + xb
        dx_lo = tl.where(gmask, tl.load(dxr), 0.0)
        dx_hi = tl.where(gmask, tl.load(dxr + 1), 0.0)
        xsr = xs_ptr + pid_m * (K // 16) + 2 * xb
        xs_lo = dx_lo * (tl.load(xsr) + tl.load(xsr + 1))
        xs_hi = dx_hi * (tl.load(xsr + 2) + tl.load(xsr + 3))
    else:
        xoff = (sb * 256 + c * 64)[:, None] + i32[None, :]  # [G, 32]
        xq_lo, dx_lo, xs_lo = _quant_x(x_row, xoff, gmask[:, None], ASM)
        xq_hi, dx_hi, xs_hi = _quant_x(x_row, xoff + 32, gmask[:, None], ASM)
        x_lo = _pack4(tl.reshape(xq_lo, (G, 8, 4)))[None]
        x_hi = _pack4(tl.reshape(xq_hi, (G, 8, 4)))[None]
    zero = tl.zeros_like(q)
    dot_lo = tl.sum(_dp4a(lo, x_lo, zero, False, ASM), axis=2).to(tl.float32)  # [BN, G]
    dot_hi = tl.sum(_dp4a(hi, x_hi, zero, False, ASM), axis=2).to(tl.float32)
    # six-bit scales and mins of sub-blocks 2c, 2c + 1 from the 12 bytes (words w0, w1, w2):
    # j < 4: sc = byte j of w0 & 63, m = byte j of w1 & 63; j >= 4: low nibbles of w2's byte
    # j - 4 (sc) or its high nibble (m), with bits 6-7 of byte j - 4 of w0 (sc) or w1 (m)
    sbi = r64[:, None] * ns + sbc[None, :]  # [BN, G]
    w0 = tl.load(sc_ptr + sbi * 3)
    w1 = tl.load(sc_ptr + sbi * 3 + 1)
    w2 = tl.load(sc_ptr + sbi * 3 + 2)
    first = (c < 2)[None, :]
    scw = tl.where(first, w0 & 0x3F3F3F3F, (w2 & M4) | ((w0 >> 2) & BITS45))
    mnw = tl.where(first, w1 & 0x3F3F3F3F, ((w2 >> 4) & M4) | ((w1 >> 2) & BITS45))
    sh8 = (16 * (c % 2))[None, :]
    sc_lo = ((scw >> sh8) & 63).to(tl.float32)
    sc_hi = ((scw >> (sh8 + 8)) & 63).to(tl.float32)
    mn_lo = ((mnw >> sh8) & 63).to(tl.float32)
    mn_hi = ((mnw >> (sh8 + 8)) & 63).to(tl.float32)
    dm = tl.load(dm_ptr + sbi)  # d in the low half, dmin in the high half
    d = f16_bits(dm)
    dmin = f16_bits(dm >> 16)
    acc += d * (sc_lo * dx_lo[None, :] * dot_lo + sc_hi * (dx_hi * hi_unit)[None, :] * dot_hi)
    acc -= dmin * (mn_lo * xs_lo[None, :] + mn_hi * xs_hi[None, :])
    return acc


@triton.jit
def _gemv_q4_q5_k_i8(
    x_ptr, xdx_ptr, xs_ptr, dm_ptr, sc_ptr, qh_ptr, qs_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
    stride_yk, SPLIT_UNITS,
    HAS_QH: tl.constexpr, BLOCK_N: tl.constexpr, SUPER: tl.constexpr, ASM: tl.constexpr,
    STAGES: tl.constexpr, PREQ: tl.constexpr, PDL: tl.constexpr,
    EARLY: tl.constexpr = False,
):  # fmt: skip
    # tile [BLOCK_N rows, 4 * SUPER chunks, 8 words]: chunk g = 4s + c of a step is 32 bytes of
    # qs, sub-blocks 2c (low nibbles) and 2c + 1 (high) of super-block s; sc int32 [N, ns * 3]
    # (the 12 scale bytes), qh int32 [N, ns * 8], qs int32 [N, K / 8], dm int32 [N, ns] (d, dmin
    # f16 each: every per-row load is a word, which the pipeline copies ahead with the quants).
    ns = K // 256
    pid_m, x_row, rows, rmask, r64, zr, lo_u, hi_u = _tile(
        x_ptr, stride_xm, M, N, ns, SPLIT_UNITS, BLOCK_N
    )
    G: tl.constexpr = 4 * SUPER
    g = tl.arange(0, G)
    c = g % 4
    t = tl.arange(0, 8)
    i32 = tl.arange(0, 32)
    # row starts are 16-byte aligned (K % 256 == 0): the hints let the loads be 16 bytes wide
    qs_row = qs_ptr + tl.multiple_of(r64 * (K // 8), 32)
    qh_row = qh_ptr + tl.multiple_of(r64 * (K // 32), 8)
    if EARLY:
        q, h = _q4k_tiles(qs_row, qh_row, lo_u, hi_u, g, c, t, HAS_QH)
    pdl.prologue(PDL)
    acc = tl.zeros([BLOCK_N, G], dtype=tl.float32)
    start = lo_u
    if EARLY:
        acc = _q4k_step(
            acc, q, h, lo_u, hi_u, x_row, zr, xdx_ptr, xs_ptr, sc_ptr, dm_ptr, r64, ns, pid_m, K,
            g, c, t, i32, HAS_QH, PREQ, ASM,
        )  # fmt: skip
        start = lo_u + SUPER
    for s0 in tl.range(start, hi_u, SUPER, num_stages=STAGES):
        q, h = _q4k_tiles(qs_row, qh_row, s0, hi_u, g, c, t, HAS_QH)
        acc = _q4k_step(
            acc, q, h, s0, hi_u, x_row, zr, xdx_ptr, xs_ptr, sc_ptr, dm_ptr, r64, ns, pid_m, K,
            g, c, t, i32, HAS_QH, PREQ, ASM,
        )  # fmt: skip
    _store_y(y_ptr, acc, pid_m, rows, rmask, stride_ym, stride_yk)


@triton.jit
def _q6_k_tiles(ql_row, qh_row, sc_ptr, d_ptr, r64, K, h0, hi_u, hh_, tt, D_WORDS: tl.constexpr):
    """One step's weight words of `gemv_q6_k_i8_kernel`: ql words a and b, qh words h
    [BN, H, 2, 4], the eight scales of each half as two words [BN, H, 1] and d [BN, H]."""
    hc = tl.minimum(h0 + hh_, hi_u - 1)
    qa = ql_row[:, None, None, None] + tl.multiple_of(hc * 16, 16)[:, None, None] + tt
    a = tl.load(qa)
    b = tl.load(qa + 8)
    h = tl.load(qh_row[:, None, None, None] + tl.multiple_of(hc * 8, 8)[:, None, None] + tt)
    sw = sc_ptr + r64[:, None] * (K // 64) + (hc * 2)[None, :]  # [BN, H]
    sw0 = tl.load(sw)[:, :, None]
    sw1 = tl.load(sw + 1)[:, :, None]
    d = f16_at(d_ptr, r64[:, None] * (K // 256) + (hc // 2)[None, :], D_WORDS)
    return a, b, h, sw0, sw1, d


@triton.jit
def _q6_k_step(
    acc, a, b, h, sw0, sw1, d, h0, hi_u, hh_, tt, u, i32, x_row, zr, xdx_ptr, xs_ptr, pid_m, K,
    PREQ: tl.constexpr, ASM: tl.constexpr,
):  # fmt: skip
    HALVES: tl.constexpr = hh_.shape[0]
    hh = h0 + hh_
    hmask = hh < hi_u
    hc = tl.minimum(hh, hi_u - 1)
    zero = tl.zeros_like(a)
    tot = tl.zeros([a.shape[0], HALVES, 2], dtype=tl.float32)
    for f in tl.static_range(4):
        if f == 0:
            q = (a & M4) | ((h << 4) & BITS45)
        elif f == 1:
            q = (b & M4) | ((h << 2) & BITS45)
        elif f == 2:
            q = ((a >> 4) & M4) | (h & BITS45)
        else:
            q = ((b >> 4) & M4) | ((h >> 2) & BITS45)
        if PREQ:  # x block 4 hc + f; past the range: a step of 0
            xb = hc * 4 + f  # [H]
            xw = tl.load(x_row + zr[:, None, None, None] + (xb * 8)[:, None, None] + tt)
            dx = tl.where(hmask, tl.load(xdx_ptr + pid_m * (K // 32) + xb), 0.0)
            xs = tl.load(xs_ptr + pid_m * (K // 16) + (2 * xb)[:, None] + u[None, :])
        else:
            xoff = (hh * 128 + 32 * f)[:, None] + i32[None, :]  # [H, 32]
            xq, dx, _ = _quant_x(x_row, xoff, hmask[:, None], ASM)
            xw = _pack4(tl.reshape(xq, (HALVES, 2, 4, 4)))[None]  # [1, H, 2, 4]
            xs = tl.sum(tl.reshape(xq, (HALVES, 2, 16)), axis=2).to(tl.float32)  # [H, 2]
        dot = tl.sum(_dp4a(q, xw, zero, False, ASM), axis=3)  # [BN, H, 2]
        if f < 2:  # [BN, H, 2]
            s = byte_at(sw0, 2 * (f % 2) + u[None, None, :])
        else:
            s = byte_at(sw1, 2 * (f % 2) + u[None, None, :])
        # quants are q - 32: sum (q - 32) xq = dot - 32 * sum xq
        tot += s * dx[None, :, None] * (dot.to(tl.float32) - 32 * xs[None])
    return acc + d * tl.sum(tot, axis=2)


@triton.jit
def gemv_q6_k_i8_kernel(
    x_ptr, xdx_ptr, xs_ptr, d_ptr, sc_ptr, qh_ptr, ql_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
    stride_yk, SPLIT_UNITS,
    BLOCK_N: tl.constexpr, HALVES: tl.constexpr, ASM: tl.constexpr, STAGES: tl.constexpr,
    PREQ: tl.constexpr, D_WORDS: tl.constexpr, PDL: tl.constexpr,
    EARLY: tl.constexpr = False,
):  # fmt: skip
    # tile [BLOCK_N rows, HALVES halves of 128, 2 (u), 4 (v)]: with t = 4u + v, words a = ql word
    # t and b = ql word 8 + t of the half, h = qh word t give in byte i the quants of elements
    # 32f + 4t + i for f = 0..3 (a low, b low, a high, b high; two bits each of h); sub-block
    # (16 elements) 2f + u. ql int32 [N, K / 8], qh int32 [N, K / 16], scales int32 [N, K / 64]
    # (a half's eight int8 scales are words 2h and 2h + 1: sub-block 2f + u is byte 2 (f % 2) + u
    # of word f // 2).
    nh = K // 128
    pid_m, x_row, rows, rmask, r64, zr, lo_u, hi_u = _tile(
        x_ptr, stride_xm, M, N, nh, SPLIT_UNITS, BLOCK_N
    )
    hh_ = tl.arange(0, HALVES)
    tt = (tl.arange(0, 2) * 4)[:, None] + tl.arange(0, 4)[None, :]  # [2, 4] word t = 4u + v
    u = tl.arange(0, 2)
    i32 = tl.arange(0, 32)
    ql_row = ql_ptr + tl.multiple_of(r64 * (K // 8), 32)  # K % 256 == 0: aligned rows
    qh_row = qh_ptr + tl.multiple_of(r64 * (K // 16), 16)
    if EARLY:
        a, b, h, sw0, sw1, d = _q6_k_tiles(
            ql_row, qh_row, sc_ptr, d_ptr, r64, K, lo_u, hi_u, hh_, tt, D_WORDS
        )
    pdl.prologue(PDL)
    acc = tl.zeros([BLOCK_N, HALVES], dtype=tl.float32)
    start = lo_u
    if EARLY:
        acc = _q6_k_step(
            acc, a, b, h, sw0, sw1, d, lo_u, hi_u, hh_, tt, u, i32, x_row, zr, xdx_ptr, xs_ptr,
            pid_m, K, PREQ, ASM,
        )  # fmt: skip
        start = lo_u + HALVES
    for h0 in tl.range(start, hi_u, HALVES, num_stages=STAGES):
        a, b, h, sw0, sw1, d = _q6_k_tiles(
            ql_row, qh_row, sc_ptr, d_ptr, r64, K, h0, hi_u, hh_, tt, D_WORDS
        )
        acc = _q6_k_step(
            acc, a, b, h, sw0, sw1, d, h0, hi_u, hh_, tt, u, i32, x_row, zr, xdx_ptr, xs_ptr,
            pid_m, K, PREQ, ASM,
        )  # fmt: skip
    _store_y(y_ptr, acc, pid_m, rows, rmask, stride_ym, stride_yk)


def asm_dp4a(device_type: str) -> bool:
    """The dp4a instruction runs on CUDA devices; Triton's interpreter (CPU) spells it out."""
    return device_type == "cuda"
