"""Where each replica of a data-parallel front runs, and its command line and environment.

Replica i of N with a tensor-parallel size T runs on GPUs first + i*T .. first + i*T + T - 1, or on
the CPU with its share of the cores. It is `worker-orcd serve` with the front's options, less those
that only the front has, on 127.0.0.1 at a port of its own choosing, with JSON logs; NVLink
multicast is off in its environment as wherever ranks start.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from worker_orcd.engine.options import MULTICAST_OFF
from worker_orcd.server.child import FRONT_PID_ENV
from worker_orcd.server.options import ServerSettings, add_serve_arguments

# The front's own options: every other `serve` option is passed on to each replica as given.
FRONT_ONLY = frozenset(
    (
        "host",
        "port",
        "worker_id",
        "callback_url",
        "device",
        "gpu_device",
        "log_format",
        "data_parallel_size",
    )
)


@dataclass(frozen=True, slots=True)
class ReplicaPlan:
    index: int
    device: str  # "cpu", or rank 0's GPU "cuda:K" (its other ranks on K+1 ..)
    argv: tuple[str, ...]
    env: dict[str, str]


def replica_devices(settings: ServerSettings) -> list[str]:
    """Each replica's device; ValueError when the GPUs asked for do not exist."""
    n, tp = settings.data_parallel_size, settings.tensor_parallel_size
    if not settings.device.startswith("cuda"):
        return [settings.device] * n
    import torch

    if not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but CUDA is not available")
    first = torch.device(settings.device).index or 0
    need, have = n * tp, torch.cuda.device_count()
    if first + need > have:
        raise ValueError(
            f"--data-parallel-size {n} x --tensor-parallel-size {tp} from cuda:{first} needs "
            f"{need} CUDA devices (cuda:{first} .. cuda:{first + need - 1}); {have} are visible"
        )
    return [f"cuda:{first + i * tp}" for i in range(n)]


def plan_replicas(args: argparse.Namespace, settings: ServerSettings) -> list[ReplicaPlan]:
    devices = replica_devices(settings)
    env = {**os.environ, **MULTICAST_OFF, "PYTHONUNBUFFERED": "1", FRONT_PID_ENV: str(os.getpid())}
    if settings.device == "cpu" and "OMP_NUM_THREADS" not in env:
        env["OMP_NUM_THREADS"] = str(max(1, _cores() // len(devices)))
    return [
        ReplicaPlan(
            index=i,
            device=device,
            argv=tuple(replica_argv(args, f"{settings.worker_id}-r{i}", device)),
            env=env,
        )
        for i, device in enumerate(devices)
    ]


def replica_argv(args: argparse.Namespace, worker_id: str, device: str) -> list[str]:
    """The command line of one replica: the front's `serve` options but its own."""
    argv = [sys.executable, "-m", "worker_orcd.server.child", "--log-level", args.log_level]
    argv += ["serve", "--host", "127.0.0.1", "--port", "0", "--log-format", "json"]
    argv += ["--worker-id", worker_id]
    if device.startswith("cuda"):
        argv += ["--device", "cuda", "--gpu-device", device.partition(":")[2] or "0"]
    else:
        argv += ["--device", device]
    for dest in sorted(_serve_dests() - FRONT_ONLY):
        value = getattr(args, dest)
        flag = "--" + dest.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    return argv


def _serve_dests() -> set[str]:
    parser = argparse.ArgumentParser(add_help=False)
    add_serve_arguments(parser)
    return set(vars(parser.parse_args(["--model", "-", "--port", "0"])))


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
