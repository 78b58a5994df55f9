"""GGUF block formats as the quantized kernels keep them: the same bytes, split into planes.

A GGUF row of a quantized [N, K] weight is K / block_size blocks, each an array of structs (scales
and quants side by side, 18 to 210 bytes, mostly not 16-byte aligned). At load we split every row
into planes, one contiguous row-major array per field, so that a kernel reads each field with wide,
coalesced, aligned loads. The planes hold exactly the block's bytes: bytes per weight stay the
format's. Only Q5_0's `qh` bits are reordered (see below); every other byte keeps its place within
its plane. The kernels read the planes of quants as 32-bit words (4 bytes of one row).

Block layouts (`d`, `dmin` fp16; "nib" = 4-bit field; element indices within the block):

    Q8_0  (34 B / 32)   | d | qs[32] int8 |       w[i] = d * qs[i]
    Q4_0  (18 B / 32)   | d | qs[16] |            w[i] = d * (nib[i] - 8)
    Q5_0  (22 B / 32)   | d | qh[4] | qs[16] |    w[i] = d * ((nib[i] | bit_i(qh) << 4) - 16)
        nib[i]: low nibble of qs[i] for i < 16, high nibble of qs[i - 16] for i >= 16;
        qh: little-endian u32, bit i belongs to element i.
    Q4_K  (144 B / 256) | d | dmin | scales[12] | qs[128] |  w = d * sc[j] * nib - dmin * m[j]
    Q5_K  (176 B / 256) | d | dmin | scales[12] | qh[32] | qs[128] |
        qs: chunk c (bytes 32c..32c+31) holds sub-block j = 2c in its low nibbles and j = 2c + 1 in
        its high nibbles; the fifth bit (Q5_K) of element l of sub-block j is bit j of qh[l].
        scales: 8 six-bit scales (A..H) and 8 six-bit mins (a..h) of the 32-element sub-blocks:
             0 EEAAAAAA    4 eeaaaaaa    8 eeeeEEEE
             1 FFBBBBBB    5 ffbbbbbb    9 ffffFFFF
             2 GGCCCCCC    6 ggcccccc   10 ggggGGGG
             3 HHDDDDDD    7 hhdddddd   11 hhhhHHHH
    Q6_K  (210 B / 256) | ql[128] | qh[64] | scales[16] int8 | d |
        half h (128 elements) uses ql[64h..64h+63] and qh[32h..32h+31]; for l < 32:
            w[128h + l]      = ql[64h + l]      low  | (qh[32h + l] >> 0 & 3) << 4
            w[128h + l + 32] = ql[64h + l + 32] low  | (qh[32h + l] >> 2 & 3) << 4
            w[128h + l + 64] = ql[64h + l]      high | (qh[32h + l] >> 4 & 3) << 4
            w[128h + l + 96] = ql[64h + l + 32] high | (qh[32h + l] >> 6 & 3) << 4
        value (q - 32) * d * scales[i // 16].

Planes per format (row n of the weight is row n of every plane; nb = K / 32, ns = K / 256):

    Q8_0  d f16 [N, nb]       qs int8 [N, K]
    Q4_0  d f16 [N, nb]       qs u8 [N, K / 2]
    Q5_0  d f16 [N, nb]       qh i32 [N, nb] (re-laid)  qs u8 [N, K / 2]
    Q4_K  dm f16 [N, ns, 2]   scales u8 [N, ns, 12]     qs u8 [N, K / 2]
    Q5_K  dm f16 [N, ns, 2]   scales u8 [N, ns, 12]     qh u8 [N, K / 8] qs u8 [N, K / 2]
    Q6_K  d f16 [N, ns]       scales i8 [N, K / 16]     qh u8 [N, K / 4] ql u8 [N, K / 2]

Q5_0's qh word is re-laid so that one shift and one mask put the fifth bits of a 32-bit word of qs
into bit 4 of each byte: word t of the block's qs holds elements 4t + i (low nibble of byte i) and
16 + 4t + i (high nibble), and their fifth bits move to bits 8i + t and 8i + 4 + t of qh. It is
still 4 bytes per block.

    bit of the re-laid word:   8i + t      8i + 4 + t     (i, t in 0..3)
    element whose fifth bit:   4t + i      16 + 4t + i
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

logger = logging.getLogger(__name__)

Q = GGMLQuantizationType

# Planes of each format, in the order the kernels take them.
PLANES: dict[GGMLQuantizationType, tuple[str, ...]] = {
    Q.Q8_0: ("d", "qs"),
    Q.Q4_0: ("d", "qs"),
    Q.Q5_0: ("d", "qh", "qs"),
    Q.Q4_K: ("dm", "scales", "qs"),
    Q.Q5_K: ("dm", "scales", "qh", "qs"),
    Q.Q6_K: ("d", "scales", "qh", "ql"),
}
SUPPORTED: tuple[GGMLQuantizationType, ...] = tuple(PLANES)


@dataclass(frozen=True, slots=True)
class BlockFormat:
    qtype: GGMLQuantizationType
    block_size: int  # weights per block
    type_size: int  # bytes per block

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.type_size / self.block_size


def block_format(qtype: GGMLQuantizationType) -> BlockFormat:
    if qtype not in PLANES:
        raise ValueError(
            f"quant type {qtype.name} is not kept quantized; supported: "
            f"{', '.join(t.name for t in SUPPORTED)}"
        )
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    return BlockFormat(qtype, block_size, type_size)


def check_shape(qtype: GGMLQuantizationType, n: int, k: int) -> BlockFormat:
    fmt = block_format(qtype)
    if n <= 0 or k <= 0 or k % fmt.block_size:
        raise ValueError(
            f"{qtype.name} weight [{n}, {k}]: rows of {k} are not a whole number of "
            f"{fmt.block_size}-element blocks"
        )
    return fmt


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A copy with row-major strides (`contiguous()` keeps odd strides of size-1 dimensions,
    which `view(dtype)` and the kernels' index arithmetic do not accept)."""
    return torch.empty(t.shape, dtype=t.dtype, device=t.device).copy_(t)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """[..., 2] bytes -> [...] float16 (little-endian)."""
    return _dense(b).view(torch.float16).squeeze(-1)


