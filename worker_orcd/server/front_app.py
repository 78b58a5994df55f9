"""The data-parallel front's routes: each request to the least busy replica, its answer back.

/execute, /v1/completions and /v1/chat/completions (streaming or not) go to the ready replica with
the fewest requests in flight (ties round-robin) and come back frame by frame as it sends them;
GET /v1/models to any. /cancel goes to the replica running the job (to every replica when the front
does not know it); /health and /metrics gather all of theirs (front_status.py). A replica that goes
away ends each of its open streams with one error event of ours (REPLICA_FAILED, retriable).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import anyio
import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.types import Receive, Scope, Send

from worker_orcd.server import front_status, sse
from worker_orcd.server.logs import log_event
from worker_orcd.server.openai_api import error_body
from worker_orcd.server.options import ServerSettings
from worker_orcd.server.replicas import Replica, ReplicaSet
from worker_orcd.server.schemas import FieldError

logger = logging.getLogger(__name__)

T = TypeVar("T")
REPLICA_FAILED = "REPLICA_FAILED"  # the replica went away before the request ended
NO_REPLICA = "NO_REPLICA"  # none is ready (all are restarting)
_STATUS = {"INVALID_REQUEST": 400, REPLICA_FAILED: 502, NO_REPLICA: 503, "WORKER_SHUTDOWN": 503}
_TERMINAL = (b"event: end\n", b"event: error\n")  # /execute's last frame
_DUPLICATE = "must be unique among live jobs: this one is already queued or running"


@dataclass(slots=True)
class Front:
    settings: ServerSettings
    replicas: ReplicaSet
    started: float = field(default_factory=time.monotonic)
    shutting_down: bool = False


class _ClientGone(Exception):
    pass


@dataclass(slots=True, eq=False)
class _Lease:
    """One request's hold on its replica: counted in flight, and the owner of its job id."""

    replicas: ReplicaSet
    replica: Replica
    job_id: str | None
    done: bool = False

    def __post_init__(self) -> None:
        self.replica.in_flight += 1
        if self.job_id is not None:
            self.replicas.owners[self.job_id] = self.replica

    def own(self, job_id: str | None) -> None:
        if job_id is not None and self.job_id is None and not self.done:
            self.job_id = job_id
            self.replicas.owners[job_id] = self.replica

    def release(self) -> None:
        if self.done:
            return
        self.done = True
        self.replica.in_flight -= 1
        if self.job_id is not None and self.replicas.owners.get(self.job_id) is self.replica:
            del self.replicas.owners[self.job_id]


def create_front_app(front: Front) -> FastAPI:
    app = FastAPI(title="worker-orcd", docs_url=None, redoc_url=None, openapi_url=None)
    replicas, wid = front.replicas, front.settings.worker_id

    @app.post("/execute")
    async def execute(request: Request) -> Response:
        return await forward(front, request, "execute")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await forward(front, request, "v1_completions")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await forward(front, request, "v1_chat_completions")

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await forward(front, request, "v1_models")

    @app.post("/cancel")
    async def cancel(request: Request) -> Response:
        raw = await request.body()
        job_id = _field(raw, "job_id")
        owner = replicas.owners.get(job_id) if job_id is not None else None
        targets = [owner] if owner is not None and owner.client else replicas.up()
        answers = await asyncio.gather(*(_post(r, "/cancel", raw) for r in targets))
        got = [a for a in answers if a is not None]
        if not got:
            return _error(front, "/cancel", NO_REPLICA, "no replica answered", retriable=True)
        refused = [a for a in got if a.status_code != 202]
        if len(got) == 1 or refused:  # a bad body: every replica says the same
            return _passed(refused[0] if refused else got[0])
        live = any(a.json().get("status") == "cancelling" for a in got)
        status = "cancelling" if live else "not_live"
        return JSONResponse({"job_id": job_id, "status": status}, status_code=202)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return await front_status.health(
            replicas,
            worker_id=wid,
            started=front.started,
            shutting_down=front.shutting_down,
        )

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(await front_status.metrics(replicas), media_type=CONTENT_TYPE_LATEST)

    return app


async def forward(front: Front, request: Request, endpoint: str) -> Response:
    """Send the request to the least busy replica; relay its answer (a stream frame by frame)."""
    path, replicas = request.url.path, front.replicas
    raw = await request.body()
    if front.shutting_down:
        return _error(front, path, "WORKER_SHUTDOWN", "worker is shutting down", retriable=True)
    job_id = _field(raw, "job_id") if endpoint == "execute" else None
    if job_id is not None and job_id in replicas.owners:
        return _error(
            front,
            path,
            "INVALID_REQUEST",
            f"invalid request: job_id {_DUPLICATE}",
            fields=[FieldError("job_id", _DUPLICATE)],
        )
    headers = {"content-type": request.headers.get("content-type", "application/json")}
    tried: list[Replica] = []
    while True:
        r = replicas.pick(exclude=tried)
        if r is None or r.client is None:
            up = len(replicas.up())
            message = f"no replica is ready ({up} of {len(replicas.replicas)} up)"
            return _error(front, path, NO_REPLICA, message, retriable=True)
        lease = _Lease(replicas, r, job_id)
        req = r.client.build_request(request.method, path, content=raw, headers=headers)
        try:
            resp = await _unless_disconnected(request, r.client.send(req, stream=True))
        except _ClientGone:
            lease.release()
            return Response(status_code=499)
        except httpx.ConnectError:  # it never got the request: another replica may take it
            lease.release()
            tried.append(r)
            continue
        except httpx.HTTPError as exc:
            lease.release()
            message = f"replica {r.index} failed before it answered ({type(exc).__name__}: {exc})"
            return _error(front, path, REPLICA_FAILED, message, retriable=True)
        break
    r.served[endpoint] = r.served.get(endpoint, 0) + 1
    if resp.status_code == 200 and resp.headers.get("content-type", "").startswith(sse.MEDIA_TYPE):
        return _RelayResponse(
            _relay(front, resp, lease, openai=path.startswith("/v1/")),
            upstream=resp,
            lease=lease,
        )
    try:
        await _unless_disconnected(request, resp.aread())
    except _ClientGone:
        return Response(status_code=499)
    except httpx.HTTPError as exc:
        message = f"replica {r.index} went away before it answered ({type(exc).__name__}: {exc})"
        return _error(front, path, REPLICA_FAILED, message, retriable=True)
    finally:
        await resp.aclose()
        lease.release()
    return _passed(resp)


