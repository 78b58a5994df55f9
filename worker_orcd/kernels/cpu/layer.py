"""The float32 operations between the matmuls, compiled for the CPU (csrc/qcpu_layer.c), with the
signatures of the torch references in worker_orcd.kernels; `register_all` plugs them in for tensors
on the CPU (the loader does, as the model runner plugs in the Triton kernels on CUDA).

A decode step of Qwen2.5-0.5B runs ~50 torch operations per layer between its matmuls; each costs
microseconds of dispatch, and on a 2-core machine with OpenMP workers sleeping passively a parallel
one also waits for a worker to wake (attention over 100 cached tokens: ~480 us in torch with two
threads, ~100 us with one, ~5 us here). Inputs these do not cover (other dtypes, strides, prompts
longer than ATTENTION_MAX_ROWS query rows per sequence, whose attention is large matmuls that torch
does well) go to the reference.

    add_rms_norm / rms_norm   float32 statistics as the reference, summation order aside
    rope_store_kv             bit-exact with the reference (same products, same order)
    attention                 causal, GQA, sliding window; softmax in float32
    silu_and_mul              AVX-512 CPUs (elsewhere torch's vectorised silu is the faster)
"""

from __future__ import annotations

import logging
import math

import torch

from worker_orcd import kernels
from worker_orcd.kernels.activation import silu_and_mul_ref
from worker_orcd.kernels.attention import AttentionMetadata, attention_ref
from worker_orcd.kernels.cpu import ops
from worker_orcd.kernels.norm import add_rms_norm_ref, rms_norm_ref
from worker_orcd.kernels.quant.ops import RoundedX

logger = logging.getLogger(__name__)

ATTENTION_MAX_ROWS = 16  # query rows of a sequence up to which the compiled attention runs
_F32 = torch.float32


def _rows(t: torch.Tensor, d: int) -> bool:
    return t.dtype == _F32 and t.dim() == 2 and t.shape[1] == d and t.is_contiguous()


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    d = weight.shape[0]
    if not (_rows(x, d) and weight.dtype == _F32 and weight.is_contiguous()):
        return rms_norm_ref(x, weight, eps)
    out = torch.empty_like(x)
    ops._qcpu.rms_norm(x.data_ptr(), 0, weight.data_ptr(), eps, x.shape[0], d, out.data_ptr(), 0)
    return out


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    rounded: RoundedX | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    d = weight.shape[0]
    fits = _rows(x, d) and weight.dtype == _F32 and weight.is_contiguous() and rounded is None
    if residual is not None:
        fits = fits and _rows(residual, d) and residual.shape == x.shape
    if not fits:
        return add_rms_norm_ref(x, residual, weight, eps, rounded)
    normed = torch.empty_like(x)
    if residual is None:
        summed, res_ptr, sum_ptr = x, 0, 0
    else:
        summed = torch.empty_like(x)
        res_ptr, sum_ptr = residual.data_ptr(), summed.data_ptr()
    ops._qcpu.rms_norm(
        x.data_ptr(), res_ptr, weight.data_ptr(), eps, x.shape[0], d, normed.data_ptr(), sum_ptr
    )
    return normed, summed


def _heads(t: torch.Tensor) -> bool:
    """[T, H, D] float32 with contiguous heads (rows may have any stride: views of qkv)."""
    return t.dtype == _F32 and t.dim() == 3 and t.stride(2) == 1 and t.stride(1) == t.shape[2]


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
    if bias is not None:
        q, k, v = kernels.add_qkv_bias(q, k, v, bias)
    t, h, d = q.shape
    fits = (
        _heads(q) and _heads(k) and _heads(v) and k.shape == v.shape and k.shape[0] == t
        and k_cache.dtype == _F32 and k_cache.is_contiguous() and v_cache.dtype == _F32
        and v_cache.is_contiguous() and k_cache.shape[1:] == k.shape[1:]
        and v_cache.shape == k_cache.shape
        and positions.dtype == torch.int64 and positions.is_contiguous()
        and slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()
        and cos_sin.dtype == _F32 and cos_sin.stride(1) == 1 and cos_sin.shape[1] <= d
        and positions.shape == (t,) and slot_mapping.shape == (t,)
    )  # fmt: skip
    if not fits:
        return kernels.rope_store_kv_ref(
            q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping
        )
    out = torch.empty((t, h, d), dtype=_F32)
    if t == 0:
        return out
    hk = k.shape[1]
    ops._qcpu.rope_store(
        q.data_ptr(), q.stride(0), h, k.data_ptr(), k.stride(0), v.data_ptr(), v.stride(0), hk, d,
        t, positions.data_ptr(), cos_sin.data_ptr(), cos_sin.stride(0), cos_sin.shape[1] // 2,
        k_cache.data_ptr(), v_cache.data_ptr(), slot_mapping.data_ptr(), out.data_ptr(),
    )  # fmt: skip
    return out


