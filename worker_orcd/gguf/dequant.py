"""Dequantization of GGML tensor data in torch: one routine per quant type, in DEQUANTIZERS.

Each routine maps blocks `[n, type_size]` uint8 to `[n, block_size]` float32 and uses only torch
ops, so it runs wherever the bytes are (CPU or CUDA). The arithmetic follows `gguf.quants` step by
step (same products in the same order, all in float32), which makes the results bit-identical to
that numpy reference. fp16 scales are read by viewing byte pairs as float16 (little-endian, like
every device we run on). Layouts below: `d`, `dmin` are fp16 (super-)block scales, `qs` quants.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
from gguf import GGML_QUANT_SIZES, QK_K, GGMLQuantizationType
from torch import Tensor

logger = logging.getLogger(__name__)

Dequantizer = Callable[[torch.Tensor], torch.Tensor]
DEQUANTIZERS: dict[GGMLQuantizationType, Dequantizer] = {}

Q = GGMLQuantizationType
# Blocks per call are capped so intermediates stay small (and cache-friendly on CPU).
_CHUNK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 26}


def register(qtype: GGMLQuantizationType) -> Callable[[Dequantizer], Dequantizer]:
    def deco(fn: Dequantizer) -> Dequantizer:
        DEQUANTIZERS[qtype] = fn
        return fn

    return deco


def dequantize(data: torch.Tensor, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> Tensor:
    """Dequantize the bytes `data` (uint8, any device) of a `qtype` tensor to float32 `shape`.

    `shape` is in torch order; its last dimension is the row length, a whole number of blocks.
    """
    fn = DEQUANTIZERS.get(qtype)
    if fn is None:
        raise ValueError(f"no dequantizer for quant type {qtype.name}")
    if data.dtype != torch.uint8:
        raise ValueError(f"expected uint8 bytes, got {data.dtype}")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_elements = math.prod(shape)
    if shape and shape[-1] % block_size:
        raise ValueError(f"rows of {shape[-1]} are not whole {qtype.name} blocks of {block_size}")
    n_blocks = n_elements // block_size
    if data.numel() != n_blocks * type_size:
        raise ValueError(
            f"{qtype.name} tensor of shape {tuple(shape)} needs {n_blocks * type_size} bytes, "
            f"got {data.numel()}"
        )
    blocks = data.contiguous().view(n_blocks, type_size)
    chunk = max(1, _CHUNK_ELEMENTS.get(data.device.type, 1 << 24) // block_size)
    if n_blocks <= chunk:
        return fn(blocks).view(shape)
    out = torch.empty((n_blocks, block_size), dtype=torch.float32, device=data.device)
    for start in range(0, n_blocks, chunk):
        out[start : start + chunk] = fn(blocks[start : start + chunk])
    return out.view(shape)


# -- helpers --------------------------------------------------------------------------------------


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Byte pairs [n, 2] -> float32 [n, 1]."""
    return b.contiguous().view(torch.float16).float()


def _shifts(values: list[int], shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.uint8, device=like.device).view(shape)


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 2, k]: all low nibbles, then all high nibbles."""
    return (qs.unsqueeze(1) >> _shifts([0, 4], (1, 2, 1), qs)) & 0x0F


def _bits(b: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 8, k]: bit j of every byte in row j."""
    return (b.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8, device=b.device).view(1, 8, 1)) & 1


def _crumbs(b: torch.Tensor) -> torch.Tensor:
    """[n, k] bytes -> [n, 4, k]: 2-bit fields at shifts 0, 2, 4, 6."""
    return (b.unsqueeze(1) >> _shifts([0, 2, 4, 6], (1, 4, 1), b)) & 0x03


# -- plain floats (block_size 1) ------------------------------------------------------------------


@register(Q.F32)
def dequant_f32(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.float32)


@register(Q.F16)
def dequant_f16(blocks: torch.Tensor) -> torch.Tensor:
    return blocks.view(torch.float16).float()


