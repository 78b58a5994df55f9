"""Shared by the kernel tests: where a case runs (`GPU`: a CUDA device, marker `gpu`;
`INTERPRETED`: CPU under Triton's interpreter, with TRITON_INTERPRET=1, skipped otherwise) and
the relative error the cases bound, and paged attention metadata over scattered blocks."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from worker_orcd.kernels.attention import AttentionMetadata

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and HAS_TRITON
CUDA = torch.cuda.is_available() and HAS_TRITON

GPU = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]
)
INTERPRETED = pytest.param(
    "cpu", marks=pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 and Triton")
)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; a NaN in out fails the test."""
    assert not torch.isnan(out).any(), "NaN in output"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def scattered_metadata(
    ctx_lens: list[int], q_lens: list[int], page: int, free: list[int], device: str
) -> AttentionMetadata:
    """Attention metadata of sequences whose last q_lens tokens are this step's, each sequence's
    cache blocks popped from `free` in turn (a shuffled list scatters them)."""
    tables, kv_slots, slots, qs = [], [], [], [0]
    for c, ql in zip(ctx_lens, q_lens, strict=True):
        table = [free.pop() for _ in range(-(-c // page))]
        tables.append(table)
        s = [table[p // page] * page + p % page for p in range(c)]
        kv_slots.append(torch.tensor(s, device=device))
        slots += s[c - ql :]
        qs.append(qs[-1] + ql)
    width = max(len(t) for t in tables)
    bt = [t + [-1] * (width - len(t)) for t in tables]
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, device=device),
        query_start=qs,
        context_lens=list(ctx_lens),
        kv_slots=kv_slots,
        query_start_t=torch.tensor(qs, dtype=torch.int32, device=device),
        context_lens_t=torch.tensor(ctx_lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(bt, dtype=torch.int32, device=device),
        block_size=page,
        max_query_len=max(q_lens),
        max_context_len=max(ctx_lens),
    )
