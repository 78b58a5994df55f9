"""SwiGLU on the fused gate/up projection output: silu(gate) * up."""

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
def _silu_and_mul_kernel(
    x_ptr,  # [T, 2I]: gate then up
    y_ptr,  # [T, I]
    xw_ptr,  # ROUND: y rounded to int8 (quant.ops.RoundedX: words [T, I / 4], dx, sums)
    xdx_ptr,
    xs_ptr,
    inter,
    stride_x,
    BLOCK: tl.constexpr,
    ROUND: tl.constexpr,
    ASM: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.prologue(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + inter + cols, mask=mask, other=0.0).to(tl.float32)
    # Round silu(gate) to the activation dtype before the product, as F.silu(gate) * up does.
    act = (gate * tl.sigmoid(gate)).to(y_ptr.dtype.element_ty).to(tl.float32)
    y = (act * up).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + row * inter + cols, y, mask=mask)
    if ROUND:  # inter % 32 == 0, BLOCK % 32 == 0; blocks past inter are zeros and not stored
        blk = tl.program_id(1) * (BLOCK // 32) + tl.arange(0, BLOCK // 32)
        yb = tl.reshape(y.to(tl.float32), (BLOCK // 32, 32))
        store_rounded(yb, blk, blk < inter // 32, xw_ptr + row * (inter // 4),
                      xdx_ptr + row * (inter // 32), xs_ptr + row * (inter // 16), ASM)  # fmt: skip


def silu_and_mul(x: torch.Tensor, rounded: RoundedX | None = None) -> torch.Tensor:
    """x [T, 2I] -> [T, I]; `rounded`: also written, the result rounded to int8 for a quantized
    GEMV."""
    n_rows, two_i = x.shape
    inter = two_i // 2
    assert x.stride(1) == 1
    y = torch.empty((n_rows, inter), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(inter))
    if rounded is not None:  # inter % 32 == 0, so BLOCK holds whole blocks of 32
        rounded.check(n_rows, inter)
    if n_rows:
        _silu_and_mul_kernel[(n_rows, triton.cdiv(inter, block))](
            x, y, *(rounded if rounded is not None else (y, y, y)), inter, x.stride(0),
            BLOCK=block, ROUND=rounded is not None, ASM=asm_dp4a(x.device.type), num_warps=4,
            **pdl.launch(x, n_rows),
        )  # fmt: skip
    return y
