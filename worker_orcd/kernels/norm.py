"""RMSNorm, alone and fused with the residual add (torch reference)."""

from __future__ import annotations

import torch

from worker_orcd.kernels.quant.ops import RoundedX, round_x_reference


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [T, D], weight [D] -> [T, D]; statistics in float32, scaled in x's dtype as transformers
    does."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    rounded: RoundedX | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (rms_norm(x + residual), x + residual); x, residual [T, D]. Without a residual (a
    model's first layer), (rms_norm(x), x). `rounded`: filled with the normalized rows rounded to
    int8 as the quantized GEMVs read them."""
    summed = x if residual is None else x + residual
    y = rms_norm_ref(summed, weight, eps)
    if rounded is not None:
        round_x_reference(y, out=rounded)
    return y, summed
