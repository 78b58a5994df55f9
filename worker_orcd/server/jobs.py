"""Jobs and the scheduler: every job is submitted to the batching engine, so many run at once.

The HTTP side lives on the asyncio loop; the engine runs its step loop on a thread of its own. Each
job owns an asyncio.Queue of events that the engine's callbacks fill through
`loop.call_soon_threadsafe`, so a route can stream them as they happen. Every job ends with exactly
one terminal event (`Finished` or `Failed`), put on the queue by `Scheduler._complete` on the loop,
which runs once per job: the engine calls `on_done` exactly once.

Admission: up to `max_num_seqs` jobs run in the engine's batch and `max_queue` more may wait beyond
it; a job past that is refused with QUEUE_FULL. A job's `started` event comes with its first output
(a job cancelled while it waits never starts).

Cancellation is the job's `threading.Event`, which the engine checks every step; `cancel_reason`
says why (a /cancel call, the inference timeout, a client that went away, shutdown) and becomes the
error code.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from worker_orcd.engine.types import GenerationOutput, SamplingParams, StopReason, TokenLogprob
from worker_orcd.errors import InvalidRequestError, WorkerError
from worker_orcd.server.logs import log_event
from worker_orcd.server.metrics import Metrics

logger = logging.getLogger(__name__)


class ErrorCode(str, enum.Enum):
    CANCELLED = "CANCELLED"
    CLIENT_DISCONNECTED = "CLIENT_DISCONNECTED"
    INFERENCE_TIMEOUT = "INFERENCE_TIMEOUT"
    WORKER_SHUTDOWN = "WORKER_SHUTDOWN"
    QUEUE_FULL = "QUEUE_FULL"
    INTERNAL = "INTERNAL"


_CANCEL_MESSAGES = {
    ErrorCode.CANCELLED: ("job cancelled", False),
    ErrorCode.CLIENT_DISCONNECTED: ("client disconnected", False),
    ErrorCode.INFERENCE_TIMEOUT: ("job ran past the inference timeout", True),
    ErrorCode.WORKER_SHUTDOWN: ("worker is shutting down", True),
}


class QueueFullError(WorkerError):
    code = ErrorCode.QUEUE_FULL.value
    retriable = True


class ShuttingDownError(WorkerError):
    code = ErrorCode.WORKER_SHUTDOWN.value
    retriable = True


class DuplicateJobError(InvalidRequestError):
    """A live (queued or running) job already has this id."""


TextCallback = Callable[[str], None]
DoneCallback = Callable[[GenerationOutput | None, WorkerError | None], None]


class GeneratingEngine(Protocol):
    """What the scheduler needs of the engine (worker_orcd.engine.engine.Engine)."""

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        *,
        on_text: TextCallback | None = None,
        on_done: DoneCallback | None = None,
        cancel: threading.Event | None = None,
        on_logprobs: Callable[[list[TokenLogprob]], None] | None = None,
    ) -> Any:
        """Queue a request (raise InvalidRequestError if it can never run); `on_text` and then
        `on_done` exactly once are called from the engine's thread; `cancel` ends it within a
        step with StopReason.CANCELLED. With params.logprobs, `on_logprobs` gets the entries of
        the tokens behind each text delta just before it (passed only then)."""
        ...

    def close(self) -> None:
        """Stop the engine; requests still live end with CANCELLED."""
        ...


@dataclass(frozen=True, slots=True)
class Started:
    seed: int
    prompt_tokens: int
    started_at: float  # unix seconds


@dataclass(frozen=True, slots=True)
class Token:
    text: str
    index: int
    logprobs: tuple[TokenLogprob, ...] = ()  # with params.logprobs: the tokens behind this text


@dataclass(frozen=True, slots=True)
class Finished:
    output: GenerationOutput


@dataclass(frozen=True, slots=True)
class Failed:
    code: str
    message: str
    retriable: bool


JobEvent = Started | Token | Finished | Failed


class JobState(str, enum.Enum):
    QUEUED = "queued"  # submitted, no output yet
    RUNNING = "running"  # started: output is coming
    DONE = "done"  # its terminal event is on its queue


@dataclass(slots=True, eq=False)
class Job:
    job_id: str
    prompt_ids: list[int]
    params: SamplingParams
    endpoint: str
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[JobEvent] = field(default_factory=asyncio.Queue)
    cancel_event: threading.Event = field(default_factory=threading.Event)
    cancel_reason: ErrorCode | None = None
    state: JobState = JobState.QUEUED
    submitted_at: float = field(default_factory=time.monotonic)
    pieces: int = 0  # Token events so far (engine thread)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)  # for the next Token
    timer: asyncio.TimerHandle | None = None
    # Events from the engine's thread not yet on the queue; non-empty iff a flush is scheduled.
    _handover: list[JobEvent] = field(default_factory=list)
    _handover_lock: threading.Lock = field(default_factory=threading.Lock)

    def emit(self, event: JobEvent) -> None:
        """Put `event` on the queue from the engine's thread. Events emitted while the loop has
        not yet taken the earlier ones go over with them: one wake-up of the loop for all, so a
        loop that falls behind under many streams catches up instead of falling further."""
        with self._handover_lock:
            self._handover.append(event)
            first = len(self._handover) == 1
        if first:
            self.call(self._take_handover)

    def _take_handover(self) -> None:
        with self._handover_lock:
            events, self._handover = self._handover, []
        for event in events:
            self.events.put_nowait(event)

    def call(self, fn: Callable[..., object], *args: object) -> bool:
        """Run fn(*args) on the job's loop, from any thread; False when the loop is closed."""
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            logger.debug("job %s: event loop closed, %s dropped", self.job_id, fn.__name__)
            return False
        return True

    @property
    def seed(self) -> int:
        assert self.params.seed is not None, "the scheduler needs a concrete seed"
        return self.params.seed


