"""Quantized weights on the GPU: GGUF blocks kept in their format, fused dequantize-matmul kernels.

`formats` splits GGUF blocks into planes (same bytes), `ops` holds the kernels' entry points and
their torch reference twins, `weights` the containers that linear and embedding layers hold.
"""

from __future__ import annotations

from worker_orcd.kernels.quant.formats import SUPPORTED, from_planes, random_blocks, to_planes
from worker_orcd.kernels.quant.ops import (
    HAS_TRITON,
    dequantize_planes,
    dequantize_reference,
    quant_gemv,
    quant_matmul,
    quant_matmul_reference,
)

__all__ = [
    "HAS_TRITON",
    "SUPPORTED",
    "dequantize_planes",
    "dequantize_reference",
    "from_planes",
    "quant_gemv",
    "quant_matmul",
    "quant_matmul_reference",
    "random_blocks",
    "to_planes",
]
