"""Sequence: the state of one request as it moves through prefill and decode."""

from __future__ import annotations

import enum
import itertools
from dataclasses import dataclass, field

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # prompt (or part of it) not yet in the KV cache
    RUNNING = "running"  # prompt cached; decoding one token per step
    FINISHED = "finished"


@dataclass(slots=True, eq=False)  # identity: `seq in waiting` must not compare token lists
class Sequence:
    """token_ids holds the prompt then the generated tokens. The K/V of the first n_cached tokens
    are in the cache, in the slots given by block_table; the last sampled token is cached by the
    next step."""

    token_ids: list[int]
    n_prompt: int
    seq_id: int = field(default_factory=lambda: next(_ids))
    block_table: list[int] = field(default_factory=list)
    n_cached: int = 0
    status: SequenceStatus = SequenceStatus.WAITING
    preemptions: int = 0  # times its blocks were taken back and its tokens recomputed

    @classmethod
    def from_prompt(cls, prompt_ids: list[int]) -> Sequence:
        if not prompt_ids:
            raise ValueError("a sequence needs at least one prompt token")
        return cls(token_ids=list(prompt_ids), n_prompt=len(prompt_ids))

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def n_uncached(self) -> int:
        return len(self.token_ids) - self.n_cached

    @property
    def generated(self) -> list[int]:
        return self.token_ids[self.n_prompt :]

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)
