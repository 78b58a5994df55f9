"""SwiGLU on the fused gate/up projection output: silu(gate) * up."""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from worker_orcd.kernels.triton import pdl

logger = logging.getLogger(__name__)


@triton.jit
def _silu_and_mul_kernel(
    x_ptr,  # [T, 2I]: gate then up
    y_ptr,  # [T, I]
    inter,
    stride_x,
    BLOCK: tl.constexpr,
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
    tl.store(y_ptr + row * inter + cols, (act * up).to(y_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] -> [T, I]."""
    n_rows, two_i = x.shape
    inter = two_i // 2
    assert x.stride(1) == 1
    y = torch.empty((n_rows, inter), dtype=x.dtype, device=x.device)
    block = min(1024, triton.next_power_of_2(inter))
    if n_rows:
        _silu_and_mul_kernel[(n_rows, triton.cdiv(inter, block))](
            x, y, inter, x.stride(0), BLOCK=block, num_warps=4, **pdl.launch(x, n_rows)
        )
    return y
