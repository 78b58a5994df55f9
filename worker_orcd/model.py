"""ONE Llama-family decoder-only transformer. Every difference between the models it runs comes from
ModelConfig flags (bias, fused tensors, sliding window, rope factors, tied embeddings); the layout
of the fused parameters is the same for every file, and loader.py maps each file's tensors onto it.

Module names follow transformers (`model.layers.N.self_attn.qkv_proj`, `mlp.gate_up_proj`, ...) so
parity tests line up with Qwen2/Phi-3 reference implementations.

The forward pass runs over a flat batch of T tokens that may belong to several sequences: input_ids
[T], positions [T] and the AttentionMetadata (KV slots per token, per-sequence lengths) built by the
model runner.

Split over several ranks (`parallel`, worker_orcd/parallel.py), every rank runs this same model on
its part of the heads, the FFN and the vocabulary; the attention and MLP outputs are all-reduced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from worker_orcd import kernels
from worker_orcd.config import ModelConfig
from worker_orcd.kernels import AttentionMetadata
from worker_orcd.kernels.quant.ops import RoundedX
from worker_orcd.layers import (
    Attention,
    GateUpLinear,
    Linear,
    LMHead,
    QKVLinear,
    RMSNorm,
    RotaryEmbedding,
    SiluAndMul,
    VocabEmbedding,
)
from worker_orcd.parallel import SINGLE, Parallel

logger = logging.getLogger(__name__)


class SelfAttention(nn.Module):
    def __init__(
        self, config: ModelConfig, *, quantized: bool = False, parallel: Parallel = SINGLE
    ) -> None:
        super().__init__()
        self.parallel = parallel
        self.n_heads = config.n_heads // parallel.size  # this rank's heads
        self.n_kv_heads = config.n_kv_heads // parallel.size
        self.head_dim = config.head_dim
        self.qkv_proj = QKVLinear(
            config.hidden_size,
            config.n_heads,
            config.n_kv_heads,
            config.head_dim,
            bias=config.qkv_bias,
            quantized=quantized,
            parallel=parallel,
        )
        self.o_proj = Linear(
            config.q_size, config.hidden_size, quantized=quantized, parallel=parallel, split="in"
        )
        self.attn = Attention(
            self.n_heads,
            self.n_kv_heads,
            config.head_dim,
            sliding_window=config.sliding_window,
        )

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        norm: RMSNorm,
        meta: AttentionMetadata,
        cos_sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(attention output [T, D], x + residual): `norm` (with the residual add), the qkv
        projection, RoPE with the KV-cache write, attention and the output projection."""
        n = hidden.shape[0]
        attn, proj, o_proj = self.attn, self.qkv_proj, self.o_proj
        # The o projection's input rounded to int8 by the decode attention, where its GEMV reads
        # x rounded once (no rounding launch of its own); heads must be whole 32-element blocks.
        rounded = None
        if o_proj.quantized is not None and meta.is_decode and self.head_dim % 32 == 0:
            rounded = _rounded_x_for(o_proj, n, hidden.device)
        if proj.quantized is None:  # one kernel up to the cache write, where one fits
            attn.check_bound()
            q, residual = kernels.norm_qkv_rope_store(
                hidden,
                residual,
                norm.weight,
                norm.eps,
                proj.weight,
                proj.bias,
                positions,
                cos_sin,
                attn.k_cache,
                attn.v_cache,
                meta.slot_mapping,
            )
            out = attn.attend(q, meta, rounded)  # [T, H, D]
        else:
            # [T, (H + 2 Hk) D] without the bias, which the RoPE kernel adds as it reads q, k, v
            qkv, residual = _norm_linear(norm, proj, hidden, residual, add_bias=False)
            q, k, v = kernels.split_qkv(qkv, attn.k_cache)  # [T, H, D], [T, Hk, D] x 2
            # RoPE is applied inside, fused with the KV-cache write.
            out = attn(
                q, k, v, meta, positions=positions, cos_sin=cos_sin, bias=proj.bias, rounded=rounded
            )
        out = o_proj(out.reshape(n, self.n_heads * self.head_dim), rounded)  # [T, D], partial
        return self.parallel.all_reduce(out), residual


