"""Batched decode on quantized weights (GPU): several sequences in one forward pass, whose matmuls
run the small-batch kernels, against each sequence run alone (its decode steps on the batch-1
GEMVs), on a random Phi-3 that holds every quant type the kernels keep.

The two paths round differently (the GEMVs round x to int8 per 32 elements, the small-batch
kernels the dequantized weight to bf16), so they are held to the quantized GPU tests' tolerance:
logits within 3% relative, and every greedy token of the lone run within 0.15 of the batched
argmax, and that argmax wherever the lone run had no other token within 0.3. The batch is
teacher-forced with the lone run's tokens, so both see the same contexts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from tests.model.conftest import prefill_then_decode, random_ids, rel_err
from tests.support.hf_gguf import make_phi3, write_gguf
from worker_orcd.engine.cuda_graphs import CudaGraphRunner
from worker_orcd.engine.engine import Engine
from worker_orcd.engine.scheduler import Scheduler
from worker_orcd.engine.sequence import Sequence
from worker_orcd.engine.types import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Phi-3-mini Q4_K_M's mix in layer 0, the legacy types in layer 1 (K-quants need rows of 256).
QTYPES = {
    "attn_qkv": Q.Q5_K,
    "attn_output": Q.Q4_K,
    "ffn_up": Q.Q4_K,
    "ffn_down": Q.Q6_K,
    "blk.1.attn_qkv": Q.Q5_0,
    "blk.1.attn_output": Q.Q8_0,
    "blk.1.ffn_up": Q.Q4_0,
    "token_embd": Q.Q4_K,
    "output": Q.Q6_K,
}
DIMS = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
PROMPT_LENS = (5, 9, 12, 4, 17, 8, 6)  # 7 sequences, 61 prompt tokens: one small-batch prefill
STEPS = 8
REL_TOL = 3e-2
GAP = 0.15


@pytest.fixture(scope="module")
def mixed_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hf = make_phi3(seed=11, **DIMS)
    path = tmp_path_factory.mktemp("quant") / "phi3_mixed.gguf"
    return write_gguf(hf, path, qtypes=QTYPES, sync_model=True)


def _alone(engine: Engine, prompts: list[list[int]]) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens of each prompt run alone, and the logits [STEPS, V] that chose them."""
    tokens, rows = [], []
    params = SamplingParams(max_tokens=STEPS, temperature=0.0)
    for prompt in prompts:
        got = engine.generate(prompt, params).token_ids
        assert len(got) == STEPS
        logits = prefill_then_decode(engine, prompt, got[:-1]).cpu()
        tokens.append(got)
        rows.append(logits[len(prompt) - 1 :])
    return tokens, rows


def _together(
    engine: Engine, prompts: list[list[int]], tokens: list[list[int]]
) -> list[torch.Tensor]:
    """Logits [STEPS, V] of each sequence with all of them in every forward pass: the prompts in
    one prefill, then one decode step for all per token of `tokens` (teacher-forced)."""
    total = sum(len(p) for p in prompts)
    sched = Scheduler(engine.blocks, max_batch_tokens=total, max_seqs=len(prompts))
    seqs = [Sequence.from_prompt(p) for p in prompts]
    index = {id(s): i for i, s in enumerate(seqs)}
    rows: list[list[torch.Tensor]] = [[] for _ in seqs]
    for s in seqs:
        sched.add(s)
    try:
        batch = sched.schedule()
        assert batch.is_prefill and batch.num_tokens == total
        for step in range(STEPS):
            logits = engine.runner.forward(batch).float().cpu()  # a copy: graphs reuse theirs
            sched.postprocess(batch)
            for j, s in enumerate(batch.seqs):
                rows[index[id(s)]].append(logits[j])
            if step == STEPS - 1:
                break
            for s, t in zip(seqs, tokens, strict=True):
                s.append(t[step])
            batch = sched.schedule()
            assert not batch.is_prefill and batch.num_tokens == len(seqs)
    finally:
        for s in seqs:
            sched.finish(s)
    return [torch.stack(r) for r in rows]


def _check(tokens: list[list[int]], alone: list[torch.Tensor], batched: list[torch.Tensor]) -> None:
    for i, (want, ref, got) in enumerate(zip(tokens, alone, batched, strict=True)):
        err = rel_err(got, ref)
        assert err < REL_TOL, f"sequence {i}: batched logits off by {err:.2e}"
        for step, token in enumerate(want):
            best = int(got[step].argmax())
            gap = float(got[step, best] - got[step, token])
            assert gap < GAP, f"sequence {i} step {step}: alone took {token}, {gap:.3f} below"
            first, second = ref[step].topk(2).values.tolist()
            if first - second > 2 * GAP:  # no near-tie alone: the batch must pick the same
                assert best == token, f"sequence {i} step {step}: batched {best}, alone {token}"


def test_batched_decode_matches_sequences_alone(mixed_file: Path) -> None:
    engine = Engine.load(mixed_file, device="cuda", max_context=256, cuda_graphs=False)
    assert engine.info().weights == "quantized"
    assert {"Q4_K", "Q5_K", "Q6_K", "Q4_0", "Q5_0", "Q8_0"} <= set(engine.info().weight_mix)
    prompts = [random_ids(n, engine.config.vocab_size, seed=n) for n in PROMPT_LENS]
    tokens, alone = _alone(engine, prompts)
    batched = _together(engine, prompts, tokens)
    _check(tokens, alone, batched)


def test_batched_decode_in_cuda_graphs(mixed_file: Path) -> None:
    """The same batch on captured decode graphs (7 sequences in the graph of 8: the small-batch
    kernels with a padding row) agrees with the eager batch and with each sequence alone."""
    eager = Engine.load(mixed_file, device="cuda", max_context=256, cuda_graphs=False)
    graphs = Engine.load(mixed_file, device="cuda", max_context=256, cuda_graphs=False)
    runner = graphs.runner
    runner.graphs = CudaGraphRunner.create(
        graphs.model, runner.kv, batch_sizes=(1, 8), banned_ids=graphs.banned_ids
    )
    if runner.graphs is None:
        pytest.skip("CUDA graphs unavailable (no Triton)")
    prompts = [random_ids(n, eager.config.vocab_size, seed=100 + n) for n in PROMPT_LENS]
    tokens, alone = _alone(eager, prompts)
    replayed = _together(graphs, prompts, tokens)
    stepped = _together(eager, prompts, tokens)
    for i, (a, b) in enumerate(zip(replayed, stepped, strict=True)):
        assert rel_err(a, b) < 2e-2, f"sequence {i}: graph replay off the eager batch"
    _check(tokens, alone, replayed)
