"""y = x @ W^T for a few rows of x (a batch of decode tokens): each weight tile is read once for
all rows and multiplied on the tensor cores, with no split-K reduction launch and, for the qkv
projection, the rotary embedding and the KV-cache write in the epilogue.

cuBLAS reads the weights of a skinny product close to the copy bandwidth, but splits K for the
short-and-wide shapes and adds a reduction launch, and the qkv projection's output makes one more
round trip through the rotary kernel. These kernels take 2 to MAX_ROWS rows of x: every program
owns BLOCK_N output columns and all rows of x (padded to BLOCK_B >= 16, the smallest `tl.dot`) and
walks K (or its share of a K split, summed by the last program of the column tile to finish) in
BLOCK_K tiles of the weight, STAGES of them in flight. The inputs come from the norm and
SwiGLU kernels: computing them inside (as the batch-1 GEMV does) puts a synchronous load of x on
every step of the walk and measured 1.4-5x slower than the separate launch (BENCHMARKS.md).
"""

from __future__ import annotations

import logging
import os

import torch
import triton
import triton.language as tl

from worker_orcd.kernels.triton import arrivals, pdl

logger = logging.getLogger(__name__)

# Rows of x up to which these kernels replace cuBLAS (and the qkv projection's RoPE launch): a
# batch of decodes. At 32 rows they measured no faster than cuBLAS and at 64 slower (H100,
# BENCHMARKS.md). WORKER_ORCD_ROWS_MAX overrides it for measurements (0 turns them off).
MAX_ROWS = int(os.environ.get("WORKER_ORCD_ROWS_MAX", "16"))


@triton.jit
def _x_tile(x_rows, b_mask, K, kk):
    """[BLOCK_B, BLOCK_K] of the rows of x (zeros past the rows and past K)."""
    return tl.load(x_rows + kk[None, :], mask=b_mask[:, None] & (kk < K)[None, :], other=0.0)


@triton.jit
def _dot(acc, w, x, F32_DOT: tl.constexpr):
    """acc + w x^T; w [R, BLOCK_K], x [BLOCK_B, BLOCK_K] in the weight's dtype. F32_DOT multiplies
    in IEEE float32: float32 weights, and Triton's interpreter, which gets bf16 products wrong."""
    xt = tl.trans(x.to(w.dtype))
    if F32_DOT:
        return tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(w, xt, acc)


@triton.jit
def _rows_kernel(
    x_ptr,  # [M, K]
    w_ptr,  # [N, K]
    b_ptr,  # [N] or unused
    y_ptr,  # [M, N]
    ws_ptr,  # SPLITS > 1: [SPLITS, M, N] float32 partials
    lock_ptr,  # SPLITS > 1: a zeroed arrival counter per column tile
    M,
    N,
    K,
    K_SPLIT,  # K per split, whole BLOCK_K tiles
    stride_xm,
    stride_wn,
    stride_ym,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
    STAGES: tl.constexpr,
    SPLITS: tl.constexpr,
    F32_DOT: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)  # output columns = weight rows
    n_mask = cols < N
    bb = tl.arange(0, BLOCK_B)
    b_mask = bb < M
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + bb[:, None] * stride_xm
    lo = tl.program_id(1) * K_SPLIT
    hi = tl.minimum(K, lo + K_SPLIT)
    pdl.prologue(PDL)
    acc = tl.zeros((BLOCK_N, BLOCK_B), dtype=tl.float32)
    for k0 in tl.range(lo, hi, BLOCK_K, num_stages=STAGES):
        kk = k0 + ks
        w = tl.load(
            w_rows + kk[None, :],
            mask=n_mask[:, None] & (kk < hi)[None, :],
            other=0.0,
            eviction_policy="evict_first",
        )
        acc = _dot(acc, w, _x_tile(x_rows, b_mask, hi, kk), F32_DOT)
    if HAS_BIAS:  # once: by the first split
        bias = tl.load(b_ptr + cols, mask=n_mask & (tl.program_id(1) == 0), other=0.0)
        acc += bias.to(tl.float32)[:, None]
    arrivals.store_split(y_ptr, ws_ptr, lock_ptr, acc, cols, M, N, bb, b_mask, stride_ym, SPLITS)


