"""Programmatic dependent launch (Hopper and later): the next kernel of a decode step starts while
the previous one drains.

A batch-1 decode step is a chain of a few hundred short kernels, each waiting for the one before.
Without help, every boundary costs the previous kernel's tail, then the launch and ramp-up of the
next (a few microseconds, as much as a small layer's whole weight read). Launched with the
programmatic-serialization attribute, a kernel may be scheduled before its predecessor finishes;
it must then wait (`griddepcontrol.wait`) before it touches memory the predecessor writes or reads.
Our kernels do that wait first thing, and at once allow their own successor to launch, so each
boundary shrinks to the drain of one kernel. The wait blocks until the predecessor has completed
and its writes are visible, so the ordering of a plain stream is kept, transitively, across the
chain; a kernel launched without the attribute (torch's own) waits for everything as usual.

Every Triton kernel that can run on the decode path takes `PDL: tl.constexpr`, calls
`pdl.prologue(PDL)` before any global memory access, and is launched with `**pdl.launch(t, tokens)`,
which turns both on together where the device supports it. `WORKER_ORCD_PDL=0` turns it off
(for before/after measurements).
"""

from __future__ import annotations

import functools
import logging
import os

import torch
import triton
import triton.language as tl

logger = logging.getLogger(__name__)


@triton.jit
def prologue(PDL: tl.constexpr):
    """Wait for the previous kernel in the stream to complete, then let the next one launch."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@functools.cache
def _supported(index: int) -> bool:
    if os.environ.get("WORKER_ORCD_PDL", "1") == "0" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    major, _ = torch.cuda.get_device_capability(index)
    return major >= 9


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` are launched as programmatic dependents."""
    if device.type != "cuda":
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


# Tokens per launch up to which kernels are launched as dependents: decode steps, where the
# boundaries are a large share of the time. Prompt passes gain nothing measurable from it.
MAX_TOKENS = 16


@functools.cache
def _triton_has_pdl() -> bool:
    """Whether this Triton knows programmatic launch (`launch_pdl`, `gdc_wait`: Triton 3.4 on)."""
    try:
        from triton.language.extra import cuda
    except ImportError:
        return False
    return hasattr(cuda, "gdc_wait")


def launch(t: torch.Tensor, tokens: int = 1) -> dict[str, bool]:
    """Launch keywords for a kernel over `tokens` token rows whose tensors live where `t` does: the
    kernel's PDL flag and the launch attribute, on or off together (no attribute at all where
    Triton predates it)."""
    if not _triton_has_pdl():
        return {"PDL": False}
    on = tokens <= MAX_TOKENS and enabled(t.device)
    return {"PDL": on, "launch_pdl": on}
