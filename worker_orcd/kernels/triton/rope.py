"""NEOX rotary embedding, alone and fused with the KV-cache write; one program per (token, head).

The cos/sin cache is [P, R] float32 with cos in the first R/2 columns and sin in the rest (see
`worker_orcd.kernels.rope`). Only the first R dims of a head rotate; the rest are copied.
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from worker_orcd.kernels.triton import norm_in, pdl

logger = logging.getLogger(__name__)


@triton.jit
def load_biased(src, b, i, mask, HAS_BIAS: tl.constexpr):
    """x[i] in float32; with a bias, x + b rounded to x's dtype first, as the projection's output
    plus its bias is when added apart (one torch add): the residual add of `norm_in`."""
    return norm_in.norm_in(src, b, i, mask, HAS_BIAS).to(tl.float32)


@triton.jit
def _cos_sin(cs_ptr, HALF, BLOCK_HALF: tl.constexpr):
    """The cos and sin halves [BLOCK_HALF] of the cache row at `cs_ptr`."""
    i = tl.arange(0, BLOCK_HALF)
    hm = i < HALF
    return tl.load(cs_ptr + i, mask=hm, other=0.0), tl.load(cs_ptr + HALF + i, mask=hm, other=0.0)


@triton.jit
def _rotate_head(
    src,
    b,
    dst,
    cos,
    sin,
    HALF,
    D,
    BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """Rotate one head at `src` (plus its bias at `b`) into `dst` with the position's `cos`, `sin`
    ([BLOCK_HALF] each, `_cos_sin`)."""
    i = tl.arange(0, BLOCK_HALF)
    hm = i < HALF
    x1 = load_biased(src, b, i, hm, HAS_BIAS)
    x2 = load_biased(src, b, HALF + i, hm, HAS_BIAS)
    ty = dst.dtype.element_ty
    tl.store(dst + i, (x1 * cos - x2 * sin).to(ty), mask=hm)
    tl.store(dst + HALF + i, (x2 * cos + x1 * sin).to(ty), mask=hm)
    if 2 * HALF < D:  # partial rotary: the tail passes through
        j = 2 * HALF + tl.arange(0, BLOCK_D)
        jm = j < D
        tl.store(dst + j, load_biased(src, b, j, jm, HAS_BIAS).to(ty), mask=jm)


@triton.jit
def _rope_kernel(
    q_ptr,  # [T, H, D] (any token stride)
    k_ptr,  # [T, Hk, D]
    v_ptr,  # [T, Hk, D], read when STORE
    qo_ptr,  # [T, H, D] contiguous
    ko_ptr,  # [T, Hk, D] contiguous, written unless STORE
    kc_ptr,  # [S, Hk, D] key cache, written when STORE
    vc_ptr,  # [S, Hk, D] value cache
    pos_ptr,  # [T]
    slot_ptr,  # [T]
    cs_ptr,  # [P, R]
    b_ptr,  # [(H + 2 Hk) D] bias of q, k, v, or unused
    H,
    HK,
    D,
    HALF,
    stride_qt,
    stride_kt,
    stride_vt,
    STORE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    # Positions and slots are written before the step's first layer (a host copy, or the decode
    # graph's first kernel), never by the projection this kernel follows: they and the cos/sin row
    # they select are read before the PDL wait, which then leaves one round trip (q, k, v) to wait.
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos, sin = _cos_sin(cs_ptr + pos * (2 * HALF), HALF, BLOCK_HALF)
    if STORE:  # a constexpr branch: slot exists, and is used, only where the caches are written
        slot = tl.load(slot_ptr + t).to(tl.int64)
    pdl.prologue(PDL)
    if h < H:
        _rotate_head(
            q_ptr + t * stride_qt + h * D,
            b_ptr + h * D,
            qo_ptr + (t * H + h) * D,
            cos,
            sin,
            HALF,
            D,
            BLOCK_HALF,
            BLOCK_D,
            HAS_BIAS,
        )
    else:
        hk = h - H
        if STORE:
            if slot >= 0:  # a negative slot marks a padding token: nothing is written
                dst = kc_ptr + (slot * HK + hk) * D
                kb = b_ptr + h * D
                _rotate_head(
                    k_ptr + t * stride_kt + hk * D,
                    kb,
                    dst,
                    cos,
                    sin,
                    HALF,
                    D,
                    BLOCK_HALF,
                    BLOCK_D,
                    HAS_BIAS,
                )
                j = tl.arange(0, BLOCK_D)
                jm = j < D
                v = load_biased(v_ptr + t * stride_vt + hk * D, kb + HK * D, j, jm, HAS_BIAS)
                tl.store(vc_ptr + (slot * HK + hk) * D + j, v.to(vc_ptr.dtype.element_ty), mask=jm)
        else:
            _rotate_head(
                k_ptr + t * stride_kt + hk * D,
                b_ptr + h * D,
                ko_ptr + (t * HK + hk) * D,
                cos,
                sin,
                HALF,
                D,
                BLOCK_HALF,
                BLOCK_D,
                HAS_BIAS,
            )


def _check(x: torch.Tensor) -> None:
    assert x.stride(2) == 1 and x.stride(1) == x.shape[2], "heads must be packed within a token"


def _launch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    slots: torch.Tensor,
    cos_sin: torch.Tensor,
    qo: torch.Tensor,
    ko: torch.Tensor,
    caches: tuple[torch.Tensor, torch.Tensor] | None,
    bias: torch.Tensor | None = None,
) -> None:
    """Rotate q into qo and k into ko, or, with caches, rotated k and v into the caches at slots;
    `bias` [(H + 2 Hk) D] (q's, k's, v's) is added first."""
    n, n_heads, d = q.shape
    if not n:
        return
    half = cos_sin.shape[1] // 2
    kc, vc = caches if caches is not None else (ko, ko)
    _rope_kernel[(n, n_heads + k.shape[1])](
        q,
        k,
        v,
        qo,
        ko,
        kc,
        vc,
        positions,
        slots,
        cos_sin,
        bias if bias is not None else cos_sin,
        n_heads,
        k.shape[1],
        d,
        half,
        q.stride(0),
        k.stride(0),
        v.stride(0) if caches is not None else 0,
        STORE=caches is not None,
        HAS_BIAS=bias is not None,
        BLOCK_HALF=triton.next_power_of_2(half),
        BLOCK_D=triton.next_power_of_2(d),
        **pdl.launch(q, n),
        num_warps=1,
    )


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D], k [T, Hk, D], positions [T], cos_sin [P, R] -> rotated (q, k), contiguous."""
    _check(q)
    _check(k)
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    ko = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    _launch(q, k, k, positions, positions, cos_sin, qo, ko, None)
    return qo, ko


def rope_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate q and k; write rotated k and v [T, Hk, D] into the caches [S, Hk, D] at slot_mapping
    (tokens with a negative slot are not written). `bias` [(H + 2 Hk) D], the qkv projection's,
    is added to q, k and v first.

    Returns the rotated q [T, H, D]. Equals apply_rope followed by store_kv, in one launch.
    """
    for x in (q, k, v):
        _check(x)
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    assert bias is None or bias.is_contiguous()
    qo = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _launch(q, k, v, positions, slot_mapping, cos_sin, qo, qo, (k_cache, v_cache), bias)
    return qo


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    kc_ptr,
    vc_ptr,
    slot_ptr,
    HK,
    D,
    stride_kt,
    stride_vt,
    BLOCK_D: tl.constexpr,
    PDL: tl.constexpr,
):
    pdl.prologue(PDL)
    t = tl.program_id(0).to(tl.int64)
    hk = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:  # a negative slot marks a padding token: nothing is written
        j = tl.arange(0, BLOCK_D)
        jm = j < D
        k = tl.load(k_ptr + t * stride_kt + hk * D + j, mask=jm, other=0.0)
        v = tl.load(v_ptr + t * stride_vt + hk * D + j, mask=jm, other=0.0)
        tl.store(kc_ptr + (slot * HK + hk) * D + j, k.to(kc_ptr.dtype.element_ty), mask=jm)
        tl.store(vc_ptr + (slot * HK + hk) * D + j, v.to(vc_ptr.dtype.element_ty), mask=jm)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write k, v [T, Hk, D] into the caches [S, Hk, D] at slot_mapping [T] (skipping negative
    slots, which mark padding tokens)."""
    n, n_kv, d = k.shape
    _check(k)
    _check(v)
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    if n:
        _store_kv_kernel[(n, n_kv)](
            k,
            v,
            k_cache,
            v_cache,
            slot_mapping,
            n_kv,
            d,
            k.stride(0),
            v.stride(0),
            BLOCK_D=triton.next_power_of_2(d),
            **pdl.launch(k, n),
            num_warps=1,
        )