@register(Q.BF16)
def dequant_bf16(blocks: torch.Tensor) -> torch.Tensor:
    # bf16 is the top half of an fp32: shift the bits up (keeps NaN payloads, like the reference).
    return (blocks.view(torch.int16).to(torch.int32) << 16).view(torch.float32)


# -- legacy 32-element blocks ---------------------------------------------------------------------
# Q4_0 | d | qs[16] |           x[i] = d * (nibble[i] - 8)
# Q4_1 | d | m | qs[16] |       x[i] = d * nibble[i] + m
# Q5_0 | d | qh[4] | qs[16] |   x[i] = d * ((nibble[i] | bit_i(qh) << 4) - 16)
# Q5_1 | d | m | qh[4] | qs[16] x[i] = d * (nibble[i] | bit_i(qh) << 4) + m
# Q8_0 | d | qs[32] int8 |      x[i] = qs[i] * d
# nibble[i]: low nibbles of qs[0..15] are elements 0..15, high nibbles elements 16..31.
# qh is a little-endian u32: bit i of byte i // 8 ... read as bytes so unaligned blocks work.


def _q5_high(qh: torch.Tensor) -> torch.Tensor:
    """qh [n, 4] -> [n, 32]: bit i of the little-endian u32, for element i."""
    return _bits(qh).transpose(1, 2).reshape(qh.shape[0], 32)


@register(Q.Q4_0)
def dequant_q4_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    q = _nibbles(blocks[:, 2:]).reshape(-1, 32)
    return d * (q.to(torch.int8) - 8).float()


@register(Q.Q4_1)
def dequant_q4_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 4:]).reshape(-1, 32).float()
    return (d * q) + m


@register(Q.Q5_0)
def dequant_q5_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    q = _nibbles(blocks[:, 6:]).reshape(-1, 32) | (_q5_high(blocks[:, 2:6]) << 4)
    return d * (q.to(torch.int8) - 16).float()


@register(Q.Q5_1)
def dequant_q5_1(blocks: torch.Tensor) -> torch.Tensor:
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    q = _nibbles(blocks[:, 8:]).reshape(-1, 32) | (_q5_high(blocks[:, 4:8]) << 4)
    return (d * q.float()) + m


@register(Q.Q8_0)
def dequant_q8_0(blocks: torch.Tensor) -> torch.Tensor:
    d = _f16(blocks[:, :2])
    return blocks[:, 2:].contiguous().view(torch.int8).float() * d


# -- K-quants: 256-element super-blocks -----------------------------------------------------------


@register(Q.Q2_K)
def dequant_q2_k(blocks: torch.Tensor) -> torch.Tensor:
    # | scales[16] | qs[64] | d | dmin |     (84 bytes)
    # scales[j]: low nibble = scale, high nibble = min of 16-element sub-block j.
    # qs: two halves of 32 bytes; in half h the 2-bit fields at shift 2s are the 32 values of
    # sub-blocks 8h + 2s and 8h + 2s + 1.
    n = blocks.shape[0]
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    dl = (d * (scales & 0x0F).float()).view(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).view(n, 16, 1)
    q = _crumbs(qs.reshape(n * 2, 32)).reshape(n, 16, 16).float()
    return (dl * q - ml).view(n, QK_K)


@register(Q.Q3_K)
def dequant_q3_k(blocks: torch.Tensor) -> torch.Tensor:
    # | hmask[32] | qs[64] | scales[12] | d |     (110 bytes)
    # 16 signed 6-bit scales (minus 32), packed as:
    #  0: IIIIAAAA    4: MMMMEEEE    8: MMIIEEAA
    #  1: JJJJBBBB    5: NNNNFFFF    9: NNJJFFBB
    #  2: KKKKCCCC    6: OOOOGGGG   10: OOKKGGCC
    #  3: LLLLDDDD    7: PPPPHHHH   11: PPLLHHDD
    # value = 2 low bits from qs, minus 4 where the hmask bit is *clear*.
    n = blocks.shape[0]
    hmask, qs, sc = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108]
    d = _f16(blocks[:, 108:110])
    low = _nibbles(sc[:, :8]).reshape(n, 16)
    high = _crumbs(sc[:, 8:12]).reshape(n, 16)
    scales = ((low | (high << 4)).to(torch.int8) - 32).float()
    dl = (d * scales).view(n, 16, 1)
    ql = _crumbs(qs.reshape(n * 2, 32)).reshape(n, 16, 16)
    qh = _bits(hmask).reshape(n, 16, 16) ^ 1
    q = (ql.to(torch.int8) - (qh << 2).to(torch.int8)).float()
    return (dl * q).view(n, QK_K)


