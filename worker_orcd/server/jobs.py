"""Jobs and the scheduler: one engine thread runs jobs one at a time from a bounded queue.

The HTTP side lives on the asyncio loop; the engine blocks a thread. Each job owns an asyncio.Queue
of events that the engine thread fills through `loop.call_soon_threadsafe`, so a route can stream
them as they happen. Every job ends with exactly one terminal event (`Finished` or `Failed`).

Cancellation is a `threading.Event` the engine checks every decode step; `cancel_reason` says why
(a /cancel call, the inference timeout, a client that went away, shutdown) and becomes the error
code.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from worker_orcd.engine.types import GenerationOutput, SamplingParams, StopReason
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


class GeneratingEngine(Protocol):
    def generate(
        self,
        prompt: list[int],
        params: SamplingParams,
        *,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
    ) -> GenerationOutput: ...


@dataclass(frozen=True, slots=True)
class Started:
    seed: int
    prompt_tokens: int
    started_at: float  # unix seconds


@dataclass(frozen=True, slots=True)
class Token:
    text: str
    index: int


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
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"


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
    pieces: int = 0

    def emit(self, event: JobEvent) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            logger.debug(
                "dropped %s for job %s: event loop closed", type(event).__name__, self.job_id
            )

    @property
    def seed(self) -> int:
        assert self.params.seed is not None, "the scheduler needs a concrete seed"
        return self.params.seed


class Scheduler:
    """Runs jobs one at a time on `engine` in its own thread; at most `max_queue` jobs wait."""

    def __init__(
        self,
        engine: GeneratingEngine,
        *,
        worker_id: str,
        max_queue: int,
        timeout_s: float,
        metrics: Metrics | None = None,
    ) -> None:
        self._engine = engine
        self._worker_id = worker_id
        self._max_queue = max_queue
        self._timeout_s = timeout_s
        self._metrics = metrics
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()
        self._live: dict[str, Job] = {}
        self._running: Job | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def jobs_queued(self) -> int:
        return len(self._queue)

    @property
    def jobs_running(self) -> int:
        return 0 if self._running is None else 1

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise ShuttingDownError("worker is shutting down")
            if job.job_id in self._live:
                raise DuplicateJobError(
                    "must be unique among live jobs: this one is already queued or running"
                )
            # One job runs and up to max_queue wait; counting live jobs is free of the race
            # with the engine thread picking the next job up.
            if len(self._live) >= self._max_queue + 1:
                raise QueueFullError(
                    f"queue is full ({len(self._live) - 1} waiting, --max-queue {self._max_queue})"
                )
            self._live[job.job_id] = job
            self._queue.append(job)
            self._cond.notify()

    def cancel(self, job_id: str, reason: ErrorCode = ErrorCode.CANCELLED) -> bool:
        """Cancel a queued or running job; False when no live job has this id. Idempotent."""
        with self._cond:
            job = self._live.get(job_id)
        if job is None:
            return False
        self._cancel_job(job, reason)
        return True

    def _cancel_job(self, job: Job, reason: ErrorCode) -> None:
        with self._cond:
            if job.cancel_reason is not None or job.state is JobState.DONE:
                return
            job.cancel_reason = reason
            job.cancel_event.set()
            if job.state is JobState.QUEUED:
                self._queue.remove(job)
                del self._live[job.job_id]
                job.state = JobState.DONE
                queued = True
            else:
                queued = False
        log_event(
            logger,
            "cancel",
            worker_id=self._worker_id,
            job_id=job.job_id,
            reason=reason.value,
            state="queued" if queued else "running",
        )
        if queued:
            self._fail(job, *self._cancel_failure(reason))

    def shutdown(self) -> None:
        """Refuse new jobs, end every live job with WORKER_SHUTDOWN and let the thread exit."""
        with self._cond:
            self._stopping = True
            live = list(self._live.values())
            self._cond.notify_all()
        for job in live:
            self._cancel_job(job, ErrorCode.WORKER_SHUTDOWN)

    def join(self, timeout: float) -> bool:
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                job = self._queue.popleft()
                job.state = JobState.RUNNING
                self._running = job
            try:
                self._execute(job)
            finally:
                with self._cond:
                    self._running = None

    def _execute(self, job: Job) -> None:
        started = time.time()
        if self._metrics is not None:
            self._metrics.queue_wait_seconds.observe(time.monotonic() - job.submitted_at)
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
        job.emit(Started(seed=job.seed, prompt_tokens=len(job.prompt_ids), started_at=started))
        timer = threading.Timer(
            self._timeout_s, self._cancel_job, (job, ErrorCode.INFERENCE_TIMEOUT)
        )
        timer.daemon = True
        timer.start()

        def on_text(text: str) -> None:
            if text:
                job.emit(Token(text=text, index=job.pieces))
                job.pieces += 1

        output: GenerationOutput | None = None
        failure: tuple[str, str, bool] | None = None
        try:
            output = self._engine.generate(
                job.prompt_ids, job.params, on_text=on_text, cancel=job.cancel_event
            )
        except WorkerError as exc:  # VramOomError included: the engine stays usable
            failure = (exc.code, exc.message, exc.retriable)
        except Exception as exc:  # noqa: BLE001 - one bad job must not kill the worker
            logger.exception("job %s failed", job.job_id)
            failure = (ErrorCode.INTERNAL.value, f"{type(exc).__name__}: {exc}", False)
        finally:
            timer.cancel()
        with self._cond:
            self._live.pop(job.job_id, None)
            job.state = JobState.DONE
        if output is not None and output.stop_reason is StopReason.CANCELLED:
            failure = self._cancel_failure(job.cancel_reason or ErrorCode.CANCELLED)
        if failure is not None:
            self._fail(job, *failure, tokens_out=output.timings.tokens_out if output else None)
            return
        assert output is not None
        self._finish(job, output)

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
        job.emit(Finished(output))

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
        job.emit(Failed(code=code, message=message, retriable=retriable))

    @staticmethod
    def _cancel_failure(reason: ErrorCode) -> tuple[str, str, bool]:
        message, retriable = _CANCEL_MESSAGES[reason]
        return reason.value, message, retriable
