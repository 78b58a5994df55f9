"""BlockManager: hands out fixed-size blocks of KV-cache slots to sequences."""

from __future__ import annotations

import heapq
import logging

from worker_orcd.engine.sequence import Sequence

logger = logging.getLogger(__name__)


class BlockManager:
    """Slot s of the cache belongs to block s // block_size. Free blocks are handed out lowest
    first, so a lone sequence on an idle cache gets contiguous slots (the attention reference reads
    them as a slice)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need at least one block of one slot (got {num_blocks} x {block_size})"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free = list(range(num_blocks))
        heapq.heapify(self._free)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-n_tokens // self.block_size)

    def can_hold(self, seq: Sequence, n_tokens: int) -> bool:
        return self.blocks_for(n_tokens) - len(seq.block_table) <= len(self._free)

    def reserve(self, seq: Sequence, n_tokens: int) -> None:
        """Grow seq's block table to hold its first n_tokens tokens."""
        need = self.blocks_for(n_tokens) - len(seq.block_table)
        if need > len(self._free):
            raise RuntimeError(
                f"KV cache exhausted: sequence {seq.seq_id} needs {need} more blocks, "
                f"{len(self._free)} free"
            )
        for _ in range(need):
            seq.block_table.append(heapq.heappop(self._free))

    def trim(self, seq: Sequence, n_tokens: int) -> None:
        """Give back the blocks of seq's table past those its first n_tokens tokens need."""
        keep = self.blocks_for(n_tokens)
        for block in seq.block_table[keep:]:
            heapq.heappush(self._free, block)
        del seq.block_table[keep:]

    def release(self, seq: Sequence) -> None:
        for block in seq.block_table:
            heapq.heappush(self._free, block)
        seq.block_table.clear()

    def slot(self, seq: Sequence, position: int) -> int:
        return (
            seq.block_table[position // self.block_size] * self.block_size
            + position % self.block_size
        )