def _u32(b: torch.Tensor) -> torch.Tensor:
    """[..., 4] bytes -> [...] int32 (little-endian bit pattern)."""
    return _dense(b).view(torch.int32).squeeze(-1)


# Q5_0 qh: bit e (element e's fifth bit) of the GGUF word goes to bit _Q5_0_QH[e] of the plane's.
_Q5_0_QH = [8 * (e % 4) + 4 * (e // 16) + (e % 16) // 4 for e in range(32)]


def _permute_bits(words: torch.Tensor, dst: list[int]) -> torch.Tensor:
    """int32 words with bit e moved to bit dst[e] (a permutation of 0..31)."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    out = torch.zeros_like(w)
    for src, to in enumerate(dst):
        out |= ((w >> src) & 1) << to
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def _q5_0_qh_plane(qh: torch.Tensor) -> torch.Tensor:
    return _permute_bits(qh, _Q5_0_QH)


def _q5_0_qh_gguf(qh: torch.Tensor) -> torch.Tensor:
    inverse = [0] * 32
    for e, to in enumerate(_Q5_0_QH):
        inverse[to] = e
    return _permute_bits(qh, inverse)


def to_planes(
    raw: torch.Tensor, qtype: GGMLQuantizationType, n: int, k: int
) -> dict[str, torch.Tensor]:
    """Split GGUF bytes of an [n, k] `qtype` weight (uint8, any shape, any device) into planes."""
    fmt = check_shape(qtype, n, k)
    nblk = k // fmt.block_size
    if raw.dtype != torch.uint8 or raw.numel() != n * nblk * fmt.type_size:
        raise ValueError(
            f"{qtype.name} weight [{n}, {k}] needs {n * nblk * fmt.type_size} uint8 bytes, "
            f"got {raw.numel()} of {raw.dtype}"
        )
    b = raw.reshape(n, nblk, fmt.type_size)

    def flat(x: torch.Tensor) -> torch.Tensor:
        return _dense(x).reshape(n, -1)

    if qtype == Q.Q8_0:
        return {"d": _f16(b[..., 0:2]), "qs": flat(b[..., 2:34]).view(torch.int8)}
    if qtype == Q.Q4_0:
        return {"d": _f16(b[..., 0:2]), "qs": flat(b[..., 2:18])}
    if qtype == Q.Q5_0:
        qh = _q5_0_qh_plane(_u32(b[..., 2:6]))
        return {"d": _f16(b[..., 0:2]), "qh": qh, "qs": flat(b[..., 6:22])}
    if qtype == Q.Q4_K:
        return {
            "dm": _f16(b[..., 0:4].reshape(n, nblk, 2, 2)),
            "scales": _dense(b[..., 4:16]),
            "qs": flat(b[..., 16:144]),
        }
    if qtype == Q.Q5_K:
        return {
            "dm": _f16(b[..., 0:4].reshape(n, nblk, 2, 2)),
            "scales": _dense(b[..., 4:16]),
            "qh": flat(b[..., 16:48]),
            "qs": flat(b[..., 48:176]),
        }
    assert qtype == Q.Q6_K
    return {
        "d": _f16(b[..., 208:210]),
        "scales": flat(b[..., 192:208]).view(torch.int8),
        "qh": flat(b[..., 128:192]),
        "ql": flat(b[..., 0:128]),
    }


def from_planes(
    planes: dict[str, torch.Tensor], qtype: GGMLQuantizationType, n: int, k: int
) -> torch.Tensor:
    """Inverse of to_planes: the GGUF bytes [n, k / block_size * type_size] uint8."""
    fmt = check_shape(qtype, n, k)
    nblk = k // fmt.block_size

    def blk(x: torch.Tensor, width: int) -> torch.Tensor:
        return _dense(x).view(torch.uint8).reshape(n, nblk, width)

    p = planes
    if qtype == Q.Q8_0:
        parts = [blk(p["d"], 2), blk(p["qs"], 32)]
    elif qtype == Q.Q4_0:
        parts = [blk(p["d"], 2), blk(p["qs"], 16)]
    elif qtype == Q.Q5_0:
        parts = [blk(p["d"], 2), blk(_q5_0_qh_gguf(p["qh"]), 4), blk(p["qs"], 16)]
    elif qtype == Q.Q4_K:
        parts = [blk(p["dm"], 4), blk(p["scales"], 12), blk(p["qs"], 128)]
    elif qtype == Q.Q5_K:
        parts = [blk(p["dm"], 4), blk(p["scales"], 12), blk(p["qh"], 32), blk(p["qs"], 128)]
    else:
        parts = [blk(p["ql"], 128), blk(p["qh"], 64), blk(p["scales"], 16), blk(p["d"], 2)]
    return torch.cat(parts, dim=-1).reshape(n, nblk * fmt.type_size)


# Byte offsets of the fp16 scale fields in each block (random blocks get sane values there).
_F16_FIELDS: dict[GGMLQuantizationType, tuple[int, ...]] = {
    Q.Q8_0: (0,),
    Q.Q4_0: (0,),
    Q.Q5_0: (0,),
    Q.Q4_K: (0, 2),
    Q.Q5_K: (0, 2),
    Q.Q6_K: (208,),
}


def random_blocks(
    qtype: GGMLQuantizationType,
    n: int,
    k: int,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    scale: float = 0.01,
) -> torch.Tensor:
    """Random GGUF bytes of an [n, k] `qtype` weight: uniform quant and scale bytes, and fp16 block
    scales drawn from N(0, scale) (never NaN/Inf). Returns uint8 [n, k / block_size * type_size]."""
    fmt = check_shape(qtype, n, k)
    nblk = k // fmt.block_size
    raw = torch.randint(
        0, 256, (n, nblk, fmt.type_size), dtype=torch.uint8, device=device, generator=generator
    )
    for off in _F16_FIELDS[qtype]:
        d = torch.randn((n, nblk), device=device, generator=generator) * scale
        raw[..., off : off + 2] = d.to(torch.float16).unsqueeze(-1).view(torch.uint8)
    return raw.reshape(n, nblk * fmt.type_size)


def nbytes(qtype: GGMLQuantizationType, n: int, k: int) -> int:
    fmt = check_shape(qtype, n, k)
    return n * (k // fmt.block_size) * fmt.type_size


def planes_nbytes(planes: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in planes.values())


def rows_of(planes: dict[str, torch.Tensor]) -> int:
    return next(iter(planes.values())).shape[0]


def ceil_div(a: int, b: int) -> int:
    return math.ceil(a / b)
