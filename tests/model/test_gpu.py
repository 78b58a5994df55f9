"""CUDA, bfloat16: the parity checks of test_parity.py with bf16 tolerances, and greedy tokens of
the real-size random Phi-3 on CUDA against CPU float32. Run with `pytest -m gpu` on a GPU machine.

bf16 tolerance: our error against the float32 reference must be within a small factor of what
transformers itself reaches in bf16 on the same GPU (plus a floor), so the bound tracks bf16
rounding rather than a guessed constant.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from transformers import PreTrainedModel

from tests.model.conftest import Pair, hf_logits, prefill_then_decode, random_ids, rel_err
from tests.support.hf_gguf import PHI3_MINI_DIMS, QWEN25_05B_DIMS
from worker_orcd.engine.engine import Engine
from worker_orcd.engine.types import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

ARCHS = ["qwen2", "phi3"]
REAL_DIMS = {"qwen2": QWEN25_05B_DIMS, "phi3": PHI3_MINI_DIMS}


@torch.no_grad()
def _hf_bf16_logits(hf: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    model = copy.deepcopy(hf).to("cuda", torch.bfloat16)
    try:
        return model(torch.tensor([ids], device="cuda")).logits[0].float().cpu()
    finally:
        del model
        torch.cuda.empty_cache()


def _check_bf16(ours: torch.Tensor, hf: PreTrainedModel, ids: list[int]) -> None:
    ref = hf_logits(hf, ids)
    peer = rel_err(_hf_bf16_logits(hf, ids), ref)
    mine = rel_err(ours, ref)
    assert mine < max(2.0 * peer, 1e-2), f"ours {mine:.4f} vs transformers bf16 {peer:.4f}"


def _cuda_pair(pair: Callable[..., Pair], arch: str, **dims: object) -> Pair:
    hf, engine = pair(arch, device="cuda", **dims)
    assert engine.dtype == torch.bfloat16 and engine.device.type == "cuda"
    return hf, engine


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_logits_small(arch: str, pair: Callable[..., Pair]) -> None:
    hf, engine = _cuda_pair(pair, arch)
    ids = random_ids(37, engine.config.vocab_size)
    _check_bf16(engine.score(ids), hf, ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_logits_real_layer_dims(arch: str, pair: Callable[..., Pair]) -> None:
    hf, engine = _cuda_pair(pair, arch, **REAL_DIMS[arch])
    ids = random_ids(29, engine.config.vocab_size, seed=2)
    _check_bf16(engine.score(ids), hf, ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_deep_stack(arch: str, pair: Callable[..., Pair]) -> None:
    hf, engine = _cuda_pair(pair, arch, num_hidden_layers={"qwen2": 24, "phi3": 32}[arch])
    ids = random_ids(17, engine.config.vocab_size, seed=3)
    _check_bf16(engine.score(ids), hf, ids)


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_prefill_then_decode_equals_score(arch: str, pair: Callable[..., Pair]) -> None:
    hf, engine = _cuda_pair(pair, arch)
    ids = random_ids(30, engine.config.vocab_size, seed=4)
    whole = engine.score(ids)
    stepped = prefill_then_decode(engine, ids[:12], ids[12:]).cpu()
    assert rel_err(stepped, whole) < 1e-2
    _check_bf16(stepped, hf, ids)


def test_bf16_phi3_sliding_window(pair: Callable[..., Pair]) -> None:
    hf, engine = _cuda_pair(pair, "phi3", sliding_window=8)
    ids = random_ids(40, engine.config.vocab_size, seed=6)
    _check_bf16(engine.score(ids), hf, ids)
    _check_bf16(prefill_then_decode(engine, ids[:20], ids[20:]).cpu(), hf, ids)


def test_real_size_phi3_greedy_cuda_matches_cpu(pair: Callable[..., Pair]) -> None:
    """Greedy tokens on CUDA (bf16) follow CPU float32: each CUDA token is the float32 argmax on the
    same prefix unless float32 itself puts the two within bf16 rounding of a tie (random weights
    give top-2 margins down to ~0.01 logits; bf16 moves logits by ~0.05 here, as it does
    transformers')."""
    hf, cpu = pair("phi3", **PHI3_MINI_DIMS)
    gpu = Engine.load(cpu.path, device="cuda", max_context=512)
    prompt = random_ids(13, cpu.config.vocab_size, seed=5)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    want = cpu.generate(prompt, params).token_ids
    got = gpu.generate(prompt, params).token_ids
    assert got[:2] == want[:2]
    # float32 logits on the CUDA path's own prefix
    ref = cpu.score(prompt + got[:-1])[len(prompt) - 1 :]
    exact = 0
    for i, token in enumerate(got):
        best = int(ref[i].argmax())
        exact += token == best
        gap = float(ref[i, best] - ref[i, token])
        assert gap < 0.15, f"step {i}: CUDA took {token}, float32 prefers {best} by {gap:.3f}"
    assert exact >= len(got) // 2


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_graph_engine_matches_eager(arch: str, pair: Callable[..., Pair]) -> None:
    """Engine.load on CUDA captures graphs by default: prefill-then-decode through them equals
    scoring on an engine loaded with cuda_graphs=False."""
    from worker_orcd.kernels import triton as triton_kernels

    hf, graphs = pair(arch, device="cuda")
    if not triton_kernels.available("cuda"):
        pytest.skip("CUDA graphs need Triton")
    assert graphs.runner.graphs is not None
    eager = Engine.load(graphs.path, device="cuda", max_context=512, cuda_graphs=False)
    assert eager.runner.graphs is None
    ids = random_ids(30, eager.config.vocab_size, seed=4)
    whole = eager.score(ids)
    stepped = prefill_then_decode(graphs, ids[:12], ids[12:]).cpu()
    assert rel_err(stepped, whole) < 2e-2
    params = SamplingParams(max_tokens=8, temperature=0.0)
    assert graphs.generate(ids[:9], params).token_ids == graphs.generate(ids[:9], params).token_ids
