"""OpenAI-compatible endpoints: /v1/completions, /v1/chat/completions, /v1/models.

They share the scheduler with /execute: a request becomes a job whose id is the response id
(`cmpl-...`, `chatcmpl-...`), so /cancel works on it too.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from worker_orcd.engine.types import GenerationOutput, StopReason, TokenLogprob
from worker_orcd.server import sse
from worker_orcd.server.jobs import Failed, Finished, Job, JobEvent, Started, Token
from worker_orcd.server.schemas import FieldError, OpenAIRequest, parse_openai
from worker_orcd.server.worker import (
    Worker,
    http_status,
    job_event_batches,
    job_events,
    read_json,
    watch_disconnect,
)

_FINISH_REASON = {
    StopReason.EOS: "stop",
    StopReason.STOP_SEQUENCE: "stop",
    StopReason.MAX_TOKENS: "length",
    StopReason.CONTEXT_FULL: "length",
}


def error_body(code: str, message: str, status: int, fields: list[FieldError]) -> dict[str, Any]:
    kind = "invalid_request_error" if status == 400 else "server_error"
    error: dict[str, Any] = {
        "message": message,
        "type": kind,
        "param": fields[0].field if fields else None,
        "code": code,
    }
    if fields:
        error["fields"] = [f.to_dict() for f in fields]
    return {"error": error}


def add_routes(app: FastAPI, worker: Worker) -> None:
    created = int(time.time())

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": worker.facts.model,
                    "object": "model",
                    "created": created,
                    "owned_by": "worker-orcd",
                },
            ],
        }

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _serve(worker, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _serve(worker, request, chat=True)


@dataclass(frozen=True, slots=True)
class _Reply:
    """How to shape one response's objects."""

    id: str
    chat: bool
    model: str
    created: int

    def envelope(self, chunk: bool) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def choice(
        self,
        text: str | None,
        finish_reason: str | None,
        *,
        role: bool = False,
        chunk: bool,
        logprobs: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0}
        if not self.chat:
            choice["text"] = text or ""
        elif chunk:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
        else:
            choice["message"] = {"role": "assistant", "content": text or ""}
        choice["logprobs"] = logprobs
        choice["finish_reason"] = finish_reason
        return choice


# JSON has no -inf: a probability that underflows reads as this, as vLLM reports it
_MIN_LOGPROB = -9999.0


