"""Quantized matmul on the CPU over GGUF blocks as the file stores them, and its torch twin.

    linear(x, parts, out, bias=)   out[:, col:col + n] = x @ W^T (+ bias) for each (W, col) part
    round_x(x)                     x rounded to int8 per 32 elements, as the int8 path rounds it
    dequantize(part, k, dtype)     weight rows as the bf16 (bfloat16) and bf16-f32 (float32)
                                   paths make them
    linear_reference(x, parts)     the int8 path's product in torch (float64), through
                                   gguf-py-exact dequantization and `int8_x_reference`

`linear` runs the compiled extension `_qcpu` (csrc/) on `torch.get_num_threads()` threads (the
extension's own pool), by one of two paths:
- int8 (decode, few rows of x; every CPU): x is rounded once per call to int8 per 32-element
  block (the rounding of `kernels.quant.ops.int8_x_reference`), each weight block is dotted with it
  in integers (AVX-512 VNNI, AVX2 or portable C, picked at run time) and scaled in float32. y is the
  product of the exactly dequantized weight with int8-rounded x, up to float32 summation: about
  5e-3 of ||y|| from the float32 product of x itself.
- bf16 (prompts, from BF16_MIN_ROWS rows of x, where the CPU has AMX): the weight is dequantized a
  slice of rows at a time into a bfloat16 scratch (gguf-py's values, rounded to nearest even) and
  multiplied by x in bfloat16 by torch (oneDNN's AMX kernels, float32 accumulation, a bfloat16
  result): about 2e-3 of ||y||, and ~10x the int8 kernels' speed on a prompt.
- bf16-f32 (the same rows, for logits): the slices are dequantized to float32 and oneDNN multiplies
  float32 x by them with bfloat16 arithmetic (its fp32_precision "bf16" mode), so the result stays
  float32: a bfloat16 result would round logits near 20 to steps of 0.125 and make ties.
Without the extension (it failed to build) `linear` computes the float32 product instead,
dequantizing the weight on every call, after a logged warning.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Sequence
from typing import NamedTuple

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from worker_orcd.gguf.dequant import dequantize as dequantize_gguf
from worker_orcd.kernels.quant.ops import int8_x_reference

logger = logging.getLogger(__name__)

Q = GGMLQuantizationType
SUPPORTED: tuple[GGMLQuantizationType, ...] = (Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K)
ISAS = ("scalar", "avx2", "avx512")  # levels of the extension's kernels, in order

try:  # by its full name: the error then says what is missing
    _qcpu = importlib.import_module("worker_orcd.kernels.cpu._qcpu")
except ImportError as e:  # pragma: no cover - depends on the build
    _qcpu = None
    _IMPORT_ERROR: str | None = str(e)
else:
    _IMPORT_ERROR = None

_warned = False

# x rows from which `linear` takes the bf16 path on an AMX CPU (measured crossover with the int8
# kernels: 16-32 rows for Qwen2.5-0.5B's gate/up on one 2-core Sapphire Rapids class machine).
BF16_MIN_ROWS = 32
_BF16_CHUNK = 1 << 24  # weight elements per scratch slice (32 MB of bfloat16, 64 MB of float32)
_scratch: dict[torch.dtype, torch.Tensor] = {}
PATHS = ("int8", "bf16", "bf16-f32")
_amx: bool | None = None


class Part(NamedTuple):
    """One weight of a packed projection: GGUF bytes [n, row_bytes] of `qtype`, whose outputs go
    to columns col .. col + n - 1."""

    qtype: GGMLQuantizationType
    blocks: torch.Tensor
    col: int


def available() -> bool:
    """Whether the compiled kernels are importable (else `linear` falls back to torch)."""
    return _qcpu is not None


def isas() -> list[str]:
    """ISA levels the kernels run at on this CPU, best last ([] without the extension)."""
    return list(_qcpu.isas()) if _qcpu is not None else []


def _isa_level(isa: str | None) -> int:
    """0 (best available) or the 1-based level of `isa`; WORKER_ORCD_CPU_ISA sets the default."""
    name = isa or os.environ.get("WORKER_ORCD_CPU_ISA") or None
    if name is None:
        return 0
    if name not in ISAS:
        raise ValueError(f"unknown CPU ISA level {name!r}; use one of {', '.join(ISAS)}")
    return ISAS.index(name) + 1


_DEFAULT_ISA = _isa_level(None)


def bf16_path_available() -> bool:
    """Whether prompts take the bf16 path: the extension is built and torch's bfloat16 matmul
    runs on AMX tiles here (elsewhere it is no faster than the int8 kernels)."""
    global _amx
    if _amx is None:
        is_amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
        _amx = bool(_qcpu is not None and is_amx is not None and is_amx() and "avx512" in isas())
    return _amx


def warn_if_unavailable() -> None:
    """Log once that quantized CPU matmuls fall back to torch (the extension did not build)."""
    global _warned
    if _qcpu is None and not _warned:
        _warned = True
        logger.warning(
            "CPU quantized kernels unavailable (%s): quantized weights are dequantized on every "
            "matmul; rebuild with `pip install -e .` (needs gcc and the Python headers)",
            _IMPORT_ERROR,
        )


def row_bytes(qtype: GGMLQuantizationType, k: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    return k // block * size


def check_part(part: Part, k: int) -> int:
    """Rows of `part`, after checking that its bytes are a [n, row_bytes] uint8 matrix of rows of
    k elements."""
    if part.qtype not in SUPPORTED:
        raise ValueError(f"no CPU quantized kernel for {part.qtype.name}")
    block, _ = GGML_QUANT_SIZES[part.qtype]
    b = part.blocks
    shape_ok = b.dim() == 2 and b.shape[1] == row_bytes(part.qtype, k)
    if k % block or b.dtype != torch.uint8 or not shape_ok:
        raise ValueError(
            f"{part.qtype.name} weight with rows of {k} needs uint8 [n, {k // block} blocks], "
            f"got {b.dtype} {tuple(b.shape)}"
        )
    if b.device.type != "cpu" or b.stride(1) != 1 or b.stride(0) != b.shape[1]:
        raise ValueError("weight blocks must be a contiguous CPU tensor")
    return b.shape[0]


def kernel_specs(
    parts: Sequence[Part], k: int, n_out: int
) -> tuple[tuple[int, int, int, int, int], ...]:
    """The extension's (qtype, address, rows, row_bytes, col) of each part, after checking that
    they fit rows of k inputs and n_out output columns."""
    specs = []
    for p in parts:
        n = check_part(p, k)
        if p.col < 0 or p.col + n > n_out:
            raise ValueError(f"part columns {p.col}..{p.col + n} outside out [M, {n_out}]")
        specs.append((int(p.qtype), p.blocks.data_ptr(), n, p.blocks.shape[1], p.col))
    return tuple(specs)


def linear_specs(
    x: torch.Tensor,
    parts: Sequence[Part],
    specs: tuple[tuple[int, int, int, int, int], ...],
    out: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    float32_out: bool = False,
) -> torch.Tensor:
    """`linear` for parts already checked into `specs` (kernel_specs, of a contiguous out whose
    width they were checked against) and float32 rows x: no checks but the cheap ones.
    `float32_out`: a prompt takes the bf16-f32 path rather than bf16."""
    m = x.shape[0]
    if _qcpu is None or m == 0 or (m >= BF16_MIN_ROWS and bf16_path_available()):
        return linear(x, parts, out, bias=bias, path="bf16-f32" if float32_out else None)
    _qcpu.linear(
        x.data_ptr(), m, x.shape[1], x.stride(0), specs, out.data_ptr(), out.stride(0),
        0 if bias is None else bias.data_ptr(), torch.get_num_threads(), _DEFAULT_ISA, 0, 0,
    )  # fmt: skip
    return out


def linear(
    x: torch.Tensor,
    parts: Sequence[Part],
    out: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    isa: str | None = None,
    path: str | None = None,
    rows: int = 0,
    mrows: int = 0,
) -> torch.Tensor:
    """out[:, col:col + n] = x @ W^T (+ bias[col:col + n]) for every part; x float32 [M, K] with
    unit column stride, out float32 [M, >= every col + n] with unit column stride, bias float32
    [out.shape[1]]. `path`: one of PATHS (module docstring), default int8 for few rows of x, bf16
    from BF16_MIN_ROWS where the CPU has AMX; path="bf16-f32" asks for a float32 result on the
    prompt path (on fewer rows, or without AMX, it means int8); `isa`: force a level of ISAS
    (tests); rows / mrows: weight rows and x rows per task of the int8 kernels (0: the kernel's
    choice; benchmarks sweep them)."""
    if x.dtype != torch.float32 or x.dim() != 2 or x.stride(1) != 1 or x.device.type != "cpu":
        raise ValueError(f"x must be float32 [M, K] rows on the CPU, got {x.dtype} {x.shape}")
    m, k = x.shape
    if out.dtype != torch.float32 or out.dim() != 2 or out.shape[0] != m or out.stride(1) != 1:
        raise ValueError(f"out must be float32 [{m}, N] with unit column stride, got {out.shape}")
    specs = []
    for p in parts:
        n = check_part(p, k)
        if p.col < 0 or p.col + n > out.shape[1]:
            raise ValueError(f"part columns {p.col}..{p.col + n} outside out [{m}, {out.shape[1]}]")
        specs.append((int(p.qtype), p.blocks.data_ptr(), n, p.blocks.shape[1], p.col))
    if bias is not None and (
        bias.dtype != torch.float32 or bias.shape != (out.shape[1],) or not bias.is_contiguous()
    ):
        raise ValueError(f"bias must be float32 [{out.shape[1]}], got {bias.dtype} {bias.shape}")
    if m == 0:
        return out
    if _qcpu is None:
        warn_if_unavailable()
        for p in parts:
            n = p.blocks.shape[0]
            y = x @ _dequantize(p.blocks, p.qtype, k).t()
            if bias is not None:
                y += bias[p.col : p.col + n]
            out[:, p.col : p.col + n] = y
        return out
    if path not in (None, *PATHS):
        raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    prompt = m >= BF16_MIN_ROWS and isa is None and bf16_path_available()
    if path is None or path == "bf16-f32" and not prompt:
        path = ("bf16" if prompt else "int8") if path is None else "int8"
    if path != "int8":
        return _linear_bf16(x, parts, out, bias, _isa_level(isa), f32=path == "bf16-f32")
    _qcpu.linear(
        x.data_ptr(), m, k, x.stride(0), specs, out.data_ptr(), out.stride(0),
        0 if bias is None else bias.data_ptr(), torch.get_num_threads(), _isa_level(isa),
        rows, mrows,
    )  # fmt: skip
    return out


def _slices(parts: Sequence[Part], k: int) -> list[list[tuple[Part, int, int]]]:
    """Groups of (part, first row, end row) that fill one scratch slice of at most _BF16_CHUNK
    weights and whose outputs are adjacent columns of out (so one matmul serves the group)."""
    step = max(1, _BF16_CHUNK // k)
    groups: list[list[tuple[Part, int, int]]] = []
    for p in parts:
        for a in range(0, p.blocks.shape[0], step):
            b = min(p.blocks.shape[0], a + step)
            g = groups[-1] if groups else None
            if g is not None:
                last, _, end = g[-1]
                used = sum(e - s for _, s, e in g)
                if last.col + end == p.col + a and (used + b - a) * k <= _BF16_CHUNK:
                    g.append((p, a, b))
                    continue
            groups.append([(p, a, b)])
    return groups


def _linear_bf16(
    x: torch.Tensor,
    parts: Sequence[Part],
    out: torch.Tensor,
    bias: torch.Tensor | None,
    isa: int,
    *,
    f32: bool,
) -> torch.Tensor:
    """The bf16 path (f32: bf16-f32), a scratch slice of weight rows at a time."""
    k = x.shape[1]
    dtype = torch.float32 if f32 else torch.bfloat16
    xs = x if f32 else x.to(torch.bfloat16)
    threads = torch.get_num_threads()
    precision = torch.backends.mkldnn.matmul.fp32_precision
    for group in _slices(parts, k):
        n = sum(b - a for _, a, b in group)
        buf = _scratch.get(dtype)
        if buf is None or buf.numel() < n * k:
            buf = _scratch[dtype] = torch.empty(n * k, dtype=dtype)
        w = buf[: n * k].view(n, k)
        row = 0
        for p, a, b in group:
            _qcpu.dequant(
                int(p.qtype), p.blocks.data_ptr(), p.blocks.shape[1], k, a, b, w[row].data_ptr(),
                k, f32, threads, isa,
            )  # fmt: skip
            row += b - a
        col = group[0][0].col + group[0][1]
        if f32:
            try:  # float32 in and out, bfloat16 products (AMX): scoped to this one matmul
                torch.backends.mkldnn.matmul.fp32_precision = "bf16"
                y = torch.mm(xs, w.t())
            finally:
                torch.backends.mkldnn.matmul.fp32_precision = precision
        else:
            y = torch.mm(xs, w.t())
        out[:, col : col + n] = y
        if bias is not None:
            out[:, col : col + n] += bias[col : col + n]
    return out


def dequantize(
    part: Part, k: int, dtype: torch.dtype = torch.bfloat16, *, isa: str | None = None
) -> torch.Tensor:
    """[n, k] in bfloat16 or float32: all rows of `part` as the bf16 (bf16-f32) path dequantizes
    them."""
    if _qcpu is None:
        raise RuntimeError(f"CPU quantized kernels unavailable: {_IMPORT_ERROR}")
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"dequantize makes bfloat16 or float32 rows, not {dtype}")
    n = check_part(part, k)
    out = torch.empty((n, k), dtype=dtype)
    _qcpu.dequant(
        int(part.qtype), part.blocks.data_ptr(), part.blocks.shape[1], k, 0, n, out.data_ptr(), k,
        dtype == torch.float32, torch.get_num_threads(), _isa_level(isa),
    )  # fmt: skip
    return out


def round_x(x: torch.Tensor, *, isa: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(xq int8 [M, K], dx float32 [M, K / 32]): x float32 [M, K] rounded as `linear` rounds it."""
    if _qcpu is None:
        raise RuntimeError(f"CPU quantized kernels unavailable: {_IMPORT_ERROR}")
    if x.dtype != torch.float32 or x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be float32 [M, K] rows, got {x.dtype} {tuple(x.shape)}")
    m, k = x.shape
    xq = torch.empty((m, k), dtype=torch.int8)
    dx = torch.empty((m, k // 32), dtype=torch.float32)
    _qcpu.round_x(x.data_ptr(), m, k, x.stride(0), xq.data_ptr(), dx.data_ptr(), _isa_level(isa))
    return xq, dx


def _dequantize(blocks: torch.Tensor, qtype: GGMLQuantizationType, k: int) -> torch.Tensor:
    return dequantize_gguf(blocks.reshape(-1), qtype, (blocks.shape[0], k))


def dequantize_rows(
    blocks: torch.Tensor, qtype: GGMLQuantizationType, k: int, ids: torch.Tensor | None = None
) -> torch.Tensor:
    """float32 rows `ids` (all without) of GGUF bytes [n, row_bytes], gguf-py-exact (the
    extension's dequantizer for a few rows of a supported type, as an embedding lookup asks)."""
    if ids is not None:
        flat = ids.reshape(-1)
        if _qcpu is not None and qtype in SUPPORTED and flat.numel() <= 64:
            n = blocks.shape[0]
            out = torch.empty((flat.numel(), k), dtype=torch.float32)
            for i, r in enumerate(flat.tolist()):
                if not 0 <= r < n:
                    raise IndexError(f"row {r} out of range for a table of {n} rows")
                _qcpu.dequant(
                    int(qtype), blocks.data_ptr(), blocks.shape[1], k, r, r + 1,
                    out[i].data_ptr(), k, True, 1, _DEFAULT_ISA,
                )  # fmt: skip
            return out
        blocks = blocks[flat.long()]
    return _dequantize(blocks, qtype, k)


def linear_reference(x: torch.Tensor, parts: Sequence[Part], n_out: int) -> torch.Tensor:
    """float64 [M, n_out]: int8_x_reference(x) @ W^T in each part's columns (others zero)."""
    k = x.shape[1]
    xr = int8_x_reference(x.float()).double()
    y = torch.zeros((x.shape[0], n_out), dtype=torch.float64)
    for p in parts:
        w = _dequantize(p.blocks, p.qtype, k).double()
        y[:, p.col : p.col + w.shape[0]] = xr @ w.t()
    return y
