"""The captured decode step against the eager one, and the Triton path against the torch reference
path, on random-weight models at real widths (GPU only: -m gpu)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from worker_orcd import kernels
from worker_orcd.bench import PRESETS, random_model
from worker_orcd.engine.kv_cache import KVCache
from worker_orcd.engine.model_runner import ModelRunner
from worker_orcd.engine.scheduler import ScheduledBatch
from worker_orcd.engine.sequence import Sequence

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = torch.device("cuda")


def _model(preset: str, layers: int, context: int):  # -> (model, config, kv)
    config = replace(PRESETS[preset], n_layers=layers)
    model = random_model(config, DEV, max_positions=context)
    with torch.no_grad():  # a peaked output distribution, so greedy ids are well separated
        model.lm_head.weight.mul_(8.0)
    kv = KVCache.allocate(config, context, dtype=torch.bfloat16, device=DEV)
    return model, config, kv


def _eager_runner(model, kv: KVCache) -> ModelRunner:
    runner = ModelRunner(model, kv)
    runner.graphs = None  # the runner's own CUDA graphs off: every step runs eagerly
    return runner


def _prefill(runner: ModelRunner, seq: Sequence) -> torch.Tensor:
    n = seq.n_uncached
    logits = runner.forward(ScheduledBatch([seq], [n], is_prefill=True))
    seq.n_cached += n
    return logits


def _decode(runner: ModelRunner, seq: Sequence, token: int) -> torch.Tensor:
    seq.append(token)
    logits = runner.forward(ScheduledBatch([seq], [1], is_prefill=False))
    seq.n_cached += 1
    return logits


@pytest.mark.parametrize("preset", ["qwen2.5-0.5b", "phi3-mini"])
# With 120, decode crosses from the short-context graph to the split one.
@pytest.mark.parametrize("prompt_len", [37, 120])
def test_graph_replay_matches_eager(preset: str, prompt_len: int) -> None:
    from worker_orcd.engine.cuda_graphs import CudaGraphRunner

    model, config, kv = _model(preset, layers=3, context=700)
    kv.k.normal_()
    kv.v.normal_()
    k_before, v_before = kv.k.clone(), kv.v.clone()
    graphs = CudaGraphRunner.create(model, kv, prompt_buckets=(16, 64, 256))
    assert graphs is not None
    # Warm-up and capture wrote nothing into the cache.
    assert torch.equal(kv.k, k_before) and torch.equal(kv.v, v_before)
    runner = _eager_runner(model, kv)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (prompt_len,), generator=gen).tolist()
    table = list(range(kv.num_blocks))[::-1]  # blocks far from contiguous

    # The prompt through its bucket graph (padded to 64 or 256 tokens) and eagerly.
    seq = Sequence.from_prompt(prompt)
    seq.block_table = table
    batch = ScheduledBatch([seq], [len(prompt)], is_prefill=True)
    g_first = graphs.try_forward(batch, kv.block_size).clone()
    # The padding tokens wrote nothing: only the prompt's slots changed.
    bs = kv.block_size
    own = torch.tensor([table[p // bs] * bs + p % bs for p in range(len(prompt))], device=DEV)
    others = torch.ones(kv.num_slots, dtype=torch.bool, device=DEV)
    others[own] = False
    assert torch.equal(kv.k[:, others], k_before[:, others])
    assert not torch.equal(kv.k[:, own], k_before[:, own])
    e_first = _prefill(runner, seq)
    assert ((g_first - e_first).norm() / e_first.norm()).item() < 1e-2
    token = int(e_first[-1].argmax())

    # Decode steps: the graph with host-fed inputs, then eagerly on the same slot and context.
    for _ in range(20):
        seq.append(token)
        g_logits = graphs.try_forward(ScheduledBatch([seq], [1], False), kv.block_size).clone()
        seq.token_ids.pop()
        e_logits = _decode(runner, seq, token)
        assert torch.equal(g_logits, e_logits), (g_logits - e_logits).abs().max()
        token = int(e_logits[-1].argmax())

    # Greedy replay back to back (argmax fed on the device) gives the eager greedy ids.
    pos = len(seq)
    fast = graphs.decode.decode_greedy(token, pos, seq.block_table, 10)
    slow = []
    for _ in range(10):
        token = int(_decode(runner, seq, token)[-1].argmax())
        slow.append(token)
    assert fast == slow


@pytest.mark.parametrize("preset", ["qwen2.5-0.5b", "phi3-mini"])
def test_triton_path_matches_torch_reference(preset: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from worker_orcd.kernels import triton as triton_kernels

    model, config, kv = _model(preset, layers=2, context=400)
    runner = _eager_runner(model, kv)
    gen = torch.Generator().manual_seed(2)
    prompt = torch.randint(0, config.vocab_size, (131,), generator=gen).tolist()

    def greedy(n_tokens: int) -> tuple[list[int], torch.Tensor]:
        seq = Sequence.from_prompt(prompt)
        seq.block_table = list(range(kv.num_blocks))
        logits = _prefill(runner, seq)
        first = logits.clone()
        ids = []
        for _ in range(n_tokens):
            ids.append(int(logits[-1].argmax()))
            logits = _decode(runner, seq, ids[-1])
        return ids, first

    triton_kernels.register_all()
    fast_ids, fast_logits = greedy(12)
    monkeypatch.setitem(kernels._BACKENDS, "cuda", {})
    ref_ids, ref_logits = greedy(12)
    err = ((fast_logits - ref_logits).norm() / ref_logits.norm()).item()
    assert err < 2e-2
    assert fast_ids[:8] == ref_ids[:8]


@pytest.mark.parametrize("preset", ["qwen2.5-0.5b", "phi3-mini"])
def test_model_runner_graphs_match_eager(preset: str) -> None:
    """The runner's graph path (whole prompt, then decode steps) gives the eager path's tokens."""
    model, config, kv = _model(preset, layers=2, context=600)
    runner = ModelRunner(model, kv, cuda_graphs=True)
    assert runner.graphs is not None
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, config.vocab_size, (101,), generator=gen).tolist()

    def greedy(r: ModelRunner) -> tuple[list[int], torch.Tensor]:
        seq = Sequence.from_prompt(prompt)
        seq.block_table = list(range(kv.num_blocks))
        logits = _prefill(r, seq).clone()
        first = logits
        ids = []
        for _ in range(40):  # crosses the short-context graph's end
            ids.append(int(logits[-1].argmax()))
            logits = _decode(r, seq, ids[-1]).clone()
        return ids, first

    graph_ids, graph_first = greedy(runner)
    runner.graphs = None
    eager_ids, eager_first = greedy(runner)
    assert ((graph_first - eager_first).norm() / eager_first.norm()).item() < 1e-2
    assert graph_ids == eager_ids


def test_batched_decode_graph_with_padding_rows() -> None:
    """Three sequences in the batch-4 graph (one padding row) give the eager batch's logits, and
    the padding row writes nothing."""
    from worker_orcd.engine.cuda_graphs import CudaGraphRunner

    model, config, kv = _model("qwen2.5-0.5b", layers=2, context=1200)
    graphs = CudaGraphRunner.create(model, kv, batch_sizes=(1, 4), prompt_buckets=(16,))
    assert graphs is not None
    runner = _eager_runner(model, kv)
    gen = torch.Generator().manual_seed(4)
    blocks = torch.randperm(kv.num_blocks, generator=gen).tolist()
    seqs = []
    for n, n_blocks in ((5, 4), (140, 12), (300, 24)):  # short and split attention in one batch
        seq = Sequence.from_prompt(
            torch.randint(0, config.vocab_size, (n,), generator=gen).tolist()
        )
        seq.block_table, blocks = blocks[:n_blocks], blocks[n_blocks:]
        _prefill(runner, seq)
        seqs.append(seq)
    tokens = [7, 8, 9]
    for seq, t in zip(seqs, tokens, strict=True):
        seq.append(t)
    k_before = kv.k.clone()
    batch = ScheduledBatch(seqs, [1, 1, 1], is_prefill=False)
    g_logits = graphs.try_forward(batch, kv.block_size).clone()
    bs = kv.block_size
    own = [s.block_table[(len(s) - 1) // bs] * bs + (len(s) - 1) % bs for s in seqs]
    changed = (kv.k != k_before).any(dim=(0, 2, 3)).nonzero().flatten().tolist()
    assert sorted(changed) == sorted(own)
    e_logits = runner.forward(batch)
    # cuBLAS may pick other kernels for 4 rows than for 3: equal up to bf16 rounding.
    assert ((g_logits - e_logits).norm() / e_logits.norm()).item() < 1e-2
    assert torch.equal(g_logits.argmax(-1), e_logits.argmax(-1))


@pytest.mark.parametrize("preset", ["qwen2.5-0.5b", "phi3-mini"])
def test_graph_steps_queued_without_host_sync(preset: str) -> None:
    """Steps enqueued while the GPU is still busy, with no sync between them (the host writes the
    next inputs before the previous copies have run) give the eager steps' logits."""
    model, config, kv = _model(preset, layers=2, context=600)
    runner = ModelRunner(model, kv, cuda_graphs=True)
    assert runner.graphs is not None
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, config.vocab_size, (70,), generator=gen).tolist()

    def run(r: ModelRunner) -> torch.Tensor:
        seq = Sequence.from_prompt(ids[:40])
        seq.block_table = list(range(kv.num_blocks))
        torch.cuda.synchronize()
        busy = torch.randn(4096, 4096, device=DEV)
        for _ in range(20):  # tens of ms of GPU work ahead of the steps below
            busy = busy @ busy / 64
        rows = [_prefill(r, seq).clone()]
        for token in ids[40:]:
            seq.append(token)
            rows.append(r.forward(ScheduledBatch([seq], [1], is_prefill=False)).clone())
            seq.n_cached += 1
        return torch.cat(rows)

    queued = run(runner)
    runner.graphs = None
    eager = run(runner)
    # Row by row: a step that read another step's inputs would be off by far more than rounding.
    err = (queued - eager).norm(dim=-1) / eager.norm(dim=-1)
    assert err.max().item() < 1e-2, err


