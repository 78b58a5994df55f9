"""The L2 prefetch of the next projection's weight (`ahead`), inside the projection kernels: see
`worker_orcd.kernels.quant.ahead` for what it is for, how it is turned on and how the weights
are linked."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _share(ptr, n_lines, THREADS: tl.constexpr):
    """This program's contiguous share of n_lines lines from ptr (bytes), a line per thread and
    instruction; the last share is short (its excess threads repeat its last line)."""
    programs = tl.num_programs(0) * tl.num_programs(1)
    p = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
    per = tl.cdiv(n_lines, programs)
    lo = p * per
    hi = tl.minimum(lo + per, n_lines)
    for i in range(lo, hi, THREADS):
        line = tl.minimum(i + tl.arange(0, THREADS), hi - 1).to(tl.int64)
        tl.inline_asm_elementwise(
            "mov.u32 $0, 0;\n\tprefetch.global.L2 [$1];", "=r,l", [ptr + line * 128],
            dtype=tl.int32, is_pure=False, pack=1,
        )  # fmt: skip


@triton.jit
def ahead(ah_a, ah_a_lines, ah_b, ah_b_lines, AHEAD: tl.constexpr, HERE: tl.constexpr):
    """Ask L2 for this program's share of both regions where AHEAD (the launch's mode) is HERE:
    1 (`ahead.START`) at the call before the PDL wait, 2 (`ahead.END`) at the one after the
    store."""
    if AHEAD == HERE:
        _share(ah_a, ah_a_lines, 128)
        _share(ah_b, ah_b_lines, 128)
