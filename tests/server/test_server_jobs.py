"""The job scheduler in-process: batching, the bounded queue, cancel, timeout, OOM, shutdown.

The engine here keeps `Engine.submit`'s contract (callbacks from its thread, `on_done` exactly
once, a cancel seen within one step) and is stepped by the test, one step at a time on a thread of
its own, so the scheduler's policies can be checked exactly and without waiting on time; the
live-server tests run the same paths against the real model.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

import pytest

from worker_orcd.engine.request import DoneCallback, TextCallback
from worker_orcd.engine.types import GenerationOutput, SamplingParams, StopReason, Timings
from worker_orcd.errors import InvalidRequestError, VramOomError, WorkerError
from worker_orcd.server.jobs import (
    DuplicateJobError,
    ErrorCode,
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


@dataclass(slots=True, eq=False)
class FakeRequest:
    prompt: list[int]
    params: SamplingParams
    on_text: TextCallback | None
    on_done: DoneCallback | None
    cancel: threading.Event
    pieces: list[str]
    out: list[int] = field(default_factory=list)


class SteppedEngine:
    """Each `step()` ends the cancelled requests (running or waiting) with CANCELLED, then gives
    each of the first `max_num_seqs` requests its next piece (`pieces[i]`, default `t{i}`) and
    ends those at max_tokens (or at an `eos` piece, which is not text)."""

    def __init__(self, max_num_seqs: int = 2) -> None:
        self.max_num_seqs = max_num_seqs
        self.live: list[FakeRequest] = []
        self.fail_next: WorkerError | None = None  # fails the next step's running requests
        self.reject_next: WorkerError | None = None  # raised by the next submit
        self.closed = False
        self.steps = 0
        self.batch_sizes: list[int] = []

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        *,
        on_text: TextCallback | None = None,
        on_done: DoneCallback | None = None,
        cancel: threading.Event | None = None,
        pieces: list[str] | None = None,
    ) -> FakeRequest:
        if self.reject_next is not None:
            exc, self.reject_next = self.reject_next, None
            raise exc
        if self.closed:
            raise WorkerError("closed", code="WORKER_SHUTDOWN")
        req = FakeRequest(prompt, params, on_text, on_done, cancel or threading.Event(), [])
        req.pieces = list(pieces or [f"t{i}" for i in range(params.max_tokens)])
        self.live.append(req)
        return req

    def step(self) -> None:
        self.steps += 1
        for req in [r for r in self.live if r.cancel.is_set()]:
            self._end(req, StopReason.CANCELLED)
        batch = self.live[: self.max_num_seqs]
        self.batch_sizes.append(len(batch))
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            for req in batch:
                self.live.remove(req)
                assert req.on_done is not None
                req.on_done(None, error)
            return
        for req in batch:
            piece = req.pieces[len(req.out)]
            req.out.append(len(req.out))
            if piece == "eos":
                self._end(req, StopReason.EOS)
                continue
            assert req.on_text is not None
            req.on_text(piece)
            if len(req.out) == req.params.max_tokens:
                self._end(req, StopReason.MAX_TOKENS)

    def close(self) -> None:
        self.closed = True
        for req in list(self.live):
            self._end(req, StopReason.CANCELLED)

    def _end(self, req: FakeRequest, reason: StopReason) -> None:
        self.live.remove(req)
        text = "".join(p for p in req.pieces[: len(req.out)] if p != "eos")
        out = GenerationOutput(
            prompt_ids=req.prompt,
            token_ids=list(req.out),
            text=text,
            stop_reason=reason,
            seed=req.params.seed or 0,
            timings=Timings(prompt_tokens=len(req.prompt), tokens_out=len(req.out)),
        )
        assert req.on_done is not None
        req.on_done(out, None)

    async def run(self, steps: int = 1) -> None:
        """`steps` steps on the engine's thread (the callbacks come from there, as they would)."""
        for _ in range(steps):
            await asyncio.to_thread(self.step)


def make_job(job_id: str, max_tokens: int = 3) -> Job:
    params = SamplingParams(max_tokens=max_tokens, seed=5)
    return Job(
        job_id=job_id,
        prompt_ids=[1, 2],
        params=params,
        endpoint="execute",
        loop=asyncio.get_running_loop(),
    )


