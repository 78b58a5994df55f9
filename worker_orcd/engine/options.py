"""Command-line options that choose how a model is loaded, shared by `generate`, `serve` and
`bench`.

Kept free of torch so that building the CLI's parser stays cheap.
"""

from __future__ import annotations

import argparse
from typing import Any

DTYPE_CHOICES = ("float32", "bfloat16", "float16")
WEIGHT_CHOICES = ("quantized", "dequantized")
# Multicast over NVLink (NCCL's NVLS, torch's symmetric memory) stays off wherever ranks start: not
# every host grants the multicast objects it needs, and a communicator that asks for them can fail.
# Here, free of torch, so that the data-parallel front can put it in its replicas' environment.
MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def positive_int(text: str) -> int:
    """argparse type of a count: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (got {value})")
    return value


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """--dtype, --weights, the batching / KV-cache budget and --tensor-parallel-size, passed to
    Engine.load."""
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES)
    p.add_argument(
        "--weights",
        default=None,
        choices=WEIGHT_CHOICES,
        help="keep GGUF quantized blocks on the device or expand them to --dtype "
        "(default: quantized on cuda, dequantized on cpu)",
    )
    add_batch_arguments(p)
    add_parallel_arguments(p)


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-num-seqs",
        type=int,
        default=64,
        help="sequences decoded together in one batch (default 64)",
    )
    p.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="tokens (prompt chunks and decode tokens) per forward pass "
        "(default min(4096, context))",
    )
    p.add_argument(
        "--kv-cache-tokens",
        type=int,
        default=None,
        help="slots of the shared KV cache (default: from --gpu-memory-utilization on cuda, one "
        "full-length sequence on cpu)",
    )
    p.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.9,
        help="share of the GPU's memory that weights, KV cache and work may use (default 0.9)",
    )


def batch_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Engine.load keyword arguments of add_batch_arguments' options."""
    return {
        "max_num_seqs": args.max_num_seqs,
        "max_batch_tokens": args.max_batch_tokens,
        "kv_cache_tokens": args.kv_cache_tokens,
        "gpu_memory_utilization": args.gpu_memory_utilization,
    }


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    """--tensor-parallel-size: Engine.load's tensor_parallel_size."""
    p.add_argument(
        "--tensor-parallel-size",
        type=positive_int,
        default=1,
        metavar="N",
        help="split the model over N ranks: N GPUs from the chosen one on cuda, N processes on "
        "cpu; heads, KV heads and the FFN must divide by N (default: 1)",
    )
