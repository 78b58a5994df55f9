"""Per-row scales read as 4-byte words, for the quantized kernels' pipelines.

Triton's software pipeliner copies a loop's loads into shared memory ahead of use (`cp.async`)
only when each thread's load is at least 4 bytes wide. A 2-byte f16 scale or a 1-byte int8 scale
is loaded plainly inside the loop instead, and every step waits for it there: one such load
defeats the pipelining of all the others. So the kernels read f16 scales through the int32 word
that holds them (`f16_at`, `f16_bits`) and int8 scales four to a word.
"""

from __future__ import annotations

import triton
import triton.language as tl

TWO_112 = tl.constexpr(2.0**112)


@triton.jit
def f16_bits(w):
    """Float32 of the f16 in the low 16 bits of int32 w, by integer ops: its exponent and
    mantissa moved to a float32's place (a float32 2**-112 times the f16's value, subnormals
    included) and scaled back by the exact 2**112. An int16 -> f16 -> f32 conversion gives the
    same value, but Triton does not carry a layout change back through it, so in the small-batch
    kernels the weights it scales would reach the MMA through shared memory."""
    bits = ((w & 0x7FFF) << 13) | ((w & 0x8000) << 16)
    return bits.to(tl.float32, bitcast=True) * TWO_112


@triton.jit
def f16_at(ptr, idx, WORDS: tl.constexpr):
    """Float32 of the f16 at flat index idx (int64) of a plane. WORDS: ptr is the plane read as
    int32 and the f16 is taken from the word that holds it; otherwise ptr is the f16 plane."""
    if WORDS:
        return f16_bits(tl.load(ptr + idx // 2) >> (16 * (idx % 2)).to(tl.int32))
    return tl.load(ptr + idx).to(tl.float32)


@triton.jit
def byte_at(w, byte):
    """Float32 of the signed byte `byte` (0..3, int32, broadcasting) of int32 words w."""
    return ((w << (24 - 8 * byte)) >> 24).to(tl.float32)
