"""PTX blocks of the small-batch K-quant kernels (`batched`): a word of quant bytes, four weights
of a tile, to bf16 weights, as the text of `tl.inline_asm_elementwise` blocks (pack 4).

Operands are numbered as Triton packs four elements: outputs first, two bf16x2 registers per
tensor ($0 and $1: elements 0, 1 and 2, 3 of the first); then each input, a u8 tensor in one
register (byte e = element e), a float32 or int32 one in four, a bf16 one in two. The float path
(`nibbles_ptx`, `q6_ptx`) makes each weight in float32 and rounds pairs to bf16; PAIRS
(`pair_nibbles_ptx`, `pair_q6_ptx`) makes them two at a time in bf16x2 lanes. Plain strings,
free of Triton, so that the CPU tests can run them through an interpreter of these instructions.
"""

from __future__ import annotations

_MAGIC = "0x43004300"  # bf16 128.0 in each 16-bit lane: a nibble or-ed under it reads 128 + q
_REGS = ".reg .b32 s0, s1, t0, t1, x0, x1, r, f0, f1, f2, f3;"


def _rotate_ptx(x: str, h: str, amount: str, mask: str) -> list[str]:
    """PTX lines leaving in x the magic with the bits `mask` of h rotated left by `amount` or-ed
    in: high quant bits brought above the nibbles of their lanes."""
    return [
        f"shf.l.wrap.b32 {x}, {h}, {h}, {amount};",
        f"lop3.b32 {x}, {x}, {mask}, {_MAGIC}, 0xEA;",
    ]


def _word_ptx(
    q: str, shift: int, out: int, scales: int, high: list[str] | None = None
) -> list[str]:
    """PTX lines turning the word of quant bytes in operand q into four bf16 weights, operands
    $out (elements 0, 1) and $out + 1 (2, 3). Each byte's nibble at bit `shift` goes under the
    magic of a 16-bit lane (a lop3 for bytes 0 and 2, one for 1 and 3), with the high bits that
    the lines `high` leave in x0 (bytes 0, 2) and x1 (1, 3); a shift or a mask widens each lane
    to the float32 128 + q; w = a (128 + q) + c' with a and c' the operands $scales + i and
    $scales + 4 + i; then a round-to-nearest pair to bf16, as the float path rounds."""
    lines = [f"shr.b32 s0, {q}, {shift};", f"shr.b32 s1, {q}, {shift + 8};"]
    magic = (_MAGIC, _MAGIC)
    if high:
        lines += high
        magic = ("x0", "x1")
    lines += [
        f"lop3.b32 t0, s0, 0x000F000F, {magic[0]}, 0xEA;",
        f"lop3.b32 t1, s1, 0x000F000F, {magic[1]}, 0xEA;",
        "shl.b32 f0, t0, 16;", "and.b32 f2, t0, 0xFFFF0000;",
        "shl.b32 f1, t1, 16;", "and.b32 f3, t1, 0xFFFF0000;",
    ]  # fmt: skip
    lines += [f"fma.rn.f32 f{i}, f{i}, ${scales + i}, ${scales + 4 + i};" for i in range(4)]
    lines += [f"cvt.rn.bf16x2.f32 ${out}, f1, f0;", f"cvt.rn.bf16x2.f32 ${out + 1}, f3, f2;"]
    return lines


def _ptx(lines: list[str], regs: str = _REGS) -> str:
    return "{\n" + "\n".join([regs, *lines]) + "\n}"


def nibbles_ptx(fifth_bit: bool) -> str:
    """PTX for `_nibbles`: one word of quant bytes (four weights of the tile) to their
    low- and high-nibble weights (`_word_ptx`); Q5_K's fifth bits, bit 2c (low) and 2c + 1 (high)
    of the qh word, rotated to bit 4 of each lane. c' = c - 128 a is exact enough: its rounding
    is ~2**-24 of 128 a."""
    first = 6 if fifth_bit else 5  # operands after the words: [2c,] a_lo, c_lo, a_hi, c_hi
    n = f"${first}"  # 2c: the qh bit of the low nibbles' sub-block
    scales = first + 4 if fifth_bit else first
    lines = []
    for half in (0, 1):
        high = []
        if fifth_bit:  # bit 2c + half of bytes 0, 2 (1, 3) to bit 4 of each lane, by a rotate
            for x, base in (("x0", 4 - half), ("x1", 28 - half)):
                high += [f"mov.b32 r, {base};", f"sub.u32 r, r, {n};"]
                high += _rotate_ptx(x, "$5", "r", "0x00100010")
        lines += _word_ptx("$4", 4 * half, 2 * half, scales + 8 * half, high)
    return _ptx(lines)


