"""Rank 0's side of a tensor-parallel model: the follower processes (follower.py), their report
pipes, and the group over which every pass's inputs go out.

Failures: a follower's error (at load, or in a pass) comes back over its pipe and is raised on rank
0; once a pass failed the ranks are stopped (a rank still inside the pass would wait for the others
forever) and every later pass raises the same error. On CUDA, where a collective with a dead peer
would wait forever, a thread aborts the NCCL group when a follower exits.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import logging
import multiprocessing.connection as mpc
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from worker_orcd.engine.follower import (
    IDLE_TIMEOUT,
    MULTICAST_OFF,
    BuildShard,
    Inputs,
    follow,
    join_group,
    moved,
    run_pass,
)
from worker_orcd.errors import ModelLoadError, WorkerError
from worker_orcd.model import CausalLM
from worker_orcd.parallel import Parallel

logger = logging.getLogger(__name__)

# After a failed pass: how long rank 0 waits for a follower's report of what went wrong.
REPORT_WAIT_S = 2.0
# How long close() waits for a pass that another thread is running before it stops the ranks hard.
CLOSE_WAIT_S = 10.0


class TensorParallelError(WorkerError):
    """A pass over the ranks failed (a rank's error, or a rank that went away); the ranks are
    stopped and the engine cannot run more passes."""


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the r-th CUDA device after rank 0's, or the CPU."""
    if device.type != "cuda":
        return device
    first = device.index if device.index is not None else torch.cuda.current_device()
    return torch.device("cuda", first + rank)


@contextlib.contextmanager
def closing_on_error(group: RankGroup | None) -> Iterator[None]:
    """Stop the followers if the block raises (rank 0's own load failed)."""
    try:
        yield
    except BaseException:
        if group is not None:
            group.close()
        raise


class RankGroup:
    """Rank 0's side of the ranks of one model: the follower processes, their report pipes and
    the gloo group that carries each pass's inputs."""

    def __init__(
        self,
        size: int,
        device: torch.device,
        procs: list[mp.Process],
        conns: list[mpc.Connection],
    ) -> None:
        self.parallel = Parallel(0, size)
        self.device = device
        self.procs = procs  # rank r is procs[r - 1]
        self.conns = conns
        self.ctrl: dist.ProcessGroup | None = None
        self._closed = False
        self._broken: TensorParallelError | None = None
        self._lock = threading.RLock()  # one pass (or the stop) on the ranks at a time

    @classmethod
    def start(cls, build: BuildShard, size: int, device: torch.device) -> RankGroup:
        if device.type == "cuda" and rank_device(device, size - 1).index >= (
            n := torch.cuda.device_count()
        ):
            raise ModelLoadError(
                f"tensor_parallel_size {size} from {rank_device(device, 0)} needs "
                f"{size} CUDA devices; {n} are visible"
            )
        if dist.is_initialized():
            raise ModelLoadError(
                "this process already has a torch.distributed group (another tensor-parallel "
                "engine?): one tensor-parallel engine per process; close the other first"
            )
        os.environ.update(MULTICAST_OFF)  # the followers inherit it
        port = _free_port()
        threads = max(1, torch.get_num_threads() // size) if device.type == "cpu" else None
        level = logging.getLogger("worker_orcd").getEffectiveLevel()
        ctx = mp.get_context("spawn")
        procs, conns = [], []
        for rank in range(1, size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(
                target=follow,
                args=(rank, size, str(rank_device(device, rank)), port, build, theirs),
                kwargs={"threads": threads, "log_level": level},
                name=f"worker-orcd-rank{rank}",
                daemon=True,
            )
            proc.start()
            theirs.close()
            procs.append(proc)
            conns.append(ours)
        group = cls(size, device, procs, conns)
        with closing_on_error(group):
            group._await("started")
            join_group(0, size, rank_device(device, 0), port)
            group.ctrl = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        if device.type == "cuda":
            threading.Thread(target=group._watch, name="tp-watch", daemon=True).start()
        atexit.register(group.close)  # a clean stop before multiprocessing terminates them
        logger.info(
            "tensor parallel: %d ranks on %s (%s), followers %s",
            size,
            device,
            dist.get_backend(),
            [p.pid for p in procs],
        )
        return group

    def wait_ready(self) -> None:
        """Wait until every follower has loaded its part; raise the first one's error."""
        with closing_on_error(self):
            self._await("ready")

    def run(self, model: CausalLM, inputs: Inputs) -> torch.Tensor:
        """Send a pass's inputs to the followers, run it here, return its logits."""
        return self._everywhere(("pass", moved(inputs, "cpu")), lambda: run_pass(model, *inputs))

    def call(self, fn: Callable[[Parallel, torch.device], Any]) -> Any:
        """Run `fn(parallel, device)` on every rank (a picklable callable, e.g. timing of the
        collectives) and return rank 0's result."""
        return self._everywhere(
            ("call", fn), lambda: fn(self.parallel, rank_device(self.device, 0))
        )

    def _everywhere(self, message: tuple[str, Any], here: Callable[[], Any]) -> Any:
        with self._lock:
            if self._broken is not None:
                raise self._broken
            if self._closed:
                raise TensorParallelError("the tensor-parallel ranks were closed")
            try:
                dist.broadcast_object_list([message], src=0, group=self.ctrl)
                return here()
            except Exception as e:
                raise self._fail(e) from e

    def close(self) -> None:
        """Stop the followers: a clean stop when they wait for a pass, else terminated (a pass
        that another thread runs gets a TensorParallelError)."""
        idle = self._lock.acquire(timeout=CLOSE_WAIT_S)
        try:
            if self._closed:
                return
            self._closed = True
            healthy = idle and self._broken is None and self.ctrl is not None
            if healthy and all(p.is_alive() for p in self.procs):
                with contextlib.suppress(RuntimeError):
                    dist.broadcast_object_list([None], src=0, group=self.ctrl)
            for p in self.procs:
                p.join(timeout=30 if healthy else 0)
                if p.is_alive():
                    p.terminate()
                    p.join()
            for c in self.conns:
                c.close()
            if idle and dist.is_initialized():  # else the running pass still holds the group
                if not healthy and self.device.type == "cuda":
                    _abort_nccl()
                if dist.is_initialized():
                    dist.destroy_process_group()
            logger.info(
                "tensor parallel: ranks stopped (exit codes %s)", [p.exitcode for p in self.procs]
            )
        finally:
            if idle:
                self._lock.release()

    # -- failures ----------------------------------------------------------------------------------

    def _await(self, what: str) -> None:
        """Until every follower reports `what`; a follower's error, or its exit, raises."""
        pending = set(range(1, self.parallel.size))
        while pending:
            waits = [self.conns[r - 1] for r in pending] + [
                self.procs[r - 1].sentinel for r in pending
            ]
            mpc.wait(waits)
            for rank in sorted(pending):
                msg = self._message(rank)
                if msg is not None and msg[0] == what:
                    pending.discard(rank)
                elif msg is not None and msg[0] == "error":
                    raise _follower_error(rank, msg, loading=True)
                elif msg is None and not self.procs[rank - 1].is_alive():
                    raise ModelLoadError(
                        f"tensor-parallel rank {rank} exited with code "
                        f"{self.procs[rank - 1].exitcode} before it was {what}"
                    )

    def _message(self, rank: int) -> tuple[Any, ...] | None:
        conn = self.conns[rank - 1]
        try:
            return conn.recv() if conn.poll() else None
        except (EOFError, OSError):
            return None

    def _fail(self, exc: Exception) -> TensorParallelError:
        """The error of a failed pass: a follower's report if one comes, else rank 0's own; the
        ranks are stopped (a rank still inside the pass would wait for the others forever)."""
        if self._broken is None:
            mpc.wait(self.conns + [p.sentinel for p in self.procs], timeout=REPORT_WAIT_S)
            for rank in range(1, self.parallel.size):
                msg = self._message(rank)
                if msg is not None and msg[0] == "error":
                    self._broken = _follower_error(rank, msg, loading=False)
                    break
            else:
                self._broken = TensorParallelError(
                    f"tensor-parallel pass failed on rank 0: {type(exc).__name__}: {exc}"
                )
            self.close()
        return self._broken

    def _watch(self) -> None:
        """On CUDA: abort the NCCL group once a follower exits, so that a collective waiting for
        it returns with an error instead of never."""
        mpc.wait([p.sentinel for p in self.procs])
        if not self._closed:
            logger.error("tensor parallel: a follower exited; aborting the NCCL group")
            _abort_nccl()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _abort_nccl() -> None:
    """Abort the NCCL group, so that collectives waiting on it return with an error."""
    abort = getattr(dist.distributed_c10d, "_abort_process_group", None)  # torch 2.5 on
    if abort is not None:
        abort()


def _follower_error(rank: int, msg: tuple[Any, ...], *, loading: bool) -> WorkerError:
    """Rank 0's error for a follower's report ("error", kind, text, traceback, exception)."""
    _, kind, text, trace, exc = msg
    logger.error("tensor-parallel rank %d failed:\n%s", rank, trace)
    if isinstance(exc, WorkerError):
        err = copy.copy(exc)  # its type and error code, the rank named
        err.args = (f"tensor-parallel rank {rank}: {text}",)
        return err
    what = "failed to load its part of the model" if loading else "failed in a forward pass"
    cls = ModelLoadError if loading else TensorParallelError
    return cls(f"tensor-parallel rank {rank} {what}: {kind}: {text}")
