"""Triton kernels for CUDA. Each has a torch twin in `worker_orcd.kernels` and a GPU test beside it.

Importing this package needs `triton` (the `gpu` extra); callers check `available()` first.
"""

from __future__ import annotations

import importlib.util

import torch


def available(device: torch.device | str | None = None) -> bool:
    """True when Triton is installed and `device` (default: any) is a CUDA device."""
    if importlib.util.find_spec("triton") is None or not torch.cuda.is_available():
        return False
    return device is None or torch.device(device).type == "cuda"


def register_all() -> None:
    """Route the CUDA entries of `worker_orcd.kernels` to the Triton kernels of this package."""
    from worker_orcd import kernels
    from worker_orcd.kernels.triton import activation, attention, gemv, norm, rope

    kernels.register("cuda", "rms_norm", norm.rms_norm)
    kernels.register("cuda", "add_rms_norm", norm.add_rms_norm)
    kernels.register("cuda", "apply_rope", rope.apply_rope)
    kernels.register("cuda", "store_kv", rope.store_kv)
    kernels.register("cuda", "attention", attention.attention)
    kernels.register("cuda", "silu_and_mul", activation.silu_and_mul)
    kernels.register("cuda", "linear", gemv.linear)
    # Fused entry points, where the dispatch table has them.
    fused = {
        "rope_store_kv": rope.rope_store_kv,
        "rope_store_attend": attention.rope_store_attend,
        "silu_and_mul_linear": gemv.silu_and_mul_linear,
        "add_rms_norm_linear": gemv.add_rms_norm_linear,
        "norm_qkv_rope_store": gemv.norm_qkv_rope_store,
    }
    for name, fn in fused.items():
        if name in kernels.REFERENCE:
            kernels.register("cuda", name, fn)
