"""Q4_K_M-style random mixes for the bench (CPU: plans on the meta device, small filled models)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from worker_orcd.bench import PRESETS, _decode_weight_bytes
from worker_orcd.kernels.quant.formats import nbytes
from worker_orcd.kernels.quant.weights import QuantizedWeight
from worker_orcd.loader import build_model
from worker_orcd.quant_mix import fill_random_q4_k_m, plan_q4_k_m


def _mix(preset: str) -> dict[str, int]:
    """Bytes per type of the preset's plan (nothing allocated)."""
    config = PRESETS[preset]
    meta = torch.device("meta")
    model = build_model(config, device=meta, dtype=torch.bfloat16, max_positions=8, quantized=True)
    mix: dict[str, int] = {}
    for planned in plan_q4_k_m(model, config):
        for qtype, n in planned.shards:
            mix[qtype.name] = mix.get(qtype.name, 0) + nbytes(qtype, n, planned.k)
    return mix


def test_phi3_mini_plan_is_q4_k_m_sized() -> None:
    """Phi-3-mini: 2.39 GB of blocks, the size of llama.cpp's Q4_K_M file (issue target <= 2.5 GB);
    fused qkv Q5_K; the head and ffn_down in 16 of the 32 layers Q6_K."""
    mix = _mix("phi3-mini")
    assert set(mix) == {"Q4_K", "Q5_K", "Q6_K"}
    assert sum(mix.values()) == 2_391_694_848
    assert mix["Q5_K"] == 32 * 9216 * 3072 // 256 * 176  # every attn_qkv
    assert mix["Q6_K"] == (32064 * 3072 + 16 * 3072 * 8192) // 256 * 210  # head, 16 ffn_down


def test_qwen_plan_falls_back_where_rows_are_not_super_blocks() -> None:
    """Qwen2.5-0.5B: rows of 896 take Q5_0 / Q8_0; ffn_down (rows of 4864) Q4_K / Q6_K with the
    same bytes as the real Qwen2.5-Coder-0.5B Q4_K_M file; the tied embedding is the Q8_0 head."""
    mix = _mix("qwen2.5-0.5b")
    assert mix["Q6_K"] == 42_900_480 and mix["Q4_K"] == 29_417_472
    assert mix["Q8_0"] == 151936 * 896 // 32 * 34 + 12 * 128 * 896 // 32 * 34
    assert set(mix) == {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}


@pytest.mark.parametrize("preset", ["qwen2.5-0.5b", "phi3-mini"])
def test_filled_small_model_runs_and_counts_its_blocks(preset: str) -> None:
    config = dataclasses.replace(PRESETS[preset], n_layers=2, vocab_size=512, intermediate_size=512)
    if preset == "phi3-mini":
        config = dataclasses.replace(config, hidden_size=256, n_heads=4, n_kv_heads=4, head_dim=64,
                                     rope_dim=64)  # fmt: skip
    cpu = torch.device("cpu")
    model = build_model(config, device=cpu, dtype=torch.float32, max_positions=16, quantized=True)
    gen = torch.Generator().manual_seed(0)
    mix = fill_random_q4_k_m(model, config, generator=gen)
    packed = {
        id(m.quantized): m.quantized for m in model.modules() if getattr(m, "quantized", None)
    }
    assert sum(mix.values()) == sum(w.nbytes for w in packed.values())
    assert all(isinstance(s, QuantizedWeight) for w in packed.values() for _, s in w.parts)
    assert model.lm_head.quantized is not None
    assert (model.lm_head.quantized is model.model.embed_tokens.quantized) == config.tied_embeddings
    dense = sum(p.numel() * 4 for p in model.parameters() if not p.is_meta)
    emb = 0 if config.tied_embeddings else model.model.embed_tokens.quantized.nbytes
    assert _decode_weight_bytes(model, config) == dense + sum(mix.values()) - emb
    hidden = torch.randn(2, config.hidden_size, generator=gen)
    assert torch.isfinite(model.compute_logits(hidden)).all()
