"""Shared by the kernel tests: where a case runs (`GPU`: a CUDA device, marker `gpu`;
`INTERPRETED`: CPU under Triton's interpreter, with TRITON_INTERPRET=1, skipped otherwise) and
the relative error the cases bound."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1" and HAS_TRITON
CUDA = torch.cuda.is_available() and HAS_TRITON

GPU = pytest.param(
    "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs CUDA")]
)
INTERPRETED = pytest.param(
    "cpu", marks=pytest.mark.skipif(not INTERPRET, reason="needs TRITON_INTERPRET=1 and Triton")
)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64; a NaN in out fails the test."""
    assert not torch.isnan(out).any(), "NaN in output"
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()