def test_greedy_steps_skip_banned_ids_and_follow_a_growing_block_table() -> None:
    """The graph's greedy pick skips the banned ids given at capture (the sampler's mask) while its
    logits stay the eager ones; GreedySteps copies block-table entries added between launches."""
    from worker_orcd.engine.cuda_graphs import CudaGraphRunner, GreedySteps
    from worker_orcd.engine.sampler import sample
    from worker_orcd.engine.types import SamplingParams

    model, config, kv = _model("qwen2.5-0.5b", layers=2, context=300)
    runner = _eager_runner(model, kv)
    gen = torch.Generator().manual_seed(6)
    prompt = torch.randint(0, config.vocab_size, (30,), generator=gen).tolist()
    table = list(range(kv.num_blocks))[::-1]  # blocks far from contiguous
    greedy = [SamplingParams(temperature=0.0)]

    def eager(banned: torch.Tensor | None, n: int) -> list[int]:
        seq = Sequence.from_prompt(prompt)
        seq.block_table = table
        logits = _prefill(runner, seq)
        ids = []
        for _ in range(n):
            ids.append(int(sample(logits, greedy, [None], None, banned)[0]))
            logits = _decode(runner, seq, ids[-1])
        return ids

    free = eager(None, 6)
    banned = torch.tensor(sorted(set(free[:4])), device=DEV)
    want = eager(banned, 41)
    assert want[0] != free[0] and not set(want) & set(free[:4])  # the ban changed the picks
    graphs = CudaGraphRunner.create(model, kv, prompt_buckets=(16,), banned_ids=banned)
    assert graphs is not None

    # Host-fed replay: the logits are the eager ones, banned ids not masked.
    seq = Sequence.from_prompt(prompt)
    seq.block_table = table
    _prefill(runner, seq)
    seq.append(want[0])
    g_logits = graphs.try_forward(ScheduledBatch([seq], [1], False), kv.block_size).clone()
    seq.token_ids.pop()
    assert torch.equal(g_logits, _decode(runner, seq, want[0]))

    # Device-fed: the table handed over grows one block at a time, as the engine reserves them.
    pos, bs = len(prompt), kv.block_size
    steps = GreedySteps(graphs.decode)
    steps.start(want[0], pos, table[: pos // bs + 1])
    steps.launch(pos, table[: pos // bs + 1])
    got = []
    for i in range(1, 40):
        steps.launch(pos + i, table[: (pos + i) // bs + 1])
        got.append(steps.next_id())
    got.append(steps.next_id())
    assert got == want[1:]
