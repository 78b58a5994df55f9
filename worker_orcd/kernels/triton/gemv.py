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

from worker_orcd.kernels import split_qkv
from worker_orcd.kernels.triton import activation, gemv_rows, norm, norm_in, pdl, rope

logger = logging.getLogger(__name__)

# Rows of x up to which the GEMV kernel beats cuBLAS (each extra row reads W again).
MAX_ROWS = 1


@triton.jit
def _gemv_x(
    x_row, r_row, g_ptr, K, kk, k_mask, rstd,
    SILU_MUL: tl.constexpr, NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):  # fmt: skip
    """One tile of the input row as float32: x; with SILU_MUL, silu(gate) * up from [gate | up];
    with NORM, rms_norm(x + residual) given the row's 1 / rms."""
    if NORM:
        return norm_in.normed(x_row, r_row, g_ptr, kk, k_mask, rstd, HAS_RESIDUAL)
    x = tl.load(x_row + kk, mask=k_mask, other=0.0)
    if SILU_MUL:
        # Rounded as the separate silu_and_mul kernel rounds, so the result is the same.
        up = tl.load(x_row + K + kk, mask=k_mask, other=0.0).to(tl.float32)
        g = x.to(tl.float32)
        act = (g * tl.sigmoid(g)).to(x.dtype).to(tl.float32)
        x = (act * up).to(x.dtype)
    return x.to(tl.float32)


@triton.jit
def _gemv_w(w_rows, K, kk, row_mask):
    """One [BLOCK_N, BLOCK_K] tile of the weight rows (zeros past K), streamed past the cache."""
    return tl.load(
        w_rows + kk[None, :],
        mask=row_mask[:, None] & (kk < K)[None, :],
        other=0.0,
        eviction_policy="evict_first",
    )


