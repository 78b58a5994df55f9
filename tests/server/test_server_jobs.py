"""The job scheduler in-process: ordering, the bounded queue, cancel, timeout, OOM, shutdown.

The engine here is a small step loop with the engine's calling convention (text callback, cancel
event checked once per step), so the scheduler's policies can be checked quickly and exactly; the
live-server tests run the same paths against the real model.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from worker_orcd.engine.types import GenerationOutput, SamplingParams, StopReason, Timings
from worker_orcd.errors import VramOomError
from worker_orcd.server.jobs import (
    DuplicateJobError,
    Failed,
    Finished,
    Job,
    JobEvent,
    QueueFullError,
    Scheduler,
    ShuttingDownError,
    Started,
    Token,
)


class StepEngine:
    """Emits `t0`, `t1`, ... one per `step_s`, checking `cancel` before each step."""

    def __init__(self, step_s: float = 0.01) -> None:
        self.step_s = step_s
        self.calls: list[list[int]] = []
        self.raise_next: Exception | None = None
        self.running = threading.Event()

    def generate(
        self,
        prompt: list[int],
        params: SamplingParams,
        *,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationOutput:
        self.calls.append(prompt)
        self.running.set()
        if self.raise_next is not None:
            exc, self.raise_next = self.raise_next, None
            raise exc
        out: list[int] = []
        reason = StopReason.MAX_TOKENS
        for i in range(params.max_tokens):
            if cancel is not None and cancel.is_set():
                reason = StopReason.CANCELLED
                break
            time.sleep(self.step_s)
            out.append(i)
            if on_text is not None:
                on_text(f"t{i}")
        self.running.clear()
        text = "".join(f"t{i}" for i in out)
        return GenerationOutput(
            prompt_ids=prompt,
            token_ids=out,
            text=text,
            stop_reason=reason,
            seed=params.seed or 0,
            timings=Timings(prompt_tokens=len(prompt), tokens_out=len(out)),
        )


def make_job(job_id: str, max_tokens: int = 3) -> Job:
    params = SamplingParams(max_tokens=max_tokens, seed=5)
    return Job(
        job_id=job_id,
        prompt_ids=[1, 2],
        params=params,
        endpoint="execute",
        loop=asyncio.get_running_loop(),
    )


async def drain(job: Job, timeout: float = 10.0) -> list[JobEvent]:
    events: list[JobEvent] = []
    while True:
        event = await asyncio.wait_for(job.events.get(), timeout)
        events.append(event)
        if isinstance(event, (Finished, Failed)):
            return events


def scheduler(engine: StepEngine, max_queue: int = 4, timeout_s: float = 30.0) -> Scheduler:
    s = Scheduler(engine, worker_id="w", max_queue=max_queue, timeout_s=timeout_s)
    s.start()
    return s


def test_events_in_order_with_one_terminal_event() -> None:
    async def main() -> None:
        s = scheduler(StepEngine())
        job = make_job("a", max_tokens=3)
        s.submit(job)
        events = await drain(job)
        assert isinstance(events[0], Started) and events[0].seed == 5
        assert events[0].prompt_tokens == 2
        assert [(e.text, e.index) for e in events[1:-1]] == [("t0", 0), ("t1", 1), ("t2", 2)]
        assert isinstance(events[-1], Finished)
        assert events[-1].output.stop_reason is StopReason.MAX_TOKENS
        await asyncio.sleep(0.05)
        assert job.events.empty()
        s.shutdown()
        assert s.join(5)

    asyncio.run(main())


def test_queue_is_bounded_and_job_ids_unique_among_live_jobs() -> None:
    async def main() -> None:
        engine = StepEngine(step_s=0.05)
        s = scheduler(engine, max_queue=1)
        running, queued = make_job("a", max_tokens=4), make_job("b", max_tokens=1)
        s.submit(running)
        s.submit(queued)
        with pytest.raises(QueueFullError) as info:
            s.submit(make_job("c"))
        assert info.value.retriable and info.value.code == "QUEUE_FULL"
        with pytest.raises(DuplicateJobError):
            s.submit(make_job("a"))
        await drain(running)
        await drain(queued)
        s.submit(make_job("a", max_tokens=1))  # the id is free again once the job ended
        s.shutdown()
        assert s.join(5)

    asyncio.run(main())


def test_cancel_queued_job_never_runs_and_cancel_is_idempotent() -> None:
    async def main() -> None:
        engine = StepEngine(step_s=0.05)
        s = scheduler(engine)
        running, queued = make_job("a", max_tokens=4), make_job("b")
        s.submit(running)
        s.submit(queued)
        assert s.cancel("b") and s.cancel("b") is False  # gone from the live set
        events = await drain(queued, timeout=1)
        assert [type(e) for e in events] == [Failed]
        assert events[0].code == "CANCELLED"
        await drain(running)
        assert len(engine.calls) == 1
        assert not s.cancel("never-existed")
        s.shutdown()
        assert s.join(5)

    asyncio.run(main())


def test_cancel_running_job_stops_within_a_step() -> None:
    async def main() -> None:
        engine = StepEngine(step_s=0.02)
        s = scheduler(engine)
        job = make_job("a", max_tokens=1000)
        s.submit(job)
        assert await asyncio.to_thread(engine.running.wait, 5)
        t0 = time.monotonic()
        assert s.cancel("a")
        assert s.cancel("a")  # idempotent while it winds down
        events = await drain(job)
        assert time.monotonic() - t0 < 0.5
        assert isinstance(events[-1], Failed) and events[-1].code == "CANCELLED"
        assert not events[-1].retriable
        s.shutdown()
        assert s.join(5)

    asyncio.run(main())


def test_timeout_ends_job_with_inference_timeout() -> None:
    async def main() -> None:
        s = scheduler(StepEngine(step_s=0.02), timeout_s=0.2)
        job = make_job("a", max_tokens=10_000)
        s.submit(job)
        t0 = time.monotonic()
        events = await drain(job)
        assert isinstance(events[-1], Failed) and events[-1].code == "INFERENCE_TIMEOUT"
        assert 0.2 <= time.monotonic() - t0 < 2.0
        s.shutdown()
        assert s.join(5)

    asyncio.run(main())


def test_oom_fails_that_job_and_the_worker_goes_on() -> None:
    async def main() -> None:
        engine = StepEngine()
        s = scheduler(engine)
        engine.raise_next = VramOomError("out of GPU memory")
        bad, good = make_job("a"), make_job("b")
        s.submit(bad)
        s.submit(good)
        events = await drain(bad)
        assert isinstance(events[-1], Failed)
        assert (events[-1].code, events[-1].retriable) == ("VRAM_OOM", True)
        assert isinstance((await drain(good))[-1], Finished)
        s.shutdown()
        assert s.join(5)

    asyncio.run(main())


def test_unexpected_engine_error_is_internal_and_not_fatal() -> None:
    async def main() -> None:
        engine = StepEngine()
        s = scheduler(engine)
        engine.raise_next = RuntimeError("boom")
        bad, good = make_job("a"), make_job("b")
        s.submit(bad)
        s.submit(good)
        assert (await drain(bad))[-1] == Failed("INTERNAL", "RuntimeError: boom", False)
        assert isinstance((await drain(good))[-1], Finished)
        s.shutdown()
        assert s.join(5)

    asyncio.run(main())


def test_shutdown_ends_every_live_job_and_refuses_new_ones() -> None:
    async def main() -> None:
        engine = StepEngine(step_s=0.02)
        s = scheduler(engine)
        running, queued = make_job("a", max_tokens=10_000), make_job("b")
        s.submit(running)
        s.submit(queued)
        assert await asyncio.to_thread(engine.running.wait, 5)
        s.shutdown()
        for job in (running, queued):
            last = (await drain(job))[-1]
            assert isinstance(last, Failed)
            assert (last.code, last.retriable) == ("WORKER_SHUTDOWN", True)
        with pytest.raises(ShuttingDownError):
            s.submit(make_job("c"))
        assert await asyncio.to_thread(s.join, 5)
        assert (s.jobs_running, s.jobs_queued) == (0, 0)

    asyncio.run(main())


def test_token_indices_count_only_non_empty_pieces() -> None:
    class Sparse(StepEngine):
        def generate(self, prompt, params, *, on_text=None, cancel=None):  # noqa: ANN001, ANN202
            for piece in ("", "a", "", "b"):
                on_text(piece)
            return super().generate(
                prompt, SamplingParams(max_tokens=0, seed=1), on_text=on_text, cancel=cancel
            )

    async def main() -> None:
        s = scheduler(Sparse())
        job = make_job("a")
        s.submit(job)
        tokens = [e for e in await drain(job) if isinstance(e, Token)]
        assert [(t.text, t.index) for t in tokens] == [("a", 0), ("b", 1)]
        s.shutdown()
        assert s.join(5)

    asyncio.run(main())