def q6_ptx(g: int) -> str:
    """PTX for `_q6_weights` of groups g and g + 2 (g = 0, 1): one word of ql bytes (operand $4)
    and one of qh bytes ($5), four weights of each group (`_word_ptx`): group f is the low
    (f < 2) or high nibble under qh's bits 2f, 2f + 1, rotated to bits 4-5 of each lane."""
    lines = []
    for i, f in enumerate((g, g + 2)):
        high = _rotate_ptx("x0", "$5", str((4 - 2 * f) % 32), "0x00300030")
        high += _rotate_ptx("x1", "$5", str((28 - 2 * f) % 32), "0x00300030")
        lines += _word_ptx("$4", 4 * (f // 2), 2 * i, 6 + 8 * i, high)
    return _ptx(lines)


# PAIRS: the weights made two at a time, in the 16-bit lanes of the bf16x2 registers the MMA takes
_PAIR_REGS = ".reg .b32 p0, p1, h0, h1, s0, s1, t0, t1, x0, x1, k1, kq, kz;"


def _pairs_ptx(word: str, p: tuple[str, str] = ("p0", "p1")) -> list[str]:
    """PTX lines spreading the four bytes of `word` over two words of two 16-bit lanes: byte 0 in
    the low lane of p[0] and byte 1 in its high lane, bytes 2 and 3 likewise in p[1]: a lane per
    weight, in the pairs of the outputs' bf16x2 registers."""
    return [
        f"prmt.b32 {p[0]}, {word}, {word}, 0x1100;",
        f"prmt.b32 {p[1]}, {word}, {word}, 0x3322;",
    ]


def _pair_word_ptx(
    shift: int, out: int, a: int, c: int | None, zero: str, high: bool = False
) -> list[str]:
    """PTX lines turning the pairs p0, p1 of quant bytes (`_pairs_ptx`) into four bf16 weights,
    operands $out (elements 0, 1) and $out + 1 (2, 3). Each lane's nibble at bit `shift` goes
    under the magic, or, where `high`, under x0 (p0) and x1 (p1), the magic with the high bits
    above the nibbles: bf16(128 + q), exact. An fma.bf16x2 by 1.0 plus `zero` (bf16x2 -128, or
    -160 with Q6_K's zero point) leaves q or q - 32, exactly (seven bits at most); a second one
    makes w = a q + c, a the operands $a (elements 0, 1) and $a + 1 (2, 3), c those from operand
    `c` on, or +0.0 without one (a zero product then reads +0.0, as in float32): one rounding to
    bf16. About two instructions a weight, where widening each lane to float32 and rounding back
    takes three and a half."""
    src = ("p0", "p1")
    lines = ["mov.b32 k1, 0x3F803F80;", f"mov.b32 kq, {zero};", "mov.b32 kz, 0;"]
    if shift:
        lines += [f"shr.b32 s0, p0, {shift};", f"shr.b32 s1, p1, {shift};"]
        src = ("s0", "s1")
    magic = ("x0", "x1") if high else (_MAGIC, _MAGIC)
    for i in (0, 1):
        cc = f"${c + i}" if c is not None else "kz"
        lines += [
            f"lop3.b32 t{i}, {src[i]}, 0x000F000F, {magic[i]}, 0xEA;",
            f"fma.rn.bf16x2 t{i}, t{i}, k1, kq;",
            f"fma.rn.bf16x2 ${out + i}, t{i}, ${a + i}, {cc};",
        ]
    return lines


_NEG_128 = "0xC300C300"  # bf16 -128.0 in each lane
_NEG_160 = "0xC320C320"  # bf16 -160.0: 128 and Q6_K's zero point 32


def pair_nibbles_ptx(fifth_bit: bool) -> str:
    """PTX for `_nibbles` with PAIRS: one word of quant bytes (operand $4, four weights of the
    tile) to their low- and high-nibble weights (`_pair_word_ptx`); Q5_K's fifth bits, bit 2c
    (low nibbles) and 2c + 1 (high) of each byte of the qh word $5, rotated to bit 4 of each lane
    by the rotation counts $6 (4 - 2c) and $10 (3 - 2c)."""
    first = 14 if fifth_bit else 5  # the bf16x2 scale operands: a_lo, c_lo, a_hi, c_hi (2 each)
    lines = _pairs_ptx("$4")
    if fifth_bit:
        lines += _pairs_ptx("$5", ("h0", "h1"))
    for half in (0, 1):
        if fifth_bit:
            amount = "$6" if half == 0 else "$10"
            lines += _rotate_ptx("x0", "h0", amount, "0x00100010")
            lines += _rotate_ptx("x1", "h1", amount, "0x00100010")
        a = first + 4 * half
        lines += _pair_word_ptx(4 * half, 2 * half, a, a + 2, _NEG_128, fifth_bit)
    return _ptx(lines, _PAIR_REGS)


def pair_q6_ptx(g: int) -> str:
    """PTX for `_q6_weights` with PAIRS, groups g and g + 2 (g = 0, 1): one word of ql bytes
    (operand $4) and one of qh bytes ($5), four weights of each group (`_pair_word_ptx`): group f
    is the low (f < 2) or high nibble under qh's bits 2f, 2f + 1, rotated to bits 4-5 of each
    lane; w = a (q6 - 32), a the bf16x2 operands $6, $7 (group g) and $8, $9 (g + 2), exact
    integers, so that w is rounded once, as the float path rounds it."""
    lines = _pairs_ptx("$4") + _pairs_ptx("$5", ("h0", "h1"))
    for i, f in enumerate((g, g + 2)):
        lines += _rotate_ptx("x0", "h0", str((4 - 2 * f) % 32), "0x00300030")
        lines += _rotate_ptx("x1", "h1", str((4 - 2 * f) % 32), "0x00300030")
        lines += _pair_word_ptx(4 * (f // 2), 2 * i, 6 + 2 * i, None, _NEG_160, True)
    return _ptx(lines, _PAIR_REGS)
