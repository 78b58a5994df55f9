"""Sampler against transformers' logits processors and brute-force numpy references."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from worker_orcd.engine.sampler import filter_logits, make_generator, sample
from worker_orcd.engine.types import SamplingParams

NEG_INF = float("-inf")


def _logits(batch: int, vocab: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def _hf_filter(row: torch.Tensor, p: SamplingParams, prev: torch.Tensor | None) -> torch.Tensor:
    """transformers' processors in the order the sampler documents; [V] -> [V]."""
    scores = row[None].clone()
    ids = (prev if prev is not None else torch.zeros(0, dtype=torch.long))[None]
    if p.repetition_penalty != 1.0:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, scores)
    if p.temperature == 0:
        return scores[0]
    if p.temperature != 1.0:
        scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
    if p.top_k:
        scores = TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(ids, scores)
    if p.min_p > 0.0:
        scores = MinPLogitsWarper(p.min_p)(ids, scores)
    return scores[0]


CASES = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=40),
    SamplingParams(temperature=1.3, top_p=0.9),
    SamplingParams(temperature=0.8, top_k=50, top_p=0.8, min_p=0.05),
    SamplingParams(temperature=1.0, min_p=0.2),
    SamplingParams(temperature=0.5, top_p=0.3, repetition_penalty=1.3),
    SamplingParams(temperature=1.0, top_k=1),
    SamplingParams(temperature=2.0, top_p=0.01),  # only the top token survives
    SamplingParams(temperature=0.0, repetition_penalty=1.5),
    SamplingParams(temperature=1.0, top_p=1e-9),  # float32 mass rounds to 1 - p: keep one
    SamplingParams(temperature=1.0, min_p=1.0),  # the top token is at the floor, not below
]


@pytest.mark.parametrize("params", CASES, ids=range(len(CASES)))
def test_filter_equals_transformers_processors(params: SamplingParams) -> None:
    logits = _logits(1, 1000, seed=1)
    prev = torch.tensor([3, 17, 17, 999, 500, 3])
    got = filter_logits(logits, [params], [prev])
    expected = _hf_filter(logits[0], params, prev)
    torch.testing.assert_close(got[0], expected, rtol=0, atol=0)


def test_mixed_batch_rows_are_filtered_independently() -> None:
    logits = _logits(len(CASES), 777, seed=2)
    prev = [
        torch.randint(0, 777, (n,), generator=torch.Generator().manual_seed(n))
        for n in range(len(CASES))
    ]
    got = filter_logits(logits, CASES, prev)
    for row, params in enumerate(CASES):
        torch.testing.assert_close(
            got[row], _hf_filter(logits[row], params, prev[row]), rtol=0, atol=0
        )


def test_padded_prev_tokens_equal_the_list_form() -> None:
    logits = _logits(3, 100, seed=3)
    rows = [torch.tensor([1, 2, 3]), torch.tensor([5]), torch.tensor([], dtype=torch.long)]
    padded = torch.tensor([[1, 2, 3], [5, -1, -1], [-1, -1, -1]])
    params = [SamplingParams(temperature=0.0, repetition_penalty=1.7)] * 3
    from_list = filter_logits(logits, params, rows)
    torch.testing.assert_close(filter_logits(logits, params, padded), from_list, rtol=0, atol=0)
    torch.testing.assert_close(from_list[2], logits[2], rtol=0, atol=0)
    changed = (from_list != logits).nonzero().tolist()
    assert changed == [[0, 1], [0, 2], [0, 3], [1, 5]]


def _counted(row: torch.Tensor, p: SamplingParams, outputs: list[int]) -> torch.Tensor:
    """The presence and frequency penalties from their definition, one id at a time."""
    out = row.clone()
    for i in set(outputs):
        out[i] -= p.frequency_penalty * outputs.count(i) + p.presence_penalty
    return out


