"""Tensor parallelism across processes: rank 0 is the engine, ranks 1..N-1 follow it.

    engine = Engine.load(path, device="cuda", tensor_parallel_size=2)

Engine.load starts N - 1 follower processes (torch.multiprocessing, spawn): one per GPU on CUDA
(rank r on the device r after rank 0's), one per process on CPU. The ranks join one
torch.distributed group for the model's collectives (NCCL on CUDA, gloo on CPU) and a gloo group
over which rank 0 sends the inputs of every forward pass. Each rank loads only its part of the
model from the file (loader.py with its `Parallel`). Rank 0 schedules and samples; its runner, a
TensorParallelRunner in place of the ModelRunner, builds each pass's inputs with the ModelRunner's
`prepare`, broadcasts them, and runs the pass; every follower runs the same pass on them, so the
collectives inside the model meet.

A follower exits when rank 0 closes the group, when rank 0's process ends (the gloo connection
closes under the follower's wait), and after any error of its own, which it reports to rank 0 over
a pipe first: rank 0 raises it from Engine.load, or from the pass that failed (TensorParallelError;
the group is then stopped). On CUDA, where a collective with a dead peer would wait forever, a
thread on rank 0 aborts the NCCL group when a follower exits. CUDA graphs are not captured with
more than one rank: those passes run eagerly.
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import dataclasses
import datetime
import logging
import multiprocessing.connection as mpc
import os
import pickle
import signal
import socket
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from worker_orcd.config import ModelConfig
from worker_orcd.engine.kv_cache import KVCache
from worker_orcd.engine.model_runner import ModelRunner
from worker_orcd.engine.scheduler import ScheduledBatch
from worker_orcd.errors import InsufficientVramError, ModelLoadError, WorkerError
from worker_orcd.gguf import GGUFFile
from worker_orcd.kernels import AttentionMetadata
from worker_orcd.loader import load_model
from worker_orcd.model import CausalLM, ForwardAborted
from worker_orcd.parallel import Parallel, check_divisible, rank_config

logger = logging.getLogger(__name__)

# Multicast over NVLink (NCCL's NVLS, torch's symmetric memory) stays off wherever ranks start: not
# every host grants the multicast objects it needs, and a communicator that asks for them can fail.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
# The longest the ranks wait for each other to join, and for one collective of a pass.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
# Followers wait for rank 0's next pass as long as the engine stays idle.
IDLE_TIMEOUT = datetime.timedelta(days=365)
# After a failed pass: how long rank 0 waits for a follower's report of what went wrong.
REPORT_WAIT_S = 2.0
# How long close() waits for a pass that another thread is running before it stops the ranks hard.
CLOSE_WAIT_S = 10.0

# What a follower builds: its model part and KV cache, given its place and device.
BuildShard = Callable[[Parallel, torch.device], tuple[CausalLM, KVCache]]
Inputs = tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int] | None]


class TensorParallelError(WorkerError):
    """A pass over the ranks failed (a rank's error, or a rank that went away); the ranks are
    stopped and the engine cannot run more passes."""


@dataclass(frozen=True, slots=True)
class GGUFShard:
    """A follower's part of a GGUF model and its KV cache, loaded as Engine.load loads rank 0's."""

    path: str
    dtype: torch.dtype
    context: int
    weights: str

    def __call__(self, parallel: Parallel, device: torch.device) -> tuple[CausalLM, KVCache]:
        with GGUFFile.open(self.path) as f:
            config = ModelConfig.from_gguf(f)
            model, _ = load_model(
                f,
                config,
                device=device,
                dtype=self.dtype,
                max_positions=self.context,
                weights=self.weights,
                parallel=parallel,
            )
        kv = KVCache.allocate(
            rank_config(config, parallel), self.context, dtype=self.dtype, device=device
        )
        return model, kv


def resolve_graphs(cuda_graphs: bool | None, size: int, use_graphs: bool) -> bool:
    """CUDA graphs with more than one rank: not captured (the passes run eagerly); asking for them
    is an error."""
    if size == 1:
        return use_graphs
    if cuda_graphs:
        raise ModelLoadError("cuda_graphs=True is not supported with tensor_parallel_size > 1")
    if use_graphs:
        logger.info("tensor parallel: CUDA graphs are not captured over several ranks; eager")
    return False


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: the r-th CUDA device after rank 0's, or the CPU."""
    if device.type != "cuda":
        return device
    first = device.index if device.index is not None else torch.cuda.current_device()
    return torch.device("cuda", first + rank)


def start_ranks(
    build: BuildShard, size: int, device: torch.device, config: ModelConfig, source: object
) -> RankGroup | None:
    """The follower processes of a model split over `size` ranks, joined with this process as
    rank 0 and loading their parts (wait_ready); None for one rank."""
    check_divisible(config, size, source)
    if size == 1:
        return None
    return RankGroup.start(build, size, device)


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
                target=_follow,
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
            _join(0, size, rank_device(device, 0), port)
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
        return self._everywhere(("pass", _moved(inputs, "cpu")), lambda: run_pass(model, *inputs))

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


class TensorParallelRunner:
    """Rank 0's runner of a model split over ranks, in place of its ModelRunner: the same
    `prepare` and `forward`, with every pass's inputs sent to the followers first. No graphs."""

    def __init__(self, inner: ModelRunner, group: RankGroup) -> None:
        self.inner = inner
        self.group = group
        self.model = inner.model
        self.kv = inner.kv
        self.device = inner.device
        self.block_size = inner.block_size
        self.graphs = None

    def greedy_steps(self) -> None:
        return None  # device-fed steps need the decode graph

    def prepare(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        return self.inner.prepare(batch)

    @torch.inference_mode()
    def forward(
        self,
        batch: ScheduledBatch,
        *,
        all_logits: bool = False,
        abort: Callable[[], bool] | None = None,
    ) -> torch.Tensor:
        """As ModelRunner.forward. `abort` is polled before the pass only: every rank runs whole
        passes (one that stopped between layers would leave the others inside a collective)."""
        if abort is not None and abort():
            raise ForwardAborted
        input_ids, positions, meta = self.inner.prepare(batch)
        rows = None if all_logits else _due_rows(batch, meta)
        return self.group.run(self.model, (input_ids, positions, meta, rows))

    def close(self) -> None:
        self.group.close()


@torch.inference_mode()
def run_pass(
    model: CausalLM,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    meta: AttentionMetadata,
    rows: list[int] | None,
) -> torch.Tensor:
    """One forward pass and the logits of `rows` of it (None: every token): what every rank runs."""
    hidden = model(input_ids, positions, meta)  # [T, D]
    if rows is not None and len(rows) != hidden.shape[0]:
        hidden = hidden[rows]
    return model.compute_logits(hidden)  # [N, V]


def _due_rows(batch: ScheduledBatch, meta: AttentionMetadata) -> list[int]:
    """Rows whose logits a pass returns (as ModelRunner.forward picks them): each sequence's last
    token, for the sequences that reach the end of their known tokens."""
    return [
        meta.query_start[i + 1] - 1
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.n_new, strict=True))
        if seq.n_cached + n == len(seq)
    ]