def _scale_min_k4(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 8 scales and 8 mins, 6 bits each, in 12 bytes:

     0 EEAAAAAA    4 eeaaaaaa    8 eeeeEEEE
     1 FFBBBBBB    5 ffbbbbbb    9 ffffFFFF
     2 GGCCCCCC    6 ggcccccc   10 ggggGGGG
     3 HHDDDDDD    7 hhdddddd   11 hhhhHHHH
    scales A..H, mins a..h.
    """
    s, m, hi = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scales = torch.cat([s & 0x3F, (hi & 0x0F) | ((s >> 2) & 0x30)], dim=1)
    mins = torch.cat([m & 0x3F, (hi >> 4) | ((m >> 2) & 0x30)], dim=1)
    return scales, mins


@register(Q.Q4_K)
def dequant_q4_k(blocks: torch.Tensor) -> torch.Tensor:
    # | d | dmin | scales[12] | qs[128] |     (144 bytes)
    # qs: 4 chunks of 32 bytes; chunk c holds sub-block 2c in low nibbles, 2c+1 in high nibbles.
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, mn = _scale_min_k4(blocks[:, 4:16])
    dl = (d * sc.float()).view(n, 8, 1)
    ml = (dmin * mn.float()).view(n, 8, 1)
    q = _nibbles(blocks[:, 16:144].reshape(n * 4, 32)).reshape(n, 8, 32).float()
    return (dl * q - ml).view(n, QK_K)


@register(Q.Q5_K)
def dequant_q5_k(blocks: torch.Tensor) -> torch.Tensor:
    # | d | dmin | scales[12] | qh[32] | qs[128] |     (176 bytes)
    # low 4 bits as Q4_K; the 5th bit of element l of sub-block j is bit j of qh[l].
    n = blocks.shape[0]
    d, dmin = _f16(blocks[:, 0:2]), _f16(blocks[:, 2:4])
    sc, mn = _scale_min_k4(blocks[:, 4:16])
    dl = (d * sc.float()).view(n, 8, 1)
    ml = (dmin * mn.float()).view(n, 8, 1)
    ql = _nibbles(blocks[:, 48:176].reshape(n * 4, 32)).reshape(n, 8, 32)
    qh = _bits(blocks[:, 16:48])
    q = (ql | (qh << 4)).float()
    return (dl * q - ml).view(n, QK_K)


@register(Q.Q6_K)
def dequant_q6_k(blocks: torch.Tensor) -> torch.Tensor:
    # | ql[128] | qh[64] | scales[16] int8 | d |     (210 bytes)
    # Two halves of 128 values. Half h: ql[64h : 64h+64] gives low nibbles for its 4 groups of 32
    # (bytes 0..31 low, 32..63 low, 0..31 high, 32..63 high); qh[32h : 32h+32] gives the 2 high bits
    # at shifts 0, 2, 4, 6 for those same 4 groups. value = (low | high << 4) - 32, scale per 16.
    n = blocks.shape[0]
    ql = _nibbles(blocks[:, 0:128].reshape(n * 2, 64)).reshape(n, 8, 32)
    qh = _crumbs(blocks[:, 128:192].reshape(n * 2, 32)).reshape(n, 8, 32)
    scales = blocks[:, 192:208].contiguous().view(torch.int8).float()
    d = _f16(blocks[:, 208:210])
    dl = (d * scales).view(n, 16, 1)
    q = ((ql | (qh << 4)).to(torch.int8) - 32).float().view(n, 16, 16)
    return (dl * q).view(n, QK_K)