async def _relay(
    front: Front, resp: httpx.Response, lease: _Lease, *, openai: bool
) -> AsyncIterator[bytes]:
    """The replica's SSE frames as they come; one error frame of our own when it went away
    before its terminal one (`end` / `error`, or OpenAI's `[DONE]`)."""
    buf, terminal, why = b"", False, "the stream ended early"
    try:
        try:
            async for chunk in resp.aiter_raw():
                buf += chunk
                while (cut := buf.find(b"\n\n")) >= 0:
                    frame, buf = buf[: cut + 2], buf[cut + 2 :]
                    if openai:
                        if lease.job_id is None:
                            lease.own(_field(frame.removeprefix(b"data: "), "id"))
                        terminal = terminal or frame == sse.OPENAI_DONE
                    else:
                        terminal = terminal or frame.startswith(_TERMINAL)
                    yield frame
        except httpx.HTTPError as exc:
            why = f"{type(exc).__name__}: {exc}"
        if not terminal:
            message = f"replica {lease.replica.index} went away mid-stream ({why})"
            log_event(
                logger,
                "error",
                worker_id=front.settings.worker_id,
                job_id=lease.job_id,
                code=REPLICA_FAILED,
                replica=lease.replica.index,
                message=message,
                level=logging.WARNING,
            )
            if openai:
                yield sse.data_only(error_body(REPLICA_FAILED, message, 502, []))
                yield sse.OPENAI_DONE
            else:
                body = {"code": REPLICA_FAILED, "message": message, "retriable": True}
                yield sse.event("error", body)
    finally:
        await _close(resp, lease)


class _RelayResponse(StreamingResponse):
    """A relayed stream that closes its upstream and ends its lease however the response ends:
    also when the client left before the first frame (the relay never started) or while a frame
    was being sent (the relay is left suspended)."""

    def __init__(
        self, frames: AsyncIterator[bytes], *, upstream: httpx.Response, lease: _Lease
    ) -> None:
        super().__init__(frames, media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)
        self._upstream, self._lease = upstream, lease

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await _close(self._upstream, self._lease)


async def _close(upstream: httpx.Response, lease: _Lease) -> None:
    """Close the replica's stream (when the client left, that cancels the job there)."""
    with anyio.CancelScope(shield=True):
        await upstream.aclose()
    lease.release()


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or _ClientGone (with `work` cancelled) when the client leaves first."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task in done:
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError, httpx.HTTPError):
        await task
    raise _ClientGone


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _post(r: Replica, path: str, raw: bytes) -> httpx.Response | None:
    if r.client is None:
        return None
    headers = {"content-type": "application/json"}
    try:
        return await r.client.post(path, content=raw, headers=headers)
    except httpx.HTTPError as exc:
        logger.warning("replica %d: POST %s failed: %s", r.index, path, exc)
        return None


def _field(raw: bytes, key: str) -> str | None:
    """body[key] when the body is a JSON object and that is a non-empty string."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    value = body.get(key) if isinstance(body, dict) else None
    return value if isinstance(value, str) and value else None


def _passed(resp: httpx.Response) -> Response:
    """The replica's (complete) answer as it gave it."""
    keep = {k: v for k, v in resp.headers.items() if k.lower() in ("content-type", "retry-after")}
    return Response(resp.content, status_code=resp.status_code, headers=keep)


def _error(
    front: Front,
    path: str,
    code: str,
    message: str,
    *,
    retriable: bool = False,
    fields: list[FieldError] | None = None,
) -> JSONResponse:
    """An answer of the front's own, shaped as the replicas shape theirs."""
    status, fields = _STATUS[code], fields or []
    log_event(
        logger,
        "error",
        worker_id=front.settings.worker_id,
        path=path,
        code=code,
        message=message,
        level=logging.WARNING,
    )
    if path.startswith("/v1/"):
        body = error_body(code, message, status, fields)
    else:
        body = {"code": code, "message": message, "retriable": retriable}
        if fields:
            body["fields"] = [f.to_dict() for f in fields]
    headers = {"Retry-After": "1"} if retriable else None
    return JSONResponse(body, status_code=status, headers=headers)
