"""The few-row kernels (a batch of decode tokens: `gemv_rows`) against their torch references:
the product (after the SwiGLU or norm kernel, as the layers call it), and the qkv projection
with RoPE and the KV-cache write in its epilogue. Real Qwen2.5 / Phi-3 shapes on the GPU (marker
`gpu`); small and odd shapes on CPU under Triton's interpreter (TRITON_INTERPRET=1), skipped
otherwise."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import CUDA, GPU, INTERPRETED, rel_err
from worker_orcd.kernels import (
    add_rms_norm_linear_ref,
    norm_qkv_rope_store_ref,
)
from worker_orcd.kernels.activation import silu_and_mul_linear_ref
from worker_orcd.kernels.rope import rope_cos_sin_cache

BF16 = torch.bfloat16
TOL = 1e-2  # bf16 operands, float32 sums: the unfused path's tolerance (test_triton.py)


def assert_summed(s: torch.Tensor, s_ref: torch.Tensor, device: str) -> None:
    """x + residual: bit for bit on the GPU; the interpreter's bfloat16 conversion truncates
    instead of rounding to nearest, so there within one bf16 step."""
    if device == "cuda":
        assert torch.equal(s, s_ref)
    else:
        assert rel_err(s, s_ref) < TOL


def _gemv(device: str):  # imported late: needs Triton
    from worker_orcd.kernels.triton import gemv, gemv_rows

    return gemv, gemv_rows


# (n, k) per device: real decode shapes on the GPU, small odd ones interpreted
LINEAR_SHAPES = {
    "cuda": [
        (9216, 3072),
        (3072, 8192),
        (16384, 3072),
        (1152, 896),
        (9728, 896),
        (896, 4864),
        (1001, 777),
    ],  # fmt: skip
    "cpu": [(37, 300), (64, 96)],
}
ROWS = {"cuda": [2, 7, 16, 33, 64], "cpu": [2, 5, 33, 64]}


def rows_for(device: str) -> list[int]:
    """Row counts to test: those the kernels take (2..MAX_ROWS)."""
    from worker_orcd.kernels.triton import gemv_rows

    return [r for r in ROWS[device] if r <= gemv_rows.MAX_ROWS]


@pytest.mark.parametrize("device", [GPU, INTERPRETED])
def test_linear_rows(device: str) -> None:
    """x [rows, K] @ W^T (+ b) for 2..16 rows: every column against the float64 product, nothing
    written past N, and `linear` routes these row counts to the kernel. Also with K split over 2
    and 3 programs per column tile, summed by the last to finish: the same product (the bias
    added once), the same bits on a second run, and the arrival counters back at zero for the
    next launch (a replayed graph relies on it)."""
    from worker_orcd.kernels.triton import arrivals

    gemv, gemv_rows = _gemv(device)
    g = torch.Generator(device=device).manual_seed(0)
    for n, k in LINEAR_SHAPES[device]:
        for rows in rows_for(device):
            x = torch.randn(rows, k, device=device, dtype=BF16, generator=g)
            w = (torch.randn(n, k, device=device, generator=g) * 0.05).to(BF16)
            b = torch.randn(n, device=device, generator=g).to(BF16)
            block_n, block_k, warps, stages, _ = gemv_rows.pick_config(n, k, rows)
            block_k = min(block_k, 64 if device == "cpu" else block_k)
            split_configs = [(block_n, block_k, warps, stages, s) for s in (2, 3)]
            for cfg in (None, *split_configs):
                for bias in (None, b):
                    ref = torch.nn.functional.linear(
                        x.double(), w.double(), None if bias is None else bias.double()
                    )
                    out = torch.full((rows, n + 3), float("nan"), device=device, dtype=BF16)
                    gemv_rows.launch(x, w, bias, config=cfg, out=out[:, :n])
                    assert rel_err(out[:, :n], ref) < TOL, (n, k, rows, cfg)
                    assert torch.isnan(out[:, n:]).all()
                    again = gemv_rows.launch(x, w, bias, config=cfg)
                    assert torch.equal(again, out[:, :n]), (n, k, rows, cfg)
                tiles = -(-n // block_n)
                assert not arrivals.counters(x.device, tiles)[:tiles].any()
            assert gemv_rows.fits(rows, n, k)
            assert rel_err(gemv.linear(x.view(rows, 1, k), w, b).view(rows, n), ref) < TOL


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_rows_as_accurate_as_cublas() -> None:
    """Against the float64 product, the few-row kernel's error is no larger than cuBLAS's on the
    same bf16 operands (both sum in float32; only the order differs)."""
    _, gemv_rows = _gemv("cuda")
    g = torch.Generator(device="cuda").manual_seed(4)
    for n, k in [(3072, 8192), (16384, 3072), (896, 4864)]:
        x = torch.randn(8, k, device="cuda", generator=g).to(BF16)
        w = (torch.randn(n, k, device="cuda", generator=g) * 0.05).to(BF16)
        ref = x.double() @ w.double().T
        ours = rel_err(gemv_rows.launch(x, w), ref)
        theirs = rel_err(torch.nn.functional.linear(x, w), ref)
        assert ours <= 1.1 * theirs, (n, k, ours, theirs)


@pytest.mark.parametrize("device", [GPU, INTERPRETED])
def test_silu_and_mul_linear_rows(device: str) -> None:
    gemv, _ = _gemv(device)
    g = torch.Generator(device=device).manual_seed(1)
    shapes = [(3072, 8192), (896, 4864), (100, 1001)] if device == "cuda" else [(40, 72)]
    for n, inter in shapes:
        for rows in rows_for(device):
            gate_up = (torch.randn(rows, 2 * inter, device=device, generator=g) * 3).to(BF16)
            w = (torch.randn(n, inter, device=device, generator=g) * 0.05).to(BF16)
            ref = silu_and_mul_linear_ref(gate_up.float(), w.float())
            assert rel_err(gemv.silu_and_mul_linear(gate_up, w), ref) < TOL, (n, inter, rows)


def _norm_proj_inputs(
    rows: int, k: int, n: int, residual: bool, device: str, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor, torch.Tensor]:
    """x, residual (or None), norm weight, weight [n, k] and bias of a norm + projection."""
    x = (torch.randn(rows, k, device=device, generator=g) * 3).to(BF16)
    r = torch.randn(rows, k, device=device, generator=g).to(BF16) if residual else None
    nw = (1 + 0.1 * torch.randn(k, device=device, generator=g)).to(BF16)
    w = (torch.randn(n, k, device=device, generator=g) * 0.05).to(BF16)
    b = torch.randn(n, device=device, generator=g).to(BF16)
    return x, r, nw, w, b


@pytest.mark.parametrize("device", [GPU, INTERPRETED])
@pytest.mark.parametrize("residual", [False, True])
def test_add_rms_norm_linear_rows(device: str, residual: bool) -> None:
    """The norm kernel, then the product: x + residual exactly, the product within the bf16
    tolerance, at short (Qwen) and long (Phi-3) rows."""
    gemv, _ = _gemv(device)
    g = torch.Generator(device=device).manual_seed(2)
    shapes = (
        [(9728, 896), (1152, 896), (16384, 3072), (300, 1000)] if device == "cuda" else [(48, 200)]
    )
    for n, k in shapes:
        for rows in rows_for(device):
            x, r, nw, w, b = _norm_proj_inputs(rows, k, n, residual, device, g)
            y, s = gemv.add_rms_norm_linear(x, r, nw, 1e-6, w, b)
            y_ref, s_ref = add_rms_norm_linear_ref(x, r, nw, 1e-6, w, b)
            assert_summed(s, s_ref, device)
            assert rel_err(y, y_ref) < TOL, (n, k, rows)


QKV_SHAPES = {  # (heads, kv heads, head dim, hidden)
    "cuda": [(14, 2, 64, 896), (32, 32, 96, 3072), (5, 1, 80, 1000)],
    "cpu": [(2, 1, 32, 64), (3, 1, 96, 40)],
}


@pytest.mark.parametrize("device", [GPU, INTERPRETED])
@pytest.mark.parametrize("residual", [False, True])
def test_norm_qkv_rope_store_rows(device: str, residual: bool) -> None:
    """Norm + qkv projection + RoPE + KV write for a batch of decode rows against the torch
    reference: rotated q, the cache rows written, nothing else touched, and no write for padding
    rows (slot -1)."""
    gemv, _ = _gemv(device)
    g = torch.Generator(device=device).manual_seed(3)
    cos_sin_cache: dict[int, torch.Tensor] = {}
    for h, hk, d, k in QKV_SHAPES[device]:
        n = (h + 2 * hk) * d
        cos_sin = cos_sin_cache.setdefault(d, rope_cos_sin_cache(d, 4096, 1e6, device=device))
        for rows in rows_for(device):
            x, r, nw, w, b = _norm_proj_inputs(rows, k, n, residual, device, g)
            positions = torch.randint(0, 4096, (rows,), device=device, generator=g)
            n_slots = 2 * rows + 8  # a cache with rows to spare
            ref_slots = torch.randperm(n_slots, device=device, generator=g)[:rows]
            slots = ref_slots.clone()
            slots[-1] = -1  # the last row is padding (the reference writes it where it was)
            caches = [
                torch.randn(n_slots, hk, d, device=device, generator=g).to(BF16) for _ in range(2)
            ]
            ours, ref = [c.clone() for c in caches], [c.clone() for c in caches]
            q, s = gemv.norm_qkv_rope_store(x, r, nw, 1e-6, w, b, positions, cos_sin, *ours, slots)
            q_ref, s_ref = norm_qkv_rope_store_ref(
                x, r, nw, 1e-6, w, b, positions, cos_sin, *ref, ref_slots
            )
            assert_summed(s, s_ref, device)
            assert rel_err(q, q_ref) < TOL, (h, hk, d, k, rows)
            written = slots[:-1]
            others = torch.ones(n_slots, dtype=torch.bool, device=device)
            others[written] = False
            for c, c_ref, c0 in zip(ours, ref, caches, strict=True):
                assert rel_err(c[written], c_ref[written]) < TOL
                assert torch.equal(c[others], c0[others])
