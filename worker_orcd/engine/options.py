"""Command-line options that choose how a model is loaded, shared by `generate` and `serve`.

Kept free of torch so that building the CLI's parser stays cheap.
"""

from __future__ import annotations

import argparse

DTYPE_CHOICES = ("float32", "bfloat16", "float16")
WEIGHT_CHOICES = ("quantized", "dequantized")


def add_load_arguments(p: argparse.ArgumentParser) -> None:
    """--dtype and --weights, passed to Engine.load."""
    p.add_argument("--dtype", default=None, choices=DTYPE_CHOICES)
    p.add_argument(
        "--weights",
        default=None,
        choices=WEIGHT_CHOICES,
        help="keep GGUF quantized blocks on the device or expand them to --dtype "
        "(default: quantized on cuda, dequantized on cpu)",
    )
