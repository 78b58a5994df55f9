"""Scheduler: decides which tokens of which sequences the next forward pass carries.

Policy: prompts first (chunked to at most max_batch_tokens per step, so a long prompt may take
several steps, each attending to the chunks before it), then one decode token for every running
sequence.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

from worker_orcd.engine.block_manager import BlockManager
from worker_orcd.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class ScheduledBatch:
    """seqs[i] contributes its tokens n_cached .. n_cached + n_new[i] to the next forward pass."""

    seqs: list[Sequence]
    n_new: list[int]
    is_prefill: bool

    @property
    def num_tokens(self) -> int:
        return sum(self.n_new)


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_batch_tokens: int, max_seqs: int = 1) -> None:
        self.blocks = blocks
        self.max_batch_tokens = max_batch_tokens
        self.max_seqs = max_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        seqs: list[Sequence] = []
        n_new: list[int] = []
        budget = self.max_batch_tokens
        for seq in self.waiting:
            if budget == 0 or len(seqs) + len(self.running) >= self.max_seqs:
                break
            n = min(seq.n_uncached, budget)
            self.blocks.reserve(seq, seq.n_cached + n)
            seqs.append(seq)
            n_new.append(n)
            budget -= n
        if seqs:
            return ScheduledBatch(seqs, n_new, is_prefill=True)
        for seq in self.running:
            self.blocks.reserve(seq, seq.n_cached + 1)
        return ScheduledBatch(list(self.running), [1] * len(self.running), is_prefill=False)

    def postprocess(self, batch: ScheduledBatch) -> list[Sequence]:
        """Mark the scheduled tokens cached; return the sequences whose next token is due."""
        due: list[Sequence] = []
        for seq, n in zip(batch.seqs, batch.n_new, strict=True):
            seq.n_cached += n
            if seq.n_uncached == 0:
                due.append(seq)
                if seq.status is SequenceStatus.WAITING:
                    self.waiting.remove(seq)
                    seq.status = SequenceStatus.RUNNING
                    self.running.append(seq)
        return due

    def finish(self, seq: Sequence) -> None:
        """Drop seq (finished, cancelled or failed) and give its blocks back."""
        if seq in self.waiting:
            self.waiting.remove(seq)
        if seq in self.running:
            self.running.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self.blocks.release(seq)