def test_presence_and_frequency_penalties_count_the_generated_ids() -> None:
    """Rows of a mixed batch: each id's logit less presence_penalty once generated and
    frequency_penalty per time; repetition first (over the prompt too); the list and padded
    forms agree; a row with both off is untouched."""
    logits = _logits(4, 120, seed=11)
    outs = [[5, 5, 5, 9], [7, 7, 100], [], [1, 2, 2]]
    params = [
        SamplingParams(temperature=0.0, frequency_penalty=0.7),
        SamplingParams(temperature=0.8, presence_penalty=-1.5, frequency_penalty=2.0),
        SamplingParams(temperature=1.0, presence_penalty=2.0),
        SamplingParams(temperature=0.0, repetition_penalty=1.4),  # counts off in this row
    ]
    prev = [torch.tensor([3, 5, *o], dtype=torch.long) for o in outs]
    rows = [torch.tensor(o, dtype=torch.long) for o in outs]
    padded = torch.tensor([[5, 5, 5, 9], [7, 7, 100, -1], [-1] * 4, [1, 2, 2, -1]])
    got = filter_logits(logits, params, prev, output_tokens=rows)
    same = filter_logits(logits, params, prev, output_tokens=padded)
    torch.testing.assert_close(same, got, rtol=0, atol=0)
    for row, (p, o) in enumerate(zip(params, outs, strict=True)):
        base = _hf_filter(
            logits[row],
            SamplingParams(temperature=0.0, repetition_penalty=p.repetition_penalty),
            prev[row],
        )
        want = _hf_filter(_counted(base, p, o), replace(p, repetition_penalty=1.0), None)
        torch.testing.assert_close(got[row], want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got[3], _hf_filter(logits[3], params[3], prev[3]), rtol=0, atol=0)
    # a big enough penalty moves the greedy pick off the generated ids
    top = logits[0].argmax()
    ids = sample(
        logits[:1],
        [replace(params[0], frequency_penalty=2.0)],
        [None],
        output_tokens=[top.repeat(30)],
    )
    assert int(ids[0]) != int(top)


def _numpy_allowed(row: np.ndarray, p: SamplingParams) -> set[int]:
    """Allowed ids from the definitions, in float64, by brute force over every id."""
    x = row.astype(np.float64) / p.temperature
    allowed = set(range(len(x)))
    if p.top_k:
        allowed = {i for i in allowed if np.sum(x > x[i]) < p.top_k}
    if p.top_p < 1.0:
        xs = np.array([x[i] if i in allowed else -np.inf for i in range(len(x))])
        probs = np.exp(xs - xs.max())
        probs /= probs.sum()
        # keep i when the mass of the ids at least as likely as i, excluding i, is below top_p
        allowed = {i for i in allowed if probs[probs > probs[i]].sum() < p.top_p}
    if p.min_p > 0.0:
        xs = np.array([x[i] if i in allowed else -np.inf for i in range(len(x))])
        probs = np.exp(xs - xs.max())
        allowed = {i for i in allowed if probs[i] >= p.min_p * probs.max()}
    return allowed


@pytest.mark.parametrize("params", [p for p in CASES if p.temperature > 0][:5])
def test_allowed_sets_match_numpy_definitions(params: SamplingParams) -> None:
    logits = _logits(4, 300, seed=4)
    got = filter_logits(logits, [params] * 4)
    for row in range(4):
        allowed = set(torch.isfinite(got[row]).nonzero().flatten().tolist())
        assert allowed == _numpy_allowed(logits[row].numpy(), params)


def test_draws_come_only_from_allowed_ids() -> None:
    params = SamplingParams(temperature=1.0, top_k=20, top_p=0.7, min_p=0.1)
    logits = _logits(1, 500, seed=5, scale=1.0)
    allowed = set(torch.isfinite(filter_logits(logits, [params])[0]).nonzero().flatten().tolist())
    assert 2 < len(allowed) < 20
    g = make_generator(123, "cpu")
    drawn = {int(sample(logits, [params], [g])[0]) for _ in range(400)}
    assert drawn <= allowed
    assert len(drawn) == len(allowed)


def _chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("top_k", [0, 3])
def test_draw_frequencies_follow_the_filtered_distribution(top_k: int) -> None:
    logits = torch.tensor([[2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0]])
    params = SamplingParams(temperature=0.8, top_k=top_k)
    probs = torch.softmax(filter_logits(logits, [params])[0], dim=-1).double().numpy()
    n = 6000
    batch = logits.expand(n, -1)
    g = make_generator(7, "cpu")
    ids = sample(batch, [params] * n, [g] * n).numpy()
    counts = np.bincount(ids, minlength=8).astype(np.float64)
    support = probs > 0
    assert (counts[~support] == 0).all()
    # 99.9th percentile of chi-square with 7 (top-k off) or 2 degrees of freedom
    bound = 24.32 if top_k == 0 else 13.82
    assert _chi_square(counts[support], probs[support]) < bound


