"""Arrival counters: int32 words, zero between launches, that let the last program of a group to
finish do the group's final step (merge split attention, sum split-K partials) instead of a
second launch. A kernel bumps a counter with an acq_rel atomic and the program that sees the
group's last count re-arms it to zero, so a CUDA graph replays with them ready. Kernels of one
stream run one after another (launched as programmatic dependents they still wait for their
predecessor before touching memory: `pdl`), so one buffer per device serves them all.
"""

from __future__ import annotations

import torch

_COUNTERS: dict[torch.device, list[torch.Tensor]] = {}


def counters(device: torch.device, n: int) -> torch.Tensor:
    """At least n zeroed counters on `device`. Buffers only grow (a smaller one may still be
    referenced by a captured graph), so call once outside capture with the largest n first."""
    held = _COUNTERS.setdefault(device, [])
    if not held or held[-1].numel() < n:
        held.append(torch.zeros(max(n, 1024), dtype=torch.int32, device=device))
    return held[-1]
