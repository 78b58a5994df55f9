"""Continuous batching on the real Qwen2.5-Coder-0.5B file (CPU, float32): requests submitted
together and staggered, greedy and seeded, each equal to the same request run alone; a cancelled
one leaves the others untouched; a KV cache too small for all of them at once completes them all
through preemption. Every request ends exactly once."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from worker_orcd.engine.engine import Engine
from worker_orcd.engine.types import GenerationOutput, SamplingParams, StopReason
from worker_orcd.errors import InvalidRequestError, WorkerError

pytestmark = pytest.mark.slow

PROMPTS = [
    "def fibonacci(n):",
    "The capital of France is",
    "import numpy as np\n\n# multiply two matrices\n",
    "Once upon a time",
    "SELECT name FROM users WHERE",
    "fn main() {",
    "Hello",
    "<html>\n<head>\n<title>",
]
MAX_TOKENS = [12, 5, 16, 9, 7, 14, 3, 10]


def _params(i: int) -> SamplingParams:
    if i % 3 == 2:  # seeded sampling, different settings per request
        return SamplingParams(
            max_tokens=MAX_TOKENS[i], temperature=0.8, top_k=40, top_p=0.9, seed=1000 + i
        )
    return SamplingParams(max_tokens=MAX_TOKENS[i], temperature=0.0)


@dataclass(slots=True)
class Tracked:
    """One submitted request's text deltas and terminal callbacks, as the engine reports them."""

    cancel_after: int | None = None  # deltas, after which `cancel` is set
    cancel: threading.Event = field(default_factory=threading.Event)
    deltas: list[str] = field(default_factory=list)
    ends: list[tuple[GenerationOutput | None, WorkerError | None]] = field(default_factory=list)
    first_text: threading.Event = field(default_factory=threading.Event)
    ended: threading.Event = field(default_factory=threading.Event)

    def on_text(self, delta: str) -> None:
        self.deltas.append(delta)
        self.first_text.set()
        if len(self.deltas) == self.cancel_after:
            self.cancel.set()

    def on_done(self, out: GenerationOutput | None, err: WorkerError | None) -> None:
        self.ends.append((out, err))
        self.ended.set()


def _submit(engine: Engine, i: int, cancel_after: int | None = None) -> Tracked:
    t = Tracked(cancel_after)
    engine.submit(PROMPTS[i], _params(i), on_text=t.on_text, on_done=t.on_done, cancel=t.cancel)
    return t


def _output(t: Tracked) -> GenerationOutput:
    assert t.ended.wait(300)
    assert len(t.ends) == 1  # exactly one end
    out, err = t.ends[0]
    assert err is None and out is not None
    assert "".join(t.deltas) == out.text  # nothing lost or duplicated on the stream
    return out


@pytest.fixture(scope="module")
def solo(qwen_engine: Engine) -> list[GenerationOutput]:
    """Each request run alone."""
    return [qwen_engine.generate(p, _params(i)) for i, p in enumerate(PROMPTS)]


def _assert_same(a: GenerationOutput, b: GenerationOutput) -> None:
    assert a.token_ids == b.token_ids
    assert a.text == b.text
    assert a.stop_reason == b.stop_reason


def test_batched_requests_equal_their_solo_runs(
    qwen_engine: Engine, solo: list[GenerationOutput]
) -> None:
    batched = qwen_engine.generate_batch(PROMPTS, [_params(i) for i in range(len(PROMPTS))])
    for a, b in zip(batched, solo, strict=True):
        _assert_same(a, b)
    stats = qwen_engine.stats()
    assert stats.running == stats.waiting == 0 and stats.kv_blocks_used == 0
    assert stats.step_seqs > stats.steps  # steps carried several sequences


def test_staggered_requests_with_a_cancel(
    qwen_engine: Engine, solo: list[GenerationOutput]
) -> None:
    """Four start together; the rest join once the first streams text, so they are admitted into
    a running batch. Request 5 is cancelled after its second delta."""
    steps_before = qwen_engine.stats().steps
    first = [_submit(qwen_engine, i) for i in range(4)]
    assert first[0].first_text.wait(300)
    late = [_submit(qwen_engine, i, 2 if i == 5 else None) for i in range(4, len(PROMPTS))]
    tracked = first + late
    for i, t in enumerate(tracked):
        out = _output(t)
        if i == 5:
            assert out.stop_reason is StopReason.CANCELLED
            assert out.token_ids == solo[i].token_ids[: len(out.token_ids)]
            continue
        _assert_same(out, solo[i])
    assert qwen_engine.stats().kv_blocks_used == 0
    assert qwen_engine.stats().steps > steps_before


def test_cancel_one_of_a_batch(qwen_engine: Engine, solo: list[GenerationOutput]) -> None:
    tracked = [_submit(qwen_engine, i, 2 if i == 2 else None) for i in range(len(PROMPTS))]
    for i, t in enumerate(tracked):
        out = _output(t)
        if i == 2:
            assert out.stop_reason is StopReason.CANCELLED
            assert len(out.token_ids) < len(solo[i].token_ids)
            assert out.token_ids == solo[i].token_ids[: len(out.token_ids)]
        else:
            _assert_same(out, solo[i])
    assert qwen_engine.stats().kv_blocks_used == 0


@pytest.fixture(scope="module")
def small_kv_engine(qwen_gguf_path: Path) -> Engine:
    """The real model with a KV cache of 64 tokens (4 blocks of 16)."""
    engine = Engine.load(
        qwen_gguf_path, device="cpu", dtype="float32", max_context=2048, kv_cache_tokens=64
    )
    yield engine
    engine.close()


def test_small_kv_cache_completes_everything_through_preemption(
    small_kv_engine: Engine, qwen_engine: Engine
) -> None:
    """Five requests of 2-3 blocks each on a 4-block cache: sequences admitted together outgrow
    it, the newest is preempted and recomputed, and every output equals its solo run."""
    engine = small_kv_engine
    picks = [0, 2, 3, 5, 7]
    params = [SamplingParams(max_tokens=22, temperature=0.0) for _ in picks]
    params[1] = SamplingParams(max_tokens=22, temperature=0.8, top_p=0.9, seed=7)
    prompts = [PROMPTS[i] for i in picks]
    solo = [qwen_engine.generate(p, q) for p, q in zip(prompts, params, strict=True)]
    outs = engine.generate_batch(prompts, params)
    for out, ref in zip(outs, solo, strict=True):
        _assert_same(out, ref)
    stats = engine.stats()
    assert stats.preemptions > 0
    assert stats.kv_blocks_used == 0 and stats.running == stats.waiting == 0


def test_request_that_never_fits_the_cache_is_refused(small_kv_engine: Engine) -> None:
    with pytest.raises(InvalidRequestError, match="exceeds the KV cache of 64 tokens"):
        small_kv_engine.submit("Hello", SamplingParams(max_tokens=200, temperature=0.0))
