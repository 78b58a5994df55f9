"""Batch-1 matrix-vector product y = x @ W^T (+ b) for decode, where every weight byte is read once.

cuBLAS picks a GEMV for one row of activations that leaves part of the memory bandwidth unused on
Hopper. This kernel gives each program a few output rows and walks the whole K dimension with wide
loads, accumulating in float32. Only worth it for a handful of activation rows: each row of x
re-reads W, so `linear` hands anything larger to torch.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

logger = logging.getLogger(__name__)

# Rows of x up to which the GEMV kernel beats cuBLAS (each extra row reads W again).
MAX_ROWS = 1


@triton.jit
def _gemv_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    b_ptr,  # [N] or unused
    y_ptr,  # [M, N]
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    SILU_MUL: tl.constexpr,  # x is [M, 2K] gate then up; the input is silu(gate) * up
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + cols
        k_mask = kk < K
        x = tl.load(x_ptr + m * stride_xm + kk, mask=k_mask, other=0.0)
        if SILU_MUL:
            # Rounded as the separate silu_and_mul kernel rounds, so the result is the same.
            up = tl.load(x_ptr + m * stride_xm + K + kk, mask=k_mask, other=0.0).to(tl.float32)
            g = x.to(tl.float32)
            act = (g * tl.sigmoid(g)).to(x.dtype).to(tl.float32)
            x = (act * up).to(x.dtype)
        x = x.to(tl.float32)
        w = tl.load(
            w_rows + kk[None, :],
            mask=row_mask[:, None] & k_mask[None, :],
            other=0.0,
            eviction_policy="evict_first",
        )
        acc += w.to(tl.float32) * x[None, :]
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)


def pick_config(n: int, k: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for a weight of [n, k].

    Two rows of 1024 columns per step with 4 warps was best or within 5% of best for every Phi-3 and
    Qwen2.5 decode shape on an H200 (benchmarks/NOTES.md).
    """
    return 2, min(1024, triton.next_power_of_2(k)), 4


def use_gemv(rows: int, n: int, k: int) -> bool:
    """Whether the GEMV kernel beats cuBLAS for x [rows, k] @ W[n, k]^T (measured, see NOTES.md)."""
    # A short, very tall weight (Qwen's 151936 x 896 output head) is as fast through cuBLAS.
    return rows <= MAX_ROWS and not (k < 1024 and n >= 65536)


def gemv(
    x: torch.Tensor,  # [M, K], or [M, 2K] with silu_mul
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
    *,
    silu_mul: bool = False,
    config: tuple[int, int, int] | None = None,
    out: torch.Tensor | None = None,  # [M, N]
) -> torch.Tensor:
    """x @ weight.T + bias for a few rows of x; with silu_mul, silu(x[:, :K]) * x[:, K:] is the
    input. `config` overrides (BLOCK_N, BLOCK_K, num_warps)."""
    m = x.shape[0]
    n, k = weight.shape
    assert x.shape[1] == (2 * k if silu_mul else k) and weight.stride(1) == 1 and x.stride(1) == 1
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_n, block_k, num_warps = config or pick_config(n, k)
    grid = (triton.cdiv(n, block_n), m)
    _gemv_kernel[grid](
        x,
        weight,
        bias if bias is not None else weight,
        out,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        SILU_MUL=silu_mul,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        num_warps=num_warps,
    )
    return out


def silu_and_mul_linear(
    gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """linear(silu_and_mul(gate_up), weight, bias); gate_up [T, 2I], weight [N, I] -> [T, N].

    One kernel for decode-sized inputs (the MLP's down projection reads gate and up directly).
    """
    from worker_orcd.kernels.triton.activation import silu_and_mul

    rows, n, k = gate_up.shape[0], weight.shape[0], weight.shape[1]
    if not use_gemv(rows, n, k) or gate_up.stride(-1) != 1 or rows == 0:
        return torch.nn.functional.linear(silu_and_mul(gate_up), weight, bias)
    return gemv(gate_up, weight, bias, silu_mul=True)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with the GEMV kernel for decode-sized inputs; x is [..., K]."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    if not use_gemv(rows, weight.shape[0], k) or weight.stride(-1) != 1 or rows == 0:
        return torch.nn.functional.linear(x, weight, bias)
    x2 = x.reshape(rows, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    return gemv(x2, weight, bias).reshape(*x.shape[:-1], weight.shape[0])
