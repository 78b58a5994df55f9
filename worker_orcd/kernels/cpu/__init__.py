"""Quantized weights on the CPU: GGUF blocks read where the file's memory map has them, by a small
compiled extension (csrc/, built by `pip install -e .`).

`ops` holds the matmul over GGUF blocks (`linear`) and its torch reference twin, `weights` the
containers the linear and embedding layers hold on the CPU.
"""

from __future__ import annotations

from worker_orcd.kernels.cpu.ops import SUPPORTED, available, isas, linear, linear_reference

__all__ = ["SUPPORTED", "available", "isas", "linear", "linear_reference"]
