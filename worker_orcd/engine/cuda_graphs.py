"""Forward passes captured as CUDA graphs, with static input buffers and an eager fallback.

A batch-1 step launches a few hundred small kernels, and on a slow host launching them costs more
than running them; replaying a captured graph costs one launch. Two kinds are captured:

- decode: one token for each of up to B sequences. The graph reads token ids, positions and block
  tables from static buffers, derives KV slots and context lengths on the device, and ends with the
  float32 logits and their argmax over the ids the sampler allows (banned ids, given at capture,
  are skipped; the logits themselves are left as the eager pass returns them). It then advances
  its own inputs (next id = argmax, position + 1), so greedy decoding can replay it back to back
  with no host work between steps (`GreedySteps`, `decode_greedy`).
  Each batch size has a graph per bound on the context: up to SHORT_CONTEXT keys (attended
  without splitting), for one sequence up to MID_CONTEXT (a few splits), and any context.
- prompt: a whole fresh prompt, padded up to a bucket length (16, 32, ... 4096 tokens, and the
  sliding window if the model has one). Padding goes after the prompt, so causal attention keeps
  real tokens from seeing it.

Padding tokens and padding rows carry KV slot -1 and block -1: the Triton kernels write nothing for
them and read zeros, so neither capture nor replay touches a cache slot the caller does not own.

The static buffers are inference tensors: the public methods run under torch.inference_mode.

Graphs need the Triton kernels (the torch reference reads lengths on the host, which a graph would
freeze). `CudaGraphRunner.create` returns None where they cannot serve (CPU, no Triton), and
`try_forward` returns None for a batch no graph fits; callers then run the eager path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import torch

from worker_orcd import kernels
from worker_orcd.engine.kv_cache import KVCache
from worker_orcd.engine.scheduler import ScheduledBatch
from worker_orcd.kernels import AttentionMetadata
from worker_orcd.model import CausalLM

logger = logging.getLogger(__name__)

PROMPT_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
# Decode batch sizes with a graph; a batch is padded up to the next one.
DECODE_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)


def decode_buckets(max_num_seqs: int) -> tuple[int, ...]:
    """The decode graph batch sizes up to max_num_seqs, which is one of them."""
    sizes = {b for b in DECODE_BUCKETS if b < max_num_seqs} | {max_num_seqs}
    return tuple(sorted(sizes))


GREEDY_RING = 4  # pinned id slots of DecodeGraphs: steps launched ahead of the host's reads


def _bind_caches(model: CausalLM, kv: KVCache) -> None:
    for i, attn in enumerate(model.attention_layers()):
        attn.k_cache = kv.k[i]  # [S, Hk, D]
        attn.v_cache = kv.v[i]


class _HostStaging:
    """Pinned host buffers for the inputs' host-to-device copies, used in a ring.

    A copy from pinned memory runs when the stream reaches it, so a buffer may be rewritten only
    once the copy that last read it has run: `take` waits for that (normally long done), and
    callers need not synchronize between steps.
    """

    def __init__(self, specs: Sequence[tuple[tuple[int, ...], torch.dtype]], depth: int = 3):
        self._sets = [
            [torch.zeros(shape, dtype=dtype, pin_memory=True) for shape, dtype in specs]
            for _ in range(depth)
        ]
        self._copied: list[torch.cuda.Event | None] = [None] * depth
        self._next = 0
        self._current = 0

    def take(self) -> list[torch.Tensor]:
        """The next set of buffers, free to write."""
        i = self._current = self._next
        self._next = (i + 1) % len(self._sets)
        if self._copied[i] is not None:
            self._copied[i].synchronize()
        return self._sets[i]

    def copies_issued(self) -> None:
        """Mark the copies from the set last taken as enqueued on the current stream."""
        event = torch.cuda.Event()
        event.record()
        self._copied[self._current] = event


def _warm_and_capture(
    fn: Callable[[], tuple[torch.Tensor, ...]], device: torch.device, pool: object
) -> tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...]]:
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


GraphKey = tuple[int, int]  # (batch size, bound on the context it was captured for)


class DecodeGraphs:
    """Captured decode steps, sharing static buffers sized for the largest batch.

    One per batch size and bound on the context: up to SHORT_CONTEXT keys (attention in one
    program per KV head, no merge launch), up to MID_CONTEXT for batch size 1 (at most MID_SPLITS
    splits) and any context (split over programs by the batch shape, then merged).
    """

    def __init__(
        self,
        model: CausalLM,
        kv: KVCache,
        batch_sizes: Sequence[int] = (1,),
        banned_ids: torch.Tensor | None = None,
    ) -> None:
        self.model = model
        self.kv = kv
        self.device = dev = kv.k.device
        self.max_batch = b = max(batch_sizes)
        # Block-table width: the blocks of the longest sequence the model or the cache holds.
        self.max_blocks = min(kv.num_blocks, -(-model.max_positions // kv.block_size))
        # Ids the greedy pick skips, as the sampler does (fixed at capture).
        self.banned_ids: torch.Tensor | None = None
        if banned_ids is not None and banned_ids.numel():
            self.banned_ids = banned_ids.to(dev, torch.int64)
        # Greedy ids read back one step behind: a ring of pinned slots, each with its event.
        self.greedy_ids = torch.zeros(GREEDY_RING, dtype=torch.int64, pin_memory=True)
        self.greedy_done = [torch.cuda.Event() for _ in range(GREEDY_RING)]
        # host staging (pinned) and the graph's static inputs
        self._staging = _HostStaging([((2, b), torch.int64), ((b, self.max_blocks), torch.int32)])
        self.token_ids = torch.zeros(b, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(b, dtype=torch.int64, device=dev)
        self.block_tables = torch.full((b, self.max_blocks), -1, dtype=torch.int32, device=dev)
        self._slots = torch.full((b,), -1, dtype=torch.int64, device=dev)
        self._context_lens = torch.ones(b, dtype=torch.int32, device=dev)
        self._query_start = torch.arange(b + 1, dtype=torch.int32, device=dev)
        self._graphs: dict[GraphKey, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[GraphKey, tuple[torch.Tensor, ...]] = {}
        self.batch_sizes = sorted(batch_sizes)
        from worker_orcd.kernels.triton.attention import split_bounds

        # The bounds on the context a graph is captured for, ascending; the last holds any.
        self._bounds = {
            n: [c for c in split_bounds(n) if c < kv.num_slots] + [kv.num_slots]
            for n in self.batch_sizes
        }
        pool = None
        for n in reversed(self.batch_sizes):
            for bound in self._bounds[n]:
                self.block_tables.fill_(-1)  # warm-up and capture write nothing to the cache
                self.positions.zero_()
                key = (n, bound)
                self._graphs[key], self._outputs[key] = _warm_and_capture(
                    lambda n=n, bound=bound: self._step(n, bound), dev, pool
                )
                pool = self._graphs[key].pool()

    def _step(self, n: int, bound: int) -> tuple[torch.Tensor, torch.Tensor]:
        from worker_orcd.kernels.triton import decode_step

        bs = self.kv.block_size
        ids, pos, tables = self.token_ids[:n], self.positions[:n], self.block_tables[:n]
        decode_step.slots_and_context_lens(pos, tables, self._slots[:n], self._context_lens[:n], bs)
        meta = AttentionMetadata(
            slot_mapping=self._slots[:n],
            query_start=list(range(n + 1)),
            context_lens=[1] * n,
            kv_slots=[slice(0, 1)] * n,
            query_start_t=self._query_start[: n + 1],
            context_lens_t=self._context_lens[:n],
            block_tables=tables,
            block_size=bs,
            max_query_len=1,
            max_context_len=bound,
        )
        hidden = self.model(ids, pos, meta)  # [n, D]
        logits = self.model.compute_logits(hidden)  # [n, V] float32
        pick = logits
        if self.banned_ids is not None:
            # On a copy: the logits stay what the eager pass returns (the sampler masks them).
            pick = logits.index_fill(1, self.banned_ids, float("-inf"))
        # The greedy pick ([n]), and the inputs advanced for a back-to-back greedy replay (the
        # host overwrites them otherwise).
        next_ids = decode_step.argmax_advance(pick, ids, pos)
        return logits, next_ids

    def batch_size_for(self, n: int) -> int | None:
        """The smallest captured batch size that holds n sequences, or None."""
        fits = [b for b in self.batch_sizes if b >= n]
        return fits[0] if fits else None

    def key(self, size: int, max_context: int) -> GraphKey:
        """The graph for a step whose longest context (keys, this token included) is given."""
        bounds = self._bounds[size]
        return size, next((c for c in bounds if max_context <= c), bounds[-1])

    @torch.inference_mode()
    def load_inputs(
        self,
        token_ids: Sequence[int],
        positions: Sequence[int],
        block_tables: Sequence[Sequence[int]],
    ) -> GraphKey:
        """Write one step's inputs; rows past len(token_ids) are padding (block -1, nothing
        written). Returns the key of the graph to replay."""
        n = len(token_ids)
        size = self.batch_size_for(n)
        if size is None:
            raise ValueError(f"no decode graph holds {n} sequences (largest {self.max_batch})")
        host, tables = self._staging.take()
        host[0, :n] = torch.as_tensor(token_ids, dtype=torch.int64)
        host[1, :n] = torch.as_tensor(positions, dtype=torch.int64)
        host[:, n:size] = 0
        tables[n:size] = -1
        for i, row in enumerate(block_tables):
            if len(row) > self.max_blocks:
                raise ValueError(
                    f"block table of {len(row)} blocks; the cache has {self.max_blocks}"
                )
            tables[i, : len(row)] = torch.as_tensor(row, dtype=torch.int32)
            tables[i, len(row) :] = -1
        self.token_ids[:size].copy_(host[0, :size], non_blocking=True)
        self.positions[:size].copy_(host[1, :size], non_blocking=True)
        self.block_tables[:size].copy_(tables[:size], non_blocking=True)
        self._staging.copies_issued()
        return self.key(size, max(positions) + 1)

    @torch.inference_mode()
    def replay(self, key: GraphKey) -> tuple[torch.Tensor, torch.Tensor]:
        """Run a captured step; logits [size, V] and greedy ids [size], valid until the next."""
        self._graphs[key].replay()
        logits, next_ids = self._outputs[key]
        return logits, next_ids

    @torch.inference_mode()
    def decode_greedy(
        self, token_id: int, position: int, block_table: Sequence[int], steps: int
    ) -> list[int]:
        """Greedy-decode `steps` tokens of one sequence after `token_id` at `position`.

        The graph feeds its argmax back to itself; the host reads each id one step behind the GPU
        through a pinned buffer, so it never waits on the step it has just launched.
        """
        greedy = GreedySteps(self)
        greedy.start(token_id, position, block_table)
        greedy.launch(position, block_table)
        ids: list[int] = []
        for i in range(1, steps):
            greedy.launch(position + i, block_table)
            ids.append(greedy.next_id())
        ids.append(greedy.next_id())
        return ids


class GreedySteps:
    """One sequence's greedy decode on the batch-1 decode graph, its ids fed on the device.

    `start` writes the first step's token from the host. Each `launch` replays one step, whose
    input id is the previous step's argmax (the graph advances its own inputs), and returns at
    once; `next_id` waits for the oldest step not yet read and returns its id. So the host can
    launch step i + 1 before it reads the id of step i, and the GPU never waits for the host.

    A launched step that is never read is dropped: it wrote K/V at its position (the caller owns
    that block) and its id into a pinned slot that a later copy on the same stream overwrites.
    Block-table entries the caller adds between launches are copied to the device before the
    step that needs them.
    """

    def __init__(self, graphs: DecodeGraphs) -> None:
        if graphs.batch_size_for(1) != 1:
            raise ValueError("greedy steps need a captured decode graph of batch size 1")
        self.graphs = graphs
        self._position = -1  # of the next launch
        self._on_device = 0  # block-table entries the device holds
        self._launched = 0
        self._read = 0

    @property
    def in_flight(self) -> int:
        """Steps launched and not yet read."""
        return self._launched - self._read

    @torch.inference_mode()
    def start(self, token_id: int, position: int, block_table: Sequence[int]) -> None:
        """The next launch reads `token_id` at `position` (its block must be in block_table)."""
        self.graphs.load_inputs([token_id], [position], [block_table])
        self._position = position
        self._on_device = len(block_table)

    @torch.inference_mode()
    def launch(self, position: int, block_table: Sequence[int]) -> None:
        """Replay one step at `position` (the last launch's + 1); block_table covers it."""
        g = self.graphs
        assert position == self._position, (position, self._position)
        assert self.in_flight < GREEDY_RING, "read ids before launching further"
        if len(block_table) > g.max_blocks:
            raise ValueError(f"block table of {len(block_table)} blocks; cache has {g.max_blocks}")
        for i in range(self._on_device, len(block_table)):
            g.block_tables[0, i : i + 1].fill_(block_table[i])  # no host sync
        self._on_device = len(block_table)
        _, next_ids = g.replay(g.key(1, position + 1))
        slot = self._launched % GREEDY_RING
        g.greedy_ids[slot : slot + 1].copy_(next_ids[:1], non_blocking=True)
        g.greedy_done[slot].record()
        self._launched += 1
        self._position = position + 1

    def next_id(self) -> int:
        """The id of the oldest unread step, once that step has run."""
        assert self.in_flight > 0, "no step in flight"
        slot = self._read % GREEDY_RING
        self.graphs.greedy_done[slot].synchronize()
        self._read += 1
        return int(self.graphs.greedy_ids[slot])


class DeviceFedSteps:
    """Greedy decode steps of a batch of sequences on the decode graphs, fed on the device.

    `start` writes one step's inputs from the host and launches it; each `chain` launches the next
    step on the previous one's argmax (the graph advances its own inputs) without waiting; `read`
    waits for a launched step and returns its ids. So the host can launch step i + 1 before it has
    read step i, and the GPU never waits for the host while the batch stays the same. Block-table
    entries the caller adds between launches are copied to the device before the step that needs
    them. A launched step whose ids are never read is dropped: it wrote K/V at its positions (the
    caller owned those blocks when it launched) and its ids into a pinned slot a later copy reuses.
    """

    def __init__(self, graphs: DecodeGraphs) -> None:
        self.graphs = graphs
        b = graphs.max_batch
        self._ids = torch.zeros((GREEDY_RING, b), dtype=torch.int64, pin_memory=True)
        self._done = [torch.cuda.Event() for _ in range(GREEDY_RING)]
        self._positions: list[int] = []  # of the next launch, per row
        self._on_device: list[int] = []  # block-table entries the device holds, per row
        self._launched = 0
        self._read = 0

    @property
    def in_flight(self) -> int:
        return self._launched - self._read

    @torch.inference_mode()
    def start(
        self,
        token_ids: Sequence[int],
        positions: Sequence[int],
        block_tables: Sequence[Sequence[int]],
    ) -> int:
        """Launch a step on host inputs; returns its ticket for `read`."""
        assert self.in_flight == 0, "read the steps in flight before starting anew"
        self.graphs.load_inputs(token_ids, positions, block_tables)
        self._positions = list(positions)
        self._on_device = [len(t) for t in block_tables]
        return self._launch()

    @torch.inference_mode()
    def chain(self, block_tables: Sequence[Sequence[int]]) -> int:
        """Launch the next step of the same rows on the last one's ids; block_tables cover it."""
        g = self.graphs
        assert self.in_flight < GREEDY_RING, "read ids before launching further"
        assert len(block_tables) == len(self._positions)
        for row, table in enumerate(block_tables):
            if len(table) > g.max_blocks:
                raise ValueError(f"block table of {len(table)} blocks; at most {g.max_blocks}")
            for i in range(self._on_device[row], len(table)):
                g.block_tables[row, i : i + 1].fill_(table[i])  # no host sync
            self._on_device[row] = len(table)
        return self._launch()

    def _launch(self) -> int:
        g = self.graphs
        n = len(self._positions)
        size = g.batch_size_for(n)
        assert size is not None
        _, next_ids = g.replay(g.key(size, max(self._positions) + 1))
        slot = self._launched % GREEDY_RING
        self._ids[slot, :n].copy_(next_ids[:n], non_blocking=True)
        self._done[slot].record()
        self._positions = [p + 1 for p in self._positions]
        ticket = self._launched
        self._launched += 1
        return ticket

    def read(self, ticket: int) -> list[int]:
        """The ids of the oldest unread step (which must be `ticket`), once it has run."""
        assert ticket == self._read and self.in_flight > 0, (ticket, self._read)
        slot = ticket % GREEDY_RING
        self._done[slot].synchronize()
        self._read += 1
        return self._ids[slot, : len(self._positions)].tolist()


class PromptGraphs:
    """One captured forward pass of a fresh single-sequence prompt per bucket length."""

    def __init__(self, model: CausalLM, kv: KVCache, buckets: Sequence[int]) -> None:
        self.model = model
        self.kv = kv
        self.device = dev = kv.k.device
        self.buckets = sorted(buckets)
        n_max = self.buckets[-1]
        self._staging = _HostStaging([((2, n_max), torch.int64), ((1,), torch.int64)])
        self.token_ids = torch.zeros(n_max, dtype=torch.int64, device=dev)
        self.slots = torch.full((n_max,), -1, dtype=torch.int64, device=dev)
        self.last = torch.zeros(1, dtype=torch.int64, device=dev)
        self._positions = torch.arange(n_max, dtype=torch.int64, device=dev)
        self._no_tables = torch.zeros((1, 1), dtype=torch.int32, device=dev)
        self._lengths = {  # bucket -> (query_start_t [2], context_lens_t [1]); made before capture
            n: (
                torch.tensor([0, n], dtype=torch.int32, device=dev),
                torch.tensor([n], dtype=torch.int32, device=dev),
            )
            for n in self.buckets
        }
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, tuple[torch.Tensor, ...]] = {}
        pool = None
        for n in reversed(self.buckets):
            self._graphs[n], self._outputs[n] = _warm_and_capture(
                lambda n=n: self._step(n), dev, pool
            )
            pool = self._graphs[n].pool()

    def _step(self, n: int) -> tuple[torch.Tensor]:
        meta = AttentionMetadata(
            slot_mapping=self.slots[:n],
            query_start=[0, n],
            context_lens=[n],
            kv_slots=[slice(0, n)],
            query_start_t=self._lengths[n][0],
            context_lens_t=self._lengths[n][1],
            block_tables=self._no_tables,
            block_size=self.kv.block_size,
            max_query_len=n,
            max_context_len=n,
        )
        hidden = self.model(self.token_ids[:n], self._positions[:n], meta)  # [n, D]
        return (self.model.compute_logits(hidden.index_select(0, self.last)),)  # [1, V]

    def bucket_for(self, n: int) -> int | None:
        fits = [b for b in self.buckets if b >= n]
        return fits[0] if fits else None

    @torch.inference_mode()
    def forward(
        self, token_ids: Sequence[int], slots: Sequence[int] | torch.Tensor
    ) -> torch.Tensor:
        """Logits [1, V] of the prompt's last token; a static view valid until the next replay."""
        n = len(token_ids)
        size = self.bucket_for(n)
        if size is None:
            raise ValueError(f"no prompt graph holds {n} tokens (largest {self.buckets[-1]})")
        host, last = self._staging.take()
        host[0, :n] = torch.as_tensor(token_ids, dtype=torch.int64)
        host[1, :n] = torch.as_tensor(slots, dtype=torch.int64)
        host[0, n:size] = 0
        host[1, n:size] = -1
        last[0] = n - 1
        self.token_ids[:size].copy_(host[0, :size], non_blocking=True)
        self.slots[:size].copy_(host[1, :size], non_blocking=True)
        self.last.copy_(last, non_blocking=True)
        self._staging.copies_issued()
        self._graphs[size].replay()
        return self._outputs[size][0]