@triton.jit
def _gemv_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    b_ptr,  # [N] or unused
    y_ptr,  # [M, N]
    r_ptr,  # [M, K] residual (NORM and HAS_RESIDUAL)
    g_ptr,  # [K] norm weight (NORM)
    s_ptr,  # [M, K] x + residual, written (NORM and HAS_RESIDUAL)
    eps,
    N,
    K,
    stride_xm,
    stride_rm,
    stride_wn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    SILU_MUL: tl.constexpr,  # x is [M, 2K] gate then up; the input is silu(gate) * up
    NORM: tl.constexpr,  # the input is rms_norm(x (+ residual)) with weight g
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr,
    PDL: tl.constexpr,
):
    pid_n = tl.program_id(0)
    m = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    # The weights do not depend on earlier kernels: the first tile is read before the wait, so
    # under programmatic launch it streams in while the previous kernel finishes.
    w = _gemv_w(w_rows, K, cols, row_mask)
    pdl.prologue(PDL)
    x_row = x_ptr + m * stride_xm
    r_row = r_ptr + m * stride_rm
    rstd = 0.0
    if NORM:
        rstd = norm_in.row_rstd(
            x_row, r_row, s_ptr + m * K, K, cols, eps, pid_n == 0, BLOCK_K, HAS_RESIDUAL
        )
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + cols
        if PREFETCH:
            # the next tile's load is in flight while this one is multiplied (masked off past K)
            w_next = _gemv_w(w_rows, K, kk + BLOCK_K, row_mask)
        elif k0 > 0:
            w = _gemv_w(w_rows, K, kk, row_mask)
        x = _gemv_x(x_row, r_row, g_ptr, K, kk, kk < K, rstd, SILU_MUL, NORM, HAS_RESIDUAL)
        acc += w.to(tl.float32) * x[None, :]
        if PREFETCH:
            w = w_next
    y = tl.sum(acc, axis=1)  # [BLOCK_N]
    if HAS_BIAS:
        y += tl.load(b_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + m * stride_ym + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _qkv_rope_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [(H + 2 Hk) D, K]: q rows, then k, then v
    b_ptr,  # [(H + 2 Hk) D] or unused
    r_ptr,  # [M, K] residual (NORM and HAS_RESIDUAL)
    g_ptr,  # [K] norm weight (NORM)
    s_ptr,  # [M, K] x + residual, written (NORM and HAS_RESIDUAL)
    pos_ptr,  # [M] positions
    slot_ptr,  # [M] KV slots (negative: not written)
    cs_ptr,  # [P, D] cos | sin
    qo_ptr,  # [M, H, D] rotated q, written
    kc_ptr,  # [S, Hk, D] key cache, rotated k written at the slot
    vc_ptr,  # [S, Hk, D] value cache
    eps,
    K,
    H,
    HK,
    stride_xm,
    stride_rm,
    stride_wn,
    D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    NORM: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_P: tl.constexpr,  # rotation pairs per program
    BLOCK_K: tl.constexpr,
    PDL: tl.constexpr,
):
    """The qkv projection of one row with the rotary embedding and the KV-cache write in its
    epilogue: a program computes the rows j and j + D/2 of one head (a NEOX rotation pair) for
    BLOCK_P consecutive j, rotates q and k pairs, and writes q to qo, k and v to the caches."""
    HALF: tl.constexpr = D // 2
    CHUNKS: tl.constexpr = HALF // BLOCK_P
    head = tl.program_id(0) // CHUNKS
    m = tl.program_id(1)
    j = (tl.program_id(0) % CHUNKS) * BLOCK_P + tl.arange(0, BLOCK_P)
    rows_a = head * D + j
    rows_b = rows_a + HALF
    cols = tl.arange(0, BLOCK_K)
    wa_rows = w_ptr + rows_a.to(tl.int64)[:, None] * stride_wn
    wb_rows = w_ptr + rows_b.to(tl.int64)[:, None] * stride_wn
    all_rows = rows_a >= 0
    wa = _gemv_w(wa_rows, K, cols, all_rows)  # weights first: see _gemv_kernel
    wb = _gemv_w(wb_rows, K, cols, all_rows)
    # The epilogue's inputs are no earlier kernel's output either (positions and slots are
    # written before the step's first layer): read here, not after the K walk.
    pos = tl.load(pos_ptr + m).to(tl.int64)
    cos = tl.load(cs_ptr + pos * D + j)
    sin = tl.load(cs_ptr + pos * D + HALF + j)
    slot = tl.load(slot_ptr + m).to(tl.int64)
    if HAS_BIAS:
        bias_a = tl.load(b_ptr + rows_a).to(tl.float32)
        bias_b = tl.load(b_ptr + rows_b).to(tl.float32)
    pdl.prologue(PDL)
    x_row = x_ptr + m * stride_xm
    r_row = r_ptr + m * stride_rm
    rstd = 0.0
    if NORM:
        first = tl.program_id(0) == 0
        rstd = norm_in.row_rstd(
            x_row, r_row, s_ptr + m * K, K, cols, eps, first, BLOCK_K, HAS_RESIDUAL
        )
    acc_a = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + cols
        if k0 > 0:
            wa = _gemv_w(wa_rows, K, kk, all_rows)
            wb = _gemv_w(wb_rows, K, kk, all_rows)
        x = _gemv_x(x_row, r_row, g_ptr, K, kk, kk < K, rstd, False, NORM, HAS_RESIDUAL)
        acc_a += wa.to(tl.float32) * x[None, :]
        acc_b += wb.to(tl.float32) * x[None, :]
    ya = tl.sum(acc_a, axis=1)
    yb = tl.sum(acc_b, axis=1)
    if HAS_BIAS:
        ya += bias_a
        yb += bias_b
    # rounded as the projection's output is before the rotary kernel reads it
    ty = x_ptr.dtype.element_ty
    ya = ya.to(ty).to(tl.float32)
    yb = yb.to(ty).to(tl.float32)
    if head < H + HK:  # q or k: rotate the pair
        ya, yb = ya * cos - yb * sin, yb * cos + ya * sin
    if head < H:
        q_row = qo_ptr + (m.to(tl.int64) * H + head) * D
        tl.store(q_row + j, ya.to(qo_ptr.dtype.element_ty))
        tl.store(q_row + HALF + j, yb.to(qo_ptr.dtype.element_ty))
    else:
        if slot >= 0:  # a negative slot marks a padding token: nothing is written
            if head < H + HK:
                dst = kc_ptr + (slot * HK + head - H) * D
            else:
                dst = vc_ptr + (slot * HK + head - H - HK) * D
            tl.store(dst + j, ya.to(kc_ptr.dtype.element_ty))
            tl.store(dst + HALF + j, yb.to(kc_ptr.dtype.element_ty))


