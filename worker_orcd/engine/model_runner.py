"""ModelRunner: turns a scheduled batch into tensors, runs the model, returns logits.

It owns the KV cache tensors and binds each layer's views into the model's attention modules. The
flat batch (input_ids [T], positions [T], AttentionMetadata) is built here and nowhere else. On CUDA
it also owns the captured graphs (cuda_graphs.py): `forward` replays one when a graph fits the batch
and runs the model eagerly otherwise; `graphs = None` forces the eager path.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from worker_orcd.engine.cuda_graphs import (
    CudaGraphRunner,
    DeviceFedSteps,
    GreedySteps,
    decode_buckets,
)
from worker_orcd.engine.kv_cache import KVCache
from worker_orcd.engine.scheduler import ScheduledBatch
from worker_orcd.kernels import AttentionMetadata
from worker_orcd.model import CausalLM

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        kv: KVCache,
        *,
        cuda_graphs: bool = False,
        banned_ids: torch.Tensor | None = None,
        max_num_seqs: int = 1,
    ) -> None:
        self.model = model
        self.kv = kv
        self.device = kv.k.device
        self.block_size = kv.block_size
        for i, attn in enumerate(model.attention_layers()):
            attn.k_cache = kv.k[i]  # [S, Hk, D]
            attn.v_cache = kv.v[i]
        if self.device.type == "cuda":
            from worker_orcd.kernels import triton as triton_kernels

            # The eager CUDA path (all-position scoring, batches no graph fits) runs the Triton
            # kernels too, not the torch references.
            if triton_kernels.available(self.device):
                triton_kernels.register_all()
        # None on CPU, without Triton, or when turned off (Engine.load turns them on for CUDA by
        # default): every step runs eagerly. banned_ids: what the decode graph's greedy pick skips.
        self.graphs = (
            CudaGraphRunner.create(
                model, kv, batch_sizes=decode_buckets(max_num_seqs), banned_ids=banned_ids
            )
            if cuda_graphs
            else None
        )

    def greedy_steps(self) -> GreedySteps | None:
        """Device-fed greedy decode of one sequence on the decode graph, or None (no graphs)."""
        if self.graphs is None or self.graphs.decode.batch_size_for(1) != 1:
            return None
        return GreedySteps(self.graphs.decode)

    def device_fed_steps(self) -> DeviceFedSteps | None:
        """Device-fed greedy decode of whole batches on the decode graphs, or None (no graphs)."""
        return None if self.graphs is None else DeviceFedSteps(self.graphs.decode)

    def prepare(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        """input_ids [T], positions [T] and the attention metadata of a scheduled batch."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        query_start = [0]
        context_lens: list[int] = []
        kv_slots: list[slice | torch.Tensor] = []
        for seq, n in zip(batch.seqs, batch.n_new, strict=True):
            first, end = seq.n_cached, seq.n_cached + n
            ids.extend(seq.token_ids[first:end])
            positions.extend(range(first, end))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(first, end))
            query_start.append(query_start[-1] + n)
            context_lens.append(end)
            kv_slots.append(self._context_slots(table, end))
        width = max(len(s.block_table) for s in batch.seqs)
        tables = [s.block_table + [-1] * (width - len(s.block_table)) for s in batch.seqs]
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            query_start=query_start,
            context_lens=context_lens,
            kv_slots=kv_slots,
            query_start_t=torch.tensor(query_start, dtype=torch.int32, device=dev),
            context_lens_t=torch.tensor(context_lens, dtype=torch.int32, device=dev),
            block_tables=torch.tensor(tables, dtype=torch.int32, device=dev),
            block_size=bs,
            max_query_len=max(batch.n_new),
            max_context_len=max(context_lens),
        )
        input_ids = torch.tensor(ids, dtype=torch.int64, device=dev)
        pos = torch.tensor(positions, dtype=torch.int64, device=dev)
        return input_ids, pos, meta

    def _context_slots(self, table: list[int], n_ctx: int) -> slice | torch.Tensor:
        n_blocks = -(-n_ctx // self.block_size)
        first = table[0]
        if table[:n_blocks] == list(range(first, first + n_blocks)):
            start = first * self.block_size
            return slice(start, start + n_ctx)
        blocks = torch.tensor(table[:n_blocks], dtype=torch.int64, device=self.device)
        offsets = torch.arange(self.block_size, device=self.device)
        return (blocks[:, None] * self.block_size + offsets).flatten()[:n_ctx]

    @torch.inference_mode()
    def forward(
        self,
        batch: ScheduledBatch,
        *,
        all_logits: bool = False,
        abort: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """float32 logits: of every token in the batch if all_logits, else of each sequence's last
        token among those that reach the end of their known tokens (their next token is due).

        A graph's logits are a static view, valid until the next forward: consume or clone them.
        `abort` is polled between layers of an eager pass (a graph replay is too short to need
        it); when it returns True the pass raises ForwardAborted and leaves the batch unfinished.
        """
        start = time.perf_counter() if logger.isEnabledFor(logging.DEBUG) else 0.0
        if self.graphs is not None and not all_logits:
            logits = self.graphs.try_forward(batch, self.block_size)
            if logits is not None:
                if start:
                    torch.cuda.synchronize(self.device)
                    logger.debug(
                        "forward %s (graph): %d tokens, %d seqs, %d layers, %.2f ms",
                        "prefill" if batch.is_prefill else "decode",
                        batch.num_tokens,
                        len(batch.seqs),
                        len(self.model.model.layers),
                        (time.perf_counter() - start) * 1e3,
                    )
                return logits
        input_ids, positions, meta = self.prepare(batch)
        hidden = self.model(input_ids, positions, meta, abort)  # [T, D]; may raise ForwardAborted
        if not all_logits:
            last = [
                meta.query_start[i + 1] - 1
                for i, (seq, n) in enumerate(zip(batch.seqs, batch.n_new, strict=True))
                if seq.n_cached + n == len(seq)
            ]
            hidden = hidden[last] if len(last) != hidden.shape[0] else hidden
        logits = self.model.compute_logits(hidden)  # [N, V]
        if start:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            logger.debug(
                "forward %s: %d tokens, %d seqs, %d layers, %.2f ms",
                "prefill" if batch.is_prefill else "decode",
                meta.num_tokens,
                meta.num_seqs,
                len(self.model.model.layers),
                (time.perf_counter() - start) * 1e3,
            )
        return logits
