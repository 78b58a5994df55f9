"""Attention over the KV cache: store this step's k/v (rotating q and k first when given the rotary
cos/sin, in one kernel), then attend. The model runner binds the caches."""

from __future__ import annotations

import torch
from torch import nn

from worker_orcd import kernels
from worker_orcd.kernels import AttentionMetadata
from worker_orcd.kernels.quant.ops import RoundedX


class Attention(nn.Module):
    """Holds one layer's KV cache views (k_cache, v_cache [num_slots, Hk, D]); no parameters."""

    def __init__(
        self, n_heads: int, n_kv_heads: int, head_dim: int, *, sliding_window: int | None = None
    ) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = sliding_window
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        meta: AttentionMetadata,
        *,
        positions: torch.Tensor | None = None,
        cos_sin: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        rounded: RoundedX | None = None,
    ) -> torch.Tensor:
        """q [T, H, D], k and v [T, Hk, D] -> [T, H, D]. With cos_sin [P, R] and positions [T], q
        and k are rotated here (un-rotated on input). `bias` [(H + 2 Hk) D], the qkv
        projection's, is added to q, k and v first. `rounded`: see `attend`."""
        self.check_bound()
        if cos_sin is not None:
            assert positions is not None, "rotary cos_sin given without positions"
            return kernels.rope_store_attend(
                q,
                k,
                v,
                positions,
                cos_sin,
                self.k_cache,
                self.v_cache,
                meta,
                scale=self.scale,
                sliding_window=self.sliding_window,
                bias=bias,
                rounded=rounded,
            )
        else:
            if bias is not None:
                q, k, v = kernels.add_qkv_bias(q, k, v, bias)
            kernels.store_kv(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        return self.attend(q, meta, rounded)

    def check_bound(self) -> None:
        if self.k_cache.numel() == 0:
            raise RuntimeError(
                "KV cache not bound: the model runner must bind caches before forward"
            )

    def attend(
        self, q: torch.Tensor, meta: AttentionMetadata, rounded: RoundedX | None = None
    ) -> torch.Tensor:
        """Rotated q [T, H, D] over the caches, this step's keys and values already written;
        `rounded`: also written, the output rounded to int8 for a quantized o projection."""
        return kernels.attention(
            q,
            self.k_cache,
            self.v_cache,
            meta,
            scale=self.scale,
            sliding_window=self.sliding_window,
            rounded=rounded,
        )