async def drain(job: Job) -> list[JobEvent]:
    """Every event the job has had so far; the steps that end it have already run."""
    await asyncio.sleep(0)  # let callbacks scheduled from the engine thread run
    events: list[JobEvent] = []
    while not job.events.empty():
        events.append(job.events.get_nowait())
    return events


def texts(events: list[JobEvent]) -> list[tuple[str, int]]:
    return [(e.text, e.index) for e in events if isinstance(e, Token)]


def scheduler(engine: SteppedEngine, max_queue: int = 4, timeout_s: float = 30.0) -> Scheduler:
    return Scheduler(
        engine,
        worker_id="w",
        max_num_seqs=engine.max_num_seqs,
        max_queue=max_queue,
        timeout_s=timeout_s,
    )


def test_events_in_order_with_one_terminal_event() -> None:
    async def main() -> None:
        engine = SteppedEngine()
        s = scheduler(engine)
        job = make_job("a", max_tokens=3)
        s.submit(job)
        assert await drain(job) == []  # nothing before its first output
        await engine.run(3)
        events = await drain(job)
        assert isinstance(events[0], Started) and events[0].seed == 5
        assert events[0].prompt_tokens == 2
        assert texts(events) == [("t0", 0), ("t1", 1), ("t2", 2)]
        assert len(events) == 5 and isinstance(events[-1], Finished)
        assert events[-1].output.stop_reason is StopReason.MAX_TOKENS
        assert job.timer is not None and job.timer.cancelled()  # the timeout is disarmed
        assert not s.cancel("a")  # no longer live
        await engine.run(2)
        assert await drain(job) == []
        s.shutdown()
        assert await asyncio.to_thread(s.join, 5)

    asyncio.run(main())


def test_jobs_run_batched_and_each_streams_its_own_text() -> None:
    async def main() -> None:
        engine = SteppedEngine(max_num_seqs=2)
        s = scheduler(engine)
        jobs = [make_job(f"j{i}", max_tokens=2 + i) for i in range(5)]
        for job in jobs:
            s.submit(job)
        assert (s.jobs_running, s.jobs_queued) == (2, 3)
        await engine.run()
        first = [await drain(job) for job in jobs]
        assert [len(texts(e)) for e in first] == [1, 1, 0, 0, 0]  # two at once, the rest wait
        events = {job.job_id: first[i] for i, job in enumerate(jobs)}
        while engine.live:
            await engine.run()
            for job in jobs:
                events[job.job_id] += await drain(job)
        assert max(engine.batch_sizes) == 2
        for i, job in enumerate(jobs):
            got = events[job.job_id]
            assert isinstance(got[0], Started) and isinstance(got[-1], Finished)
            assert texts(got) == [(f"t{k}", k) for k in range(2 + i)]
            assert sum(isinstance(e, (Finished, Failed)) for e in got) == 1
        assert (s.jobs_running, s.jobs_queued, s.jobs_live) == (0, 0, 0)
        s.shutdown()
        assert await asyncio.to_thread(s.join, 5)

    asyncio.run(main())


def test_queue_is_bounded_beyond_the_batch_and_ids_unique_among_live_jobs() -> None:
    async def main() -> None:
        engine = SteppedEngine(max_num_seqs=1)
        s = scheduler(engine, max_queue=1)
        running, queued = make_job("a", max_tokens=2), make_job("b", max_tokens=1)
        s.submit(running)
        s.submit(queued)
        with pytest.raises(QueueFullError) as info:
            s.submit(make_job("c"))
        assert info.value.retriable and info.value.code == "QUEUE_FULL"
        assert info.value.message == "queue is full (1 waiting, --max-queue 1)"
        with pytest.raises(DuplicateJobError):
            s.submit(make_job("a"))
        await engine.run(3)
        assert isinstance((await drain(running))[-1], Finished)
        assert isinstance((await drain(queued))[-1], Finished)
        s.submit(make_job("a", max_tokens=1))  # the id is free again once the job ended
        s.submit(make_job("c", max_tokens=1))
        s.shutdown()
        assert await asyncio.to_thread(s.join, 5)

    asyncio.run(main())


