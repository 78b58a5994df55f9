"""SwiGLU on the fused gate/up projection output, alone and fused into the down projection (torch
references)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker_orcd.kernels.quant.ops import RoundedX, round_x_reference


def silu_and_mul_ref(x: torch.Tensor, rounded: RoundedX | None = None) -> torch.Tensor:
    """x [T, 2I] holding gate then up -> silu(gate) * up [T, I]. `rounded`: filled with the result
    rounded to int8 as the quantized GEMVs read it."""
    gate, up = x.chunk(2, dim=-1)
    y = F.silu(gate) * up
    if rounded is not None:
        round_x_reference(y, out=rounded)
    return y


def silu_and_mul_linear_ref(
    gate_up: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """gate_up [T, 2I], weight [N, I], bias [N] -> linear(silu(gate) * up) [T, N]."""
    return F.linear(silu_and_mul_ref(gate_up), weight, bias)
