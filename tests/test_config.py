"""ModelConfig.from_gguf on the real files and on synthetic ones."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from worker_orcd.config import ModelConfig
from worker_orcd.errors import ModelLoadError
from worker_orcd.gguf import GGUFFile


def _config(path: Path) -> ModelConfig:
    with GGUFFile.open(path) as f:
        return ModelConfig.from_gguf(f)


def test_real_qwen(qwen_gguf_path: Path):
    c = _config(qwen_gguf_path)
    assert c.architecture == "qwen2"
    assert (c.n_layers, c.hidden_size, c.n_heads, c.n_kv_heads) == (24, 896, 14, 2)
    assert (c.head_dim, c.rope_dim, c.intermediate_size) == (64, 64, 4864)
    assert (c.vocab_size, c.context_length) == (151936, 32768)
    assert c.rope_theta == 1e6
    assert c.rms_eps == pytest.approx(1e-6, rel=1e-6)
    assert c.qkv_bias and not (c.tied_embeddings or c.fused_qkv or c.fused_gate_up)
    assert c.rope_scaling_type is c.rope_scaling_factor is c.rope_original_context is None
    assert (c.has_rope_factors, c.sliding_window) == (False, None)
    # The file holds exactly the parameters the config implies.
    with GGUFFile.open(qwen_gguf_path) as f:
        assert c.n_params_estimate() == sum(t.n_elements for t in f.tensors.values())
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.n_layers = 3  # type: ignore[misc]


def test_phi3_vocab_file(vocab_dir: Path):
    c = _config(vocab_dir / "ggml-vocab-phi-3.gguf")
    assert c.architecture == "phi3"
    assert (c.n_layers, c.hidden_size, c.n_heads, c.n_kv_heads) == (32, 3072, 32, 32)
    assert (c.head_dim, c.rope_dim, c.intermediate_size) == (96, 96, 8192)
    assert (c.vocab_size, c.context_length, c.rope_theta) == (32064, 4096, 10000.0)
    assert c.rms_eps == pytest.approx(1e-5, rel=1e-6)
    assert c.rope_original_context == 4096
    # No tensors to look at: Phi-3's usual layout.
    assert c.fused_qkv and c.fused_gate_up and not (c.qkv_bias or c.has_rope_factors)


def test_llama_and_qwen2_vocab_files(vocab_dir: Path):
    llama = _config(vocab_dir / "ggml-vocab-llama-spm.gguf")
    assert (llama.architecture, llama.n_layers, llama.head_dim) == ("llama", 32, 128)
    assert llama.vocab_size == 32000
    assert (llama.rope_theta, llama.qkv_bias, llama.fused_qkv) == (10000.0, False, False)
    qwen = _config(vocab_dir / "ggml-vocab-qwen2.gguf")
    assert (qwen.vocab_size, qwen.head_dim) == (151936, 128)
    assert qwen.qkv_bias and not qwen.fused_gate_up


def test_tiny_qwen2_flags_follow_tensors(tiny_model, write_gguf):
    m = tiny_model("qwen2")
    c = _config(write_gguf(m))
    assert (c.n_layers, c.hidden_size, c.n_heads, c.n_kv_heads, c.head_dim) == (2, 64, 4, 2, 16)
    assert (c.vocab_size, c.qkv_bias, c.tied_embeddings, c.fused_qkv) == (32, True, False, False)
    del m.tensors["output.weight"]
    for name in [k for k in m.tensors if k.endswith(".bias")]:
        del m.tensors[name]
    c = _config(write_gguf(m, name="tied.gguf"))
    assert (c.tied_embeddings, c.qkv_bias) == (True, False)


def test_synthetic_phi3_with_sliding_window_and_rope_factors(tiny_model, write_gguf):
    m = tiny_model("phi3")
    m.metadata |= {
        "phi3.attention.sliding_window": 262144,
        "phi3.rope.dimension_count": 16,
        "phi3.rope.scaling.original_context_length": 64,
        "phi3.rope.scaling.attn_factor": 1.19,
        "phi3.context_length": 1024,
    }
    half = m.hidden // m.heads // 2
    m.tensors["rope_factors_long.weight"] = np.linspace(1, 4, half, dtype=np.float32)
    m.tensors["rope_factors_short.weight"] = np.ones(half, dtype=np.float32)
    c = _config(write_gguf(m))
    assert c.architecture == "phi3"
    assert c.fused_qkv and c.fused_gate_up and not (c.qkv_bias or c.tied_embeddings)
    assert (c.sliding_window, c.context_length, c.rope_original_context) == (262144, 1024, 64)
    assert c.has_rope_factors and c.rope_scaling_type == "longrope"
    assert c.rope_attn_factor == pytest.approx(1.19)
    assert (c.head_dim, c.rope_dim, c.n_kv_heads) == (16, 16, 2)


def test_explicit_key_length_and_rope_scaling(tiny_model, write_gguf):
    m = tiny_model("llama")
    m.metadata |= {
        "llama.attention.key_length": 32,
        "llama.attention.value_length": 32,
        "llama.rope.dimension_count": 24,
        "llama.rope.scaling.type": "linear",
        "llama.rope.scaling.factor": 4.0,
        "llama.attention.sliding_window": 0,
    }
    c = _config(write_gguf(m, metadata=m.metadata, arch="llama", tensors={}))
    assert (c.head_dim, c.rope_dim) == (32, 24)
    assert (c.rope_scaling_type, c.rope_scaling_factor, c.sliding_window) == ("linear", 4.0, None)
    assert c.vocab_size == 32  # from the token list: no tensors


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("qwen2.block_count", 0, "'qwen2.block_count' must be a positive integer, got 0"),
        ("qwen2.attention.head_count", 6, "'qwen2.embedding_length' (64) is not a multiple of"),
        ("qwen2.attention.head_count_kv", 3, "'qwen2.attention.head_count' (4) is not a multiple"),
        ("qwen2.rope.dimension_count", 17, "'qwen2.rope.dimension_count' (17) must be even"),
        ("qwen2.rope.freq_base", -1.0, "'qwen2.rope.freq_base' must be a positive number"),
        ("qwen2.context_length", "long", "'qwen2.context_length' must be a positive integer"),
        ("qwen2.attention.head_count_kv", [2, 2], "per-layer values for 'qwen2.attention.head_c"),
    ],
)
def test_bad_values_are_named(tiny_model, write_gguf, key, value, message):
    m = tiny_model()
    m.metadata[key] = value
    with GGUFFile.open(write_gguf(m)) as f, pytest.raises(ModelLoadError) as e:
        ModelConfig.from_gguf(f)
    assert message in e.value.message


@pytest.mark.parametrize(
    "key",
    [
        "qwen2.block_count",
        "qwen2.embedding_length",
        "qwen2.attention.head_count",
        "qwen2.context_length",
        "qwen2.attention.layer_norm_rms_epsilon",
    ],
)
def test_missing_required_key_is_named(tiny_model, write_gguf, key):
    m = tiny_model()
    del m.metadata[key]
    with GGUFFile.open(write_gguf(m)) as f, pytest.raises(ModelLoadError) as e:
        ModelConfig.from_gguf(f)
    assert f"missing required metadata key '{key}'" in e.value.message
