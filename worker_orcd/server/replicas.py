"""The replicas behind a data-parallel front: their processes, their state, which one is next.

A replica is a child `worker-orcd serve` (replica_plan.py) that logs JSON lines on stderr. The front
learns its address from its `ready` line, relays its other lines into its own log with `replica=i`,
and restarts it whenever it exits (at once after it had served; with a growing delay after a start
that failed) until the front stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import signal
import subprocess
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx

from worker_orcd.server.logs import log_event
from worker_orcd.server.replica_plan import ReplicaPlan

logger = logging.getLogger(__name__)

RESTART_DELAY_S = 1.0  # after a start that failed; doubled on each further failure
RESTART_DELAY_MAX_S = 30.0
# A replica's lifecycle lines are the front's own events under another name.
_RENAMED = {"ready": "replica_ready", "startup": "replica_startup", "shutdown": "replica_shutdown"}


class ReplicaStartError(Exception):
    """A replica exited before it was ready while the front was starting."""


class ReplicaState(str, enum.Enum):
    STARTING = "starting"
    UP = "up"
    DOWN = "down"


@dataclass(slots=True, eq=False)
class Replica:
    plan: ReplicaPlan
    state: ReplicaState = ReplicaState.DOWN
    url: str | None = None
    client: httpx.AsyncClient | None = None  # while up
    proc: subprocess.Popen[bytes] | None = None
    in_flight: int = 0  # requests the front has sent it that have not ended
    served: dict[str, int] = field(default_factory=dict)  # endpoint -> requests sent
    restarts: int = 0
    last_error: str | None = None  # the message of its last `error` line
    launch: int = 0  # which of its processes the state describes

    @property
    def index(self) -> int:
        return self.plan.index

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


class ReplicaSet:
    """The replicas, which of them is up, and which of them runs each live job."""

    def __init__(self, plans: Iterable[ReplicaPlan], *, worker_id: str) -> None:
        self.replicas = [Replica(p) for p in plans]
        self.owners: dict[str, Replica] = {}  # job id -> the replica running it
        self.worker_id = worker_id
        self._next = 0  # where the round-robin among equally busy replicas goes on
        self._stopping = False
        self._stopped = asyncio.Event()
        self._serving = False  # all came up once: from here on an exit means a restart
        self._settled: asyncio.Future[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def up(self) -> list[Replica]:
        return [r for r in self.replicas if r.state is ReplicaState.UP]

    def pick(self, exclude: Iterable[Replica] = ()) -> Replica | None:
        """The up replica with the fewest requests in flight; ties go round-robin."""
        skip = set(exclude)
        n = len(self.replicas)
        candidates = [r for r in self.up() if r not in skip]
        if not candidates:
            return None
        chosen = min(candidates, key=lambda r: (r.in_flight, (r.index - self._next) % n))
        self._next = (chosen.index + 1) % n
        return chosen

    async def start(self) -> None:
        """Start every replica and wait until all are ready; ReplicaStartError when one exits
        first (the others are then stopped)."""
        self._settled = asyncio.get_running_loop().create_future()
        self._tasks = [asyncio.create_task(self._supervise(r)) for r in self.replicas]
        try:
            await self._settled
        except ReplicaStartError:
            await self.stop()
            raise
        self._serving = True

    def begin_stop(self) -> None:
        """No more restarts; SIGTERM to every replica (each ends its jobs and exits). Once: a
        second SIGTERM would cut a replica's own shutdown short."""
        if self._stopping:
            return
        self._stopping = True
        self._stopped.set()
        for r in self.replicas:
            if r.proc is not None and r.proc.poll() is None:
                r.proc.send_signal(signal.SIGTERM)

    async def stop(self, timeout: float = 30.0) -> bool:
        """Stop every replica; those still running after `timeout` are killed. True when all
        exited by themselves."""
        self.begin_stop()
        if not self._tasks:
            return True
        _, pending = await asyncio.wait(self._tasks, timeout=timeout)
        for r in self.replicas:
            if pending and r.proc is not None and r.proc.poll() is None:
                r.proc.kill()
        if pending:
            await asyncio.wait(pending)
        return not pending

    async def _supervise(self, r: Replica) -> None:
        failures = 0
        while not self._stopping:
            served = await self._run_once(r)
            if self._stopping:
                return
            if not self._serving:
                why = f": {r.last_error}" if r.last_error else ""
                self._settle(
                    ReplicaStartError(
                        f"replica {r.index} ({r.plan.device}) exited with code "
                        f"{r.proc.returncode if r.proc else None} before it was ready{why}"
                    )
                )
                return
            failures = 0 if served else failures + 1
            delay = RESTART_DELAY_S * 2 ** (failures - 1) if failures else 0.0
            delay = min(RESTART_DELAY_MAX_S, delay)
            r.restarts += 1
            log_event(
                logger, "replica_restart", worker_id=self.worker_id, replica=r.index, delay_s=delay
            )
            if delay:  # or until the front stops
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopped.wait(), delay)

    async def _run_once(self, r: Replica) -> bool:
        """Run one process of replica `r` until it exits; True when it was up before."""
        loop = asyncio.get_running_loop()
        r.launch += 1
        r.state, r.url, r.last_error = ReplicaState.STARTING, None, None
        r.proc = proc = subprocess.Popen(
            r.plan.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=r.plan.env,
            start_new_session=True,  # Ctrl-C reaches the front, which stops the replicas
        )
        exited: asyncio.Future[int] = loop.create_future()
        threading.Thread(
            target=self._relay, args=(r, proc, r.launch, loop), daemon=True, name="replica-log"
        ).start()
        threading.Thread(
            target=_wait_exit, args=(proc, exited, loop), daemon=True, name="replica-wait"
        ).start()
        log_event(
            logger,
            "replica_start",
            worker_id=self.worker_id,
            replica=r.index,
            device=r.plan.device,
            pid=proc.pid,
        )
        code = await exited
        was_up = r.state is ReplicaState.UP
        r.state = ReplicaState.DOWN
        client, r.client = r.client, None
        if client is not None:
            await client.aclose()
        log_event(
            logger,
            "replica_exit",
            worker_id=self.worker_id,
            replica=r.index,
            pid=proc.pid,
            exit_code=code,
            level=logging.INFO if self._stopping else logging.WARNING,
        )
        return was_up

    def _ready(self, r: Replica, launch: int, url: str) -> None:
        if launch != r.launch or r.state is not ReplicaState.STARTING or self._stopping:
            return
        r.url, r.state = url, ReplicaState.UP
        r.client = httpx.AsyncClient(
            base_url=url,
            timeout=httpx.Timeout(10.0, read=None),  # a stream's tokens may be far apart
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )
        if all(x.state is ReplicaState.UP for x in self.replicas):
            self._settle(None)

    def _settle(self, error: ReplicaStartError | None) -> None:
        if self._settled is None or self._settled.done():
            return
        if error is None:
            self._settled.set_result(None)
        else:
            self._settled.set_exception(error)

    def _relay(
        self,
        r: Replica,
        proc: subprocess.Popen[bytes],
        launch: int,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        """Thread: read the replica's log lines, pass its address on, relay the rest."""
        assert proc.stderr is not None
        for raw in proc.stderr:
            text = raw.decode("utf-8", errors="replace").rstrip()
            if not text:
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError:
                rec = None
            if not isinstance(rec, dict):  # not one of its log records (a follower rank's line)
                logger.info("replica %d: %s", r.index, text)
                continue
            event = rec.get("event")
            if event == "ready" and isinstance(rec.get("uri"), str):
                _call_soon(loop, self._ready, r, launch, rec["uri"])
            if event == "error" and isinstance(rec.get("message"), str):
                r.last_error = rec["message"]
            _relay_record(r.index, rec)


def _relay_record(index: int, rec: dict[str, Any]) -> None:
    level = logging.getLevelName(str(rec.pop("level", "INFO")))
    level = level if isinstance(level, int) else logging.INFO
    for key in ("ts", "logger"):
        rec.pop(key, None)
    event = rec.pop("event", None)
    if event is None:
        logger.log(level, "replica %d: %s", index, rec.get("message", rec))
        return
    worker_id = str(rec.pop("worker_id", "-"))
    job_id = rec.pop("job_id", None)
    log_event(
        logger,
        _RENAMED.get(event, event),
        worker_id=worker_id,
        job_id=job_id,
        level=level,
        replica=index,
        **rec,
    )


def _wait_exit(
    proc: subprocess.Popen[bytes], exited: asyncio.Future[int], loop: asyncio.AbstractEventLoop
) -> None:
    """Thread: wait for the process itself (its pipes may stay open in its own children)."""
    code = proc.wait()
    _call_soon(loop, lambda: exited.done() or exited.set_result(code))


def _call_soon(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: the front is gone
        pass
