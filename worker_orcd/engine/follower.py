"""A follower rank of a tensor-parallel model: its process from spawn to exit, and what every rank
runs for a pass.

A follower joins the ranks' groups, builds its part of the model (a picklable BuildShard), reports
"ready" to rank 0 over its pipe, then runs every message rank 0 broadcasts on the gloo group: a
pass's inputs, or a callable to run on every rank, until rank 0 sends None. Any error ends it, after
a report ("error", kind, text, traceback, exception) to rank 0; so does rank 0's end (the gloo
connection closes under the wait).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import multiprocessing.connection as mpc
import os
import pickle
import signal
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from worker_orcd.engine.kv_cache import KVCache
from worker_orcd.engine.model_runner import ModelRunner
from worker_orcd.engine.options import MULTICAST_OFF
from worker_orcd.errors import InsufficientVramError
from worker_orcd.kernels import AttentionMetadata
from worker_orcd.model import CausalLM
from worker_orcd.parallel import Parallel

logger = logging.getLogger(__name__)

# The longest the ranks wait for each other to join, and for one collective of a pass.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
# Followers wait for rank 0's next pass as long as the engine stays idle.
IDLE_TIMEOUT = datetime.timedelta(days=365)

# What every rank builds: its model part and KV cache, given its place and device.
BuildShard = Callable[[Parallel, torch.device], tuple[CausalLM, KVCache]]
Inputs = tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int] | None]


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


def moved(obj: Any, device: torch.device | str) -> Any:
    """obj with every tensor in it (in lists, tuples and dataclass fields) moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(moved(x, device) for x in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: moved(getattr(obj, f.name), device) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **fields)
    return obj


def join_group(rank: int, size: int, device: torch.device, port: int) -> None:
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


def follow(
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
        join_group(rank, size, device, port)
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
                run_pass(model, *moved(payload, device))
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
