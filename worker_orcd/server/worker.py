"""Serving state shared by every route: engine, scheduler, metrics, cached health facts."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from worker_orcd.errors import InvalidRequestError
from worker_orcd.server.jobs import (
    DuplicateJobError,
    ErrorCode,
    Failed,
    Finished,
    GeneratingEngine,
    Job,
    JobEvent,
    JobState,
    Scheduler,
)
from worker_orcd.server.logs import log_event
from worker_orcd.server.metrics import Metrics
from worker_orcd.server.options import ServerSettings
from worker_orcd.server.schemas import FieldError, GenerationRequest, RequestValidationError

if TYPE_CHECKING:
    from worker_orcd.engine.steps import EngineStats
    from worker_orcd.engine.types import TokenLogprob

logger = logging.getLogger(__name__)

# HTTP status for an error code, whether it refuses a request or ends a job.
HTTP_STATUS = {
    "INVALID_REQUEST": 400,
    "CANCELLED": 499,
    "CLIENT_DISCONNECTED": 499,
    "QUEUE_FULL": 503,
    "WORKER_SHUTDOWN": 503,
    "VRAM_OOM": 503,
    "INFERENCE_TIMEOUT": 504,
}


def http_status(code: str) -> int:
    return HTTP_STATUS.get(code, 500)


class ServingEngine(GeneratingEngine, Protocol):
    """What the worker needs of the engine beyond the scheduler's `submit` and `close`."""

    model_name: str

    def encode_prompt(
        self,
        prompt: str | None = None,
        messages: Sequence[dict[str, str]] | None = None,
        system: str | None = None,
    ) -> list[int]: ...

    def check_fits(self, n_prompt: int, max_tokens: int) -> None: ...

    def token_bytes(self, token_id: int) -> bytes: ...

    def prompt_logprobs(self, ids: Sequence[int], top: int) -> list[TokenLogprob]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def stats(self) -> EngineStats: ...


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """What /health and the ready callback report about the loaded model; read once at start-up."""

    model: str
    architecture: str
    device: str
    dtype: str
    quant_kind: str  # the file's declared type (general.file_type), e.g. Q4_K_M
    weights: str  # "quantized" (GGUF blocks on the device) or "dequantized"
    weight_mix: dict[str, int]  # storage type on the device ("Q4_K", "bfloat16", ...) -> bytes
    tokenizer_kind: str
    vocab_size: int
    context_length: int
    weight_bytes: int
    kv_cache_bytes: int


def gpu_memory_bytes(device: str) -> int:
    """Bytes the CUDA caching allocator holds for this process on `device` (0 on CPU)."""
    if not device.startswith("cuda"):
        return 0
    import torch

    return int(torch.cuda.memory_reserved(torch.device(device)))


