"""RMSNorm and RMSNorm fused with the residual add; one program per token row.

Rounding follows the torch twin (`worker_orcd.kernels.norm`): the sum is rounded to the activation
dtype before its statistics, the normalized row is rounded before the weight multiplies it.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from worker_orcd.kernels.quant.gemv_i8 import asm_dp4a, store_rounded
from worker_orcd.kernels.quant.ops import RoundedX
from worker_orcd.kernels.triton import pdl

logger = logging.getLogger(__name__)


@triton.jit
def _rms_norm_kernel(
    x_ptr,  # [T, D]
    r_ptr,  # [T, D] residual, read when HAS_RESIDUAL
    w_ptr,  # [D]
    y_ptr,  # [T, D] normalized
    s_ptr,  # [T, D] x + residual, written when HAS_RESIDUAL
    xw_ptr,  # ROUND: y rounded to int8 (quant.ops.RoundedX: words [T, D / 4], dx, sums)
    xdx_ptr,
    xs_ptr,
    D,
    stride_x,
    stride_r,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    ROUND: tl.constexpr,
    BLOCK_D: tl.constexpr,
    ASM: tl.constexpr,
    PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    # The weight is no kernel's output: read before the wait, its latency under the predecessor's
    # tail (programmatic launch), not after the row's reduction.
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    pdl.prologue(PDL)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(s_ptr + row * D + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / D + eps)
    normed = (xf * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    y = (normed * w).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * D + cols, y, mask=mask)
    if ROUND:  # D % 32 == 0; blocks past D are zeros and not stored
        blk = tl.arange(0, BLOCK_D // 32)
        yb = tl.reshape(y.to(tl.float32), (BLOCK_D // 32, 32))
        store_rounded(yb, blk, blk < D // 32, xw_ptr + row * (D // 4), xdx_ptr + row * (D // 32),
                      xs_ptr + row * (D // 16), ASM)  # fmt: skip


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    rounded: RoundedX | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n_rows, d = x.shape
    assert x.stride(1) == 1 and (residual is None or residual.stride(1) == 1)
    out_dtype = torch.promote_types(x.dtype, weight.dtype)
    y = torch.empty((n_rows, d), dtype=out_dtype, device=x.device)
    summed = (
        torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    )
    block_d = triton.next_power_of_2(d)
    if rounded is not None:
        rounded.check(n_rows, d)
    if n_rows:
        _rms_norm_kernel[(n_rows,)](
            x,
            residual if residual is not None else x,
            weight,
            y,
            summed if summed is not None else y,
            *(rounded if rounded is not None else (y, y, y)),
            d,
            x.stride(0),
            residual.stride(0) if residual is not None else 0,
            eps,
            HAS_RESIDUAL=residual is not None,
            ROUND=rounded is not None,
            BLOCK_D=block_d,
            ASM=asm_dp4a(x.device.type),
            **pdl.launch(x, n_rows),
            num_warps=4 if block_d <= 2048 else 8,
        )
    return y, summed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, D], weight [D] -> [T, D]."""
    return _launch(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    rounded: RoundedX | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); x, residual [T, D]. Residual None: (rms_norm(x),
    x). `rounded`: also written, the normalized rows rounded to int8 for a quantized GEMV."""
    y, summed = _launch(x, residual, weight, eps, rounded)
    return y, x if summed is None else summed