class Scheduler:
    """Submits jobs to `engine` as they come, within `max_num_seqs` running + `max_queue` waiting.

    `submit`, `cancel` and `shutdown` are called on the jobs' event loop; the engine's callbacks
    only hand their values over to it.
    """

    def __init__(
        self,
        engine: GeneratingEngine,
        *,
        worker_id: str,
        max_num_seqs: int,
        max_queue: int,
        timeout_s: float,
        metrics: Metrics | None = None,
    ) -> None:
        self._engine = engine
        self._worker_id = worker_id
        self._max_num_seqs = max_num_seqs
        self._max_queue = max_queue
        self._timeout_s = timeout_s
        self._metrics = metrics
        self._lock = threading.Lock()
        self._live: dict[str, Job] = {}
        self._stopping = False
        self._closed = False

    @property
    def jobs_running(self) -> int:
        """Live jobs within the running batch's size."""
        return min(len(self._live), self._max_num_seqs)

    @property
    def jobs_queued(self) -> int:
        """Live jobs beyond the running batch's size: what --max-queue bounds."""
        return max(len(self._live) - self._max_num_seqs, 0)

    @property
    def jobs_live(self) -> int:
        return len(self._live)

    def submit(self, job: Job) -> None:
        """Hand `job` to the engine, or raise: ShuttingDownError, DuplicateJobError,
        QueueFullError, or the engine's InvalidRequestError."""
        with self._lock:
            if self._stopping:
                raise ShuttingDownError("worker is shutting down")
            if job.job_id in self._live:
                raise DuplicateJobError(
                    "must be unique among live jobs: this one is already queued or running"
                )
            if len(self._live) >= self._max_num_seqs + self._max_queue:
                waiting = len(self._live) - self._max_num_seqs
                raise QueueFullError(
                    f"queue is full ({waiting} waiting, --max-queue {self._max_queue})"
                )
            self._live[job.job_id] = job
        extra = {}
        if job.params.logprobs is not None:
            extra["on_logprobs"] = job.pending_logprobs.extend
        try:
            self._engine.submit(
                job.prompt_ids,
                job.params,
                on_text=lambda text: self._on_text(job, text),
                on_done=lambda output, error: self._on_done(job, output, error),
                cancel=job.cancel_event,
                **extra,
            )
        except BaseException:
            with self._lock:
                self._live.pop(job.job_id, None)
            job.state = JobState.DONE
            raise
        # Armed after submit on this loop; the terminal event, queued behind it, disarms it.
        job.timer = job.loop.call_later(
            self._timeout_s, self._cancel_job, job, ErrorCode.INFERENCE_TIMEOUT
        )

    def cancel(self, job_id: str, reason: ErrorCode = ErrorCode.CANCELLED) -> bool:
        """Cancel a live job; False when no live job has this id. Idempotent: the first reason
        stands."""
        with self._lock:
            job = self._live.get(job_id)
        if job is None:
            return False
        self._cancel_job(job, reason)
        return True

    def _cancel_job(self, job: Job, reason: ErrorCode) -> None:
        with self._lock:
            if job.cancel_reason is not None or job.state is JobState.DONE:
                return
            job.cancel_reason = reason
            state = job.state.value
        job.cancel_event.set()  # the engine ends it within one step; _complete reports it
        log_event(
            logger,
            "cancel",
            worker_id=self._worker_id,
            job_id=job.job_id,
            reason=reason.value,
            state=state,
        )

    def shutdown(self) -> None:
        """Refuse new jobs and cancel every live one with WORKER_SHUTDOWN (`join` then closes the
        engine). Idempotent."""
        with self._lock:
            self._stopping = True
            live = list(self._live.values())
        for job in live:
            self._cancel_job(job, ErrorCode.WORKER_SHUTDOWN)

    def join(self, timeout: float) -> bool:
        """Shut down (if not yet) and close the engine: its thread ends once the cancelled jobs
        are out, and any still live end with CANCELLED, reported as WORKER_SHUTDOWN. Blocks: call
        it off the event loop. True when the engine stopped within `timeout`."""
        self.shutdown()
        if not self._closed:
            self._closed = True
            done = threading.Event()

            def close() -> None:
                try:
                    self._engine.close()
                finally:
                    done.set()

            threading.Thread(target=close, name="engine-close", daemon=True).start()
            if not done.wait(timeout):
                return False
        return True

    # -- the engine's callbacks (its thread) --------------------------------------------------

    def _on_text(self, job: Job, text: str) -> None:
        if not text:
            return
        if job.state is JobState.QUEUED:
            self._start(job, job.emit)
        job.emit(Token(text=text, index=job.pieces, logprobs=tuple(job.pending_logprobs)))
        job.pending_logprobs.clear()
        job.pieces += 1

    def _on_done(
        self, job: Job, output: GenerationOutput | None, error: WorkerError | None
    ) -> None:
        if not job.call(self._complete, job, output, error):
            with self._lock:  # no loop to report on: at least free the job's place
                self._live.pop(job.job_id, None)

    def _start(self, job: Job, put: Callable[[JobEvent], object]) -> None:
        job.state = JobState.RUNNING
        put(Started(seed=job.seed, prompt_tokens=len(job.prompt_ids), started_at=time.time()))
        log_event(
            logger,
            "execute_start",
            worker_id=self._worker_id,
            job_id=job.job_id,
            endpoint=job.endpoint,
            prompt_tokens=len(job.prompt_ids),
            max_tokens=job.params.max_tokens,
            seed=job.seed,
        )

    # -- the terminal event (the loop) ----------------------------------------------------------

    def _complete(
        self, job: Job, output: GenerationOutput | None, error: WorkerError | None
    ) -> None:
        if job.timer is not None:
            job.timer.cancel()
        cancelled = output is not None and output.stop_reason is StopReason.CANCELLED
        if error is None and not cancelled and job.state is JobState.QUEUED:
            self._start(job, job.events.put_nowait)  # it ended with no text (EOS first) but ran
        with self._lock:
            self._live.pop(job.job_id, None)
            job.state = JobState.DONE
        if error is not None:
            failure = (error.code, error.message, error.retriable)
        elif cancelled:
            reason = job.cancel_reason
            if reason is None:  # the engine was closed under it
                reason = ErrorCode.WORKER_SHUTDOWN if self._stopping else ErrorCode.CANCELLED
            message, retriable = _CANCEL_MESSAGES[reason]
            failure = (reason.value, message, retriable)
        else:
            assert output is not None, "the engine reports an output or an error"
            self._finish(job, output)
            return
        tokens_out = output.timings.tokens_out if output is not None else None
        self._fail(job, *failure, tokens_out=tokens_out)

    def _finish(self, job: Job, output: GenerationOutput) -> None:
        t = output.timings
        log_event(
            logger,
            "execute_end",
            worker_id=self._worker_id,
            job_id=job.job_id,
            prompt_tokens=t.prompt_tokens,
            tokens_out=t.tokens_out,
            prefill_ms=t.prefill_ms,
            first_token_ms=t.first_token_ms,
            decode_tok_s=t.decode_tok_s,
            stop_reason=output.stop_reason.value,
        )
        if self._metrics is not None:
            m = self._metrics
            m.count_request(job.endpoint, "completed")
            m.tokens_generated.inc(t.tokens_out)
            m.prompt_tokens.inc(t.prompt_tokens)
            m.prefill_seconds.observe(t.prefill_ms / 1e3)
            m.decode_seconds.observe(t.decode_ms / 1e3)
            m.time_to_first_token.observe(t.first_token_ms / 1e3)
            # The engine's first-token time counts from submission, its prefill from the first
            # step that carried the prompt: the difference is the wait for a place in the batch.
            m.queue_wait_seconds.observe(max(t.first_token_ms - t.prefill_ms, 0.0) / 1e3)
        job.events.put_nowait(Finished(output))

    def _fail(
        self, job: Job, code: str, message: str, retriable: bool, tokens_out: int | None = None
    ) -> None:
        log_event(
            logger,
            "error",
            worker_id=self._worker_id,
            job_id=job.job_id,
            code=code,
            message=message,
            retriable=retriable,
            tokens_out=tokens_out,
            level=logging.WARNING,
        )
        if self._metrics is not None:
            self._metrics.count_request(job.endpoint, code.lower())
        job.events.put_nowait(Failed(code=code, message=message, retriable=retriable))
