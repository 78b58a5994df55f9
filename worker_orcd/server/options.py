"""Arguments of `worker-orcd serve` and the resolved settings the server runs with."""

from __future__ import annotations

import argparse
import os
import socket
from dataclasses import dataclass
from typing import Any

from worker_orcd.engine.options import add_load_arguments, batch_kwargs, positive_int

PROMPT_MAX_CHARS = 32768
MAX_STOP_STRINGS = 4


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number in [0, 65535] (got {value})")
    return value


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="GGUF file to serve")
    p.add_argument("--port", type=_port, required=True, help="TCP port; 0 picks a free one")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--worker-id", default=None, help="name in logs and the ready callback")
    p.add_argument("--gpu-device", type=int, default=0, help="CUDA device index")
    p.add_argument(
        "--device",
        default=None,
        choices=["cpu", "cuda"],
        help="default: cuda when available, else cpu",
    )
    add_load_arguments(p)
    p.add_argument(
        "--callback-url",
        default=None,
        help="POST {worker_id, uri, vram_bytes, model} here once ready",
    )
    p.add_argument(
        "--max-tokens-in",
        type=positive_int,
        default=None,
        help="largest prompt in tokens (default: the context length)",
    )
    p.add_argument("--max-tokens-out", type=positive_int, default=2048)
    p.add_argument(
        "--inference-timeout-sec",
        type=float,
        default=300.0,
        help="a job not done this long after its submission is cancelled (INFERENCE_TIMEOUT)",
    )
    p.add_argument("--max-context", type=positive_int, default=None)
    p.add_argument(
        "--max-queue",
        type=int,
        default=16,
        help="jobs that may wait beyond the running batch (--max-num-seqs); beyond that "
        "requests get 503 (default 16)",
    )
    p.add_argument("--log-format", default="text", choices=["text", "json"])
    p.add_argument(
        "--data-parallel-size",
        type=positive_int,
        default=1,
        metavar="N",
        help="N independent copies of the model (each on its own GPUs, or on the cpu) behind "
        "one HTTP front that sends each request to the least busy (default: 1)",
    )


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """What the HTTP layer and the scheduler need to know, resolved from the arguments."""

    worker_id: str
    model_path: str
    host: str
    port: int
    device: str
    dtype: str | None
    weights: str | None  # "quantized" | "dequantized"; None: the engine's default for the device
    callback_url: str | None
    max_tokens_in: int | None
    max_tokens_out: int
    inference_timeout_s: float
    max_context: int | None
    max_queue: int
    # The engine's batch and KV-cache budget (engine/options.py), passed to Engine.load.
    max_num_seqs: int
    max_batch_tokens: int | None
    kv_cache_tokens: int | None
    gpu_memory_utilization: float
    tensor_parallel_size: int = 1  # ranks the model is split over (GPUs from `device` on)
    data_parallel_size: int = 1  # replicas behind one front (server/front.py)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ServerSettings:
        if args.max_queue < 0:
            raise ValueError(f"--max-queue must be >= 0 (got {args.max_queue})")
        if not args.inference_timeout_sec > 0:
            raise ValueError(
                f"--inference-timeout-sec must be > 0 (got {args.inference_timeout_sec})"
            )
        batch = batch_kwargs(args)
        for name in ("max_num_seqs", "max_batch_tokens", "kv_cache_tokens"):
            if batch[name] is not None and batch[name] < 1:
                flag = "--" + name.replace("_", "-")
                raise ValueError(f"{flag} must be >= 1 (got {batch[name]})")
        if not 0.0 < batch["gpu_memory_utilization"] <= 1.0:
            raise ValueError(
                "--gpu-memory-utilization must be in (0, 1] "
                f"(got {batch['gpu_memory_utilization']})"
            )
        return cls(
            worker_id=args.worker_id or f"worker-{socket.gethostname()}-{os.getpid()}",
            model_path=args.model,
            host=args.host,
            port=args.port,
            device=resolve_device(args.device, args.gpu_device),
            dtype=args.dtype,
            weights=args.weights,
            callback_url=args.callback_url,
            max_tokens_in=args.max_tokens_in,
            max_tokens_out=args.max_tokens_out,
            inference_timeout_s=float(args.inference_timeout_sec),
            max_context=args.max_context,
            max_queue=args.max_queue,
            **batch,
            tensor_parallel_size=args.tensor_parallel_size,
            data_parallel_size=args.data_parallel_size,
        )

    def batch_kwargs(self) -> dict[str, Any]:
        """Engine.load keyword arguments of the batch and KV-cache budget."""
        return {
            "max_num_seqs": self.max_num_seqs,
            "max_batch_tokens": self.max_batch_tokens,
            "kv_cache_tokens": self.kv_cache_tokens,
            "gpu_memory_utilization": self.gpu_memory_utilization,
        }


def resolve_device(device: str | None, gpu_device: int) -> str:
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return f"cuda:{gpu_device}" if device == "cuda" else device