def test_cancel_waiting_job_never_starts_and_cancel_is_idempotent() -> None:
    async def main() -> None:
        engine = SteppedEngine(max_num_seqs=1)
        s = scheduler(engine)
        running, waiting = make_job("a", max_tokens=4), make_job("b")
        s.submit(running)
        s.submit(waiting)
        await engine.run()
        assert s.cancel("b") and s.cancel("b")  # live until the engine's next step
        s.cancel("b", reason=ErrorCode.INFERENCE_TIMEOUT)  # the first reason stands
        await engine.run()
        events = await drain(waiting)
        assert events == [Failed("CANCELLED", "job cancelled", False)]  # it never started
        assert not s.cancel("b") and not s.cancel("never-existed")
        await engine.run(2)
        got = await drain(running)
        assert texts(got) == [(f"t{k}", k) for k in range(4)] and isinstance(got[-1], Finished)
        s.shutdown()
        assert await asyncio.to_thread(s.join, 5)

    asyncio.run(main())


def test_cancel_running_job_ends_it_and_leaves_the_other_untouched() -> None:
    async def main() -> None:
        engine = SteppedEngine(max_num_seqs=2)
        s = scheduler(engine)
        victim, other = make_job("a", max_tokens=1000), make_job("b", max_tokens=5)
        s.submit(victim)
        s.submit(other)
        await engine.run(2)
        assert s.cancel("a")
        await engine.run()  # the engine sees the cancel within one step
        events = await drain(victim)
        assert texts(events) == [("t0", 0), ("t1", 1)]
        assert events[-1] == Failed("CANCELLED", "job cancelled", False)
        await engine.run(3)
        got = await drain(other)
        assert texts(got) == [(f"t{k}", k) for k in range(5)] and isinstance(got[-1], Finished)
        s.shutdown()
        assert await asyncio.to_thread(s.join, 5)

    asyncio.run(main())


def test_cancel_that_loses_the_race_with_the_end_gives_one_terminal_event() -> None:
    async def main() -> None:
        engine = SteppedEngine()
        s = scheduler(engine)
        job = make_job("a", max_tokens=1)
        s.submit(job)
        engine.step()  # on this thread: the end is reported to the loop but not yet handled
        assert s.cancel("a")
        events = await drain(job)
        assert [type(e) for e in events] == [Started, Token, Finished]
        await engine.run()
        assert await drain(job) == []
        s.shutdown()
        assert await asyncio.to_thread(s.join, 5)

    asyncio.run(main())


def test_timeout_ends_job_with_inference_timeout() -> None:
    async def main() -> None:
        engine = SteppedEngine()
        s = scheduler(engine, timeout_s=0.05)
        job = make_job("a", max_tokens=10_000)
        s.submit(job)
        await engine.run()
        assert await asyncio.to_thread(job.cancel_event.wait, 10)  # the timer fired
        await engine.run()
        events = await drain(job)
        assert texts(events) == [("t0", 0)]
        assert events[-1] == Failed("INFERENCE_TIMEOUT", "job ran past the inference timeout", True)
        s.shutdown()
        assert await asyncio.to_thread(s.join, 5)

    asyncio.run(main())


def test_oom_fails_those_jobs_and_the_worker_goes_on() -> None:
    async def main() -> None:
        engine = SteppedEngine(max_num_seqs=1)
        s = scheduler(engine)
        bad, good = make_job("a"), make_job("b", max_tokens=2)
        s.submit(bad)
        s.submit(good)
        engine.fail_next = VramOomError("out of GPU memory in a forward pass")
        await engine.run()
        events = await drain(bad)
        assert events == [Failed("VRAM_OOM", "out of GPU memory in a forward pass", True)]
        await engine.run(2)
        assert isinstance((await drain(good))[-1], Finished)
        s.shutdown()
        assert await asyncio.to_thread(s.join, 5)

    asyncio.run(main())


