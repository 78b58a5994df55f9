"""`worker-orcd serve`: load the model, listen, announce readiness, serve until SIGTERM/SIGINT.

Order: load (with progress lines) -> bind and listen -> log `ready` -> POST the ready callback. A
model that cannot be loaded ends the process with one `error` line and a non-zero exit code. On
SIGTERM or SIGINT the listener closes, every live job ends with a WORKER_SHUTDOWN error event, open
streams are allowed to finish, the engine is closed, and the process exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import uvicorn
from fastapi import FastAPI

from worker_orcd.server.app import create_app
from worker_orcd.server.jobs import Scheduler
from worker_orcd.server.loading import load_engine, model_facts
from worker_orcd.server.logs import configure_json_logging, log_event
from worker_orcd.server.metrics import Metrics
from worker_orcd.server.options import ServerSettings
from worker_orcd.server.worker import Worker, gpu_memory_bytes

logger = logging.getLogger(__name__)

CALLBACK_ATTEMPTS = 3
GRACEFUL_SHUTDOWN_S = 10


def serve(args: argparse.Namespace) -> int:
    if args.log_format == "json":
        configure_json_logging(args.log_level)
    try:
        settings = ServerSettings.from_args(args)
    except ValueError as exc:
        log_event(
            logger,
            "error",
            worker_id=args.worker_id or "-",
            code="INVALID_ARGUMENT",
            message=str(exc),
            level=logging.ERROR,
        )
        return 2
    wid = settings.worker_id
    log_event(
        logger,
        "startup",
        worker_id=wid,
        model=settings.model_path,
        device=settings.device,
        host=settings.host,
        port=settings.port,
        pid=os.getpid(),
    )
    engine = load_engine(settings)
    if engine is None:
        return 1
    sock = bind_or_log(settings)
    if sock is None:
        return 1
    facts = model_facts(engine, settings)
    metrics = Metrics(gpu_memory_bytes=lambda: gpu_memory_bytes(facts.device))
    scheduler = Scheduler(
        engine,
        worker_id=wid,
        max_num_seqs=engine.info().max_num_seqs,
        max_queue=settings.max_queue,
        timeout_s=settings.inference_timeout_s,
        metrics=metrics,
    )
    metrics.watch(
        queue_length=lambda: scheduler.jobs_queued, jobs_running=lambda: scheduler.jobs_running
    )
    metrics.watch_engine(engine.stats)
    engine.set_step_observer(metrics.observe_step)
    worker = Worker(
        engine=engine, facts=facts, settings=settings, scheduler=scheduler, metrics=metrics
    )
    return asyncio.run(_serve(worker, sock))


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket. Created with proto=IPPROTO_TCP (socket.create_server leaves it 0) so
    that asyncio sets TCP_NODELAY on accepted connections: without it a response written in two
    parts waits for the client's delayed ACK (~40 ms), and so would every SSE event."""
    family, kind, proto, _, addr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def bind_or_log(settings: ServerSettings) -> socket.socket | None:
    """`listen` on the settings' host and port, or None after logging why it could not
    (BIND_FAILED: the port taken, an unknown host, ...)."""
    try:
        return listen(settings.host, settings.port)
    except OSError as exc:
        log_event(
            logger,
            "error",
            worker_id=settings.worker_id,
            code="BIND_FAILED",
            host=settings.host,
            port=settings.port,
            message=str(exc),
            level=logging.ERROR,
        )
        return None


class _Server(uvicorn.Server):
    """uvicorn's server, with signals handled on the loop so that shutdown can end jobs first."""

    def __init__(self, config: uvicorn.Config, on_first_signal: Callable[[int], None]) -> None:
        super().__init__(config)
        self._on_first_signal = on_first_signal

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        sigs = (signal.SIGINT, signal.SIGTERM)
        for sig in sigs:
            loop.add_signal_handler(sig, self._signal, sig)
        try:
            yield
        finally:
            for sig in sigs:
                loop.remove_signal_handler(sig)

    def _signal(self, sig: int) -> None:
        if self.should_exit:
            self.force_exit = True
            return
        self._on_first_signal(sig)
        self.should_exit = True


async def start_serving(
    app: FastAPI, sock: socket.socket, on_first_signal: Callable[[int], None]
) -> tuple[_Server, asyncio.Task[None], str | None]:
    """uvicorn serving `app` on `sock`, SIGINT/SIGTERM handed to `on_first_signal`, once it has
    started: (the server, its task, the URI it serves at, or None where it stopped first)."""
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="off",
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = _Server(config, on_first_signal)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not serving.done():
        await asyncio.sleep(0.005)
    if not server.started:
        return server, serving, None
    host, port = sock.getsockname()[:2]
    return server, serving, f"http://{host}:{port}"


async def _serve(worker: Worker, sock: socket.socket) -> int:
    settings, wid = worker.settings, worker.settings.worker_id
    exit_code = 0
    reason = "signal"

    def begin_shutdown(sig: int) -> None:
        log_event(
            logger,
            "shutdown",
            worker_id=wid,
            phase="begin",
            signal=signal.Signals(sig).name,
            jobs_running=worker.scheduler.jobs_running,
            jobs_queued=worker.scheduler.jobs_queued,
        )
        worker.shutting_down = True
        worker.scheduler.shutdown()

    server, serving, uri = await start_serving(create_app(worker), sock, begin_shutdown)
    if uri is not None:
        log_event(
            logger,
            "ready",
            worker_id=wid,
            uri=uri,
            model=worker.facts.model,
            device=worker.facts.device,
            context_length=worker.facts.context_length,
        )
        if settings.callback_url:
            body = {
                "worker_id": wid,
                "uri": uri,
                "model": worker.facts.model,
                "vram_bytes": gpu_memory_bytes(worker.facts.device),
            }
            if not await asyncio.to_thread(post_callback, settings.callback_url, body, wid):
                # Nobody knows this worker exists: holding the GPU would only waste it.
                exit_code, reason = 1, "callback_failed"
                worker.shutting_down = True
                worker.scheduler.shutdown()
                server.should_exit = True
    await serving
    worker.scheduler.shutdown()
    stopped = await asyncio.to_thread(worker.scheduler.join, GRACEFUL_SHUTDOWN_S)
    log_event(
        logger,
        "shutdown",
        worker_id=wid,
        phase="complete",
        reason=reason,
        engine_stopped=stopped,
        exit_code=exit_code,
    )
    return exit_code


def post_callback(url: str, body: dict[str, object], worker_id: str) -> bool:
    data = json.dumps(body).encode()
    for attempt in range(1, CALLBACK_ATTEMPTS + 1):
        req = urllib.request.Request(
            url, data=data, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                log_event(logger, "callback", worker_id=worker_id, url=url, status=resp.status)
                return True
        except (urllib.error.URLError, OSError) as exc:
            log_event(
                logger,
                "error",
                worker_id=worker_id,
                code="CALLBACK_FAILED",
                url=url,
                attempt=attempt,
                message=str(exc),
                level=logging.WARNING,
            )
            time.sleep(0.5 * attempt)
    return False
