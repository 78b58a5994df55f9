"""The flat-batch forward: several sequences in one pass, paged (non-contiguous) KV blocks."""

from __future__ import annotations

import torch

from worker_orcd.engine.block_manager import BlockManager
from worker_orcd.engine.engine import Engine
from worker_orcd.engine.scheduler import Scheduler
from worker_orcd.engine.sequence import Sequence


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_block_manager_hands_out_lowest_blocks() -> None:
    bm = BlockManager(8, 4)
    a, b = Sequence.from_prompt([1] * 5), Sequence.from_prompt([1] * 3)
    bm.reserve(a, 5)
    bm.reserve(b, 3)
    bm.reserve(a, 9)
    assert a.block_table == [0, 1, 3] and b.block_table == [2]
    assert bm.slot(a, 8) == 12 and bm.num_free == 4
    assert not bm.can_hold(b, 4 * 6)
    bm.release(a)
    assert bm.num_free == 7
    c = Sequence.from_prompt([1])
    bm.reserve(c, 8)
    assert c.block_table == [0, 1]


def test_two_sequences_in_one_batch_match_separate_scores(phi3_engine: Engine) -> None:
    """Prefill two prompts in one forward, then decode both together; blocks interleave."""
    p1 = list(range(300, 330))  # 30 tokens: two blocks of 16, a third once decoding
    p2 = list(range(500, 509))
    c1, c2 = [7, 8, 9, 10, 11], [12, 13, 14, 15, 16]
    ref1 = phi3_engine.score(p1 + c1)
    ref2 = phi3_engine.score(p2 + c2)
    sched = Scheduler(phi3_engine.blocks, max_batch_tokens=64, max_seqs=2)
    s1, s2 = Sequence.from_prompt(p1), Sequence.from_prompt(p2)
    sched.add(s1)
    sched.add(s2)
    runner = phi3_engine.runner
    try:
        batch = sched.schedule()
        assert batch.is_prefill and batch.n_new == [30, 9]
        logits = runner.forward(batch)  # the last prompt token of each
        assert sched.postprocess(batch) == [s1, s2]
        rows1, rows2 = [logits[0]], [logits[1]]
        for t1, t2 in zip(c1, c2, strict=True):
            s1.append(t1)
            s2.append(t2)
            batch = sched.schedule()
            assert not batch.is_prefill and batch.num_tokens == 2
            logits = runner.forward(batch).clone()
            sched.postprocess(batch)
            rows1.append(logits[0])
            rows2.append(logits[1])
        # s1's third block came after s2's first: its context is not one contiguous run.
        assert len(s1.block_table) == 3 and s1.block_table[2] != s1.block_table[1] + 1
    finally:
        sched.finish(s1)
        sched.finish(s2)
    assert _rel(torch.stack(rows1), ref1[len(p1) - 1 :]) < 1e-5
    assert _rel(torch.stack(rows2), ref2[len(p2) - 1 :]) < 1e-5
