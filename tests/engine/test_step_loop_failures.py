"""The step loop's end-exactly-once and keep-running guarantees under failures, on the CPU engine
(random Phi-3): a callback that raises, a device-fed step that fails or runs out of memory, a
score while requests hold the cache, a batch with an invalid prompt. Every request ends exactly
once (on_done once, handle.result() returns or raises), and the engine thread survives whatever a
request's callbacks do.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.engine.test_pipelined import EagerDeviceFed
from tests.support.hf_gguf import make_phi3, write_gguf
from worker_orcd.engine.engine import Engine
from worker_orcd.engine.types import GenerationOutput, SamplingParams, StopReason
from worker_orcd.errors import InvalidRequestError, VramOomError, WorkerError

WAIT_S = 15.0  # a guard against a hang, not a sleep: every wait returns as soon as its event is set


@pytest.fixture(scope="module")
def phi3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_gguf(make_phi3(), tmp_path_factory.mktemp("failures") / "phi3.gguf")


@pytest.fixture
def engine(phi3_path: Path) -> Iterator[Engine]:
    """A fresh engine per test: some of these leave the engine thread dead."""
    e = Engine.load(phi3_path, max_context=256)
    yield e
    e.loop.close(timeout=5.0)


@dataclass(slots=True)
class Ends:
    """on_done calls of one request."""

    calls: list[tuple[GenerationOutput | None, WorkerError | None]] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)

    def __call__(self, out: GenerationOutput | None, err: WorkerError | None) -> None:
        self.calls.append((out, err))
        self.ended.set()


class SinkGone(RuntimeError):
    pass


def raising_on_text(_text: str) -> None:
    """A listener whose sink is gone (a closed event loop, a broken pipe)."""
    raise SinkGone("the listener is gone")


def sampled(engine: Engine, n: int) -> bool:
    """Whether n running sequences have a generated token (the observer of the step before may
    still run once after the previous request ended)."""
    running = engine.scheduler.running
    return len(running) == n and all(len(s) > s.n_prompt for s in running)


def first_delta(engine: Engine, prompt: str) -> str:
    out = engine.generate(prompt, SamplingParams(max_tokens=1, temperature=0.0))
    assert out.text  # the test needs the first token to have text
    return out.text


def test_on_text_error_fails_its_request_alone(engine: Engine) -> None:
    """A and B are sampled in the same step, A first. A reaches max_tokens and ends; then B's
    on_text raises: B fails, and A keeps its one, successful end."""
    greedy1 = SamplingParams(max_tokens=1, temperature=0.0)
    a_ends, b_ends = Ends(), Ends()
    with engine.loop.lock:  # the engine thread takes both in one step
        a = engine.submit("Hello", greedy1, on_done=a_ends)
        b = engine.submit(
            "A",
            SamplingParams(max_tokens=5, temperature=0.0),
            on_text=raising_on_text,
            on_done=b_ends,
        )
    assert a_ends.ended.wait(WAIT_S) and b_ends.ended.wait(WAIT_S)
    engine.generate("Hello", greedy1)  # one more step: everything above has settled
    assert len(b_ends.calls) == 1
    assert len(a_ends.calls) == 1, a_ends.calls
    assert (
        b_ends.calls[0][1] is not None and "on_text callback failed" in b_ends.calls[0][1].message
    )
    out = a.result(0)
    assert out.stop_reason is StopReason.MAX_TOKENS and len(out.token_ids) == 1
    assert b.done
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_on_text_error_in_a_cancel_still_ends_the_request(engine: Engine) -> None:
    """A cancelled request's held-back text is flushed when it ends; an on_text that raises there
    does not keep the request from ending."""
    stop = first_delta(engine, "Hello") + "\x07"  # holds the first token's text back
    cancel = threading.Event()
    engine.set_step_observer(lambda n_seqs, n_tokens: cancel.set() if sampled(engine, 1) else None)
    ends = Ends()
    try:
        handle = engine.submit(
            "Hello",
            SamplingParams(max_tokens=20, temperature=0.0, stop=(stop,)),
            on_text=raising_on_text,
            on_done=ends,
            cancel=cancel,
        )
        assert ends.ended.wait(WAIT_S), "the cancelled request never ended"
    finally:
        engine.set_step_observer(None)
    assert len(ends.calls) == 1
    assert handle.done
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_on_text_error_at_close_ends_every_request(engine: Engine) -> None:
    """close() ends live requests with CANCELLED: the first one's flushed text goes to an on_text
    that raises, and every other live request still ends."""
    stop = first_delta(engine, "Hello") + "\x07"
    # The observer runs on the engine thread after the first pass, which prefilled both; close()
    # from the engine thread only marks the loop closed, which the loop acts on after this step.
    engine.set_step_observer(
        lambda n_seqs, n_tokens: engine.loop.close() if sampled(engine, 2) else None
    )
    a_ends, b_ends = Ends(), Ends()
    with engine.loop.lock:
        engine.submit(
            "Hello",
            SamplingParams(max_tokens=20, temperature=0.0, stop=(stop,)),
            on_text=raising_on_text,
            on_done=a_ends,
        )
        b = engine.submit("A", SamplingParams(max_tokens=20, temperature=0.0), on_done=b_ends)
    assert b_ends.ended.wait(WAIT_S), "B never ended: the engine thread died in close()"
    assert b.result(0).stop_reason is StopReason.CANCELLED
    assert a_ends.ended.is_set() and len(a_ends.calls) == 1


class ReadFailsOnce(EagerDeviceFed):
    """The device-fed steps, whose first read fails (an error surfacing at the sync)."""

    failed = False

    def read(self, ticket: int) -> list[int]:
        if not self.failed:
            self.failed = True
            raise RuntimeError("device step failed")
        return super().read(ticket)


def test_device_fed_read_failure_fails_its_batch_only(engine: Engine) -> None:
    """A failed read fails its batch; the device-fed steps start afresh, so the next greedy decode
    batch runs normally."""
    engine.loop.device_fed = ReadFailsOnce(engine)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    with pytest.raises(WorkerError, match="device step failed"):
        engine.generate("Hello", params)
    assert engine.blocks.num_free == engine.blocks.num_blocks
    out = engine.generate("Once upon a time", params)
    assert len(out.token_ids) == 8


def test_generate_batch_checks_every_prompt_before_submitting(engine: Engine) -> None:
    """An invalid prompt in a batch is refused, naming its request, before any is submitted."""
    added: list[object] = []
    real_add = engine.loop.add

    def add(request: object) -> None:
        added.append(request)
        real_add(request)  # type: ignore[arg-type]

    engine.loop.add = add  # type: ignore[method-assign]
    try:
        with pytest.raises(InvalidRequestError) as info:
            engine.generate_batch(["Hello", [10**9]], SamplingParams(max_tokens=4, temperature=0.0))
    finally:
        del engine.loop.add
    assert added == []
    assert "request 1" in info.value.message


def test_score_while_requests_hold_blocks_is_not_an_invalid_request(
    engine: Engine,
) -> None:
    """score() takes its blocks from the pool the running requests share. Called from a step (the
    step observer, on the engine thread) while a 200-token request holds 13 of the 16 blocks, it
    cannot wait for them: it raises a retriable error, not INVALID_REQUEST."""
    results: list[object] = []

    def observe(n_seqs: int, n_tokens: int) -> None:
        if not results and sampled(engine, 1):
            try:
                results.append(engine.score(list(range(1000, 1060))))  # 4 blocks
            except WorkerError as e:
                results.append(e)

    engine.set_step_observer(observe)
    try:
        engine.generate(list(range(500, 700)), SamplingParams(max_tokens=8, temperature=0.0))
    finally:
        engine.set_step_observer(None)
    (got,) = results
    assert not isinstance(got, InvalidRequestError), got
    if isinstance(got, WorkerError):
        assert got.retriable


class StartOutOfMemory(EagerDeviceFed):
    """Device-fed steps whose launch runs out of device memory once."""

    failed = False

    def start(self, token_ids: list[int], positions: list[int], tables: list[list[int]]) -> int:
        if not self.failed:
            self.failed = True
            raise torch.OutOfMemoryError("CUDA out of memory (test)")
        return super().start(token_ids, positions, tables)


def test_device_fed_oom_is_vram_oom_of_its_batch(engine: Engine) -> None:
    """An out-of-memory error in a device-fed launch fails that batch's requests with VRAM_OOM; a
    request waiting beside it runs to its end."""
    engine.loop.device_fed = StartOutOfMemory(engine)
    fed, waiting = Ends(), Ends()
    big = list(range(500, 700))  # 13 blocks: the second request cannot be admitted beside it
    with engine.loop.lock:
        engine.submit(big, SamplingParams(max_tokens=8, temperature=0.0), on_done=fed)
        engine.submit(big, SamplingParams(max_tokens=8, temperature=0.0), on_done=waiting)
    assert fed.ended.wait(WAIT_S) and waiting.ended.wait(WAIT_S)
    (_, err), (out, other) = fed.calls[0], waiting.calls[0]
    assert other is None, other
    assert out is not None and len(out.token_ids) == 8
    assert isinstance(err, VramOomError), err