def _slot_spec(slots: slice | torch.Tensor, n_ctx: int) -> tuple[int, int] | None:
    """(first slot, address of an int64 slot index or 0), or None if the kernel cannot read it."""
    if isinstance(slots, slice):
        if slots.step not in (None, 1) or slots.start is None or slots.stop - slots.start != n_ctx:
            return None
        return slots.start, 0
    if slots.dtype != torch.int64 or slots.dim() != 1 or slots.numel() != n_ctx:
        return None
    if not slots.is_contiguous():
        return None
    return 0, slots.data_ptr()


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
    t, h, d = q.shape
    hk = k_cache.shape[1]
    fits = rounded is None and (
        meta.max_query_len <= ATTENTION_MAX_ROWS and q.dtype == _F32 and q.is_contiguous()
        and k_cache.dtype == _F32 and k_cache.is_contiguous() and v_cache.dtype == _F32
        and v_cache.is_contiguous() and v_cache.shape == k_cache.shape
        and k_cache.shape[2] == d and d <= 128 and h % hk == 0 and t == meta.num_tokens
    )  # fmt: skip
    seqs = []
    if fits:
        for b in range(meta.num_seqs):
            spec = _slot_spec(meta.kv_slots[b], meta.context_lens[b])
            if spec is None:
                fits = False
                break
            s, e = meta.query_start[b], meta.query_start[b + 1]
            seqs.append((s, e, meta.context_lens[b], spec[0], spec[1]))
    if not fits:
        return attention_ref(
            q, k_cache, v_cache, meta, scale=scale, sliding_window=sliding_window, rounded=rounded
        )
    out = torch.empty_like(q)
    ops._qcpu.attention(
        q.data_ptr(), h, d, k_cache.data_ptr(), v_cache.data_ptr(), hk, seqs,
        1.0 / math.sqrt(d) if scale is None else scale, sliding_window or 0, out.data_ptr(),
        torch.get_num_threads(), ops._DEFAULT_ISA,
    )  # fmt: skip
    return out


def silu_and_mul(x: torch.Tensor, rounded: RoundedX | None = None) -> torch.Tensor:
    if not (x.dtype == _F32 and x.dim() == 2 and x.is_contiguous() and rounded is None):
        return silu_and_mul_ref(x, rounded)
    n = x.shape[1] // 2
    out = torch.empty((x.shape[0], n), dtype=_F32)
    ops._qcpu.silu_mul(x.data_ptr(), x.shape[0], n, out.data_ptr())
    return out


def silu_and_mul_linear(
    gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """linear(silu_and_mul(gate_up)) with this module's silu_and_mul, so the fused entry point
    computes what the unfused pair does once that is registered."""
    return torch.nn.functional.linear(silu_and_mul(gate_up), weight, bias)


def register_all() -> None:
    """Use these for CPU tensors (no-op without the compiled extension)."""
    if not ops.available():
        return
    kernels.register("cpu", "rms_norm", rms_norm)
    kernels.register("cpu", "add_rms_norm", add_rms_norm)
    kernels.register("cpu", "rope_store_kv", rope_store_kv)
    kernels.register("cpu", "attention", attention)
    if "avx512" in ops.isas():
        kernels.register("cpu", "silu_and_mul", silu_and_mul)
        kernels.register("cpu", "silu_and_mul_linear", silu_and_mul_linear)
