"""HTTP routes of the worker: /execute (SSE), /cancel, /health, /metrics, and the OpenAI family."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from worker_orcd.errors import WorkerError
from worker_orcd.server import openai_api, sse
from worker_orcd.server.jobs import Failed, Finished, Job, Started, Token
from worker_orcd.server.logs import log_event
from worker_orcd.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from worker_orcd.server.schemas import (
    FieldError,
    RequestValidationError,
    parse_execute,
)
from worker_orcd.server.worker import (
    Worker,
    http_status,
    job_event_batches,
    read_json,
    watch_disconnect,
)

logger = logging.getLogger(__name__)


def create_app(worker: Worker) -> FastAPI:
    app = FastAPI(title="worker-orcd", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.worker = worker

    @app.exception_handler(WorkerError)
    async def on_worker_error(request: Request, exc: WorkerError) -> Response:
        return error_response(worker, request, exc)

    @app.post("/execute")
    async def execute(request: Request) -> Response:
        body = await read_json(request)
        req = parse_execute(body, max_tokens_out=worker.settings.max_tokens_out)
        request.state.job_id = req.job_id
        job = await worker.new_job(req.job_id, req.generation, endpoint="execute")
        return StreamingResponse(
            execute_stream(worker, job, request), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS
        )

    @app.post("/cancel", status_code=202)
    async def cancel(request: Request) -> dict[str, Any]:
        body = await read_json(request)
        job_id = body.get("job_id") if isinstance(body, dict) else None
        errors = []
        if not isinstance(job_id, str) or not job_id:
            errors.append(FieldError("job_id", "must be a non-empty string"))
        if isinstance(body, dict):
            errors += [FieldError(k, "is not a known field") for k in body if k != "job_id"]
        if errors:
            raise RequestValidationError(errors)
        found = worker.scheduler.cancel(job_id)
        return {"job_id": job_id, "status": "cancelling" if found else "not_live"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return worker.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(worker.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    openai_api.add_routes(app, worker)
    return app


async def execute_stream(worker: Worker, job: Job, request: Request) -> AsyncIterator[bytes]:
    watcher = asyncio.create_task(watch_disconnect(request, lambda: worker.cancel_on_exit(job)))
    try:
        async for batch in job_event_batches(job):
            yield b"".join(execute_frame(worker, job, event) for event in batch)
    finally:
        watcher.cancel()
        worker.cancel_on_exit(job)


def execute_frame(worker: Worker, job: Job, event: Started | Token | Finished | Failed) -> bytes:
    if isinstance(event, Token):
        return sse.event("token", {"t": event.text, "i": event.index})
    if isinstance(event, Started):
        started_at = dt.datetime.fromtimestamp(event.started_at, dt.timezone.utc)
        return sse.event(
            "started",
            {
                "job_id": job.job_id,
                "model": worker.facts.model,
                "seed": event.seed,
                "prompt_tokens": event.prompt_tokens,
                "started_at": started_at.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            },
        )
    if isinstance(event, Finished):
        out = event.output
        t = out.timings
        end: dict[str, Any] = {
            "tokens_out": t.tokens_out,
            "decode_time_ms": round(t.decode_ms, 3),
            "first_token_ms": round(t.first_token_ms, 3),
            "tokens_per_sec": round(t.decode_tok_s, 3),
            "stop_reason": out.stop_reason.value,
            "prompt_tokens": t.prompt_tokens,
            "prefill_ms": round(t.prefill_ms, 3),
        }
        if out.stop_sequence is not None:
            end["stop_sequence_matched"] = out.stop_sequence
        return sse.event("end", end)
    return sse.event(
        "error", {"code": event.code, "message": event.message, "retriable": event.retriable}
    )


def error_response(worker: Worker, request: Request, exc: WorkerError) -> JSONResponse:
    """A request refused before any job ran: /execute's error body, or OpenAI's under /v1."""
    status = http_status(exc.code)
    fields = exc.errors if isinstance(exc, RequestValidationError) else []
    path = request.url.path
    endpoint = path.strip("/").replace("/", "_") or "root"
    worker.metrics.count_request(endpoint, exc.code.lower())
    log_event(
        logger,
        "error",
        worker_id=worker.settings.worker_id,
        job_id=getattr(request.state, "job_id", None),
        path=path,
        code=exc.code,
        fields=",".join(f.field for f in fields) or None,
        message=None if fields else exc.message,
        level=logging.WARNING,
    )
    headers = {"Retry-After": "1"} if exc.retriable else None
    if path.startswith("/v1/"):
        body = openai_api.error_body(exc.code, exc.message, status, fields)
    else:
        body = {"code": exc.code, "message": exc.message, "retriable": exc.retriable}
        if fields:
            body["fields"] = [f.to_dict() for f in fields]
    return JSONResponse(body, status_code=status, headers=headers)
