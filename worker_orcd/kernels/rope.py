"""Rotary position embedding, NEOX pairing (element i with i + rope_dim/2), as llama.cpp applies it
to qwen2 and phi3 and transformers' rotate_half does.

The cos/sin cache is one float32 tensor [max_positions, rope_dim] holding cos in the first half of
the last dimension and sin in the second; it is built once per model and indexed by position.
"""

from __future__ import annotations

import torch


def rope_cos_sin_cache(
    rope_dim: int,
    max_positions: int,
    theta: float,
    *,
    factors: torch.Tensor | None = None,
    attention_scaling: float = 1.0,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """cos/sin cache [max_positions, rope_dim] (float32).

    `factors` [rope_dim / 2] are LongRoPE frequency divisors (Phi-3 rope_factors_short/long); the
    cos and sin are multiplied by `attention_scaling` as transformers does for LongRoPE.
    """
    if rope_dim % 2:
        raise ValueError(f"rope_dim must be even (got {rope_dim})")
    exponents = torch.arange(0, rope_dim, 2, dtype=torch.float32, device=device) / rope_dim
    inv_freq = 1.0 / (theta**exponents)  # [R/2]
    if factors is not None:
        if factors.shape != (rope_dim // 2,):
            raise ValueError(
                f"rope factors must have shape ({rope_dim // 2},), got {tuple(factors.shape)}"
            )
        inv_freq = inv_freq / factors.to(device=inv_freq.device, dtype=torch.float32)
    positions = torch.arange(max_positions, dtype=torch.float32, device=device)
    freqs = positions[:, None] * inv_freq[None, :]  # [P, R/2]
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1) * attention_scaling


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [T, H, D]; cos, sin [T, 1, R/2] float32. Only the first R dims rotate (partial rotary).
    half = cos.shape[-1]
    rot = 2 * half
    xf = x[..., :rot].float()
    x1, x2 = xf[..., :half], xf[..., half:]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    if rot == x.shape[-1]:
        return out
    return torch.cat([out, x[..., rot:]], dim=-1)


def apply_rope_ref(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, H, D], k [T, Hk, D], positions [T] (int64), cos_sin [P, R] -> rotated (q, k)."""
    cs = cos_sin.index_select(0, positions)  # [T, R]
    cos, sin = cs[:, None, :].chunk(2, dim=-1)  # [T, 1, R/2]
    return _rotate(q, cos, sin), _rotate(k, cos, sin)