class CudaGraphRunner:
    """Decode and prompt graphs of one model and KV cache, behind `try_forward(batch)`."""

    def __init__(self, decode: DecodeGraphs, prompt: PromptGraphs | None) -> None:
        self.decode = decode
        self.prompt = prompt

    @classmethod
    def create(
        cls,
        model: CausalLM,
        kv: KVCache,
        *,
        batch_sizes: Sequence[int] = (1,),
        prompt_buckets: Sequence[int] = PROMPT_BUCKETS,
        banned_ids: torch.Tensor | None = None,
    ) -> CudaGraphRunner | None:
        """Capture the graphs, or None (eager path) where they cannot serve. `banned_ids` [n]:
        ids the decode graph's greedy pick never takes (the sampler's banned ids)."""
        device = kv.k.device
        if device.type != "cuda":
            return None
        from worker_orcd.kernels import triton as triton_kernels

        if not triton_kernels.available(device):
            logger.info("CUDA graphs off: Triton is not installed")
            return None
        triton_kernels.register_all()
        if kernels.implementation("attention", device) is kernels.REFERENCE["attention"]:
            logger.info("CUDA graphs off: no device-side attention kernel")
            return None
        start = time.perf_counter()
        _bind_caches(model, kv)
        with torch.inference_mode():
            decode = DecodeGraphs(model, kv, batch_sizes, banned_ids)
            window = model.config.sliding_window
            limit = min(kv.num_slots, model.max_positions)
            fits = {b for b in prompt_buckets if b <= limit}
            if window is not None and window < limit:
                # Longer prompts take the windowed kernel, which reads block tables that a prompt
                # graph does not fill: the window itself is the last bucket.
                fits = {b for b in fits if b <= window} | {window}
            buckets = sorted(fits)
            prompt = PromptGraphs(model, kv, buckets) if buckets else None
        logger.info(
            "captured CUDA graphs in %.2fs: decode batch sizes %s, prompt buckets %s",
            time.perf_counter() - start,
            sorted(batch_sizes),
            buckets,
        )
        return cls(decode, prompt)

    @torch.inference_mode()
    def try_forward(self, batch: ScheduledBatch, block_size: int) -> torch.Tensor | None:
        """Logits [N, V] of each sequence's due token through a graph, or None if none fits.

        The result is a static view, valid until the next graph replay.
        """
        seqs = batch.seqs
        if not batch.is_prefill:
            if self.decode.batch_size_for(len(seqs)) is None or any(n != 1 for n in batch.n_new):
                return None
            ids = [s.token_ids[s.n_cached] for s in seqs]
            positions = [s.n_cached for s in seqs]
            key = self.decode.load_inputs(ids, positions, [s.block_table for s in seqs])
            return self.decode.replay(key)[0][: len(seqs)]
        if self.prompt is None or len(seqs) != 1:
            return None
        seq, n = seqs[0], batch.n_new[0]
        if seq.n_cached != 0 or n != len(seq) or self.prompt.bucket_for(n) is None:
            return None
        blocks = torch.as_tensor(seq.block_table[: -(-n // block_size)], dtype=torch.int64)
        slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:n]
        return self.prompt.forward(seq.token_ids, slots)
