"""Parity with transformers (float32, CPU) on random-weight Qwen2 (GQA, qkv bias) and Phi-3 (MHA,
fused qkv and gate/up) models written to GGUF as llama.cpp lays them out."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.model.conftest import (
    Pair,
    hf_greedy,
    hf_logits,
    prefill_then_decode,
    random_ids,
    rel_err,
)
from tests.support.hf_gguf import PHI3_MINI_DIMS, QWEN25_05B_DIMS
from worker_orcd.engine.types import SamplingParams, StopReason

TOL = 1e-4
ARCHS = ["qwen2", "phi3"]
REAL_DIMS = {"qwen2": QWEN25_05B_DIMS, "phi3": PHI3_MINI_DIMS}


@pytest.mark.parametrize("arch", ARCHS)
def test_block_single_layer_logits(arch: str, pair: Callable[..., Pair]) -> None:
    hf, engine = pair(arch, num_hidden_layers=1)
    ids = random_ids(19, engine.config.vocab_size)
    assert rel_err(engine.score(ids), hf_logits(hf, ids)) < TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_attention_output_of_first_layer(arch: str, tiny_pairs: Callable[[str], Pair]) -> None:
    """The attention block's output (after o_proj) of layer 0 (GQA 4/2 for Qwen2, MHA for Phi-3)."""
    hf, engine = tiny_pairs(arch)
    assert (engine.config.n_kv_heads < engine.config.n_heads) == (arch == "qwen2")
    ids = random_ids(23, engine.config.vocab_size, seed=1)
    captured: dict[str, torch.Tensor] = {}
    hf_hook = hf.model.layers[0].self_attn.register_forward_hook(
        lambda m, args, out: captured.__setitem__("hf", out[0][0])
    )
    our_hook = engine.model.model.layers[0].self_attn.register_forward_hook(
        lambda m, args, out: captured.__setitem__("ours", out[0])  # (output, residual)
    )
    try:
        engine.score(ids)
        hf_logits(hf, ids)
    finally:
        hf_hook.remove()
        our_hook.remove()
    assert captured["ours"].shape == captured["hf"].shape
    assert rel_err(captured["ours"], captured["hf"]) < TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_real_layer_dims(arch: str, pair: Callable[..., Pair]) -> None:
    """Real per-layer dimensions (Phi-3-mini 3072/32 heads/96/8192/32064; Qwen2.5-0.5B), 2
    layers."""
    hf, engine = pair(arch, **REAL_DIMS[arch])
    if arch == "phi3":
        c = engine.config
        assert (c.hidden_size, c.n_heads, c.head_dim, c.intermediate_size, c.vocab_size) == (
            3072,
            32,
            96,
            8192,
            32064,
        )
    ids = random_ids(21, engine.config.vocab_size, seed=2)
    assert rel_err(engine.score(ids), hf_logits(hf, ids)) < TOL
    prompt = ids[:9]
    ours = engine.generate(prompt, SamplingParams(max_tokens=6, temperature=0.0))
    assert ours.token_ids == hf_greedy(hf, prompt, 6)[: len(ours.token_ids)]


@pytest.mark.parametrize("arch", ARCHS)
def test_deep_stack_at_small_width(arch: str, pair: Callable[..., Pair]) -> None:
    """All layers of the real model (32 for Phi-3-mini, 24 for Qwen2.5-0.5B) at a small width."""
    layers = {"qwen2": 24, "phi3": 32}[arch]
    hf, engine = pair(arch, num_hidden_layers=layers)
    assert len(engine.model.model.layers) == layers
    ids = random_ids(17, engine.config.vocab_size, seed=3)
    assert rel_err(engine.score(ids), hf_logits(hf, ids)) < TOL


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_then_decode_equals_score(arch: str, tiny_pairs: Callable[[str], Pair]) -> None:
    hf, engine = tiny_pairs(arch)
    ids = random_ids(30, engine.config.vocab_size, seed=4)
    whole = engine.score(ids)
    assert rel_err(whole, hf_logits(hf, ids)) < TOL
    stepped = prefill_then_decode(engine, ids[:12], ids[12:])
    assert stepped.shape == whole.shape
    assert rel_err(stepped, whole) < 1e-5
    # Chunked prefill (chunks of 7 over the cached ones) gives the same logits too.
    saved, engine.scheduler.max_batch_tokens = engine.scheduler.max_batch_tokens, 7
    try:
        assert rel_err(engine.score(ids), whole) < 1e-5
    finally:
        engine.scheduler.max_batch_tokens = saved


@pytest.mark.parametrize("arch", ARCHS)
def test_32_greedy_tokens_match(arch: str, tiny_pairs: Callable[[str], Pair]) -> None:
    hf, engine = tiny_pairs(arch)
    prompt = random_ids(11, engine.config.vocab_size, seed=5)
    ours = engine.generate(prompt, SamplingParams(max_tokens=32, temperature=0.0))
    ref = hf_greedy(hf, prompt, 32)
    if ours.stop_reason is StopReason.EOS:  # a random model may draw an end-of-generation id
        assert ours.token_ids == ref[: len(ours.token_ids)]
    else:
        assert ours.stop_reason is StopReason.MAX_TOKENS
        assert ours.token_ids == ref


def test_phi3_sliding_window_longer_prompt(pair: Callable[..., Pair]) -> None:
    """A prompt (and decode steps) longer than a declared window of 8 keys, as transformers masks
    it."""
    hf, engine = pair("phi3", sliding_window=8)
    assert engine.config.sliding_window == 8
    ids = random_ids(40, engine.config.vocab_size, seed=6)
    ref = hf_logits(hf, ids)
    assert rel_err(engine.score(ids), ref) < TOL
    assert rel_err(prefill_then_decode(engine, ids[:20], ids[20:]), ref) < TOL
    # Without the window the logits would differ: the test can tell.
    for layer in engine.model.model.layers:
        layer.self_attn.attn.sliding_window = None
    assert rel_err(engine.score(ids), ref) > 1e-2


@pytest.mark.parametrize("max_context,n", [(64, 40), (256, 100)], ids=["short", "long"])
def test_phi3_longrope_factors(max_context: int, n: int, pair: Callable[..., Pair]) -> None:
    """LongRoPE: short factors for a context within the original 64, long factors beyond it."""
    hf, engine = pair(
        "phi3", longrope=True, original_max_position_embeddings=64, max_context=max_context
    )
    assert engine.config.has_rope_factors
    ids = random_ids(n, engine.config.vocab_size, seed=7)
    assert rel_err(engine.score(ids), hf_logits(hf, ids)) < TOL


def test_qwen2_tied_embeddings(pair: Callable[..., Pair]) -> None:
    hf, engine = pair("qwen2", tie_word_embeddings=True)
    assert engine.config.tied_embeddings
    assert engine.model.lm_head.weight is engine.model.model.embed_tokens.weight
    ids = random_ids(13, engine.config.vocab_size, seed=8)
    assert rel_err(engine.score(ids), hf_logits(hf, ids)) < TOL
