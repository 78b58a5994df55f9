"""Scheduler: decides which tokens of which sequences the next forward pass carries.

Policy, per step, within a budget of `max_batch_tokens` tokens and `max_seqs` sequences:
1. one decode token for every running sequence (its KV blocks grown first); when the block pool
   runs dry, the most recently admitted running sequence is preempted: its blocks are freed and it
   goes back to the front of the waiting queue, its tokens so far to be recomputed as a prompt;
2. then prompt chunks of waiting sequences, first come first served, as far as the remaining
   token budget and free blocks allow (a long prompt takes several steps, each chunk attending to
   the ones before it).
A step that carries any prompt chunk is a prefill step (`is_prefill`); one of decode tokens alone
is a decode step, which a captured graph can run.
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

    def due(self) -> list[Sequence]:
        """The sequences whose next token this pass makes due (their known tokens all cached)."""
        return [s for s, n in zip(self.seqs, self.n_new, strict=True) if s.n_cached + n == len(s)]


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_batch_tokens: int, max_seqs: int = 1) -> None:
        if max_batch_tokens < 1 or max_seqs < 1:
            raise ValueError(
                f"max_batch_tokens and max_seqs must be >= 1 (got {max_batch_tokens}, {max_seqs})"
            )
        self.blocks = blocks
        self.max_batch_tokens = max_batch_tokens
        self.max_seqs = max_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        seqs: list[Sequence] = []
        n_new: list[int] = []
        budget = self.max_batch_tokens
        for seq in list(self.running):  # oldest first; preemption takes the newest
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue  # preempted while an older sequence made room, or no budget left
            if self._make_room(seq, seq.n_cached + 1):
                seqs.append(seq)
                n_new.append(1)
                budget -= 1
        # New prompt chunks leave a block free for each running sequence, so that the decode
        # steps right after need not preempt what was just admitted.
        headroom = len(self.running)
        admitted = len(self.running)
        is_prefill = False
        for seq in self.waiting:
            if budget == 0 or admitted >= self.max_seqs:
                break
            free = self.blocks.num_free - headroom
            room = (len(seq.block_table) + max(free, 0)) * self.blocks.block_size - seq.n_cached
            n = min(seq.n_uncached, budget, room)
            if n <= 0:
                break  # first come, first served: nothing overtakes a prompt that must wait
            self.blocks.reserve(seq, seq.n_cached + n)
            seqs.append(seq)
            n_new.append(n)
            budget -= n
            admitted += 1
            is_prefill = True
        return ScheduledBatch(seqs, n_new, is_prefill=is_prefill)

    def _make_room(self, seq: Sequence, n_tokens: int) -> bool:
        """Reserve blocks for running seq's first n_tokens, preempting newer sequences (partly
        prefilled waiting ones, then running ones from the newest, seq itself last) until they
        fit; False when seq itself was preempted."""
        while not self.blocks.can_hold(seq, n_tokens):
            victim = self._newer_holder(seq)
            self.preempt(victim or seq)
            if victim is None:
                return False
        self.blocks.reserve(seq, n_tokens)
        return True

    def _newer_holder(self, seq: Sequence) -> Sequence | None:
        """A sequence admitted after running `seq` that holds blocks, the newest first."""
        for other in reversed(self.waiting):
            if other.block_table:
                return other
        for other in reversed(self.running):
            if other is seq:
                return None
            return other
        return None

    def unblock(self) -> None:
        """After a step that could schedule nothing: the first waiting sequence needs blocks that
        partly prefilled sequences behind it hold. They give them back and start over later."""
        for seq in list(self.waiting)[1:]:
            if seq.block_table:
                self.blocks.release(seq)
                seq.n_cached = 0
                seq.preemptions += 1
                self.preemptions += 1

    def preempt(self, seq: Sequence) -> None:
        """Free seq's blocks and requeue it at the front; its tokens so far become its prompt."""
        self.blocks.release(seq)
        seq.n_cached = 0
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.preemptions += 1
        self.waiting.appendleft(seq)
        self.preemptions += 1
        logger.info(
            "preempted sequence %d (%d tokens) for lack of KV blocks (%d free of %d)",
            seq.seq_id,
            len(seq),
            self.blocks.num_free,
            self.blocks.num_blocks,
        )

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
