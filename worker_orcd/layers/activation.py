"""SwiGLU activation on the fused gate/up output."""

from __future__ import annotations

import torch
from torch import nn

from worker_orcd import kernels


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.silu_and_mul(x)  # [T, 2I] -> [T, I]
