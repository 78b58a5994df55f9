"""Kernels: pure functions on tensors. The public functions here are the only entry points.

Each kernel has a torch reference (`*_ref`, runs anywhere). A faster implementation for a device
type is plugged in with `register("cuda", "attention", fn)`, with the reference's signature;
dispatch happens here, in one place, by the device of the first tensor argument. Tests compare every
registered implementation with its reference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F

from worker_orcd.kernels.activation import silu_and_mul_linear_ref, silu_and_mul_ref
from worker_orcd.kernels.attention import AttentionMetadata, attention_ref, store_kv_ref
from worker_orcd.kernels.norm import add_rms_norm_ref, rms_norm_ref
from worker_orcd.kernels.quant.ops import RoundedX
from worker_orcd.kernels.rope import apply_rope_ref, rope_cos_sin_cache

logger = logging.getLogger(__name__)

__all__ = [
    "AttentionMetadata",
    "add_qkv_bias",
    "add_rms_norm",
    "add_rms_norm_linear",
    "apply_rope",
    "attention",
    "embedding",
    "linear",
    "norm_qkv_rope_store",
    "register",
    "rms_norm",
    "rope_cos_sin_cache",
    "rope_store_attend",
    "rope_store_kv",
    "silu_and_mul",
    "silu_and_mul_linear",
    "split_qkv",
    "store_kv",
]


def _linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, weight, bias)


def rope_store_kv_ref(
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
    """apply_rope then store_kv of the rotated k and v; returns the rotated q [T, H, D]. `bias`
    [(H + 2 Hk) D], the qkv projection's, is added to q, k and v first (in their dtype)."""
    if bias is not None:
        q, k, v = add_qkv_bias(q, k, v, bias)
    q, k = apply_rope_ref(q, k, positions, cos_sin)
    store_kv_ref(k, v, k_cache, v_cache, slot_mapping)
    return q


def rope_store_attend_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    bias: torch.Tensor | None = None,
    rounded: RoundedX | None = None,
) -> torch.Tensor:
    """`rope_store_kv` at meta's slots, then `attention` of the rotated q (each through its own
    dispatch)."""
    q = rope_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, meta.slot_mapping, bias)
    return attention(
        q, k_cache, v_cache, meta, scale=scale, sliding_window=sliding_window, rounded=rounded
    )