class _Logprobs:
    """TokenLogprob entries as the endpoint's logprobs object: chat's `content` list (token,
    logprob, bytes, top_logprobs) or completions' parallel lists (tokens, token_logprobs,
    top_logprobs with the chosen token among them, text_offset). Keeps the count handed out and,
    for completions, each token's offset in the text, across the chunks of a stream."""

    def __init__(self, chat: bool, token_bytes: Callable[[int], bytes]) -> None:
        self.chat = chat
        self.token_bytes = token_bytes
        self.sent = 0
        self.offset = 0

    def shape(self, entries: Sequence[TokenLogprob], lead: int | None = None) -> dict[str, Any]:
        """`lead`: completions' echo: the prompt's first token, which has no log-probability."""
        self.sent += len(entries)
        if self.chat:
            content = [
                {
                    **self._item(e.token_id, e.logprob),
                    "top_logprobs": [self._item(*t) for t in e.top],
                }
                for e in entries
            ]
            return {"content": content, "refusal": None}
        tokens: list[str] = []
        offsets: list[int] = []
        tops: list[dict[str, float] | None] = []
        values: list[float | None] = []
        if lead is not None:
            tokens.append(self._text(lead))
            offsets.append(self.offset)
            self.offset += len(tokens[0])
            tops.append(None)
            values.append(None)
        values += [_finite(e.logprob) for e in entries]
        for e in entries:
            text = self._text(e.token_id)
            tokens.append(text)
            offsets.append(self.offset)
            self.offset += len(text)
            top = {self._text(t): _finite(v) for t, v in e.top}
            top.setdefault(text, _finite(e.logprob))
            tops.append(top)
        return {
            "tokens": tokens,
            "token_logprobs": values,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def _text(self, token_id: int) -> str:
        return self.token_bytes(token_id).decode("utf-8", "replace")

    def _item(self, token_id: int, logprob: float) -> dict[str, Any]:
        raw = self.token_bytes(token_id)
        return {
            "token": raw.decode("utf-8", "replace"),
            "logprob": _finite(logprob),
            "bytes": list(raw),
        }


def _finite(logprob: float) -> float:
    return logprob if logprob > _MIN_LOGPROB else _MIN_LOGPROB


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _reply_json(
    reply: _Reply,
    text: str,
    reason: str,
    logprobs: dict[str, Any] | None,
    usage: dict[str, int],
) -> JSONResponse:
    """The whole (not streamed) response of one choice."""
    choice = reply.choice(text, reason, chunk=False, logprobs=logprobs)
    return JSONResponse({**reply.envelope(chunk=False), "choices": [choice], "usage": usage})


async def _outcome(worker: Worker, request: Request, job: Job) -> GenerationOutput | Response:
    """The job's output once it finishes, or the error response if it fails; a client that
    goes away first cancels it."""
    watcher = asyncio.create_task(watch_disconnect(request, lambda: worker.cancel_on_exit(job)))
    try:
        async for event in job_events(job):
            if isinstance(event, Failed):
                status = http_status(event.code)
                return JSONResponse(
                    error_body(event.code, event.message, status, []), status_code=status
                )
            if isinstance(event, Finished):
                return event.output
    finally:
        watcher.cancel()
        worker.cancel_on_exit(job)
    raise AssertionError("a job's events always end with Finished or Failed")


async def _serve(worker: Worker, request: Request, *, chat: bool) -> Response:
    body = await read_json(request)
    req = parse_openai(body, chat=chat, max_tokens_out=worker.settings.max_tokens_out)
    job_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
    request.state.job_id = job_id
    endpoint = "v1_chat_completions" if chat else "v1_completions"
    reply = _Reply(id=job_id, chat=chat, model=worker.facts.model, created=int(time.time()))
    if req.echo:
        return await _serve_echo(worker, request, req, reply, endpoint)
    job = await worker.new_job(job_id, req.generation, endpoint=endpoint)
    if req.stream:
        return StreamingResponse(
            _stream(worker, job, request, req, reply),
            media_type=sse.MEDIA_TYPE,
            headers=sse.HEADERS,
        )
    out = await _outcome(worker, request, job)
    if isinstance(out, Response):
        return out
    logprobs = None
    if out.logprobs is not None:
        logprobs = _Logprobs(chat, worker.engine.token_bytes).shape(out.logprobs)
    usage = _usage(len(out.prompt_ids), len(out.token_ids))
    return _reply_json(reply, out.text, _FINISH_REASON[out.stop_reason], logprobs, usage)


async def _serve_echo(
    worker: Worker, request: Request, req: OpenAIRequest, reply: _Reply, endpoint: str
) -> Response:
    """Completions with echo (never streamed): the prompt, then its completion (none with
    max_tokens 0); with logprobs, the prompt tokens' from the model's logits over the prompt
    (the first token has none), then the completion's."""
    gen = req.generation
    ids = await worker.prompt_ids(gen)
    worker.check_fit(len(ids), gen.max_tokens)  # before the scoring pass
    prompt_text = gen.prompt if gen.prompt is not None else worker.engine.decode(ids)
    entries: list[TokenLogprob] = []
    if gen.logprobs is not None:
        entries = await run_in_threadpool(worker.engine.prompt_logprobs, ids, gen.logprobs)
    text, reason, generated = prompt_text, "length", 0
    if gen.max_tokens != 0:
        job = await worker.new_job(reply.id, gen, endpoint=endpoint, ids=ids)
        out = await _outcome(worker, request, job)
        if isinstance(out, Response):
            return out
        text += out.text
        reason = _FINISH_REASON[out.stop_reason]
        generated = len(out.token_ids)
        entries += out.logprobs or []
    logprobs = None
    if gen.logprobs is not None:
        logprobs = _Logprobs(False, worker.engine.token_bytes).shape(entries, lead=ids[0])
    return _reply_json(reply, text, reason, logprobs, _usage(len(ids), generated))


async def _stream(
    worker: Worker, job: Job, request: Request, req: OpenAIRequest, reply: _Reply
) -> AsyncIterator[bytes]:
    watcher = asyncio.create_task(watch_disconnect(request, lambda: worker.cancel_on_exit(job)))
    # With include_usage every chunk carries "usage": null, and one last chunk carries the totals.
    extra: dict[str, Any] = {"usage": None} if req.include_usage else {}
    # with logprobs: each chunk those of the tokens behind its text, the last one any left
    shaper = None
    if req.generation.logprobs is not None:
        shaper = _Logprobs(reply.chat, worker.engine.token_bytes)

    def chunk(
        text: str | None,
        finish_reason: str | None = None,
        role: bool = False,
        entries: Sequence[TokenLogprob] = (),
    ) -> bytes:
        logprobs = shaper.shape(entries) if shaper is not None and entries else None
        choice = reply.choice(text, finish_reason, role=role, chunk=True, logprobs=logprobs)
        return sse.data_only({**reply.envelope(chunk=True), "choices": [choice], **extra})

    def frames(event: JobEvent) -> list[bytes]:
        if isinstance(event, Started):
            return [chunk("", role=True)] if reply.chat else []
        if isinstance(event, Token):
            return [chunk(event.text, entries=event.logprobs)]
        if isinstance(event, Finished):
            out = event.output
            rest = out.logprobs[shaper.sent :] if shaper is not None and out.logprobs else []
            reason = _FINISH_REASON[out.stop_reason]
            last = [chunk(None if reply.chat else "", reason, entries=rest)]
            if req.include_usage:
                usage = {
                    **reply.envelope(chunk=True),
                    "choices": [],
                    "usage": _usage(len(out.prompt_ids), len(out.token_ids)),
                }
                last.append(sse.data_only(usage))
            return last
        return [sse.data_only(error_body(event.code, event.message, http_status(event.code), []))]

    try:
        async for batch in job_event_batches(job):  # the events waiting: one send
            body = b"".join(frame for event in batch for frame in frames(event))
            if body:
                yield body
        yield sse.OPENAI_DONE
    finally:
        watcher.cancel()
        worker.cancel_on_exit(job)
