"""The next weight of a decode step asked into L2 by the projection before it ("ahead"): host side.

A decode step alternates projections, each a few microseconds of reading a weight at 50-90% of
the copy bandwidth, with small kernels (norm, RoPE, attention, SwiGLU) that move almost no bytes;
memory idles through those and through each projection's ramp and tail. With this on, the
programs of a projection kernel also issue `prefetch.global.L2` for their share of the weight
that the step's next projection reads (one 128-byte line per thread and instruction, no register
written), so those bytes stream in while the small kernels run and the next projection's loads
hit L2. The kernels that do it: the int8 GEMVs of quantized weights (`gemv_i8`, one to three
rows), and for bf16 weights the GEMV and the few-row kernels (`triton.gemv`, `triton.gemv_rows`,
1 to 16 rows); the small-batch quantized kernels and cuBLAS do not.

Nothing writes a weight, so the prefetches may go before the PDL wait (`START`: under the previous
kernel's tail, competing with this kernel's own first loads) or after the program's store (`END`:
programs that finish early fill the launch's tail). `WORKER_ORCD_L2_AHEAD` picks one, `start` or
`end`, optionally with a cap in MB on the bytes asked for per weight (`end:16`; default 24), and
is off when unset or 0: a measurement has yet to decide. `CausalLM.finish_loading` links the
weights in the order a step reads them (`link`; each gets `l2_ahead`); the prefetch changes no
result.
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
        logger.info(
            "next weights asked into L2 by each projection (%s, up to %d MB)", mode_s, cap >> 20
        )
    return mode, cap


@dataclass(frozen=True, slots=True)
class Ahead:
    """Up to two byte regions (flat uint8 views of weight planes) and their lengths in lines:
    what one projection launch asks L2 for. An unused region has 0 lines."""

    a: torch.Tensor
    a_lines: int
    b: torch.Tensor
    b_lines: int

    @classmethod
    def of(cls, planes: list[torch.Tensor], cap: int) -> Ahead | None:
        """The two largest of `planes`, each cut to its share of `cap` bytes (their start: the
        first rows, which the next projection's first programs read)."""
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


def launch_args(ahead: Ahead | None, device: torch.device) -> dict:
    """Kernel keywords: the regions and AHEAD (the mode) where `ahead` applies on `device`; none
    otherwise, so that the kernel's defaults (AHEAD off) make the launch it was before."""
    mode, _ = setting()
    if ahead is None or mode == OFF or device.type != "cuda":
        return {}
    return dict(
        ah_a=ahead.a, ah_a_lines=ahead.a_lines, ah_b=ahead.b, ah_b_lines=ahead.b_lines, AHEAD=mode
    )


def int8_args(ahead: Ahead | None, device: torch.device) -> dict:
    """`launch_args` for the int8 GEMVs, with EVICT: under `ahead` their quant loads are marked
    evict-first (as the bf16 kernels' weight loads always are), so that a large weight streaming
    through L2 does not push out the next one's lines before they are read. `end:0` (no lines)
    measures that alone."""
    args = launch_args(ahead, device)
    return {**args, "EVICT": "evict_first"} if args else {}


def planes(w: object) -> list[torch.Tensor]:
    """The tensors of a weight: a quantized weight's planes, or a dense weight itself."""
    planes = getattr(w, "planes", None)
    return list(planes.values()) if planes is not None else [w]


def link(weights: list[object]) -> int:
    """Give each weight of `weights` (a step's projection weights in the order it reads them:
    quantized weights with `.planes`, or dense weight tensors) an `l2_ahead` with the regions of
    the next one, the last the first's (the next step starts over). Returns the number linked;
    off: none."""
    mode, cap = setting()
    if mode == OFF or len(weights) < 2:
        return 0
    for w, nxt in zip(weights, weights[1:] + weights[:1], strict=True):
        w.l2_ahead = Ahead.of(planes(nxt), cap)
    return len(weights)


def of(weight: object) -> Ahead | None:
    """The regions `link` gave `weight` (None if none)."""
    return getattr(weight, "l2_ahead", None)
