"""Quantized matmul and dequantization: Triton on CUDA, a torch reference twin everywhere.

    quant_gemv(x, planes, qtype, n, k)            fused dequantize + GEMV (decode, few rows of x)
    quant_batched(x, planes, qtype, n, k)         fused dequantize + tensor-core matmul (2-64 rows)
    dequantize_planes(planes, qtype, n, k, ids=)  dense rows (prefill scratch, embedding lookup)
    quant_matmul(x, planes, qtype, n, k)          picks one of the three by the number of rows of x
    *_reference(...)                              the same functions in torch (float32), any device

Decode GEMVs round x to int8 per 32-element block by default (`GemvConfig.int8_x`, kernels in
`gemv_i8`): y is then the exact product of the dequantized weight with `int8_x_reference(x)`, about
5e-3 of ||y|| from the float32 product; `int8_x=False` keeps x in float (kernels in `gemv`).

The references go back to GGUF bytes (`formats.from_planes`) and use the dequantizers of
`worker_orcd.gguf.dequant`, which are bit-exact with gguf-py; the kernels are tested against them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType

from worker_orcd.gguf.dequant import dequantize as dequantize_gguf
from worker_orcd.kernels.quant.formats import Q, ceil_div, check_shape, from_planes

logger = logging.getLogger(__name__)

try:  # Triton is optional: without it (CPU-only installs) only the references run.
    import triton

    from worker_orcd.kernels.quant import batched as _bt
    from worker_orcd.kernels.quant import dequant as _dq
    from worker_orcd.kernels.quant import gemv as _gv
    from worker_orcd.kernels.quant import gemv_i8 as _gi
    from worker_orcd.kernels.triton import arrivals, pdl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAS_TRITON = False

# Activation rows up to which the fused GEMV is used; above it, dequantize + cuBLAS (measured
# crossover on H200: GEMV ahead at 2 rows, behind at 4 for Phi-3's largest weights).
GEMV_MAX_ROWS = 3
# Rows up to which the fused small-batch kernels (`batched`) are used; above it, dequantize +
# cuBLAS (prefill), whose dequantization is paid once for any number of rows.
BATCHED_MAX_ROWS = 64


@dataclass(frozen=True, slots=True)
class GemvConfig:
    block_n: int  # output rows per program
    tile: int  # blocks (32-element types), super-blocks (Q4_K/Q5_K) or halves (Q6_K) per step
    num_warps: int
    split_k: int = 1  # programs along K; > 1 adds float32 partials and a summing launch
    one_plus: bool = False  # float kernels, Q4_K/Q5_K: quants read as 1 + q / 2**bits
    int8_x: bool = True  # x rounded to int8 per 32 elements, dp4a kernels (`gemv_i8`); else float
    stages: int = 1  # int8 kernels: software-pipeline stages of the walk along K
    prequant: bool = False  # int8 kernels: x rounded once by its own launch, not in every program
    early: bool = False  # int8 kernels: the first step's weights read before the PDL wait


def gemv_config(qtype: GGMLQuantizationType, n: int, k: int, *, int8_x: bool = True) -> GemvConfig:
    """Launch shape, from the sweeps in benchmarks/quant_kernels.py (benchmarks/QUANT.md):
    int8-activation kernels. From 2048 rows on, K-quant weights read x rounded once by its own
    launch (`prequant`, H100 sweep): no K split, 2-8 rows and 0.5-2 KB of quants per row and step.
    Below 2048 rows (Q5_K), and for the 32-element types but Q8_0's tall output head, the extra
    launch costs more than it saves, so each program rounds x itself (H200 sweep): 4-8 rows, K
    split in four below 2048 rows, 16-32 blocks per step.
    Q4_K from 2048 rows (H100, repeated timings, +8.4% at one Phi-3 Q4_K_M stream): one warp of
    4 rows x 2 super-blocks from 16384 rows, else 2 rows x 16 super-blocks for K >= 8192 and
    for 2048-8191 rows (Phi-3's gate_up, down and o); Q5_K keeps the shapes it was swept at.
    Q4_K and Q6_K under 2048 rows (Qwen's down, whose x the SwiGLU kernel rounds): x rounded
    once, 2 rows a program, no K split, 4,096 weights a row and step (H100, repeated timings with x
    rounded by its producer: 5.0 -> 4.0 and 6.4 -> 4.7 us, +5% at one Qwen Q4_K_M stream).
    A split of K is rounded to whole tiles, so for K = 896 it collapses to none. `early` where
    a program walks few steps along K: under 2048 rows or columns (Qwen2.5-0.5B's every weight;
    H100, one Q4_K_M stream: Qwen +3.9% on top of the 129-256-key decode graph, and Phi-3 -2.5%
    with it on its 3072-8192 columns), but not for Q5_K, which Qwen's file lacks and no run has
    measured with it. With int8_x=False, the float kernels' own table."""
    if not int8_x:
        return _float_gemv_config(qtype, n, k)
    early = qtype != Q.Q5_K and (n < 2048 or k < 2048)
    return replace(_i8_gemv_config(qtype, n, k), early=early)


def _i8_gemv_config(qtype: GGMLQuantizationType, n: int, k: int) -> GemvConfig:
    if n < 2048 and qtype in (Q.Q4_K, Q.Q6_K):
        return GemvConfig(2, 16 if qtype == Q.Q4_K else 32, 4, prequant=True)
    if qtype in (Q.Q4_K, Q.Q5_K):
        q4 = qtype == Q.Q4_K
        if n < 2048:
            return GemvConfig(4, 4, 4, split_k=4)
        if k >= 8192:
            return GemvConfig(2, 16 if q4 else 8, 4, prequant=True)
        if n >= 16384:
            return GemvConfig(4, 2, 1 if q4 else 4, prequant=True)
        if n >= 8192:
            return GemvConfig(8, 4, 4, prequant=True)
        return GemvConfig(2, 16, 4, prequant=True) if q4 else GemvConfig(4, 8, 4, prequant=True)
    if qtype == Q.Q6_K:
        return (
            GemvConfig(4, 4, 4, prequant=True) if n >= 16384 else GemvConfig(2, 8, 4, prequant=True)
        )
    if qtype == Q.Q8_0:
        return GemvConfig(4, 16, 4, prequant=True) if n >= 32768 else GemvConfig(2, 32, 4)
    if n >= 8192:  # Q4_0, Q5_0
        return GemvConfig(8, 16, 4)
    return GemvConfig(4, 32, 4)


def _float_gemv_config(qtype: GGMLQuantizationType, n: int, k: int) -> GemvConfig:
    """Float kernels: wide steps along K (2-4 KB of quants per program and step), few rows per
    program for short matrices, more for tall ones, K split over 2-3 programs where few rows meet
    a long K (H200 sweep of 2026-11-26)."""
    if qtype in (Q.Q4_K, Q.Q5_K):
        if n >= 16384:
            return GemvConfig(16, 4, 4, one_plus=True, int8_x=False)
        if n < 2048:
            return GemvConfig(2, 4, 4, split_k=4, one_plus=True, int8_x=False)
        if k >= 8192:
            return GemvConfig(8, 4, 4, split_k=2, one_plus=True, int8_x=False)
        return GemvConfig(4 if n < 4096 else 8, 4, 4, one_plus=True, int8_x=False)
    if qtype == Q.Q6_K:
        if n < 2048:
            return GemvConfig(4, 8, 4, split_k=4, int8_x=False)
        return GemvConfig(8 if n >= 16384 else 4, 8, 4, int8_x=False)
    if qtype == Q.Q8_0:
        if n >= 32768:
            return GemvConfig(32, 4, 4, int8_x=False)
        return GemvConfig(2, 32, 4, int8_x=False)
    if n < 2048:  # Q4_0, Q5_0
        return GemvConfig(2, 32, 4, int8_x=False)
    return GemvConfig(8 if n >= 8192 else 4, 32, 4, int8_x=False)


# The K-quants, whose small-batch kernels take a whole super-block a step and, on bf16 x, make
# their weights a word of quants at a time (PACKED; in bf16 pairs with `BatchedConfig.pairs`)
PACKED_TYPES = (Q.Q4_K, Q.Q5_K, Q.Q6_K)


@dataclass(frozen=True, slots=True)
class BatchedConfig:
    """Launch shape of the small-batch kernels (`batched`)."""

    block_n: int  # output rows per program (the MMA's M): 16, 32, 64 or 128
    block_b: int  # rows of x per program (the MMA's N), rows past M masked: 16, 32 or 64
    num_warps: int = 4
    split_k: int = 1  # programs along K; > 1 adds float32 partials, summed by the last
    tiles: int = 4  # [block_n, 32] weight tiles per unrolled step along K
    stages: int = 2  # software-pipeline stages of the walk along K
    # K-quants on bf16 x: weights made two at a time in bf16 (`batched`'s PAIRS; Q4_K/Q5_K's
    # scale and min rounded to bf16 first) instead of in float32 and rounded
    pairs: bool = False

    def check(self, qtype: GGMLQuantizationType) -> None:
        if self.block_n not in (16, 32, 64, 128) or self.block_b not in (16, 32, 64):
            raise ValueError(f"{self}: block_n must be 16-128 and block_b 16-64, powers of two")
        if min(self.num_warps, self.split_k, self.tiles, self.stages) < 1:
            raise ValueError(f"{self}: warps, split_k, tiles and stages must be positive")
        # a K-quant step is 64-element chunks of one super-block (Q4_K/Q5_K), or one or two
        # halves of 128 (Q6_K)
        allowed = {Q.Q4_K: (2, 4, 8), Q.Q5_K: (2, 4, 8), Q.Q6_K: (4, 8)}.get(qtype)
        if allowed and self.tiles not in allowed:
            raise ValueError(f"{self}: {qtype.name} steps are {allowed} tiles of 32")


# Programs (along N, x's rows and K) up to which the default splits K: the H100 sweeps of the
# Phi-3 Q4_K_M weights (QUANT.md) ran fastest with 2-5 programs per SM at 32 and 64 rows, and
# with 7-9 at up to 16 rows, where a K-quant split may also be as short as one step.
_BATCHED_PROGRAMS = 600
_BATCHED_PROGRAMS_FEW = 1200


def batched_config(qtype: GGMLQuantizationType, n: int, k: int, m: int) -> BatchedConfig:
    """Launch shape of the small-batch kernels for x [m, k] and an [n, k] weight, from the H100
    sweeps (`benchmarks/quant_kernels.py --batched --tune`, QUANT.md): all of x in one program up
    to 64 rows (each weight tile is then read once), 64 output rows per program from 2048 rows
    (32 on Qwen's short weights), and K split in up to 4 (K-quants: 8) while the programs stay
    within _BATCHED_PROGRAMS (_BATCHED_PROGRAMS_FEW up to 16 rows) and each split keeps at least
    two steps (K-quants up to 16 rows: one). K-quants take 8 tiles of 32 a step, a whole
    super-block. The walk along K is latency-bound at few rows: at 8 rows, splitting up to about
    eight programs an SM took 12-28% off Phi-3's qkv, gate_up and output head (second sweep of
    2026-12-06)."""
    block_b = 16 if m <= 16 else 32 if m <= 32 else 64
    block_n = 64 if n >= 2048 else 32
    programs = ceil_div(n, block_n) * ceil_div(m, block_b)
    units = k // 32
    k_quant = qtype in PACKED_TYPES
    tiles, most = (8, 8) if k_quant else (4, 4)
    few = block_b == 16
    cap = _BATCHED_PROGRAMS_FEW if few else _BATCHED_PROGRAMS
    steps = 1 if few and k_quant else 2  # the fewest steps a split may keep
    split = 1
    while split < most and programs * split * 2 <= cap and units >= steps * tiles * split * 2:
        split *= 2
    return BatchedConfig(block_n, block_b, split_k=split, tiles=tiles, pairs=pairs_default())


# Not on by default until a GPU run has compared it: `WORKER_ORCD_QUANT_PAIRS=1` turns it on for
# the default configs, for before/after measurements of whole models.
PAIRS_ENV = "WORKER_ORCD_QUANT_PAIRS"


def pairs_default() -> bool:
    """Whether the default small-batch configs make K-quant weights in bf16 pairs."""
    value = os.environ.get(PAIRS_ENV, "0")
    if value not in ("0", "1"):
        raise ValueError(f"{PAIRS_ENV} must be 0 or 1, got {value!r}")
    return value == "1"


class RoundedX(NamedTuple):
    """x [M, K] rounded to int8 per 32-element block as the int8 GEMVs round it (`quantize_x`)."""

    words: torch.Tensor  # int32 [M, K / 4]: xq bytes, byte i of word t of a block = element 4t + i
    dx: torch.Tensor  # float32 [M, K / 32]: the step of each block
    sums: torch.Tensor  # float32 [M, K / 16]: sum of xq over each 16 elements

    @staticmethod
    def empty(m: int, k: int, device: torch.device) -> RoundedX:
        _check_blocks(k)
        return RoundedX(
            torch.empty((m, k // 4), dtype=torch.int32, device=device),
            torch.empty((m, k // 32), dtype=torch.float32, device=device),
            torch.empty((m, k // 16), dtype=torch.float32, device=device),
        )

    def check(self, m: int, k: int) -> None:
        """That these are buffers a kernel can write x [m, k] rounded into."""
        _check_blocks(k)
        shapes = ((m, k // 4), (m, k // 32), (m, k // 16))
        for t, shape in zip(self, shapes, strict=True):
            if t.shape != shape or not t.is_contiguous():
                raise ValueError(f"rounded x [{m}, {k}] needs contiguous {shape}, got {t.shape}")


class NormIn(NamedTuple):
    """The input of a GEMV given as rms_norm(x + residual) * weight, which its programs compute
    from x and the residual (`fuses_norm`), rounded as the add_rms_norm kernel rounds."""

    residual: torch.Tensor | None  # [M, K], or None (no add)
    weight: torch.Tensor  # [K], the norm's
    eps: float
    summed: torch.Tensor | None  # [M, K]: x + residual is written here (by one launch of several)


# Longest row a GEMV normalizes itself: every program reads and reduces the whole row.
NORM_MAX_K = 1024


def fuses_norm(qtype: GGMLQuantizationType, n: int, k: int, m: int, device: torch.device) -> bool:
    """Whether `quant_matmul` of m rows can take its input as a `NormIn`: a GEMV that rounds x
    itself (the 32-element types below 2048 rows or so: Qwen's 896-wide weights) over rows
    short enough for every program to reduce."""
    return (
        device.type == "cuda" and HAS_TRITON and m <= GEMV_MAX_ROWS
        and _normalizes(qtype, k, gemv_config(qtype, n, k))
    )  # fmt: skip


def _normalizes(qtype: GGMLQuantizationType, k: int, cfg: GemvConfig) -> bool:
    """Whether the GEMV launched with `cfg` can normalize its input: a 32-element type whose
    kernel rounds x itself, over a row short enough for every program to reduce."""
    return qtype in (Q.Q4_0, Q.Q5_0, Q.Q8_0) and k <= NORM_MAX_K and cfg.int8_x and not cfg.prequant


def takes_rounded_x(
    qtype: GGMLQuantizationType, n: int, k: int, m: int, device: torch.device
) -> bool:
    """Whether `quant_matmul` of m rows reads x rounded once (a `RoundedX`) for this weight."""
    return (
        device.type == "cuda" and HAS_TRITON and m <= GEMV_MAX_ROWS
        and gemv_config(qtype, n, k).prequant
    )  # fmt: skip


def _check_blocks(k: int) -> None:
    if k % 32:
        raise ValueError(f"x is rounded per 32 elements; rows of {k} are not whole blocks")


# Weights per K unit of each GEMV kernel (its tile counts these units).
_UNIT = {Q.Q8_0: 32, Q.Q4_0: 32, Q.Q5_0: 32, Q.Q4_K: 256, Q.Q5_K: 256, Q.Q6_K: 128}
# ... and of each small-batch kernel (Q4_K/Q5_K: chunks of two sub-blocks, Q6_K: halves of a
# super-block, the others: blocks)
_UNIT_BATCHED = {Q.Q8_0: 32, Q.Q4_0: 32, Q.Q5_0: 32, Q.Q4_K: 64, Q.Q5_K: 64, Q.Q6_K: 128}


def _kernel_args_i8(
    planes: dict[str, torch.Tensor], qtype: GGMLQuantizationType
) -> tuple[object, list[torch.Tensor], dict[str, object], str]:
    """Like _kernel_args, for the int8-activation kernels: quant planes, and the per-row scale
    planes where they can be, viewed as int32 words (`words`)."""
    p = {name: t for name, t in planes.items()}
    for name in ("qs", "ql", "scales", "dm") + (("qh",) if qtype != Q.Q5_0 else ()):
        if name in p:
            p[name] = p[name].view(torch.int32)
    d, d_flags = _d_words(p.get("d"))
    if qtype == Q.Q8_0:
        return _gi.gemv_q8_0_i8_kernel, [d, p["qs"]], d_flags, "BLOCKS"
    if qtype == Q.Q4_0:
        return _gi._gemv_q4_q5_0_i8, [d, d, p["qs"]], {"HAS_QH": False, **d_flags}, "BLOCKS"
    if qtype == Q.Q5_0:
        return _gi._gemv_q4_q5_0_i8, [d, p["qh"], p["qs"]], {"HAS_QH": True, **d_flags}, "BLOCKS"
    if qtype in (Q.Q4_K, Q.Q5_K):
        has_qh = qtype == Q.Q5_K
        args = [p["dm"], p["scales"], p["qh"] if has_qh else p["qs"], p["qs"]]
        return _gi._gemv_q4_q5_k_i8, args, {"HAS_QH": has_qh}, "SUPER"
    if qtype == Q.Q6_K:
        args = [d, p["scales"], p["qh"], p["ql"]]
        return _gi.gemv_q6_k_i8_kernel, args, d_flags, "HALVES"
    raise ValueError(f"no quantized kernel for {qtype.name}")


def _d_words(d: torch.Tensor | None) -> tuple[torch.Tensor | None, dict[str, object]]:
    """An f16 scale plane as int32 words where it can be (contiguous, an even count), with the
    kernels' D_WORDS flag; the words are read by `words.f16_at`."""
    if d is None:
        return None, {}
    words = d.is_contiguous() and d.numel() % 2 == 0
    return (d.reshape(-1).view(torch.int32) if words else d), {"D_WORDS": words}


def _i8_warps(qtype: GGMLQuantizationType, cfg: GemvConfig) -> int:
    """cfg.num_warps, halved until the step's x tile has an element per thread and its quant
    tile four words: on an H200, 8 warps over a 1-super-block Q4_K tile ([32, 4, 8] words, x
    [4, 32]) gave a wrong row once in two runs, an intermittent error we did not see at any
    config with whole tiles per thread (suspected: a layout conversion through shared memory)."""
    if qtype in (Q.Q4_K, Q.Q5_K):
        x_elems, q_words = 128 * cfg.tile, 32 * cfg.tile * cfg.block_n
    elif qtype == Q.Q6_K:
        x_elems, q_words = 32 * cfg.tile, 8 * cfg.tile * cfg.block_n
    else:
        words = 8 if qtype == Q.Q8_0 else 4
        x_elems, q_words = 32 * cfg.tile, words * cfg.tile * cfg.block_n
    warps = cfg.num_warps
    while warps > 1 and 32 * warps > min(x_elems, q_words // 4):
        warps //= 2
    return warps


def _kernel_args(
    planes: dict[str, torch.Tensor], qtype: GGMLQuantizationType
) -> tuple[object, list[torch.Tensor], dict[str, object], str]:
    """(gemv kernel, plane args, constexpr flags, name of the tile constexpr) for `qtype`."""
    p = planes
    if qtype == Q.Q8_0:
        return _gv.gemv_q8_0_kernel, [p["d"], p["qs"]], {}, "BLOCKS"
    if qtype == Q.Q4_0:
        return _gv._gemv_q4_q5_0, [p["d"], p["d"], p["qs"]], {"HAS_QH": False}, "BLOCKS"
    if qtype == Q.Q5_0:
        return _gv._gemv_q4_q5_0, [p["d"], p["qh"], p["qs"]], {"HAS_QH": True}, "BLOCKS"
    if qtype == Q.Q4_K:
        args = [p["dm"], p["scales"], p["qs"], p["qs"]]
        return _gv._gemv_q4_q5_k, args, {"HAS_QH": False}, "SUPER"
    if qtype == Q.Q5_K:
        args = [p["dm"], p["scales"], p["qh"], p["qs"]]
        return _gv._gemv_q4_q5_k, args, {"HAS_QH": True}, "SUPER"
    if qtype == Q.Q6_K:
        return _gv.gemv_q6_k_kernel, [p["d"], p["scales"], p["qh"], p["ql"]], {}, "HALVES"
    raise ValueError(f"no quantized kernel for {qtype.name}")


def _dequant_args(
    planes: dict[str, torch.Tensor], qtype: GGMLQuantizationType
) -> tuple[object, list[torch.Tensor], dict[str, object], str, int]:
    """(kernel, plane args, flags, tile constexpr name, weights per tile unit)."""
    p = planes
    if qtype == Q.Q8_0:
        return _dq.dequant_q8_0_kernel, [p["d"], p["qs"]], {}, "BLOCKS", 32
    if qtype == Q.Q4_0:
        return _dq._dequant_q4_q5_0, [p["d"], p["d"], p["qs"]], {"HAS_QH": False}, "BLOCKS", 32
    if qtype == Q.Q5_0:
        return _dq._dequant_q4_q5_0, [p["d"], p["qh"], p["qs"]], {"HAS_QH": True}, "BLOCKS", 32
    if qtype == Q.Q4_K:
        args = [p["dm"], p["scales"], p["qs"], p["qs"]]
        return _dq._dequant_q4_q5_k, args, {"HAS_QH": False}, "SUPER", 256
    if qtype == Q.Q5_K:
        args = [p["dm"], p["scales"], p["qh"], p["qs"]]
        return _dq._dequant_q4_q5_k, args, {"HAS_QH": True}, "SUPER", 256
    if qtype == Q.Q6_K:
        args = [p["d"], p["scales"], p["qh"], p["ql"]]
        return _dq.dequant_q6_k_kernel, args, {}, "HALVES", 128
    raise ValueError(f"no quantized kernel for {qtype.name}")


def _check_x(x: torch.Tensor, k: int) -> None:
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"expected activations [M, {k}], got {tuple(x.shape)}")


def quant_gemv(
    x: torch.Tensor,
    planes: dict[str, torch.Tensor],
    qtype: GGMLQuantizationType,
    n: int,
    k: int,
    *,
    out: torch.Tensor | None = None,
    config: GemvConfig | None = None,
    rounded: RoundedX | None = None,
    norm: NormIn | None = None,
) -> torch.Tensor:
    """y = x W^T with W [n, k] in planes; x [M, k] (M small); out [M, n] may be a column slice.
    `rounded`: x already rounded (by the kernel that produced it), used where the config reads
    x rounded once. `norm`: the input is rms_norm(x + residual) * weight, computed here (where
    `fuses_norm`)."""
    check_shape(qtype, n, k)
    _check_x(x, k)
    if x.stride(1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.stride(1) != 1:
        raise ValueError(f"out must be [{m}, {n}] with unit column stride, got {tuple(out.shape)}")
    cfg = config or gemv_config(qtype, n, k)
    warps = cfg.num_warps
    if cfg.int8_x:
        kernel, args, flags, tile_name = _kernel_args_i8(planes, qtype)
        flags["ASM"] = _gi.asm_dp4a(x.device.type)
        flags["STAGES"] = cfg.stages
        flags["PREQ"] = cfg.prequant
        flags["EARLY"] = cfg.early
        warps = _i8_warps(qtype, cfg)
        if cfg.prequant:
            x, xdx, xsum = rounded if rounded is not None else quantize_x(x)
            args = [xdx, xsum, *args]
        else:
            args = [x, x, *args]
    else:
        kernel, args, flags, tile_name = _kernel_args(planes, qtype)
        if qtype in (Q.Q4_K, Q.Q5_K):
            flags["ONE_PLUS"] = cfg.one_plus
    norm_args = {}
    if norm is not None:
        if not _normalizes(qtype, k, cfg):
            raise ValueError(f"a {qtype.name} GEMV [{n}, {k}] does not take its input normalized")
        r = norm.residual
        if r is not None and (r.shape != x.shape or r.stride(1) != 1):
            raise ValueError(f"residual must be {tuple(x.shape)} with unit column stride")
        s = norm.summed
        if s is not None and (r is None or s.shape != x.shape or not s.is_contiguous()):
            raise ValueError("x + residual needs a residual and a contiguous [M, K] output")
        norm_args = dict(
            r_ptr=r if r is not None else x, g_ptr=norm.weight, s_ptr=s if s is not None else x,
            stride_rm=r.stride(0) if r is not None else 0, eps=norm.eps, NORM=True,
            HAS_RESIDUAL=r is not None, WRITE_SUM=s is not None,
            NORM_BLOCK=triton.next_power_of_2(k),
        )  # fmt: skip
    flags.update(pdl.launch(x))
    units = k // _UNIT[qtype]
    per, split = arrivals.split_len(units, cfg.split_k, cfg.tile)
    grid = (m * triton.cdiv(n, cfg.block_n), split)
    if split == 1:
        kernel[grid](
            x, *args, out, m, n, k, x.stride(0), out.stride(0), 0, per,
            BLOCK_N=cfg.block_n, num_warps=warps, **flags, **{tile_name: cfg.tile}, **norm_args,
        )  # fmt: skip
        return out
    ws = torch.empty((split, m, n), dtype=torch.float32, device=x.device)  # [S, M, N] partials
    kernel[grid](
        x, *args, ws, m, n, k, x.stride(0), n, m * n, per,
        BLOCK_N=cfg.block_n, num_warps=warps, **flags, **{tile_name: cfg.tile}, **norm_args,
    )  # fmt: skip
    block = 1024
    _gv.splitk_sum_kernel[(triton.cdiv(m * n, block),)](
        ws, out, m, n, out.stride(0), SPLIT=split, BLOCK=block, num_warps=4, **pdl.launch(out)
    )
    return out


def _batched_args(
    planes: dict[str, torch.Tensor], qtype: GGMLQuantizationType
) -> tuple[object, list[torch.Tensor], dict[str, object]]:
    """(small-batch kernel, plane args, constexpr flags) for `qtype`. Per-row scale planes go as
    int32 words where they can, so the kernels' pipeline prefetches them (`words`)."""
    p = planes
    d, d_flags = _d_words(p.get("d"))
    if qtype == Q.Q8_0:
        return _bt.mm_q8_0_kernel, [d, p["qs"].view(torch.uint8)], d_flags
    if qtype == Q.Q4_0:
        return _bt._mm_q4_q5_0, [d, d, p["qs"]], {"HAS_QH": False, **d_flags}
    if qtype == Q.Q5_0:
        return _bt._mm_q4_q5_0, [d, p["qh"], p["qs"]], {"HAS_QH": True, **d_flags}
    if qtype in (Q.Q4_K, Q.Q5_K):
        has_qh = qtype == Q.Q5_K
        sc = p["scales"].view(torch.int32)
        args = [p["dm"].view(torch.int32), sc, p["qh"] if has_qh else p["qs"], p["qs"]]
        return _bt._mm_q4_q5_k, args, {"HAS_QH": has_qh}
    if qtype == Q.Q6_K:
        args = [d, p["scales"].view(torch.int32), p["qh"], p["ql"]]
        return _bt.mm_q6_k_kernel, args, d_flags
    raise ValueError(f"no quantized kernel for {qtype.name}")


def quant_batched(
    x: torch.Tensor,
    planes: dict[str, torch.Tensor],
    qtype: GGMLQuantizationType,
    n: int,
    k: int,
    *,
    out: torch.Tensor | None = None,
    config: BatchedConfig | None = None,
) -> torch.Tensor:
    """y = x W^T with W [n, k] in planes, x [M, k] (a few to 64 rows: one read of the weight per
    `block_b` rows), dequantized tile by tile into tensor-core products; out [M, n] may be a
    column slice. Launches a fixed set of kernels for a given M (capturable in a CUDA graph)."""
    check_shape(qtype, n, k)
    _check_x(x, k)
    if x.stride(1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    elif out.shape != (m, n) or out.stride(1) != 1:
        raise ValueError(f"out must be [{m}, {n}] with unit column stride, got {tuple(out.shape)}")
    if m == 0:
        return out
    cfg = config or batched_config(qtype, n, k, m)
    cfg.check(qtype)
    kernel, args, flags = _batched_args(planes, qtype)
    step = cfg.tiles // (_UNIT_BATCHED[qtype] // 32)  # units per step
    flags["STEP"] = step
    # float32 x in IEEE float32; Triton's interpreter (CPU tensors) cannot multiply bf16 operands
    flags["F32_DOT"] = x.dtype == torch.float32 or x.device.type != "cuda"
    if qtype in PACKED_TYPES:  # bf16 x: weights made a word of quants at a time
        flags["PACKED"] = x.dtype == torch.bfloat16
        flags["ASM"] = x.device.type == "cuda"
        flags["PAIRS"] = cfg.pairs
    flags.update(pdl.launch(x, m))
    units = k // _UNIT_BATCHED[qtype]
    per, split = arrivals.split_len(units, cfg.split_k, step)
    grid = (triton.cdiv(n, cfg.block_n) * triton.cdiv(m, cfg.block_b), split)
    launch = dict(
        BLOCK_N=cfg.block_n, BLOCK_B=cfg.block_b, STAGES=cfg.stages, num_warps=cfg.num_warps,
        SPLITS=split, **flags,
    )  # fmt: skip
    ws, lock = arrivals.partials(out, split, grid[0])  # a counter per output tile
    kernel[grid](x, *args, out, ws, lock, m, n, k, x.stride(0), out.stride(0), per, **launch)
    return out


def quantize_x(x: torch.Tensor) -> RoundedX:
    """x [M, K] (K % 32 == 0) rounded to int8 per 32-element block as the int8 GEMV kernels round
    it, by one launch."""
    m, k = x.shape
    if x.stride(1) != 1:
        raise ValueError(f"expected unit-stride rows, got strides {x.stride()}")
    r = RoundedX.empty(m, k, x.device)
    blocks = 8
    _gi.quantize_x_kernel[(m, triton.cdiv(k // 32, blocks))](
        x, *r, k, x.stride(0), BLOCKS=blocks, ASM=_gi.asm_dp4a(x.device.type), num_warps=2,
        **pdl.launch(x, m),
    )  # fmt: skip
    return r


def dequantize_planes(
    planes: dict[str, torch.Tensor],
    qtype: GGMLQuantizationType,
    n: int,
    k: int,
    *,
    ids: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Dense weight rows: all n rows, or rows `ids` (int tensor [R]); out [R, k] may be a slice."""
    check_shape(qtype, n, k)
    r = n if ids is None else ids.numel()
    device = next(iter(planes.values())).device
    if out is None:
        out = torch.empty((r, k), dtype=dtype, device=device)
    elif out.shape != (r, k) or out.stride(1) != 1:
        raise ValueError(f"out must be [{r}, {k}] with unit column stride, got {tuple(out.shape)}")
    if r == 0:
        return out
    kernel, args, flags, tile_name, unit = _dequant_args(planes, qtype)
    block_r, tile = (8, max(1, 512 // unit))
    ids_arg = ids.reshape(-1) if ids is not None else out
    grid = (triton.cdiv(r, block_r), triton.cdiv(k // unit, tile))
    kernel[grid](
        ids_arg, *args, out, r, k, out.stride(0),
        HAS_IDS=ids is not None, BLOCK_R=block_r, num_warps=4, **flags, **{tile_name: tile},
        **pdl.launch(out),
    )  # fmt: skip
    return out


class Scratch:
    """One growing buffer per device and dtype for prefill's dequantized weight (one at a time)."""

    def __init__(self) -> None:
        self._buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}

    def get(self, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = shape[0] * shape[1]
        key = (device, dtype)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buf
            logger.debug("quant scratch on %s grown to %d %s", device, numel, dtype)
        return buf[:numel].view(shape)


SCRATCH = Scratch()


def matmul_path(m: int, device: torch.device) -> str:
    """Which kernel `quant_matmul` runs for m rows of x on `device`: "gemv", "batched" (fused
    small-batch), "dense" (dequantize + cuBLAS), or "reference" (torch, off CUDA or without
    Triton)."""
    if device.type != "cuda" or not HAS_TRITON:
        return "reference"
    if m <= GEMV_MAX_ROWS:
        return "gemv"
    return "batched" if m <= BATCHED_MAX_ROWS else "dense"


def quant_matmul(
    x: torch.Tensor,
    planes: dict[str, torch.Tensor],
    qtype: GGMLQuantizationType,
    n: int,
    k: int,
    *,
    out: torch.Tensor | None = None,
    rounded: RoundedX | None = None,
    norm: NormIn | None = None,
) -> torch.Tensor:
    """y = x W^T for x [M, k]: fused GEMV for M <= GEMV_MAX_ROWS, the fused small-batch kernel
    up to BATCHED_MAX_ROWS, else dequantize + cuBLAS (`matmul_path`). `rounded`: x rounded by
    its producer, for the GEMVs that read it (`takes_rounded_x`); `norm`: the input normalized
    by the GEMV (only where `fuses_norm`)."""
    _check_x(x, k)
    path = matmul_path(x.shape[0], x.device)
    if norm is not None:
        if path != "gemv":
            raise ValueError(f"only the GEMV of up to {GEMV_MAX_ROWS} rows normalizes its input")
        return quant_gemv(x, planes, qtype, n, k, out=out, norm=norm)
    if path == "reference":
        y = quant_matmul_reference(x, planes, qtype, n, k).to(x.dtype)
        if out is None:
            return y
        out.copy_(y)
        return out
    if path == "gemv":
        return quant_gemv(x, planes, qtype, n, k, out=out, rounded=rounded)
    if path == "batched":
        return quant_batched(x, planes, qtype, n, k, out=out)
    w = dequantize_planes(planes, qtype, n, k, out=SCRATCH.get((n, k), x.dtype, x.device))
    if out is None:
        return F.linear(x, w)
    if out.is_contiguous():
        return torch.matmul(x, w.t(), out=out)
    return out.copy_(F.linear(x, w))


# -- references -----------------------------------------------------------------------------------


def dequantize_reference(
    planes: dict[str, torch.Tensor],
    qtype: GGMLQuantizationType,
    n: int,
    k: int,
    *,
    ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """float32 [n, k] (or [len(ids), k]) through the GGUF bytes and the gguf-exact dequantizers."""
    raw = from_planes(planes, qtype, n, k)
    if ids is not None:
        raw = raw[ids.reshape(-1).long()]
    return dequantize_gguf(raw.reshape(-1), qtype, (raw.shape[0], k))


def _rounded_blocks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(xq float32 [M, K / 32, 32] in -127..127, dx float32 [M, K / 32]): x rounded per 32-element
    block as the int8 kernels round it."""
    xb = x.float().reshape(x.shape[0], -1, 32)
    amax = xb.abs().amax(dim=-1, keepdim=True)
    # a float32 quotient rounded once, as the kernels (tensor / tensor: `127.0 / t` would be
    # t.reciprocal() * 127, two roundings); the product exact in float64
    inv = torch.full_like(amax, 127.0) / amax.clamp_min(1e-30)
    xq = torch.round(xb.double() * inv.double()).float()
    return xq, (amax * (1.0 / 127.0)).squeeze(-1)


def int8_x_reference(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] as the int8 GEMV kernels see it, in float32: rounded per 32-element block to
    dx * round(x * (127 / max|x|)), dx = max|x| / 127 (round half to even, as the kernels)."""
    xq, dx = _rounded_blocks(x)
    return (xq * dx[..., None]).reshape(x.shape)


def round_x_reference(x: torch.Tensor, out: RoundedX | None = None) -> RoundedX:
    """`quantize_x` in torch (any device): x [M, K] rounded into a RoundedX (`out` if given)."""
    m, k = x.shape
    xq, dx = _rounded_blocks(x)
    b = xq.to(torch.int64).reshape(m, k // 4, 4) & 255
    words = (b << torch.tensor([0, 8, 16, 24], device=x.device)).sum(-1)
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    r = RoundedX(words, dx.reshape(m, -1), xq.reshape(m, k // 16, 16).sum(-1))
    if out is None:
        return r
    for dst, src in zip(out, r, strict=True):
        dst.copy_(src)
    return out


def quant_matmul_reference(
    x: torch.Tensor, planes: dict[str, torch.Tensor], qtype: GGMLQuantizationType, n: int, k: int
) -> torch.Tensor:
    """float32 x W^T with W dequantized in float32."""
    _check_x(x, k)
    return x.float() @ dequantize_reference(planes, qtype, n, k).t()


def quant_matmul_fused_q4_k(
    x: torch.Tensor,
    planes: dict[str, torch.Tensor],
    n: int,
    k: int,
    *,
    block_m: int = 128,
    block_n: int = 128,
    num_warps: int = 8,
    num_stages: int = 3,
) -> torch.Tensor:
    """Prefill alternative for Q4_K: dequantize tiles inside a Triton matmul (no scratch buffer)."""
    check_shape(Q.Q4_K, n, k)
    _check_x(x, k)
    x = x.contiguous()
    m = x.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    _dq.matmul_q4_k_kernel[grid](
        x, planes["dm"], planes["scales"], planes["qs"], out, m, n, k, x.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, GROUP_M=8, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out