@dataclass(slots=True)
class Worker:
    engine: ServingEngine
    facts: ModelFacts
    settings: ServerSettings
    scheduler: Scheduler
    metrics: Metrics
    started: float = field(default_factory=time.monotonic)
    shutting_down: bool = False

    def health(self) -> dict[str, Any]:
        f = self.facts
        s = self.engine.stats()
        return {
            "status": "unhealthy" if self.shutting_down else "healthy",
            "worker_id": self.settings.worker_id,
            "model": f.model,
            "resident": True,
            "device": f.device,
            "dtype": f.dtype,
            "quant_kind": f.quant_kind,
            "weights": f.weights,
            "weight_mix": f.weight_mix,
            "vram_bytes_used": gpu_memory_bytes(f.device),
            "tokenizer_kind": f.tokenizer_kind,
            "vocab_size": f.vocab_size,
            "context_length": f.context_length,
            "uptime_seconds": round(time.monotonic() - self.started, 3),
            "jobs_running": self.scheduler.jobs_running,
            "jobs_queued": self.scheduler.jobs_queued,
            # The engine's batch: sequences in it and waiting for it (new or preempted), its KV
            # cache blocks, and the preemptions and forward passes since start-up.
            "max_num_seqs": s.max_num_seqs,
            "max_queue": self.settings.max_queue,
            "seqs_running": s.running,
            "seqs_waiting": s.waiting,
            "kv_blocks_used": s.kv_blocks_used,
            "kv_blocks_total": s.kv_blocks_total,
            "kv_block_size": s.kv_block_size,
            "preemptions": s.preemptions,
            "steps": s.steps,
            "mean_batch_seqs": round(s.step_seqs / s.steps, 3) if s.steps else 0.0,
        }

    async def prompt_ids(self, gen: GenerationRequest) -> list[int]:
        """The request's prompt as token ids: tokenized off the event loop, or as given (each id
        checked against the vocabulary)."""
        if gen.prompt_ids is not None:
            vocab = self.facts.vocab_size
            bad = [i for i in gen.prompt_ids if i >= vocab]
            if bad:
                raise RequestValidationError(
                    [FieldError("prompt", f"holds token id {bad[0]}, outside 0..{vocab - 1}")]
                )
            return list(gen.prompt_ids)
        try:
            return await run_in_threadpool(
                self.engine.encode_prompt,
                prompt=gen.prompt,
                messages=list(gen.messages) if gen.messages else None,
            )
        except RequestValidationError:
            raise
        except InvalidRequestError as exc:  # e.g. a chat request to a model without a template
            field = "prompt" if gen.prompt is not None else "messages"
            raise _field_error(field, exc) from exc

    async def new_job(
        self, job_id: str, gen: GenerationRequest, endpoint: str, ids: list[int] | None = None
    ) -> Job:
        """Tokenize off the event loop (unless `ids` are given), check the prompt's fit, and
        queue the job."""
        if ids is None:
            ids = await self.prompt_ids(gen)
        max_tokens = self.check_fit(len(ids), gen.max_tokens)
        seed = gen.seed if gen.seed is not None else secrets.randbits(64)
        params = gen.sampling(max_tokens=max_tokens, seed=seed)
        job = Job(
            job_id=job_id,
            prompt_ids=ids,
            params=params,
            endpoint=endpoint,
            loop=asyncio.get_running_loop(),
        )
        try:
            self.scheduler.submit(job)
        except DuplicateJobError as exc:
            raise RequestValidationError([FieldError("job_id", exc.message)]) from exc
        log_event(
            logger,
            "job_queued",
            worker_id=self.settings.worker_id,
            job_id=job_id,
            endpoint=endpoint,
            prompt_chars=gen.prompt_chars,
            prompt_tokens=len(ids),
            live=self.scheduler.jobs_live,
            level=logging.DEBUG,
        )
        return job

    def check_fit(self, n_prompt: int, max_tokens: int | None) -> int:
        """max_tokens, or as many as the context and --max-tokens-out allow; raise naming the
        prompt if it does not fit."""
        limit = self.settings.max_tokens_in
        if limit is not None and n_prompt > limit:
            raise RequestValidationError(
                [FieldError("prompt", f"is {n_prompt} tokens, more than --max-tokens-in {limit}")]
            )
        if max_tokens is None:
            room = self.facts.context_length - n_prompt
            if room < 1:
                raise RequestValidationError(
                    [
                        FieldError(
                            "prompt",
                            f"is {n_prompt} tokens and leaves no room in the context of "
                            f"{self.facts.context_length} tokens",
                        )
                    ]
                )
            max_tokens = min(self.settings.max_tokens_out, room)
        try:
            self.engine.check_fits(n_prompt, max_tokens)
        except InvalidRequestError as exc:
            raise _field_error("prompt", exc) from exc
        return max_tokens

    def cancel_on_exit(self, job: Job) -> None:
        """The consumer of `job` went away before its terminal event: stop the work."""
        if job.state is not JobState.DONE:
            self.scheduler.cancel(job.job_id, ErrorCode.CLIENT_DISCONNECTED)


async def job_events(job: Job) -> AsyncIterator[JobEvent]:
    """The job's events up to and including its one terminal event."""
    async for batch in job_event_batches(job):
        for event in batch:
            yield event


async def job_event_batches(job: Job) -> AsyncIterator[list[JobEvent]]:
    """The job's events as they come, each time all those already waiting (a stream writes them
    in one send), up to and including its one terminal event."""
    while True:
        batch = [await job.events.get()]
        while not isinstance(batch[-1], (Finished, Failed)) and not job.events.empty():
            batch.append(job.events.get_nowait())
        yield batch
        if isinstance(batch[-1], (Finished, Failed)):
            return


async def watch_disconnect(request: Request, on_disconnect: Callable[[], None]) -> None:
    """Wait for the client to go away (the body is already read), then call `on_disconnect`."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


async def read_json(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestValidationError([FieldError("body", f"must be valid JSON ({exc})")]) from exc


def _field_error(field: str, exc: InvalidRequestError) -> RequestValidationError:
    """The engine's refusal as a validation error of `field`. The engine's sentences may already
    lead with the field ("prompt of N tokens + ..."); the field is then said once."""
    return RequestValidationError([FieldError(field, exc.message.removeprefix(f"{field} "))])