def test_same_seed_same_tokens_and_other_seeds_differ() -> None:
    logits = _logits(1, 1000, seed=6, scale=0.5)
    params = [SamplingParams(temperature=1.0, top_p=0.95)]

    def run(seed: int) -> list[int]:
        g = make_generator(seed, "cpu")
        return [int(sample(logits, params, [g])[0]) for _ in range(32)]

    assert run(42) == run(42)
    assert run(42) != run(43)
    assert len(set(run(42))) > 10  # the generator advances between steps


def test_banned_ids_are_never_drawn() -> None:
    logits = _logits(2, 64, seed=8)
    banned = torch.tensor([5, 9, 63])
    logits[:, banned] = 50.0  # would win every draw
    greedy, hot = SamplingParams(temperature=0.0), SamplingParams(temperature=2.0)
    g = make_generator(1, "cpu")
    for _ in range(200):
        ids = sample(logits, [greedy, hot], [None, g], banned_ids=banned)
        assert not set(ids.tolist()) & {5, 9, 63}
    filtered = filter_logits(logits, [hot, greedy], banned_ids=banned)
    assert torch.isneginf(filtered[:, banned]).all()


def test_greedy_is_argmax_after_penalty() -> None:
    logits = _logits(3, 200, seed=9)
    params = [SamplingParams(temperature=0.0)] * 3
    ids = sample(logits, params, [None] * 3)
    torch.testing.assert_close(ids, logits.argmax(-1))
    assert ids.dtype == torch.int64
    top = logits.argmax(-1)
    penalized = sample(
        logits,
        [SamplingParams(temperature=0.0, repetition_penalty=2.0)] * 3,
        [None] * 3,
        prev_tokens=[t[None] for t in top],
    )
    expected = _hf_filter(logits[0], SamplingParams(temperature=0, repetition_penalty=2.0), top[:1])
    assert int(penalized[0]) == int(expected.argmax())
    assert (penalized != top).any()


def test_mixed_greedy_and_sampled_rows() -> None:
    logits = _logits(2, 50, seed=10)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, top_k=5)]
    g = make_generator(0, "cpu")
    top5 = set(logits[1].topk(5).indices.tolist())
    for _ in range(50):
        ids = sample(logits, params, [None, g])
        assert int(ids[0]) == int(logits[0].argmax())
        assert int(ids[1]) in top5


def test_bad_arguments_are_rejected() -> None:
    logits = _logits(2, 10)
    with pytest.raises(ValueError, match="2 rows"):
        sample(logits, [SamplingParams()] * 2, [None])
    with pytest.raises(ValueError, match="B = 3"):
        filter_logits(logits, [SamplingParams()] * 3)


@pytest.mark.gpu
def test_cuda_sampling_is_seeded_and_never_syncs() -> None:
    dev = torch.device("cuda")
    logits = _logits(4, 32064, seed=11).to(dev)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=0.9, top_k=40, top_p=0.9, min_p=0.02, repetition_penalty=1.1),
        SamplingParams(temperature=1.0),
        SamplingParams(temperature=0.7, top_p=0.5),
    ]
    prev = torch.randint(0, 32064, (4, 16), device=dev)
    banned = torch.arange(32000, 32064, device=dev)

    def run(seed: int) -> list[list[int]]:
        gens = [make_generator(seed + i, dev) for i in range(4)]
        steps = [sample(logits, params, gens, prev, banned) for _ in range(16)]  # warm-up included
        return torch.stack(steps).tolist()

    first = run(5)
    torch.cuda.synchronize()
    gens = [make_generator(5 + i, dev) for i in range(4)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        ids = sample(logits, params, gens, prev, banned)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert ids.tolist() == first[0]
    assert run(5) == first
    cpu = filter_logits(logits.cpu(), params, prev.cpu(), banned.cpu())
    gpu = filter_logits(logits, params, prev, banned).cpu()
    assert torch.equal(torch.isfinite(cpu), torch.isfinite(gpu))
