"""The small-batch kernels' PTX blocks (`ptx`), run instruction by instruction on the CPU.

Each block turns a word of quant bytes (four weights) and their scales into bf16 weights; here a
small interpreter of the few PTX instructions they use runs them on random words, and every
output lane is held bit for bit to the weight computed from the format's definition with exact
rational arithmetic, rounded as the block documents: in float32 then to bf16 (the float path), or
from a and c rounded to bf16 with one rounding (PAIRS). Operands follow Triton's packing of four
elements: a u8 operand is one register (byte e = element e), a float32 one four registers, a
bf16 one two (elements 0, 1 and 2, 3); the outputs are two bf16x2 registers per tensor. That
Triton hands the elements over in this order is the GPU tests' to check.
"""

from __future__ import annotations

import random
import struct
from fractions import Fraction

import pytest

from worker_orcd.kernels.quant import ptx as blocks

M32 = 0xFFFFFFFF


def round_bits(v: Fraction, bits: int) -> Fraction:
    """v rounded to nearest-even with `bits` significant bits (normal range)."""
    if v == 0:
        return Fraction(0)
    e = 0
    a = abs(v)
    while a >= 2**bits:
        a /= 2
        e += 1
    while a < 2 ** (bits - 1):
        a *= 2
        e -= 1
    n = round(a)  # half to even
    return (n if v > 0 else -n) * Fraction(2) ** e


def f32_bits(v: Fraction) -> int:
    return struct.unpack("<I", struct.pack("<f", float(round_bits(v, 24))))[0]


def bf16_bits(v: Fraction) -> int:
    return f32_bits(round_bits(v, 8)) >> 16  # exact: 8 bits fit float32


def f32_of(bits: int) -> Fraction:
    return Fraction(struct.unpack("<f", struct.pack("<I", bits & M32))[0])


def bf16_of(bits: int) -> Fraction:
    return f32_of((bits & 0xFFFF) << 16)


def run_ptx(ptx: str, operands: dict[str, int]) -> dict[str, int]:
    """Registers after running `ptx` (only the instructions the blocks use) on `operands`."""
    regs = dict(operands)

    def val(t: str) -> int:
        return int(t, 0) if t[0].isdigit() else regs[t]

    for line in ptx.strip("{}\n").splitlines():
        line = line.strip().rstrip(";")
        if line.startswith(".reg"):
            continue
        op, rest = line.split(None, 1)
        d, *args = [a.strip() for a in rest.split(",")]
        v = [val(a) for a in args]
        if op == "prmt.b32":
            src = [(v[0] >> 8 * i) & 255 for i in range(4)] + [
                (v[1] >> 8 * i) & 255 for i in range(4)
            ]
            r = sum(src[(v[2] >> 4 * i) & 7] << 8 * i for i in range(4))
        elif op == "shf.l.wrap.b32":
            n = v[2] & 31
            r = ((v[0] << n) | (v[1] >> (32 - n))) if n else v[0]
        elif op == "lop3.b32":
            r = 0
            for bit in range(32):
                a, b, c = ((x >> bit) & 1 for x in v[:3])
                r |= ((v[3] >> (a << 2 | b << 1 | c)) & 1) << bit
        elif op in ("shr.b32", "shl.b32", "and.b32", "sub.u32", "mov.b32"):
            f = {
                "shr.b32": lambda a, b: a >> b, "shl.b32": lambda a, b: a << b,
                "and.b32": lambda a, b: a & b, "sub.u32": lambda a, b: a - b,
                "mov.b32": lambda a: a,
            }[op]  # fmt: skip
            r = f(*v)
        elif op == "fma.rn.f32":
            r = f32_bits(f32_of(v[0]) * f32_of(v[1]) + f32_of(v[2]))
        elif op == "cvt.rn.bf16x2.f32":  # d = (bf16(a) << 16) | bf16(b)
            r = bf16_bits(f32_of(v[0])) << 16 | bf16_bits(f32_of(v[1]))
        elif op == "fma.rn.bf16x2":
            r = 0
            for lane in (0, 1):
                x, y, z = (bf16_of(t >> 16 * lane) for t in v)
                r |= bf16_bits(x * y + z) << 16 * lane
        else:
            raise AssertionError(f"no interpreter for {op}")
        regs[d] = r & M32
    return regs


def float_operands(base: int, values: list[list[float]]) -> dict[str, int]:
    """float32 tensors from $base on: four registers each."""
    flat = [f32_bits(Fraction(x)) for v in values for x in v]
    return {f"${base + i}": b for i, b in enumerate(flat)}


def bf16_operands(base: int, values: list[list[float]]) -> dict[str, int]:
    """bf16 tensors from $base on: two bf16x2 registers each (elements 0, 1 and 2, 3)."""
    out = {}
    for t, v in enumerate(values):
        for p in (0, 1):
            lo, hi = (bf16_bits(Fraction(x)) for x in v[2 * p : 2 * p + 2])
            out[f"${base + 2 * t + p}"] = lo | hi << 16
    return out


