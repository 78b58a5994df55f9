"""Command-line options that choose how a model is loaded, shared by `generate`, `serve` and
`bench`.

Kept free of torch so that building the CLI's parser stays cheap.
"""

from __future__ import annotations

import argparse

DTYPE_CHOICES = ("float32", "bfloat16", "float16")
WEIGHT_CHOICES = ("quantized", "dequantized")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1 (got {value})")
    return value


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """--dtype, --weights and --tensor-parallel-size, passed to Engine.load."""
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES)
    p.add_argument(
        "--weights",
        default=None,
        choices=WEIGHT_CHOICES,
        help="keep GGUF quantized blocks on the device or expand them to --dtype "
        "(default: quantized on cuda, dequantized on cpu)",
    )
    add_parallel_arguments(p)


def add_parallel_arguments(p: argparse.ArgumentParser) -> None:
    """--tensor-parallel-size: Engine.load's tensor_parallel_size."""
    p.add_argument(
        "--tensor-parallel-size",
        type=_positive_int,
        default=1,
        metavar="N",
        help="split the model over N ranks: N GPUs from the chosen one on cuda, N processes on "
        "cpu; heads, KV heads and the FFN must divide by N (default: 1)",
    )