def test_engine_step_failure_is_internal_and_not_fatal() -> None:
    async def main() -> None:
        engine = SteppedEngine(max_num_seqs=1)
        s = scheduler(engine)
        bad, good = make_job("a"), make_job("b", max_tokens=1)
        s.submit(bad)
        s.submit(good)
        engine.fail_next = WorkerError("RuntimeError: boom")
        await engine.run(2)
        assert (await drain(bad))[-1] == Failed("INTERNAL", "RuntimeError: boom", False)
        assert isinstance((await drain(good))[-1], Finished)
        s.shutdown()
        assert await asyncio.to_thread(s.join, 5)

    asyncio.run(main())


def test_request_the_engine_refuses_is_not_live() -> None:
    async def main() -> None:
        engine = SteppedEngine()
        s = scheduler(engine)
        engine.reject_next = InvalidRequestError("exceeds the KV cache of 64 tokens")
        with pytest.raises(InvalidRequestError, match="KV cache of 64 tokens"):
            s.submit(make_job("a"))
        assert s.jobs_live == 0 and not s.cancel("a")
        job = make_job("a", max_tokens=1)
        s.submit(job)  # the id was never taken
        await engine.run()
        assert isinstance((await drain(job))[-1], Finished)
        s.shutdown()
        assert await asyncio.to_thread(s.join, 5)

    asyncio.run(main())


def test_shutdown_ends_every_live_job_refuses_new_ones_and_closes_the_engine() -> None:
    async def main() -> None:
        engine = SteppedEngine(max_num_seqs=1)
        s = scheduler(engine)
        running, waiting, late = make_job("a", 10_000), make_job("b"), make_job("c")
        for job in (running, waiting, late):
            s.submit(job)
        await engine.run(2)
        s.shutdown()
        with pytest.raises(ShuttingDownError):
            s.submit(make_job("d"))
        await engine.run()  # the engine ends the cancelled ones within a step
        assert not engine.live
        assert await asyncio.to_thread(s.join, 5)
        assert engine.closed
        for job in (running, waiting, late):
            events = await drain(job)
            assert events[-1] == Failed("WORKER_SHUTDOWN", "worker is shutting down", True)
            assert sum(isinstance(e, (Finished, Failed)) for e in events) == 1
            assert len(texts(events)) == (2 if job is running else 0)
        assert (s.jobs_running, s.jobs_queued, s.jobs_live) == (0, 0, 0)

    asyncio.run(main())


def test_closing_the_engine_under_live_jobs_reports_worker_shutdown() -> None:
    async def main() -> None:
        engine = SteppedEngine(max_num_seqs=1)
        s = scheduler(engine)
        running, waiting = make_job("a", 10_000), make_job("b")
        s.submit(running)
        s.submit(waiting)
        await engine.run(2)
        assert await asyncio.to_thread(s.join, 5)  # no step in between: close ends them
        for job in (running, waiting):
            events = await drain(job)
            assert events[-1] == Failed("WORKER_SHUTDOWN", "worker is shutting down", True)
            assert len(texts(events)) == (2 if job is running else 0)

    asyncio.run(main())


def test_token_indices_count_only_non_empty_pieces_and_a_silent_job_still_starts() -> None:
    class Sparse(SteppedEngine):
        def submit(self, prompt, params, **kw):  # noqa: ANN001, ANN003, ANN202
            pieces = ["", "a", "", "b"] if params.max_tokens == 4 else ["eos"]
            return super().submit(prompt, params, pieces=pieces, **kw)

    async def main() -> None:
        engine = Sparse()
        s = scheduler(engine)
        job, silent = make_job("a", max_tokens=4), make_job("b", max_tokens=1)
        s.submit(job)
        s.submit(silent)
        await engine.run(4)
        events = await drain(job)
        assert texts(events) == [("a", 0), ("b", 1)] and isinstance(events[0], Started)
        events = await drain(silent)  # EOS first: no text, but it ran
        assert [type(e) for e in events] == [Started, Finished]
        assert events[-1].output.stop_reason is StopReason.EOS
        s.shutdown()
        assert await asyncio.to_thread(s.join, 5)

    asyncio.run(main())
