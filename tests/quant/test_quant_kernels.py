"""Triton quantized GEMV and dequantize kernels against dequantize-then-matmul in float32.

GPU tests (marker `gpu`) run real Qwen2.5 / Phi-3 shapes and odd ones (conftest). With
TRITON_INTERPRET=1 the same checks run on CPU at small shapes (Triton's interpreter).

The int8-activation GEMV (the default) is checked against the float32 product with
`int8_x_reference(x)` (x rounded to int8 per 32-element block exactly as the kernel rounds it) at
the float kernels' tolerances, and that rounding's own error against the product with x itself
(~5e-3 relative for Gaussian x) is bounded by 1e-2 where the output has at least 100 elements.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from tests.quant.conftest import (
    ODD,
    REAL,
    gpu,
    needs_cuda,
    needs_interpreter,
    random_planes,
    rel_err,
    shapes_for,
)
from worker_orcd.kernels.quant import (
    SUPPORTED,
    dequantize_planes,
    dequantize_reference,
    quant_gemv,
)
from worker_orcd.kernels.quant.formats import Q, block_format
from worker_orcd.kernels.quant.ops import (
    GemvConfig,
    NormIn,
    RoundedX,
    gemv_config,
    int8_x_reference,
    quant_matmul,
    quant_matmul_fused_q4_k,
    quantize_x,
    round_x_reference,
)
from worker_orcd.kernels.quant.weights import PackedWeight, QuantizedWeight


def check_gemv(
    qtype: Q, n: int, k: int, m: int, dtype: torch.dtype, device: str, config: GemvConfig | None
) -> None:
    planes = random_planes(qtype, n, k, device, seed=n * 7 + k)
    gen = torch.Generator(device=device).manual_seed(n * 131 + k * 7 + m)  # reproducible
    x = torch.randn(m, k, device=device, dtype=torch.float32, generator=gen).to(dtype)
    w = dequantize_reference(planes, qtype, n, k)  # float32, gguf-exact
    ref = x.double() @ w.double().T
    int8_x = (config or gemv_config(qtype, n, k)).int8_x
    # poison around a column slice of a wider output to catch unwritten or stray elements
    out = torch.full((m, n + 5), float("nan"), device=device, dtype=dtype)
    quant_gemv(x, planes, qtype, n, k, out=out[:, 2 : 2 + n], config=config)
    y = out[:, 2 : 2 + n]
    assert not y.isnan().any(), "unwritten output"
    assert out[:, :2].isnan().all() and out[:, 2 + n :].isnan().all(), "write outside the slice"
    # float32 accumulation; the only other rounding is the output's dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}[dtype]
    where = f"{qtype.name} [{n}, {k}] m={m} {config}"
    if int8_x:
        # the exact product with x rounded as the kernel rounds it, and that rounding's own error,
        # on enough outputs to be a stable measure (~5e-3 for Gaussian x)
        ref_i8 = int8_x_reference(x).double() @ w.double().T
        assert rel_err(y, ref_i8) < tol, f"{where}: rel err {rel_err(y, ref_i8):.2e} (int8 x)"
        if n * m >= 100:
            assert rel_err(ref_i8, ref) < 1e-2, f"{where}: int8 x off by {rel_err(ref_i8, ref):.2e}"
        return
    assert rel_err(y, ref) < tol, f"{where}: rel err {rel_err(y, ref):.2e}"


def check_prequant(qtype: Q, n: int, k: int, m: int, device: str, cfg: GemvConfig) -> None:
    """x rounded once (`quantize_x`, then the GEMV reading its words) against x rounded inside
    every program: the same rounding and the same sums, so the same bits; and the rounded x
    itself against `int8_x_reference`."""
    planes = random_planes(qtype, n, k, device, seed=n + 3 * k)
    gen = torch.Generator(device=device).manual_seed(k + m)
    x = (torch.randn(m, k, device=device, generator=gen) * 3).to(torch.bfloat16)
    words, dx, sums = quantize_x(x)
    ref = round_x_reference(x)
    assert torch.equal(words, ref.words) and torch.equal(dx, ref.dx) and torch.equal(sums, ref.sums)
    xq = words.view(torch.int8).reshape(m, k).float()  # little-endian: byte i = element 4t + i
    assert xq.abs().max() <= 127
    diff = (xq.reshape(m, -1, 32) * dx[..., None] - int8_x_reference(x).reshape(m, -1, 32)).abs()
    steps = diff / dx[..., None]
    assert diff.max() == 0, f"x rounded unlike int8_x_reference: {steps.max():.2f} steps"
    torch.testing.assert_close(sums, xq.reshape(m, -1, 16).sum(-1), rtol=0, atol=0)
    inkernel = quant_gemv(x, planes, qtype, n, k, config=replace(cfg, prequant=False))
    once = quant_gemv(x, planes, qtype, n, k, config=replace(cfg, prequant=True))
    assert torch.equal(once, inkernel), f"{qtype.name} [{n}, {k}] {cfg}: x rounded once differs"


def check_producers(device: str, dims: list[int], rows: int) -> None:
    """RMSNorm and SwiGLU kernels that also round their output for a quantized GEMV write what
    rounding their bf16 output afterwards gives (`round_x_reference`, itself equal to
    `quantize_x`), bit for bit, and the same output as without rounding."""
    from worker_orcd.kernels.triton import activation, norm

    def same(a: RoundedX, b: RoundedX) -> bool:
        return all(torch.equal(u, v) for u, v in zip(a, b, strict=True))

    g = torch.Generator(device=device).manual_seed(sum(dims) + rows)
    for d in dims:
        x, r = (torch.randn(rows, d, device=device, generator=g).to(torch.bfloat16) for _ in "xr")
        w = torch.randn(d, device=device, generator=g).to(torch.bfloat16)
        rounded = RoundedX.empty(rows, d, x.device)
        y, summed = norm.add_rms_norm(x, r, w, 1e-5, rounded)
        y0, summed0 = norm.add_rms_norm(x, r, w, 1e-5)
        assert torch.equal(y, y0) and torch.equal(summed, summed0)
        assert same(rounded, round_x_reference(y)), f"RMSNorm [{rows}, {d}]: rounding differs"
        gate_up = torch.randn(rows, 2 * d, device=device, generator=g).to(torch.bfloat16) * 3
        rounded = RoundedX.empty(rows, d, x.device)
        act = activation.silu_and_mul(gate_up, rounded)
        assert torch.equal(act, activation.silu_and_mul(gate_up))
        assert same(rounded, round_x_reference(act)), f"SwiGLU [{rows}, {d}]: rounding differs"


def check_norm_in(qtype: Q, n: int, k: int, m: int, device: str, cfg: GemvConfig | None) -> None:
    """A GEMV that normalizes its own input (`NormIn`) gives the bits of the add_rms_norm kernel
    followed by the same GEMV, with and without a residual, and writes the same x + residual."""
    from worker_orcd.kernels.triton import norm

    planes = random_planes(qtype, n, k, device, seed=7 * n + k)
    g = torch.Generator(device=device).manual_seed(n + m)
    x, r = ((torch.randn(m, k, device=device, generator=g) * 2).to(torch.bfloat16) for _ in "xr")
    w = torch.randn(k, device=device, generator=g).to(torch.bfloat16)
    for residual in (r, None):
        normed, summed_ref = norm.add_rms_norm(x, residual, w, 1e-6)
        want = quant_gemv(normed, planes, qtype, n, k, config=cfg)
        summed = None if residual is None else torch.full_like(x, float("nan"))
        got = quant_gemv(x, planes, qtype, n, k, config=cfg, norm=NormIn(residual, w, 1e-6, summed))
        assert torch.equal(got, want), f"{qtype.name} [{n}, {k}] {cfg}: normalized input differs"
        if summed is not None:
            assert torch.equal(summed, summed_ref)


def check_packed_norm_in(device: str, k: int) -> None:
    """A packed weight of two types whose GEMVs both normalize x (as Qwen's q/k and v parts):
    `norm_matmul` equals the norm kernel, then `matmul`, bias included; x + residual once."""
    from worker_orcd.kernels.triton import norm

    parts = [(Q.Q5_0, 40), (Q.Q8_0, 24)]
    packed = PackedWeight.pack(
        [QuantizedWeight(q, n, k, random_planes(q, n, k, device, seed=n)) for q, n in parts]
    )
    dev = torch.device(device)
    assert packed.fuses_norm(1, dev) and not packed.fuses_norm(64, dev)
    g = torch.Generator(device=device).manual_seed(k)
    x, r = (torch.randn(1, k, device=device, generator=g).to(torch.bfloat16) for _ in "xr")
    w = torch.randn(k, device=device, generator=g).to(torch.bfloat16)
    bias = torch.randn(packed.n, device=device, generator=g).to(torch.bfloat16)
    normed, summed_ref = norm.add_rms_norm(x, r, w, 1e-6)
    y, summed = packed.norm_matmul(x, r, w, 1e-6, bias)
    assert torch.equal(y, packed.matmul(normed, bias)) and torch.equal(summed, summed_ref)


def check_dequant(qtype: Q, n: int, k: int, device: str) -> None:
    planes = random_planes(qtype, n, k, device, seed=n + k)
    ref = dequantize_reference(planes, qtype, n, k)
    got = dequantize_planes(planes, qtype, n, k, dtype=torch.float32)
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-7)
    ids = torch.randint(0, n, (11,), device=device)
    rows = dequantize_planes(planes, qtype, n, k, ids=ids, dtype=torch.bfloat16)
    # one bf16 rounding (Triton's interpreter truncates instead of rounding to nearest)
    torch.testing.assert_close(rows.float(), ref[ids], rtol=2**-7, atol=0)


# -- GPU ------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_gemv_real_and_odd_shapes(qtype: Q) -> None:
    for n, k in shapes_for(qtype, REAL + ODD):
        check_gemv(qtype, n, k, 1, torch.bfloat16, "cuda", None)
    for n, k in shapes_for(qtype, ODD):
        check_gemv(qtype, n, k, 3, torch.float32, "cuda", None)
        check_gemv(qtype, n, k, 2, torch.float16, "cuda", GemvConfig(2, 1, 2))
    # split K (partials + sum), the float kernels and their 1 + q / 2**bits reading
    for n, k in shapes_for(qtype, [(896, 4864), (3072, 8192), (3072, 3072)] + ODD):
        for cfg in (GemvConfig(4, 2, 4, split_k=4), GemvConfig(32, 1, 8, split_k=3),
                    GemvConfig(8, 4, 4, split_k=2, stages=3),
                    GemvConfig(8, 4, 4, split_k=2, prequant=True),
                    GemvConfig(16, 2, 4, prequant=True),
                    GemvConfig(8, 4, 4, split_k=2, early=True),
                    GemvConfig(16, 2, 4, prequant=True, early=True),
                    GemvConfig(4, 2, 4, split_k=4, int8_x=False),
                    GemvConfig(8, 4, 4, split_k=3, one_plus=True, int8_x=False),
                    GemvConfig(2, 8, 8, one_plus=True, int8_x=False)):  # fmt: skip
            check_gemv(qtype, n, k, 1, torch.bfloat16, "cuda", cfg)
        check_gemv(qtype, n, k, 3, torch.float32, "cuda", GemvConfig(4, 1, 4, 2, True, False))
        check_gemv(qtype, n, k, 3, torch.float32, "cuda", GemvConfig(16, 2, 4, 2))
        check_gemv(qtype, n, k, 3, torch.float32, "cuda", GemvConfig(8, 2, 4, 2, prequant=True))


@gpu
@needs_cuda
@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_x_rounded_once_is_bit_equal(qtype: Q) -> None:
    for n, k in shapes_for(qtype, [(896, 4864), (9216, 3072), (3072, 8192), (151936, 896)] + ODD):
        for m, cfg in [(1, gemv_config(qtype, n, k)), (3, GemvConfig(8, 2, 4, split_k=3))]:
            check_prequant(qtype, n, k, m, "cuda", replace(cfg, int8_x=True))


@gpu
@needs_cuda
def test_producers_round_x_like_quantize_x() -> None:
    check_producers("cuda", [896, 3072, 8192, 4864, 96], rows=3)
    # through the layers' plumbing: a packed weight that reads x rounded once, fed by the norm
    from worker_orcd.kernels.triton import norm

    q = Q.Q4_K
    n, k = 4096, 3072
    packed = PackedWeight.pack([QuantizedWeight(q, n, k, random_planes(q, n, k, "cuda", seed=1))])
    assert packed.takes_rounded_x(1, torch.device("cuda"))
    assert not packed.takes_rounded_x(64, torch.device("cuda"))  # prefill: dequantize + cuBLAS
    x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
    w = torch.randn(k, device="cuda").to(torch.bfloat16)
    rounded = RoundedX.empty(1, k, x.device)
    normed, _ = norm.add_rms_norm(x, None, w, 1e-5, rounded)
    assert torch.equal(packed.matmul(normed, None, rounded), packed.matmul(normed))


@gpu
@needs_cuda
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q5_0, Q.Q8_0], ids=lambda t: t.name)
def test_gemv_normalizes_its_input(qtype: Q) -> None:
    for n, k in [(1024, 896), (128, 896), (896, 896), (4864 * 2, 896), (37, 768)]:
        for m in (1, 3):
            check_norm_in(qtype, n, k, m, "cuda", None)
    check_norm_in(qtype, 37, 768, 2, "cuda", GemvConfig(8, 2, 4, split_k=3))
    if qtype == Q.Q5_0:
        check_packed_norm_in("cuda", 896)


@gpu
@needs_cuda
@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_dequant_and_embedding_rows(qtype: Q) -> None:
    for n, k in shapes_for(qtype, [(896, 896), (3072, 3072), (151936, 896)] + ODD):
        check_dequant(qtype, n, k, "cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("m", [9, 512])
def test_quant_matmul_prefill_paths(m: int) -> None:
    n, k = 1000, 3072
    planes = random_planes(Q.Q4_K, n, k, "cuda", seed=5)
    x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
    ref = x.double() @ dequantize_reference(planes, Q.Q4_K, n, k).double().T
    assert rel_err(quant_matmul(x, planes, Q.Q4_K, n, k), ref) < 8e-3
    assert rel_err(quant_matmul_fused_q4_k(x, planes, n, k), ref) < 8e-3


# -- CPU, Triton interpreter ---------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_interpreted_kernels(qtype: Q) -> None:
    bs = block_format(qtype).block_size
    for n, k, m, cfg in [
        (5, 3 * bs, 1, None),
        (12, 6 * bs, 2, GemvConfig(4, 2, 4)),  # an even count of f16 scales: read as words
        (37, 5 * bs, 2, GemvConfig(8, 2, 4)),
        (37, 7 * bs, 2, GemvConfig(8, 1, 4, split_k=3)),
        (11, 9 * bs, 1, GemvConfig(16, 4, 4, split_k=2)),
        (37, 7 * bs, 2, GemvConfig(8, 2, 4, split_k=3, prequant=True)),
        (11, 9 * bs, 3, GemvConfig(4, 4, 4, prequant=True)),
        (11, 12 * bs, 3, GemvConfig(2, 16, 4, prequant=True)),  # a step past the row's end
        (7, 19 * bs, 2, GemvConfig(2, 32, 4, prequant=True)),  # ... at Qwen's K = 4864 (K-quants)
        (37, 7 * bs, 2, GemvConfig(8, 1, 4, split_k=3, early=True)),  # first step before the wait
        (11, 12 * bs, 3, GemvConfig(2, 16, 4, prequant=True, early=True)),
        (37, 5 * bs, 2, GemvConfig(8, 2, 4, int8_x=False)),
        (37, 7 * bs, 2, GemvConfig(8, 1, 4, split_k=3, int8_x=False)),
        (11, 9 * bs, 3, GemvConfig(4, 2, 4, split_k=2, one_plus=True, int8_x=False)),
        (6, 4 * bs, 1, GemvConfig(2, 4, 4, one_plus=True, int8_x=False)),
    ]:
        check_gemv(qtype, n, k, m, torch.float32, "cpu", cfg)
    check_prequant(qtype, 37, 7 * bs, 2, "cpu", GemvConfig(8, 2, 4, split_k=3))
    check_dequant(qtype, 13, 2 * bs, "cpu")


@needs_interpreter
def test_interpreted_producers_round_x() -> None:
    check_producers("cpu", [96, 320], rows=2)


@needs_interpreter
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q5_0, Q.Q8_0], ids=lambda t: t.name)
def test_interpreted_gemv_normalizes_its_input(qtype: Q) -> None:
    check_norm_in(qtype, 5, 96, 1, "cpu", None)
    check_norm_in(qtype, 37, 224, 2, "cpu", GemvConfig(8, 2, 4, split_k=3))