def add_qkv_bias(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v [T, heads, D] plus their parts of the qkv projection's bias [(H + 2 Hk) D]."""
    h, hk = q.shape[1], k.shape[1]
    bq, bk, bv = bias.view(h + 2 * hk, -1).split((h, hk, hk))
    return q + bq, k + bk, v + bv


def add_rms_norm_linear_ref(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(rms_norm(x + residual)), x + residual); without a residual, (linear(rms_norm(x)),
    x). A norm and the projection it feeds, as a decoder layer runs them."""
    normed, summed = add_rms_norm_ref(x, residual, norm_weight, eps)
    return F.linear(normed, weight, bias), summed


def norm_qkv_rope_store_ref(
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
    """add_rms_norm_linear into the qkv projection, then rope_store_kv: returns (rotated q [T, H,
    D], x + residual); rotated k and v are written into the caches."""
    qkv, summed = add_rms_norm_linear_ref(x, residual, norm_weight, eps, weight, bias)
    q, k, v = split_qkv(qkv, k_cache)
    q = rope_store_kv_ref(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)
    return q, summed


def split_qkv(
    qkv: torch.Tensor, k_cache: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """qkv [T, (H + 2 Hk) D] -> views q [T, H, D], k and v [T, Hk, D] (Hk, D from the cache)."""
    rows = qkv.shape[0]
    _, n_kv, d = k_cache.shape
    n_heads = qkv.shape[1] // d - 2 * n_kv
    q, k, v = qkv.split([n_heads * d, n_kv * d, n_kv * d], dim=-1)
    return q.view(rows, n_heads, d), k.view(rows, n_kv, d), v.view(rows, n_kv, d)


def _embedding_ref(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids, weight)


REFERENCE: dict[str, Callable[..., object]] = {
    "rms_norm": rms_norm_ref,
    "add_rms_norm": add_rms_norm_ref,
    "add_rms_norm_linear": add_rms_norm_linear_ref,
    "norm_qkv_rope_store": norm_qkv_rope_store_ref,
    "apply_rope": apply_rope_ref,
    "store_kv": store_kv_ref,
    "rope_store_kv": rope_store_kv_ref,
    "rope_store_attend": rope_store_attend_ref,
    "attention": attention_ref,
    "silu_and_mul": silu_and_mul_ref,
    "silu_and_mul_linear": silu_and_mul_linear_ref,
    "linear": _linear_ref,
    "embedding": _embedding_ref,
}

# device type ("cuda") -> kernel name -> implementation
_BACKENDS: dict[str, dict[str, Callable[..., object]]] = {}


def register(device_type: str, name: str, fn: Callable[..., object]) -> None:
    """Use `fn` instead of the reference for tensors on `device_type`."""
    if name not in REFERENCE:
        raise KeyError(f"unknown kernel {name!r}; known: {sorted(REFERENCE)}")
    _BACKENDS.setdefault(device_type, {})[name] = fn
    logger.debug("kernel %s on %s -> %s", name, device_type, getattr(fn, "__qualname__", fn))


def implementation(name: str, device: torch.device) -> Callable[..., object]:
    return _BACKENDS.get(device.type, {}).get(name) or REFERENCE[name]


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return implementation("rms_norm", x.device)(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    rounded: RoundedX | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual); residual None: (rms_norm(x), x). `rounded`: also
    written, the normalized rows rounded to int8 for the quantized GEMV they feed."""
    return implementation("add_rms_norm", x.device)(x, residual, weight, eps, rounded)


def add_rms_norm_linear(
    x: torch.Tensor,  # [T, K]
    residual: torch.Tensor | None,  # [T, K]
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None,  # [N]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(linear(rms_norm(x + residual)) [T, N], x + residual [T, K]); residual None: no add."""
    return implementation("add_rms_norm_linear", x.device)(
        x, residual, norm_weight, eps, weight, bias
    )


def norm_qkv_rope_store(
    x: torch.Tensor,  # [T, K]
    residual: torch.Tensor | None,  # [T, K]
    norm_weight: torch.Tensor,  # [K]
    eps: float,
    weight: torch.Tensor,  # [(H + 2 Hk) D, K]: q, k, v rows
    bias: torch.Tensor | None,
    positions: torch.Tensor,  # [T]
    cos_sin: torch.Tensor,  # [P, R]
    k_cache: torch.Tensor,  # [S, Hk, D]
    v_cache: torch.Tensor,  # [S, Hk, D]
    slot_mapping: torch.Tensor,  # [T]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A layer's attention input: the norm (with the residual add), the qkv projection, the
    rotary embedding of q and k, and the write of k and v into the caches at slot_mapping.
    Returns (rotated q [T, H, D], x + residual)."""
    return implementation("norm_qkv_rope_store", x.device)(
        x,
        residual,
        norm_weight,
        eps,
        weight,
        bias,
        positions,
        cos_sin,
        k_cache,
        v_cache,
        slot_mapping,
    )


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    return implementation("apply_rope", q.device)(q, k, positions, cos_sin)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    implementation("store_kv", k.device)(k, v, k_cache, v_cache, slot_mapping)


def rope_store_kv(
    q: torch.Tensor,  # [T, H, D]
    k: torch.Tensor,  # [T, Hk, D]
    v: torch.Tensor,  # [T, Hk, D]
    positions: torch.Tensor,  # [T]
    cos_sin: torch.Tensor,  # [P, R]
    k_cache: torch.Tensor,  # [S, Hk, D]
    v_cache: torch.Tensor,  # [S, Hk, D]
    slot_mapping: torch.Tensor,  # [T]
    bias: torch.Tensor | None = None,  # [(H + 2 Hk) D]
) -> torch.Tensor:
    """Rotate q and k (after adding the qkv projection's bias to q, k and v, if given), write the
    rotated k and v into the caches; returns the rotated q."""
    return implementation("rope_store_kv", q.device)(
        q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, bias
    )


def attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    rounded: RoundedX | None = None,
) -> torch.Tensor:
    """Causal attention of q [T, H, D] over the cached contexts -> [T, H, D]; `rounded`: also
    written, the output rounded to int8 for the quantized o projection it feeds."""
    return implementation("attention", q.device)(
        q, k_cache, v_cache, meta, scale=scale, sliding_window=sliding_window, rounded=rounded
    )


def rope_store_attend(
    q: torch.Tensor,  # [T, H, D], before RoPE
    k: torch.Tensor,  # [T, Hk, D], before RoPE
    v: torch.Tensor,  # [T, Hk, D]
    positions: torch.Tensor,  # [T]
    cos_sin: torch.Tensor,  # [P, R]
    k_cache: torch.Tensor,  # [S, Hk, D]
    v_cache: torch.Tensor,  # [S, Hk, D]
    meta: AttentionMetadata,
    *,
    scale: float | None = None,
    sliding_window: int | None = None,
    bias: torch.Tensor | None = None,  # [(H + 2 Hk) D]
    rounded: RoundedX | None = None,
) -> torch.Tensor:
    """`rope_store_kv` (this step's k and v into the caches at meta's slots) then `attention` of
    the rotated q -> [T, H, D]; `rounded` as in `attention`."""
    return implementation("rope_store_attend", q.device)(
        q,
        k,
        v,
        positions,
        cos_sin,
        k_cache,
        v_cache,
        meta,
        scale=scale,
        sliding_window=sliding_window,
        bias=bias,
        rounded=rounded,
    )


def silu_and_mul(x: torch.Tensor, rounded: RoundedX | None = None) -> torch.Tensor:
    """x [T, 2I] (gate, up) -> silu(gate) * up [T, I]; `rounded`: also written, the result rounded
    to int8 for the quantized GEMV it feeds."""
    return implementation("silu_and_mul", x.device)(x, rounded)


def silu_and_mul_linear(
    gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """linear(silu_and_mul(gate_up), weight, bias): gate_up [T, 2I], weight [N, I] -> [T, N]."""
    return implementation("silu_and_mul_linear", gate_up.device)(gate_up, weight, bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return implementation("linear", x.device)(x, weight, bias)


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return implementation("embedding", weight.device)(ids, weight)
