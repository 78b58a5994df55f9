"""Fixtures for parity tests: random-weight transformers models written to GGUF and loaded by the
engine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel

from tests.support.hf_gguf import make_phi3, make_qwen2, write_gguf
from worker_orcd.engine.engine import Engine
from worker_orcd.engine.sequence import Sequence

MAKERS = {"qwen2": make_qwen2, "phi3": make_phi3}

Pair = tuple[PreTrainedModel, Engine]


@pytest.fixture(scope="module")
def tiny_pairs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Pair]:
    """tiny_pairs(arch) -> the default small model of arch, built once per test module
    (read-only)."""
    cache: dict[str, Pair] = {}

    def get(arch: str) -> Pair:
        if arch not in cache:
            hf = MAKERS[arch]()
            path = write_gguf(hf, tmp_path_factory.mktemp("tiny") / f"{arch}.gguf")
            cache[arch] = (hf, Engine.load(path, max_context=512, weights="dequantized"))
        return cache[arch]

    return get


@pytest.fixture
def pair(tmp_path: Path) -> Callable[..., Pair]:
    """pair(arch, max_context=None, device="cpu", dtype=None, **dims) -> (transformers model,
    engine)."""

    def build(
        arch: str,
        *,
        max_context: int | None = 512,
        device: str = "cpu",
        dtype: str | None = None,
        **dims: Any,
    ) -> Pair:
        hf = MAKERS[arch](**dims)
        path = write_gguf(hf, tmp_path / f"{arch}.gguf")
        engine = Engine.load(
            path, device=device, dtype=dtype, max_context=max_context, weights="dequantized"
        )
        return hf, engine

    return build


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """‖ours − ref‖ / ‖ref‖ in float64."""
    ours, ref = ours.double().cpu(), ref.double().cpu()
    return ((ours - ref).norm() / ref.norm()).item()


def random_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, min(vocab, 30000), (n,), generator=g).tolist()


@torch.no_grad()
def hf_logits(hf: PreTrainedModel, ids: list[int]) -> torch.Tensor:
    return hf(torch.tensor([ids])).logits[0].float()


@torch.no_grad()
def hf_greedy(hf: PreTrainedModel, ids: list[int], n: int) -> list[int]:
    """n greedy tokens from transformers, recomputing the whole sequence each step."""
    seq = list(ids)
    for _ in range(n):
        seq.append(int(hf(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids) :]


def prefill_then_decode(engine: Engine, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """Logits at every position: the prompt in one prefill, then one decode step per token."""
    seq = Sequence.from_prompt(prompt)
    sched = engine.scheduler
    sched.add(seq)
    rows: list[torch.Tensor] = []
    try:
        batch = sched.schedule()
        rows.append(engine.runner.forward(batch, all_logits=True))
        sched.postprocess(batch)
        for token in continuation:
            seq.append(token)
            batch = sched.schedule()
            assert not batch.is_prefill
            rows.append(engine.runner.forward(batch).clone())  # a graph's logits are reused
            sched.postprocess(batch)
    finally:
        sched.finish(seq)
    return torch.cat(rows)
