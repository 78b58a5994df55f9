"""Q4_K_M-style quant mixes for models with random weights (the bench's quantized presets).

`q4_k_m_type` follows llama.cpp's choice for LLAMA_FTYPE_MOSTLY_Q4_K_M (llama-quant.cpp): Q4_K
everywhere except Q6_K for the output head (and a tied embedding, which serves as the head), Q6_K
for attn_v and ffn_down in the layers `use_more_bits` picks (the first and last eighth and every
third between), and Q5_K for a fused attn_qkv. Rows that are not a whole number of 256-value
super-blocks fall back as llama.cpp does: Q4_K -> Q5_0, Q6_K -> Q8_0, Q5_K -> Q5_1 (kept as Q5_0
here, which the kernels support), so Qwen2.5-0.5B (hidden 896) comes out mostly Q5_0/Q8_0 as its
real file does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from gguf import GGMLQuantizationType
from torch import nn

from worker_orcd.config import ModelConfig
from worker_orcd.kernels.quant.formats import nbytes, random_blocks, to_planes
from worker_orcd.kernels.quant.weights import PackedWeight, QuantizedWeight

logger = logging.getLogger(__name__)

Q = GGMLQuantizationType
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_0, Q.Q6_K: Q.Q8_0}


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def q4_k_m_type(role: str, layer: int | None, config: ModelConfig, k: int) -> GGMLQuantizationType:
    """Type of one GGUF tensor: `role` is its llama.cpp name without `blk.N.` and `.weight`
    ("attn_v", "ffn_down", "output", "token_embd", ...), `k` its row length."""
    more = layer is not None and _use_more_bits(layer, config.n_layers)
    if role == "output" or (role == "token_embd" and config.tied_embeddings):
        qtype = Q.Q6_K
    elif role in ("attn_v", "ffn_down") and more:
        qtype = Q.Q6_K
    elif role == "attn_qkv":
        qtype = Q.Q5_K
    else:
        qtype = Q.Q4_K
    return _FALLBACK[qtype] if k % 256 else qtype


def _roles(name: str, config: ModelConfig) -> tuple[int | None, dict[object, str]]:
    """(layer, shard id -> role) of one placeholder parameter's module."""
    fused = config.architecture == "phi3"
    parts = name.split(".")
    layer = int(parts[2]) if parts[:2] == ["model", "layers"] else None
    leaf = parts[-1] if layer is None else ".".join(parts[3:])
    roles: dict[str, dict[object, str]] = {
        "embed_tokens": {None: "token_embd"},
        "lm_head": {None: "output"},
        "self_attn.qkv_proj": (
            {None: "attn_qkv"} if fused else {"q": "attn_q", "k": "attn_k", "v": "attn_v"}
        ),
        "self_attn.o_proj": {None: "attn_output"},
        "mlp.gate_up_proj": {None: "ffn_up"} if fused else {0: "ffn_gate", 1: "ffn_up"},
        "mlp.down_proj": {None: "ffn_down"},
    }
    if leaf not in roles:
        raise ValueError(f"no Q4_K_M role for module {name}")
    return layer, roles[leaf]


@dataclass(frozen=True, slots=True)
class PlannedWeight:
    module: str  # the owning module ("model.layers.3.self_attn.qkv_proj")
    shards: list[tuple[GGMLQuantizationType, int]]  # (type, rows) in row order
    k: int

    @property
    def nbytes(self) -> int:
        return sum(nbytes(qtype, n, self.k) for qtype, n in self.shards)


def plan_q4_k_m(model: nn.Module, config: ModelConfig) -> list[PlannedWeight]:
    """The Q4_K_M-style type of every quantized placeholder (a model built with quantized=True;
    works on the meta device), a tied head's weight once."""
    plan: list[PlannedWeight] = []
    seen: set[int] = set()
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if weight is None or id(weight) in seen or not hasattr(module, "quantized"):
            continue
        seen.add(id(weight))
        layer, roles = _roles(name, config)
        slices = getattr(weight, "shard_slices", None)
        spans = [(None, slice(0, weight.shape[0]))] if None in roles else list(slices.items())
        k = weight.shape[1]
        shards = [(q4_k_m_type(roles[s], layer, config, k), r.stop - r.start) for s, r in spans]
        plan.append(PlannedWeight(name, shards, k))
    return plan


@torch.no_grad()
def fill_random_q4_k_m(
    model: nn.Module, config: ModelConfig, *, generator: torch.Generator, scale: float = 1e-3
) -> dict[str, int]:
    """Give every quantized placeholder (a model built with quantized=True) random blocks of its
    Q4_K_M-style type, made on the device of the generator; returns bytes per type."""
    device = generator.device
    modules = dict(model.named_modules())
    mix: dict[str, int] = {}
    for planned in plan_q4_k_m(model, config):
        k = planned.k
        shards = []
        for qtype, n in planned.shards:
            raw = random_blocks(qtype, n, k, device=device, generator=generator, scale=scale)
            shards.append(QuantizedWeight(qtype, n, k, to_planes(raw.reshape(-1), qtype, n, k)))
            mix[qtype.name] = mix.get(qtype.name, 0) + shards[-1].nbytes
        packed = PackedWeight.pack(shards)
        weight = modules[planned.module].weight
        for m in model.modules():  # the embedding and a head tied to it
            if m._parameters.get("weight") is weight:
                m.quantized = packed
    return mix
