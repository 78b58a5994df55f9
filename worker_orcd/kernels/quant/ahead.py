"""The next weight of a decode step asked into L2 by the GEMV before it ("ahead"): host side.

A batch-1 decode step on quantized weights alternates GEMVs, each a few microseconds of reading a
weight at half the copy bandwidth or less, with small kernels (norm, RoPE, attention, SwiGLU) that
move almost no bytes. Memory is idle during the small kernels and during each GEMV's ramp and
tail. Here a GEMV's programs also issue `prefetch.global.L2` for their share of the weight that
the step's next GEMV reads (one 128-byte line per thread and instruction, no registers written),
so those bytes stream in while the small kernels run, and the next GEMV's loads hit L2.

Nothing writes a weight, so the prefetches may go before the PDL wait (`START`: under the previous
kernel's tail, competing with this GEMV's own first loads) or after the program's store (`END`:
programs that finish early fill the launch's tail). `WORKER_ORCD_L2_AHEAD` picks one, `start` or
`end`, optionally with a cap in MB on the bytes asked for per weight (`end:16`; default 24), and
is off when unset or 0: a measurement has yet to decide. The weights are linked in the order a
step reads them (`link`, from `CausalLM.finish_loading`); the prefetch changes no result.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

LINE = 128  # bytes per prefetch instruction: an L2 line
OFF, START, END = 0, 1, 2
_MODES = {"0": OFF, "": OFF, "off": OFF, "start": START, "end": END}
DEFAULT_CAP_MB = 24


@functools.cache
def setting() -> tuple[int, int]:
    """(mode, cap in bytes) from WORKER_ORCD_L2_AHEAD ("start", "end", "end:16"; unset: off; a
    value it cannot read: off, with a warning)."""
    raw = os.environ.get("WORKER_ORCD_L2_AHEAD", "").strip().lower()
    mode_s, _, cap_s = raw.partition(":")
    if mode_s not in _MODES or (cap_s and not cap_s.isdigit()):
        logger.warning(
            "WORKER_ORCD_L2_AHEAD=%r ignored: it takes start or end, optionally :MB (end:16)", raw
        )
        return OFF, DEFAULT_CAP_MB << 20
    mode = _MODES[mode_s]
    cap = int(cap_s or DEFAULT_CAP_MB) << 20
    if mode != OFF:
        logger.info("next weights asked into L2 by each GEMV (%s, up to %d MB)", mode_s, cap >> 20)
    return mode, cap


@dataclass(frozen=True, slots=True)
class Ahead:
    """Up to two byte regions (flat uint8 views of weight planes) and their lengths in lines:
    what one GEMV launch asks L2 for. An unused region has 0 lines."""

    a: torch.Tensor
    a_lines: int
    b: torch.Tensor
    b_lines: int

    @classmethod
    def of(cls, planes: list[torch.Tensor], cap: int) -> Ahead | None:
        """The two largest of `planes`, each cut to its share of `cap` bytes (their start: the
        first rows, which the next GEMV's first programs read)."""
        flat = sorted(
            (p.reshape(-1).view(torch.uint8) for p in planes if p.is_contiguous() and p.numel()),
            key=lambda t: -t.numel(),
        )[:2]
        if not flat:
            return None
        total = sum(t.numel() for t in flat)
        lines = [min(t.numel(), cap * t.numel() // total) // LINE for t in flat]
        if len(flat) == 1:
            flat, lines = flat * 2, lines + [0]
        return cls(flat[0], lines[0], flat[1], lines[1])

    @property
    def nbytes(self) -> int:
        return (self.a_lines + self.b_lines) * LINE

    def args(self) -> tuple[torch.Tensor, int, torch.Tensor, int]:
        return self.a, self.a_lines, self.b, self.b_lines


def launch_args(ahead: Ahead | None, like: torch.Tensor, device: torch.device) -> dict:
    """Kernel keywords: the regions and AHEAD (the mode where `ahead` applies on `device`, else
    OFF with `like` standing in for the pointers)."""
    mode, _ = setting()
    if ahead is None or mode == OFF or device.type != "cuda":
        return dict(ah_a=like, ah_a_lines=0, ah_b=like, ah_b_lines=0, AHEAD=OFF)
    return dict(
        ah_a=ahead.a, ah_a_lines=ahead.a_lines, ah_b=ahead.b, ah_b_lines=ahead.b_lines, AHEAD=mode
    )


def link(weights: list[object]) -> int:
    """Give each quantized weight of `weights` (a step's GEMV weights in the order it reads them,
    each with `.ahead` and `.planes`; None for a dense one) the regions of the next one, the last
    the first's (the next step starts over). Returns the number linked; off: none."""
    mode, cap = setting()
    quantized = [w for w in weights if w is not None]
    if mode == OFF or len(quantized) < 2:
        return 0
    for w, nxt in zip(quantized, quantized[1:] + quantized[:1], strict=True):
        w.ahead = Ahead.of(list(nxt.planes.values()), cap)
    return len(quantized)
