"""Tensor parallelism across processes: rank 0 is the engine, ranks 1..N-1 follow it.

    engine = Engine.load(path, device="cuda", tensor_parallel_size=2)

Engine.load starts N - 1 follower processes (torch.multiprocessing, spawn): one per GPU on CUDA
(rank r on the device r after rank 0's), one per process on CPU. The ranks join one
torch.distributed group for the model's collectives (NCCL on CUDA, gloo on CPU) and a gloo group
over which rank 0 sends the inputs of every forward pass. Each rank loads only its part of the
model from the file (loader.py with its `Parallel`). Rank 0 schedules and samples; its runner, a
TensorParallelRunner in place of the ModelRunner, builds each pass's inputs with the ModelRunner's
`prepare`, broadcasts them, and runs the pass; every follower runs the same pass on them, so the
collectives inside the model meet. ranks.py is rank 0's side of the processes, follower.py the
others'.

A follower exits when rank 0 closes the group, when rank 0's process ends, and after any error of
its own, which rank 0 raises (from Engine.load, or from the pass: TensorParallelError). CUDA graphs
are not captured with more than one rank: those passes run eagerly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from worker_orcd.config import ModelConfig
from worker_orcd.engine.follower import BuildShard
from worker_orcd.engine.kv_cache import KVCache
from worker_orcd.engine.model_runner import ModelRunner
from worker_orcd.engine.ranks import RankGroup, TensorParallelError, closing_on_error
from worker_orcd.engine.scheduler import ScheduledBatch
from worker_orcd.errors import ModelLoadError
from worker_orcd.gguf import GGUFFile
from worker_orcd.kernels import AttentionMetadata
from worker_orcd.loader import load_model
from worker_orcd.model import CausalLM, ForwardAborted
from worker_orcd.parallel import Parallel, check_divisible, rank_config

logger = logging.getLogger(__name__)

__all__ = [
    "GGUFShard",
    "RankGroup",
    "TensorParallelError",
    "TensorParallelRunner",
    "closing_on_error",
    "resolve_graphs",
    "start_ranks",
]


@dataclass(frozen=True, slots=True)
class GGUFShard:
    """A follower's part of a GGUF model and its KV cache, loaded as Engine.load loads rank 0's."""

    path: str
    dtype: torch.dtype
    context: int
    weights: str
    kv_tokens: int  # slots of every rank's cache, as rank 0 planned them

    def __call__(self, parallel: Parallel, device: torch.device) -> tuple[CausalLM, KVCache]:
        with GGUFFile.open(self.path) as f:
            config = ModelConfig.from_gguf(f)
            model, _ = load_model(
                f,
                config,
                device=device,
                dtype=self.dtype,
                max_positions=self.context,
                weights=self.weights,
                parallel=parallel,
            )
        kv = KVCache.allocate(
            rank_config(config, parallel), self.kv_tokens, dtype=self.dtype, device=device
        )
        return model, kv


def resolve_graphs(cuda_graphs: bool | None, size: int, use_graphs: bool) -> bool:
    """CUDA graphs with more than one rank: not captured (the passes run eagerly); asking for them
    is an error."""
    if size == 1:
        return use_graphs
    if cuda_graphs:
        raise ModelLoadError("cuda_graphs=True is not supported with tensor_parallel_size > 1")
    if use_graphs:
        logger.info("tensor parallel: CUDA graphs are not captured over several ranks; eager")
    return False


def start_ranks(
    build: BuildShard, size: int, device: torch.device, config: ModelConfig, source: object
) -> RankGroup | None:
    """The follower processes of a model split over `size` ranks, joined with this process as
    rank 0 and loading their parts (wait_ready); None for one rank."""
    check_divisible(config, size, source)
    if size == 1:
        return None
    return RankGroup.start(build, size, device)


class TensorParallelRunner:
    """Rank 0's runner of a model split over ranks, in place of its ModelRunner: the same
    `prepare` and `forward`, with every pass's inputs sent to the followers first. No graphs."""

    def __init__(self, inner: ModelRunner, group: RankGroup) -> None:
        self.inner = inner
        self.group = group
        self.model = inner.model
        self.kv = inner.kv
        self.device = inner.device
        self.block_size = inner.block_size
        self.graphs = None

    def device_fed_steps(self) -> None:
        return None  # device-fed steps need the decode graphs

    def prepare(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        return self.inner.prepare(batch)

    @torch.inference_mode()
    def forward(
        self,
        batch: ScheduledBatch,
        *,
        all_logits: bool = False,
        abort: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """As ModelRunner.forward. `abort` is polled before the pass only: every rank runs whole
        passes (one that stopped between layers would leave the others inside a collective)."""
        if abort is not None and abort():
            raise ForwardAborted
        input_ids, positions, meta = self.inner.prepare(batch)
        rows = None if all_logits else _due_rows(batch, meta)
        return self.group.run(self.model, (input_ids, positions, meta, rows))

    def close(self) -> None:
        self.group.close()


def _due_rows(batch: ScheduledBatch, meta: AttentionMetadata) -> list[int]:
    """Rows whose logits a pass returns (as ModelRunner.forward picks them): each sequence's last
    token, for the sequences that reach the end of their known tokens."""
    return [
        meta.query_start[i + 1] - 1
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.n_new, strict=True))
        if seq.n_cached + n == len(seq)
    ]