class MLP(nn.Module):
    def __init__(
        self, config: ModelConfig, *, quantized: bool = False, parallel: Parallel = SINGLE
    ) -> None:
        super().__init__()
        self.parallel = parallel
        self.gate_up_proj = GateUpLinear(
            config.hidden_size, config.intermediate_size, quantized=quantized, parallel=parallel
        )
        self.act_fn = SiluAndMul()
        self.down_proj = Linear(
            config.intermediate_size,
            config.hidden_size,
            quantized=quantized,
            parallel=parallel,
            split="in",
        )

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up [T, 2I], the output of gate_up_proj -> [T, D]."""
        down = self.down_proj
        if down.quantized is None:  # SwiGLU fused into the down projection
            out = kernels.silu_and_mul_linear(gate_up, down.weight, down.bias)  # [T, D]
        else:
            rounded = _rounded_x_for(down, gate_up.shape[0], gate_up.device)
            out = down(kernels.silu_and_mul(gate_up, rounded), rounded)
        return self.parallel.all_reduce(out)  # the sum of every rank's part of the FFN


class DecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, *, quantized: bool = False, parallel: Parallel = SINGLE
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
        self.self_attn = SelfAttention(config, quantized=quantized, parallel=parallel)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_eps)
        self.mlp = MLP(config, quantized=quantized, parallel=parallel)

    def forward(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
        cos_sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden, residual [T, D]: the residual add of the previous block is fused into this
        norm, and each norm into the projection it feeds where a kernel does that."""
        hidden, residual = self.self_attn(
            positions, hidden, residual, self.input_layernorm, meta, cos_sin
        )
        gate_up, residual = _norm_linear(
            self.post_attention_layernorm, self.mlp.gate_up_proj, hidden, residual
        )
        return self.mlp(gate_up), residual


def _norm_linear(
    norm: RMSNorm,
    proj: Linear,
    x: torch.Tensor,
    residual: torch.Tensor | None,
    *,
    add_bias: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(proj(norm(x + residual)), x + residual); without a residual (the first layer), no add.
    `add_bias=False` leaves proj's bias to the caller."""
    bias = proj.bias if add_bias else None
    if proj.quantized is None:
        return kernels.add_rms_norm_linear(x, residual, norm.weight, norm.eps, proj.weight, bias)
    if proj.quantized.fuses_norm(x.shape[0], x.device):  # the GEMVs normalize x themselves
        return proj.quantized.norm_matmul(x, residual, norm.weight, norm.eps, bias)
    rounded = _rounded_x_for(proj, x.shape[0], x.device)
    normed, summed = kernels.add_rms_norm(x, residual, norm.weight, norm.eps, rounded)
    return proj.quantized.matmul(normed, bias, rounded), summed


def _rounded_x_for(proj: Linear, rows: int, device: torch.device) -> RoundedX | None:
    """Buffers for the input of quantized `proj` rounded to int8 by the kernel that produces it,
    where proj's GEMV reads x rounded once (decode on CUDA, large K-quant weights); else None."""
    if not proj.quantized.takes_rounded_x(rows, device):
        return None
    return RoundedX.empty(rows, proj.in_features, device)


class ForwardAborted(Exception):
    """Raised between layers once the caller's `abort()` returns True (a cancelled request)."""


class Transformer(nn.Module):
    def __init__(
        self,
        config: ModelConfig,
        max_positions: int,
        *,
        quantized: bool = False,
        parallel: Parallel = SINGLE,
    ) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(
            config.vocab_size, config.hidden_size, quantized=quantized, parallel=parallel
        )
        self.rotary_emb = RotaryEmbedding(
            config.rope_dim,
            max_positions,
            config.rope_theta,
            long_factors=config.has_rope_factors,
            original_context=config.rope_original_context,
            trained_context=config.context_length,
            attention_scaling=config.rope_attn_factor,
        )
        self.layers = nn.ModuleList(
            DecoderLayer(config, quantized=quantized, parallel=parallel)
            for _ in range(config.n_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_eps)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        abort: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)  # [T, D]
        residual: torch.Tensor | None = None
        cos_sin = self.rotary_emb.cos_sin
        for layer in self.layers:
            # A cancelled request stops within one layer, not one whole pass (a CPU decode step
            # or a long prefill takes far longer than a cancel may).
            if abort is not None and abort():
                raise ForwardAborted
            hidden, residual = layer(positions, hidden, residual, meta, cos_sin)
        hidden, _ = self.norm(hidden, residual)
        return hidden


class CausalLM(nn.Module):
    """input_ids [T], positions [T], meta -> hidden [T, D]; compute_logits(hidden [N, D]) -> [N,
    V].

    `quantized=True` builds the projections, embedding and head as shapes only (meta device); the
    loader gives them their GGUF blocks (layers/linear.py). `parallel`: this rank's place when the
    model is split over several (each rank builds this same model and holds its part).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        max_positions: int | None = None,
        quantized: bool = False,
        parallel: Parallel = SINGLE,
    ) -> None:
        super().__init__()
        self.config = config
        self.parallel = parallel
        self.max_positions = max_positions or config.context_length
        self.model = Transformer(config, self.max_positions, quantized=quantized, parallel=parallel)
        tied = self.model.embed_tokens if config.tied_embeddings else None
        self.lm_head = LMHead(
            config.vocab_size, config.hidden_size, tied, quantized=quantized, parallel=parallel
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        meta: AttentionMetadata,
        abort: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        return self.model(input_ids, positions, meta, abort)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)  # [N, V] float32

    def attention_layers(self) -> list[Attention]:
        """The per-layer attention modules, whose KV caches the model runner binds."""
        return [layer.self_attn.attn for layer in self.model.layers]

    def finish_loading(self) -> None:
        """Build what derives from loaded weights (the LongRoPE cos/sin cache)."""
        self.model.rotary_emb.build()
