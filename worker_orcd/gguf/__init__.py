"""GGUF file access: validated memory-mapped reading and torch dequantization."""

from __future__ import annotations

from worker_orcd.gguf.dequant import DEQUANTIZERS, dequantize
from worker_orcd.gguf.reader import GGUFFile, TensorInfo

__all__ = ["DEQUANTIZERS", "GGUFFile", "TensorInfo", "dequantize"]
