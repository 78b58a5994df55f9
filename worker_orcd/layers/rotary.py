"""Rotary embedding shared by all layers: owns the cos/sin cache and, for LongRoPE, the factor
tensors."""

from __future__ import annotations

import logging
import math

import torch
from torch import nn

from worker_orcd import kernels
from worker_orcd.layers.linear import default_weight_loader

logger = logging.getLogger(__name__)


class RotaryEmbedding(nn.Module):
    """NEOX rotary embedding over the first `rope_dim` dims of each head.

    With LongRoPE factors (`long_factors=True`), parameters `short_factors` and `long_factors`
    [rope_dim/2] are loaded from the file and `build()` must be called after loading: like
    llama.cpp, the short factors serve a context up to `original_context` and the long ones a longer
    context. cos and sin are scaled by sqrt(1 + ln(s) / ln(original_context)) with s =
    trained_context / original_context, as transformers does, unless the file states the factor
    (`attention_scaling`).
    """

    def __init__(
        self,
        rope_dim: int,
        max_positions: int,
        theta: float,
        *,
        long_factors: bool = False,
        original_context: int | None = None,
        trained_context: int | None = None,
        attention_scaling: float | None = None,
    ) -> None:
        super().__init__()
        self.rope_dim = rope_dim
        self.max_positions = max_positions
        self.theta = theta
        self.original_context = original_context
        self.trained_context = trained_context
        self.attention_scaling = attention_scaling
        self.short_factors: nn.Parameter | None = None
        self.long_factors: nn.Parameter | None = None
        if long_factors:
            if not original_context:
                raise ValueError("LongRoPE factors need the original context length")
            for name in ("short_factors", "long_factors"):
                p = nn.Parameter(
                    torch.empty(rope_dim // 2, dtype=torch.float32), requires_grad=False
                )
                p.weight_loader = default_weight_loader
                setattr(self, name, p)
        self.register_buffer("cos_sin", torch.empty(0), persistent=False)
        if not long_factors:
            self.build()

    def build(self) -> None:
        """(Re)compute the cos/sin cache [max_positions, rope_dim] from theta and the loaded
        factors."""
        factors = None
        scaling = 1.0
        if self.long_factors is not None:
            use_long = self.max_positions > self.original_context
            factors = (self.long_factors if use_long else self.short_factors).detach()
            s = (self.trained_context or self.original_context) / self.original_context
            if self.attention_scaling is not None:
                scaling = self.attention_scaling
            elif s > 1.0:
                scaling = math.sqrt(1.0 + math.log(s) / math.log(self.original_context))
            logger.info(
                "LongRoPE: %s factors for a context of %d (original %d), scaling %.4f",
                "long" if use_long else "short",
                self.max_positions,
                self.original_context,
                scaling,
            )
        device = self.cos_sin.device
        self.cos_sin = kernels.rope_cos_sin_cache(
            self.rope_dim,
            self.max_positions,
            self.theta,
            factors=factors,
            attention_scaling=scaling,
            device=device,
        )

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T], q [T, H, D], k [T, Hk, D] -> rotated (q, k)."""
        return kernels.apply_rope(q, k, positions, self.cos_sin)
