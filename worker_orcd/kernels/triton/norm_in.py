"""RMSNorm (with the residual add) computed inside the projection that consumes it, for rows short
enough that every program can reduce the whole row: Triton helpers shared by the bf16 GEMV and the
int8 GEMVs of quantized weights. Every value is rounded as the add_rms_norm kernel rounds it, so
the fused kernels see the same input bits as the separate norm would give them."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def norm_in(x_row, r_row, kk, k_mask, HAS_RESIDUAL: tl.constexpr):
    """One tile of x + residual, rounded to x's dtype as the add_rms_norm kernel rounds it."""
    h = tl.load(x_row + kk, mask=k_mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_row + kk, mask=k_mask, other=0.0)
        h = (h.to(tl.float32) + r.to(tl.float32)).to(h.dtype)
    return h


@triton.jit
def row_rstd(
    x_row, r_row, s_row, K, cols, eps, first,
    BLOCK_K: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """1 / rms of x + residual over the whole (short) row, which every program reads; the `first`
    program also writes x + residual to s_row (the next residual)."""
    ss = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + cols
        h = norm_in(x_row, r_row, kk, kk < K, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(s_row + kk, h, mask=kk < tl.where(first, K, 0))
        hf = h.to(tl.float32)
        ss += hf * hf
    return tl.rsqrt(tl.sum(ss, axis=0) / K + eps)


@triton.jit
def normed(x_row, r_row, g_ptr, kk, k_mask, rstd, HAS_RESIDUAL: tl.constexpr):
    """rms_norm(x + residual) * g at offsets kk (any shape) as float32, given the row's 1 / rms."""
    h = norm_in(x_row, r_row, kk, k_mask, HAS_RESIDUAL)
    y = (h.to(tl.float32) * rstd).to(h.dtype).to(tl.float32)
    g = tl.load(g_ptr + kk, mask=k_mask, other=0.0).to(tl.float32)
    return (y * g).to(h.dtype).to(tl.float32)