def _moved(obj: Any, device: torch.device | str) -> Any:
    """obj with every tensor in it (in lists, tuples and dataclass fields) moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_moved(x, device) for x in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: _moved(getattr(obj, f.name), device) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **fields)
    return obj


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, size: int, device: torch.device, port: int) -> None:
    """Join the model's group (NCCL on CUDA, gloo on CPU) as `rank`. NCCL's communicator is made
    at the first collective, once rank 0 watches its followers (an eager one would wait for a
    failed rank inside the join)."""
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=COLLECTIVE_TIMEOUT,
    )


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


def _follow(
    rank: int,
    size: int,
    device_name: str,
    port: int,
    build: BuildShard,
    conn: mpc.Connection,
    *,
    threads: int | None,
    log_level: int,
) -> None:
    """A follower's life: join, load its part, then run every pass rank 0 sends until it stops."""
    # Ctrl-C reaches the whole process group: rank 0 decides when its followers stop (a server
    # finishes its jobs first), so they ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(MULTICAST_OFF)
    logging.basicConfig(
        level=log_level,
        format=f"%(asctime)s %(levelname)s rank {rank} %(name)s: %(message)s",
    )
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(device_name)
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        conn.send(("started",))  # from here on rank 0 waits in the join for this rank
        _join(rank, size, device, port)
        ctrl = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)
        try:
            model, kv = build(Parallel(rank, size), device)
        except torch.OutOfMemoryError as e:
            raise InsufficientVramError(
                f"out of GPU memory loading rank {rank}'s part of the model on {device}"
            ) from e
        ModelRunner(model, kv)  # binds the KV caches into the model's attention layers
        conn.send(("ready",))
        parallel = Parallel(rank, size)
        while True:
            box: list[Any] = [None]
            dist.broadcast_object_list(box, src=0, group=ctrl)
            if box[0] is None:
                break
            kind, payload = box[0]
            if kind == "pass":
                run_pass(model, *_moved(payload, device))
            else:
                payload(parallel, device)
    except BaseException as e:  # report, then leave without running teardown that could hang
        logger.error("rank %d stops: %s: %s", rank, type(e).__name__, e)
        _report(conn, e)
        logging.shutdown()
        os._exit(1)
    dist.destroy_process_group()
    conn.close()


def _report(conn: mpc.Connection, exc: BaseException) -> None:
    """Send ("error", kind, text, traceback, the exception if it pickles) to rank 0, if it
    listens."""
    trace = "".join(traceback.format_exception(exc))
    try:
        pickle.dumps(exc)
        sent: BaseException | None = exc
    except Exception:
        sent = None
    with contextlib.suppress(OSError, ValueError):
        conn.send(("error", type(exc).__name__, str(exc), trace, sent))
