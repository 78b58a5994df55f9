"""`serve --data-parallel-size N`: N replicas of the model (replicas.py), each a `serve` process
on its own GPUs (or the CPU), behind one HTTP front that loads no model itself (front_app.py).

Order: start every replica and wait for all to be ready -> bind and listen -> log `ready` -> POST
the ready callback. A replica that fails to start ends the front with one `error` line and exit
code 1 (the others are stopped). On SIGTERM or SIGINT the front stops taking requests, every replica
ends its jobs (their streams end through the front with WORKER_SHUTDOWN) and exits, and so does the
front, with 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal

from worker_orcd.server import front_status
from worker_orcd.server.front_app import REPLICA_FAILED, Front, create_front_app
from worker_orcd.server.logs import configure_json_logging, log_event
from worker_orcd.server.main import (
    GRACEFUL_SHUTDOWN_S,
    bind_or_log,
    post_callback,
    start_serving,
)
from worker_orcd.server.options import ServerSettings
from worker_orcd.server.replica_plan import plan_replicas
from worker_orcd.server.replicas import ReplicaSet, ReplicaStartError

logger = logging.getLogger(__name__)


def serve_front(args: argparse.Namespace) -> int:
    if args.log_format == "json":
        configure_json_logging(args.log_level)
    wid = args.worker_id or "-"
    try:
        settings = ServerSettings.from_args(args)
        wid = settings.worker_id
        plans = plan_replicas(args, settings)
    except ValueError as exc:
        log_event(
            logger,
            "error",
            worker_id=wid,
            code="INVALID_ARGUMENT",
            message=str(exc),
            level=logging.ERROR,
        )
        return 2
    if not os.path.isfile(settings.model_path):
        log_event(
            logger,
            "error",
            worker_id=wid,
            code="MODEL_LOAD_FAILED",
            path=settings.model_path,
            message=f"no such file: {settings.model_path}",
            level=logging.ERROR,
        )
        return 1
    log_event(
        logger,
        "startup",
        worker_id=wid,
        model=settings.model_path,
        data_parallel_size=len(plans),
        tensor_parallel_size=settings.tensor_parallel_size,
        devices=",".join(p.device for p in plans),
        host=settings.host,
        port=settings.port,
        pid=os.getpid(),
    )
    return asyncio.run(_run(settings, ReplicaSet(plans, worker_id=wid)))


async def _run(settings: ServerSettings, replicas: ReplicaSet) -> int:
    wid = settings.worker_id
    failed = await _start(replicas, wid)
    if failed is not None:
        return failed
    sock = bind_or_log(settings)
    if sock is None:
        await replicas.stop()
        return 1
    front = Front(settings, replicas)
    exit_code, reason = 0, "signal"

    def begin_shutdown(sig: int) -> None:
        log_event(logger, "shutdown", worker_id=wid, phase="begin", signal=signal.Signals(sig).name)
        front.shutting_down = True
        replicas.begin_stop()  # each replica ends its jobs: their streams end through us

    server, serving, uri = await start_serving(create_front_app(front), sock, begin_shutdown)
    if uri is not None:
        facts = await front_status.health(
            replicas, worker_id=wid, started=front.started, shutting_down=False
        )
        log_event(
            logger,
            "ready",
            worker_id=wid,
            uri=uri,
            model=facts.get("model"),
            device=facts["device"],
            context_length=facts.get("context_length"),
            data_parallel_size=len(replicas.replicas),
        )
        if settings.callback_url:
            body = {
                "worker_id": wid,
                "uri": uri,
                "model": facts.get("model"),
                "vram_bytes": facts["vram_bytes_used"],
            }
            if not await asyncio.to_thread(post_callback, settings.callback_url, body, wid):
                exit_code, reason = 1, "callback_failed"
                front.shutting_down = True
                replicas.begin_stop()
                server.should_exit = True
    await serving
    stopped = await replicas.stop(GRACEFUL_SHUTDOWN_S + 5)
    log_event(
        logger,
        "shutdown",
        worker_id=wid,
        phase="complete",
        reason=reason,
        replicas_stopped=stopped,
        exit_code=exit_code,
    )
    return exit_code


async def _start(replicas: ReplicaSet, wid: str) -> int | None:
    """Start the replicas: None once all are ready, else the exit code (1: one failed, which is
    logged; 0: a signal came first and they are stopped)."""
    loop = asyncio.get_running_loop()
    signalled = asyncio.Event()
    sigs = (signal.SIGINT, signal.SIGTERM)
    for sig in sigs:
        loop.add_signal_handler(sig, signalled.set)
    starting = asyncio.ensure_future(replicas.start())
    waiting = asyncio.ensure_future(signalled.wait())
    try:
        await asyncio.wait({starting, waiting}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiting.cancel()
        for sig in sigs:
            loop.remove_signal_handler(sig)
    if not starting.done():
        starting.cancel()
        stopped = await replicas.stop()
        log_event(
            logger,
            "shutdown",
            worker_id=wid,
            phase="complete",
            reason="signal",
            replicas_stopped=stopped,
            exit_code=0,
        )
        return 0
    exc = starting.exception()
    if exc is not None:
        code = REPLICA_FAILED if isinstance(exc, ReplicaStartError) else "INTERNAL"
        log_event(logger, "error", worker_id=wid, code=code, message=str(exc), level=logging.ERROR)
        return 1
    return None