Config = tuple[int, int, int, bool]  # (BLOCK_N, BLOCK_K, num_warps, prefetch)


def pick_config(n: int, k: int) -> Config:
    """Launch config for a weight of [n, k], from the H200 sweep in benchmarks/NOTES.md (v6).

    Two rows of 1024 columns with 4 warps is best or within 2% for every Phi-3 shape. Qwen's short
    rows (896) over many outputs want more rows per program and shorter tiles; its few long rows
    (the down projection, 896 x 4864) one row per program, 8 warps and the next tile in flight.
    """
    if k <= 1024 and n >= 4096:
        return 8, 256, 2, True
    if n <= 1024 and k >= 2048:
        return 1, 1024, 8, True
    return 2, min(1024, triton.next_power_of_2(k)), 4, False


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
    config: Config | tuple[int, int, int] | None = None,
    out: torch.Tensor | None = None,  # [M, N]
) -> torch.Tensor:
    """x @ weight.T + bias for a few rows of x; with silu_mul, silu(x[:, :K]) * x[:, K:] is the
    input. `config` overrides (BLOCK_N, BLOCK_K, num_warps[, prefetch])."""
    n, k = weight.shape
    assert x.shape[1] == (2 * k if silu_mul else k) and weight.stride(1) == 1 and x.stride(1) == 1
    return _launch(x, weight, bias, silu_mul=silu_mul, config=config, out=out)


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    silu_mul: bool = False,
    norm_args: tuple[torch.Tensor | None, torch.Tensor, float, torch.Tensor] | None = None,
    config: Config | tuple[int, int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    m = x.shape[0]
    n, k = weight.shape
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_n, block_k, num_warps, *prefetch = config or pick_config(n, k)
    residual, norm_weight, eps, summed = norm_args if norm_args is not None else (None, x, 0.0, x)
    grid = (triton.cdiv(n, block_n), m)
    _gemv_kernel[grid](
        x,
        weight,
        bias if bias is not None else weight,
        out,
        residual if residual is not None else x,
        norm_weight,
        summed,
        eps,
        n,
        k,
        x.stride(0),
        residual.stride(0) if residual is not None else 0,
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        SILU_MUL=silu_mul,
        NORM=norm_args is not None,
        HAS_RESIDUAL=residual is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        PREFETCH=bool(prefetch and prefetch[0]),
        num_warps=num_warps,
        **pdl.launch(x, m),
    )
    return out


# Row length up to which the norm before a projection is computed inside the GEMV (every program
# reads the whole row; for longer rows that costs more than the separate norm launch, NOTES.md v5).
NORM_MAX_K = 1024


def add_rms_norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(rms_norm(x + residual)), x + residual); one kernel for a decode row with a short
    hidden size, the norm kernel and `linear` otherwise."""
    rows, k = x.shape
    n = weight.shape[0]
    fused = (
        0 < rows
        and use_gemv(rows, n, k)
        and k <= NORM_MAX_K
        and x.dtype == norm_weight.dtype == weight.dtype
        and x.stride(1) == 1
        and weight.stride(1) == 1
        and (residual is None or residual.stride(1) == 1)
    )
    if not fused:
        normed, summed = norm.add_rms_norm(x, residual, norm_weight, eps)
        return linear(normed, weight, bias), summed
    summed = torch.empty((rows, k), dtype=x.dtype, device=x.device) if residual is not None else x
    y = _launch(x, weight, bias, norm_args=(residual, norm_weight.contiguous(), eps, summed))
    return y, summed


def norm_qkv_rope_store(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rotated q [T, H, D], x + residual): the norm, the qkv projection, the rotary embedding and
    the KV-cache write in one kernel for a decode row (the norm inside only for rows up to
    NORM_MAX_K), the norm kernel and one kernel for the rest for a batch of decode rows
    (`gemv_rows`); otherwise the norm + projection, then `rope_store_kv`."""
    rows, k = x.shape
    n = weight.shape[0]
    _, n_kv, d = k_cache.shape
    n_heads = n // d - 2 * n_kv
    one_row = use_gemv(rows, n, k)
    fused = (
        0 < rows
        and (one_row or gemv_rows.fits(rows, n, k))
        and cos_sin.shape[1] == d  # every dim rotates (no partial rotary)
        and d % 2 == 0
        and x.dtype == weight.dtype == k_cache.dtype
        and x.stride(1) == 1
        and weight.stride(1) == 1
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
        and cos_sin.is_contiguous()
    )
    if not fused:
        qkv, summed = add_rms_norm_linear(x, residual, norm_weight, eps, weight, bias)
        q, kk, v = split_qkv(qkv, k_cache)
        q = rope.rope_store_kv(q, kk, v, positions, cos_sin, k_cache, v_cache, slot_mapping)
        return q, summed
    if not one_row:  # a batch of decode rows: the norm kernel, then one launch
        src, summed = norm.add_rms_norm(x, residual, norm_weight, eps)
        q = gemv_rows.qkv_rope_launch(
            src, weight, bias, positions, cos_sin, k_cache, v_cache, slot_mapping
        )
        return q, summed
    in_kernel = k <= NORM_MAX_K and norm_weight.dtype == x.dtype  # the norm inside
    if in_kernel:
        summed = (
            torch.empty((rows, k), dtype=x.dtype, device=x.device) if residual is not None else x
        )
        src = x
    else:  # the norm kernel first, then the projection with rotary epilogue on its output
        src, summed = norm.add_rms_norm(x, residual, norm_weight, eps)
    q = torch.empty((rows, n_heads, d), dtype=x.dtype, device=x.device)
    half = d // 2
    block_p = 2 if k <= NORM_MAX_K and half % 2 == 0 else 1
    with_residual = in_kernel and residual is not None
    _qkv_rope_kernel[((n_heads + 2 * n_kv) * (half // block_p), rows)](
        src,
        weight,
        bias if bias is not None else weight,
        residual if with_residual else src,
        norm_weight,
        summed if with_residual else src,
        positions,
        slot_mapping,
        cos_sin,
        q,
        k_cache,
        v_cache,
        eps,
        k,
        n_heads,
        n_kv,
        src.stride(0),
        residual.stride(0) if with_residual else 0,
        weight.stride(0),
        D=d,
        HAS_BIAS=bias is not None,
        NORM=in_kernel,
        HAS_RESIDUAL=with_residual,
        BLOCK_P=block_p,
        BLOCK_K=min(1024, triton.next_power_of_2(k)),
        num_warps=4,
        **pdl.launch(x, rows),
    )
    return q, summed


def silu_and_mul_linear(
    gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """linear(silu_and_mul(gate_up), weight, bias); gate_up [T, 2I], weight [N, I] -> [T, N].

    One kernel for a decode row (the MLP's down projection reads gate and up directly).
    """
    rows, n, k = gate_up.shape[0], weight.shape[0], weight.shape[1]
    if 0 < rows and use_gemv(rows, n, k) and gate_up.stride(-1) == 1 and weight.stride(-1) == 1:
        return gemv(gate_up, weight, bias, silu_mul=True)
    # `linear` picks the few-row kernel or cuBLAS (and takes empty or strided weights to torch)
    return linear(activation.silu_and_mul(gate_up), weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with the GEMV kernel for decode-sized inputs; x is [..., K]."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    n = weight.shape[0]
    gemv_fits = use_gemv(rows, n, k)
    if not (gemv_fits or gemv_rows.fits(rows, n, k)) or weight.stride(-1) != 1 or rows == 0:
        return torch.nn.functional.linear(x, weight, bias)
    x2 = x.reshape(rows, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = gemv(x2, weight, bias) if gemv_fits else gemv_rows.launch(x2, weight, bias)
    return y.reshape(*x.shape[:-1], n)