@triton.jit
def _qkv_rope_rows_kernel(
    x_ptr,  # [M, K] normalized input
    w_ptr,  # [(H + 2 Hk) D, K]: q rows, then k, then v
    b_ptr,  # [(H + 2 Hk) D] or unused
    pos_ptr,  # [M] positions
    slot_ptr,  # [M] KV slots (negative: not written)
    cs_ptr,  # [P, D] cos | sin
    qo_ptr,  # [M, H, D] rotated q, written
    kc_ptr,  # [S, Hk, D] key cache, rotated k written at the slot
    vc_ptr,  # [S, Hk, D] value cache
    M,
    K,
    H,
    HK,
    stride_xm,
    stride_wn,
    D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_P: tl.constexpr,  # rotation pairs per program
    BLOCK_K: tl.constexpr,
    BLOCK_B: tl.constexpr,
    STAGES: tl.constexpr,
    F32_DOT: tl.constexpr,
    PDL: tl.constexpr,
):
    """The qkv projection of a few rows with the rotary embedding and the KV-cache write in the
    epilogue. A program computes, for all rows, the weight rows j and j + D/2 of one head (the
    NEOX rotation pairs) for BLOCK_P consecutive j, stacked as one [2 BLOCK_P, BLOCK_K] tile so
    that one product covers both halves of each pair."""
    HALF: tl.constexpr = D // 2
    CHUNKS: tl.constexpr = HALF // BLOCK_P
    head = tl.program_id(0) // CHUNKS
    j0 = (tl.program_id(0) % CHUNKS) * BLOCK_P
    i2 = tl.arange(0, 2 * BLOCK_P)
    wrows = head * D + j0 + (i2 % BLOCK_P) + tl.where(i2 < BLOCK_P, 0, HALF)
    bb = tl.arange(0, BLOCK_B)
    b_mask = bb < M
    ks = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + wrows.to(tl.int64)[:, None] * stride_wn
    x_rows = x_ptr + bb[:, None] * stride_xm
    # The epilogue's inputs are no earlier kernel's output (positions and slots are written
    # before the step's first layer): read before the wait, not after the K walk.
    j = j0 + tl.arange(0, BLOCK_P)
    pos = tl.load(pos_ptr + bb, mask=b_mask, other=0).to(tl.int64)
    cs = cs_ptr + pos[None, :] * D + j[:, None]
    cos = tl.load(cs, mask=b_mask[None, :], other=0.0)
    sin = tl.load(cs + HALF, mask=b_mask[None, :], other=0.0)
    slot = tl.load(slot_ptr + bb, mask=b_mask, other=-1).to(tl.int64)
    if HAS_BIAS:
        bias = tl.load(b_ptr + wrows).to(tl.float32)
    pdl.prologue(PDL)
    acc = tl.zeros((2 * BLOCK_P, BLOCK_B), dtype=tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        kk = k0 + ks
        w = tl.load(w_rows + kk[None, :], mask=(kk < K)[None, :], other=0.0)
        acc = _dot(acc, w, _x_tile(x_rows, b_mask, K, kk), F32_DOT)
    if HAS_BIAS:
        acc += bias[:, None]
    # [2P, B] -> the j halves ya and the j + D/2 halves yb, each [P, B]
    ya, yb = tl.split(tl.permute(tl.reshape(acc, (2, BLOCK_P, BLOCK_B)), (1, 2, 0)))
    # rounded as the projection's output is before the rotary kernel reads it
    ty = x_ptr.dtype.element_ty
    ya = ya.to(ty).to(tl.float32)
    yb = yb.to(ty).to(tl.float32)
    if head < H + HK:  # q or k: rotate the pairs
        ya, yb = ya * cos - yb * sin, yb * cos + ya * sin
    if head < H:
        q = qo_ptr + (bb.to(tl.int64)[None, :] * H + head) * D + j[:, None]
        tl.store(q, ya.to(qo_ptr.dtype.element_ty), mask=b_mask[None, :])
        tl.store(q + HALF, yb.to(qo_ptr.dtype.element_ty), mask=b_mask[None, :])
    else:
        ok = (slot >= 0)[None, :]  # a negative slot marks a padding token: nothing is written
        if head < H + HK:
            dst = kc_ptr + (slot[None, :] * HK + head - H) * D + j[:, None]
        else:
            dst = vc_ptr + (slot[None, :] * HK + head - H - HK) * D + j[:, None]
        tl.store(dst, ya.to(kc_ptr.dtype.element_ty), mask=ok)
        tl.store(dst + HALF, yb.to(kc_ptr.dtype.element_ty), mask=ok)


def _f32_dot(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.float32 or os.environ.get("TRITON_INTERPRET") == "1"


def block_b(rows: int) -> int:
    """Rows of x per program: all of them, padded to a power of two of at least 16 (tl.dot)."""
    return max(16, triton.next_power_of_2(rows))


def pick_config(n: int, k: int, rows: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, stages, K splits) for x [rows, k] @ W[n, k]^T, from the
    sweeps of `benchmarks/kernels.py rows` (BENCHMARKS.md): tall weights 64 columns a program,
    Qwen's small square ones 16, the rest 32; 4 tiles in flight. Phi-3's o and down (3,072
    columns: 96 tiles for 132 multiprocessors) split K in 4 (H200, 8 rows: 8.6 -> 8.0 and
    19.0 -> 15.8 us)."""
    if n >= 8192:
        return 64, 128, 4, 4, 1
    if n <= 1536 and k <= 1024:
        return 16, 128, 4, 4, 1
    if n >= 2048 and k >= 3072:
        return 32, 128, 4, 4, 4
    return 32, 256, 4, 4, 1


def fits(rows: int, n: int, k: int) -> bool:
    """Whether these kernels take x [rows, k] @ W[n, k]^T: 2 to MAX_ROWS rows, not the tall
    short-row output head (cuBLAS's is as fast), K long enough for one tile."""
    return 2 <= rows <= MAX_ROWS and not (k < 1024 and n >= 65536) and k >= 16


def launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: tuple[int, int, int, int, int] | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [M, K] @ weight[N, K]^T + bias for a few rows of x. With K split (the config's last
    field), each split's program writes float32 partials and the last of a column tile to
    finish sums them in split order (`arrivals.store_split`): one launch, the same result
    whatever the order the programs finish in."""
    m = x.shape[0]
    n, k = weight.shape
    assert x.shape[1] == k and x.stride(1) == 1 and weight.stride(1) == 1
    if out is None:
        out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    block_n, block_k, num_warps, stages, splits = config or pick_config(n, k, m)
    per, splits = arrivals.split_len(k, splits, block_k)
    tiles = triton.cdiv(n, block_n)
    ws, lock = arrivals.partials(out, splits, tiles)
    _rows_kernel[(tiles, splits)](
        x,
        weight,
        bias if bias is not None else weight,
        out,
        ws,
        lock,
        m,
        n,
        k,
        per,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        BLOCK_B=block_b(m),
        STAGES=stages,
        SPLITS=splits,
        F32_DOT=_f32_dot(weight),
        num_warps=num_warps,
        **pdl.launch(x, m),
    )
    return out


def qkv_rope_launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> torch.Tensor:
    """The qkv projection of the rows of x (already normalized), rotated: returns q [M, H, D] and
    writes k, v into the caches at the slots (nothing for a negative slot)."""
    m, k = x.shape
    n = weight.shape[0]
    _, n_kv, d = k_cache.shape
    n_heads = n // d - 2 * n_kv
    half = d // 2
    assert x.stride(1) == 1 and weight.stride(1) == 1 and k_cache.is_contiguous()
    q = torch.empty((m, n_heads, d), dtype=x.dtype, device=x.device)
    # 2 * BLOCK_P weight rows a program, at least 16 for tl.dot
    block_p = next((p for p in (16, 8) if half % p == 0), half)
    _qkv_rope_rows_kernel[((n_heads + 2 * n_kv) * (half // block_p),)](
        x,
        weight,
        bias if bias is not None else weight,
        positions,
        slot_mapping,
        cos_sin,
        q,
        k_cache,
        v_cache,
        m,
        k,
        n_heads,
        n_kv,
        x.stride(0),
        weight.stride(0),
        D=d,
        HAS_BIAS=bias is not None,
        BLOCK_P=block_p,
        BLOCK_K=128,  # H200, Phi-3 at 8 rows: 2,904 -> 2,971 tok/s end to end against 256
        BLOCK_B=block_b(m),
        STAGES=4,
        F32_DOT=_f32_dot(weight),
        num_warps=4,
        **pdl.launch(x, m),
    )
    return q
