"""Shared cases of the quantized-kernel tests: shapes, random planes, the relative error, markers.

GPU tests (marker `gpu`) run real Qwen2.5 / Phi-3 shapes and odd ones. With TRITON_INTERPRET=1 the
same checks run on CPU at small shapes (Triton's interpreter); otherwise those are skipped.
"""

from __future__ import annotations

import os

import pytest
import torch

from worker_orcd.kernels.quant import HAS_TRITON, random_blocks, to_planes
from worker_orcd.kernels.quant.formats import Q, block_format

CUDA = torch.cuda.is_available() and HAS_TRITON
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and HAS_TRITON
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA and Triton")
needs_interpreter = pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 and Triton")

# [out, in]: Qwen2.5-0.5B, Phi-3-mini, and odd ones
REAL = [
    (896, 896), (4864, 896), (896, 4864), (151936, 896), (1024, 896), (1152, 896), (128, 896),
    (3072, 3072), (9216, 3072), (16384, 3072), (3072, 8192), (32064, 3072),
]  # fmt: skip
ODD = [(1, 256), (37, 768), (1000, 1280), (333, 2304)]


def shapes_for(qtype: Q, shapes: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The shapes whose rows are whole blocks of `qtype`."""
    bs = block_format(qtype).block_size
    return [(n, k) for n, k in shapes if k % bs == 0]


def random_planes(qtype: Q, n: int, k: int, device: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    return to_planes(random_blocks(qtype, n, k, device=device, generator=g), qtype, n, k)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref.double()).norm() / ref.double().norm())