def outputs(regs: dict[str, int]) -> list[list[int]]:
    """The two bf16 output tensors' four elements each, as bf16 bits."""
    return [
        [(regs[f"${2 * t + e // 2}"] >> 16 * (e % 2)) & 0xFFFF for e in range(4)] for t in (0, 1)
    ]


def word(b: list[int]) -> int:
    return sum(x << 8 * i for i, x in enumerate(b))


def weight(q: int, a: float, c: float, pairs: bool) -> int:
    """bf16 bits of w = a q + c as the block rounds it: float path a (128 + q) + (c - 128 a) in
    float32 (c - 128 a itself rounded to float32, as the kernel computes it), then to bf16;
    PAIRS: a and c rounded to bf16, then one rounding."""
    if pairs:
        return bf16_bits(
            Fraction(q) * bf16_of(bf16_bits(Fraction(a))) + bf16_of(bf16_bits(Fraction(c)))
        )
    a32 = f32_of(f32_bits(Fraction(a)))
    c32 = f32_of(f32_bits(f32_of(f32_bits(Fraction(c))) - 128 * a32))
    return bf16_bits(f32_of(f32_bits((128 + q) * a32 + c32)))


def random_scales(rng: random.Random, n: int, size: float) -> list[list[float]]:
    return [[rng.uniform(-size, size) for _ in range(4)] for _ in range(n)]


@pytest.mark.parametrize("pairs", [False, True], ids=["floats", "pairs"])
@pytest.mark.parametrize("fifth_bit", [False, True], ids=["Q4_K", "Q5_K"])
def test_nibble_blocks(fifth_bit: bool, pairs: bool) -> None:
    rng = random.Random(int(fifth_bit) * 2 + int(pairs))
    build = blocks.pair_nibbles_ptx if pairs else blocks.nibbles_ptx
    code = build(fifth_bit)
    for _ in range(100):
        q, h = [rng.randrange(256) for _ in range(4)], [rng.randrange(256) for _ in range(4)]
        chunk = rng.randrange(4)
        a_lo, c_lo, a_hi, c_hi = random_scales(rng, 4, 1e-2)
        ops = {"$4": word(q)}
        if fifth_bit:
            ops["$5"] = word(h)
        if pairs:
            if fifth_bit:  # the rotation counts, 4 - 2c and 3 - 2c, four registers each
                ops |= {f"${6 + i}": (4 - 2 * chunk) & M32 for i in range(4)}
                ops |= {f"${10 + i}": (3 - 2 * chunk) & M32 for i in range(4)}
            ops |= bf16_operands(14 if fifth_bit else 5, [a_lo, c_lo, a_hi, c_hi])
        else:
            if fifth_bit:
                ops |= {f"${6 + i}": 2 * chunk for i in range(4)}
            # the kernel passes c - 128 a: the float32 block computes a (128 + q) + that
            c32 = [
                [float(f32_of(f32_bits(Fraction(c)))) - 128 * float(f32_of(f32_bits(Fraction(a))))
                 for a, c in zip(av, cv, strict=True)]
                for av, cv in ((a_lo, c_lo), (a_hi, c_hi))
            ]  # fmt: skip
            ops |= float_operands(10 if fifth_bit else 5, [a_lo, c32[0], a_hi, c32[1]])
        got = outputs(run_ptx(code, ops))
        for half, (a, c) in enumerate(((a_lo, c_lo), (a_hi, c_hi))):
            for e in range(4):
                v = (q[e] >> 4 * half) & 15
                if fifth_bit:
                    v |= ((h[e] >> (2 * chunk + half)) & 1) << 4
                want = weight(v, a[e], c[e], pairs)
                assert got[half][e] == want, (fifth_bit, pairs, chunk, half, e, q, h)


@pytest.mark.parametrize("pairs", [False, True], ids=["floats", "pairs"])
@pytest.mark.parametrize("g", [0, 1])
def test_q6_blocks(g: int, pairs: bool) -> None:
    """Groups g and g + 2 of Q6_K: w = scale (q6 - 32), the same bf16 value by either block."""
    rng = random.Random(10 + g * 2 + int(pairs))
    code = (blocks.pair_q6_ptx if pairs else blocks.q6_ptx)(g)
    for _ in range(100):
        q, h = [rng.randrange(256) for _ in range(4)], [rng.randrange(256) for _ in range(4)]
        sc = [[rng.randrange(-128, 128) for _ in range(4)] for _ in range(2)]
        ops = {"$4": word(q), "$5": word(h)}
        if pairs:
            ops |= bf16_operands(6, sc)
        else:  # a and c = -160 a per group (w = a (128 + q6) + c)
            ops |= float_operands(
                6, [sc[0], [-160 * x for x in sc[0]], sc[1], [-160 * x for x in sc[1]]]
            )
        got = outputs(run_ptx(code, ops))
        for i, f in enumerate((g, g + 2)):
            for e in range(4):
                q6 = ((q[e] >> 4 * (f // 2)) & 15) | (((h[e] >> 2 * f) & 3) << 4)
                want = bf16_bits(Fraction((q6 - 32) * sc[i][e]))
                assert got[i][e] == want, (g, pairs, f, e, q, h, sc[i][e])
