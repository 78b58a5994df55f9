"""The bench presets have the real models' sizes (CPU, on the meta device: nothing is allocated)."""

from __future__ import annotations

import pytest
import torch

from worker_orcd.bench import PRESETS, _decode_weight_bytes, _kv_bytes, _preset_like
from worker_orcd.loader import build_model


@pytest.mark.parametrize(
    ("preset", "params", "decode_bytes"),
    [
        # Phi-3-mini-4k: 3.82 G parameters; decode reads all but the 32064 x 3072 embedding table.
        ("phi3-mini", 3_821_079_552, 2 * (3_821_079_552 - 32064 * 3072)),
        # Qwen2.5-0.5B: 494 M parameters with the output head tied to the embedding.
        ("qwen2.5-0.5b", 494_032_768, 2 * 494_032_768),
    ],
)
def test_preset_sizes(preset: str, params: int, decode_bytes: int) -> None:
    config = PRESETS[preset]
    model = build_model(config, device=torch.device("meta"), dtype=torch.bfloat16, max_positions=64)
    assert sum(p.numel() for p in model.parameters()) == params
    assert _decode_weight_bytes(model, config) == decode_bytes
    assert _preset_like(config) == preset


def test_kv_bytes_per_token() -> None:
    # Phi-3: 32 layers x 32 KV heads x 96 x (K and V) x 2 bytes = 393,216 bytes per token.
    assert _kv_bytes(PRESETS["phi3-mini"], 1) == 393_216
    assert _kv_bytes(PRESETS["qwen2.5-0.5b"], 4000) == 4000 * 24 * 2 * 64 * 2 * 2


@pytest.mark.parametrize(
    ("preset", "params"), [("phi3-mini", 3_821_079_552), ("qwen2.5-0.5b", 494_032_768)]
)
def test_peer_is_built_from_the_same_dimensions(preset: str, params: int) -> None:
    """transformers' model from hf_config(preset) has exactly our parameter count and shapes."""
    from transformers import AutoModelForCausalLM

    from worker_orcd.benchtools import hf_config

    config = PRESETS[preset]
    with torch.device("meta"):
        peer = AutoModelForCausalLM.from_config(hf_config(config), dtype=torch.bfloat16)
    assert sum(p.numel() for p in peer.parameters()) == params
    layer = peer.model.layers[0]
    assert layer.self_attn.o_proj.weight.shape == (
        config.hidden_size,
        config.n_heads * config.head_dim,
    )
    assert peer.config.num_key_value_heads == config.n_kv_heads
