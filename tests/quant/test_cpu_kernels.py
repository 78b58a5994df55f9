"""The CPU quantized matmul (kernels/cpu, the compiled `_qcpu` extension) against its torch twins.

int8 path: every ISA level this CPU runs (AVX-512 VNNI, AVX2, portable C) is forced in turn. The
kernels round x to int8 per 32 elements, so they are compared with two references: the product of
the exactly dequantized weight (gguf-py-exact) with `int8_x_reference(x)`, which they must match up
to float32 summation (1e-5 of sum |x| |w|), and the float32 product with x itself, which they must
match up to the rounding of x (1.5e-2 of the norm; random normal x gives ~5e-3).

bf16 path (prompts on AMX CPUs): the dequantized bfloat16 rows must be gguf-py's values rounded to
nearest even, bit for bit, and the product that of bfloat16 x and weights up to the bfloat16
rounding of the result (2^-8 relative) and float32 summation.
"""

from __future__ import annotations

import logging

import pytest
import torch
from gguf import GGMLQuantizationType as Q

from worker_orcd.kernels.cpu import ops
from worker_orcd.kernels.quant.formats import random_blocks
from worker_orcd.kernels.quant.ops import int8_x_reference, round_x_reference

pytestmark = pytest.mark.skipif(not ops.available(), reason="CPU extension not built")

ISAS = ops.isas()
LEGACY = (Q.Q4_0, Q.Q5_0, Q.Q8_0)
KQUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
# (n, k): Qwen2.5-0.5B's qkv (1152 rows), gate (4864) and down (k = 4864) shapes, and odd ones (an
# odd number of 32-element blocks takes the kernels' half-step tail; one block; one super-block).
SHAPES = {
    **{q: [(1152, 896), (4864, 896), (896, 4864), (37, 96), (5, 32)] for q in LEGACY},
    **{q: [(896, 4864), (37, 768), (3, 256)] for q in KQUANTS},
}
ROWS = (1, 2, 7, 64)
SUM_TOL = 1e-5  # of sum |x_r| |w|: float32 accumulation
ROUND_TOL = 1.5e-2  # of ||x W^T||: int8 rounding of x


def _weight(qtype: Q, n: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return random_blocks(qtype, n, k, generator=g)


def _x(m: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, k, generator=g) * (1 + 3 * torch.rand(m, 1, generator=g))


def _check(out: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> None:
    """out [M, n] against x [M, k] and the dequantized weight w [n, k] (float64)."""
    xr = int8_x_reference(x).double()
    ref = xr @ w.t()
    bound = xr.abs() @ w.abs().t()
    err = (out.double() - ref).abs()
    assert (err <= SUM_TOL * bound + 1e-30).all(), float((err / bound.clamp_min(1e-30)).max())
    exact = x.double() @ w.t()
    assert ((out.double() - exact).norm() / exact.norm()).item() < ROUND_TOL


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("qtype", LEGACY + KQUANTS, ids=lambda q: q.name)
def test_linear_matches_reference(qtype: Q, isa: str) -> None:
    for n, k in SHAPES[qtype]:
        raw = _weight(qtype, n, k, seed=n + k)
        w = ops.dequantize_rows(raw, qtype, k).double()
        for m in ROWS:
            x = _x(m, k, seed=m * 7 + k)
            out = torch.full((m, n + 9), float("nan"))
            ops.linear(x, [ops.Part(qtype, raw, 4)], out, isa=isa)
            assert out[:, :4].isnan().all() and out[:, 4 + n :].isnan().all()  # own columns only
            _check(out[:, 4 : 4 + n], x, w)


@pytest.mark.parametrize("isa", ISAS)
def test_output_head_rows(isa: str) -> None:
    """Qwen2.5's 151936-row Q8_0 head (the tall case the tasks are split over)."""
    n, k = 151936, 896
    raw = _weight(Q.Q8_0, n, k, seed=1)
    for m in (1, 2):
        x = _x(m, k, seed=m)
        out = ops.linear(x, [ops.Part(Q.Q8_0, raw, 0)], torch.empty(m, n))
        for r0 in range(0, n, 16384):  # the reference in slices of rows, to bound its memory
            rows = raw[r0 : r0 + 16384]
            _check(
                out[:, r0 : r0 + rows.shape[0]], x, ops.dequantize_rows(rows, Q.Q8_0, k).double()
            )


@pytest.mark.parametrize("isa", ISAS)
def test_packed_parts_bias_and_strided_out(isa: str) -> None:
    """A fused projection: three parts of different types in one call, each into its columns,
    the bias added once, out a column slice of a wider tensor."""
    k = 256
    shapes = [(Q.Q5_0, 96), (Q.Q6_K, 33), (Q.Q8_0, 40)]
    parts, ws, col = [], [], 0
    for i, (qtype, n) in enumerate(shapes):
        raw = _weight(qtype, n, k, seed=i)
        parts.append(ops.Part(qtype, raw, col))
        ws.append(ops.dequantize_rows(raw, qtype, k).double())
        col += n
    bias = torch.randn(col)
    wide = torch.full((7, col + 10), float("nan"))
    x = _x(7, k, seed=3)
    ops.linear(x, parts, wide[:, 5 : 5 + col], bias=bias, isa=isa)
    assert wide[:, :5].isnan().all() and wide[:, 5 + col :].isnan().all()
    _check(wide[:, 5 : 5 + col] - bias, x, torch.cat(ws))


def test_threads_do_not_change_results() -> None:
    """Each output is computed whole by one task, so the split over threads cannot change it."""
    raw = _weight(Q.Q4_K, 896, 4864, seed=5)
    x = _x(19, 4864, seed=5)
    old = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            results.append(ops.linear(x, [ops.Part(Q.Q4_K, raw, 0)], torch.empty(19, 896)))
    finally:
        torch.set_num_threads(old)
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("isa", ISAS)
def test_round_x_is_bit_exact(isa: str) -> None:
    """x rounded as `int8_x_reference` rounds it, bit for bit: random rows, an all-zero block,
    huge and tiny blocks, and ties (a block with max 127 has step 1, so 2.5 rounds to 2)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 4864, generator=g) * 3
    x[1, 32:64] = 0.0
    x[2, :32] *= 1e30
    x[3, 64:96] *= 1e-30
    x[4, :32] = torch.tensor([127.0, 2.5, -2.5, 3.5, 0.5, -0.5] + [1.25] * 26)
    xq, dx = ops.round_x(x, isa=isa)
    ref = round_x_reference(x)
    assert torch.equal(dx, ref.dx)
    want = torch.stack([(ref.words >> s) & 255 for s in (0, 8, 16, 24)], -1).reshape(5, -1)
    assert torch.equal(xq.to(torch.int64) & 255, want.to(torch.int64))
    assert xq[4, :6].tolist() == [127, 2, -2, 4, 0, 0]


def test_bad_input_is_refused() -> None:
    raw = _weight(Q.Q5_0, 8, 64, seed=0)
    out = torch.empty(2, 8)
    with pytest.raises(ValueError, match="x must be float32"):
        ops.linear(torch.randn(2, 64).double(), [ops.Part(Q.Q5_0, raw, 0)], out)
    with pytest.raises(ValueError, match="needs uint8"):
        ops.linear(torch.randn(2, 96), [ops.Part(Q.Q5_0, raw, 0)], out)  # rows of 64, not 96
    with pytest.raises(ValueError, match="no CPU quantized kernel for Q4_1"):
        ops.linear(torch.randn(2, 64), [ops.Part(Q.Q4_1, raw, 0)], out)
    with pytest.raises(ValueError, match="outside out"):
        ops.linear(torch.randn(2, 64), [ops.Part(Q.Q5_0, raw, 1)], out)
    with pytest.raises(ValueError, match="unknown CPU ISA level 'sse9'"):
        ops.linear(torch.randn(2, 64), [ops.Part(Q.Q5_0, raw, 0)], out, isa="sse9")
    with pytest.raises(ValueError, match="bias must be float32"):
        ops.linear(torch.randn(2, 64), [ops.Part(Q.Q5_0, raw, 0)], out, bias=torch.zeros(7))


def test_without_the_extension_falls_back_to_torch(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A build without `_qcpu`: the same call computes the float32 reference, after a warning."""
    monkeypatch.setattr(ops, "_qcpu", None)
    monkeypatch.setattr(ops, "_warned", False)
    raw = _weight(Q.Q6_K, 24, 512, seed=2)
    x = _x(3, 512, seed=2)
    bias = torch.randn(24)
    with caplog.at_level(logging.WARNING, logger="worker_orcd.kernels.cpu.ops"):
        out = ops.linear(x, [ops.Part(Q.Q6_K, raw, 0)], torch.empty(3, 24), bias=bias)
        ops.linear(x, [ops.Part(Q.Q6_K, raw, 0)], torch.empty(3, 24))
    assert sum("CPU quantized kernels unavailable" in r.message for r in caplog.records) == 1
    want = x @ ops.dequantize_rows(raw, Q.Q6_K, 512).t() + bias
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert not ops.available()


@pytest.mark.parametrize("isa", [i for i in ISAS if i in ("scalar", "avx512")])
@pytest.mark.parametrize("qtype", LEGACY + KQUANTS, ids=lambda q: q.name)
def test_bf16_rows_are_exact(qtype: Q, isa: str) -> None:
    for n, k in SHAPES[qtype]:
        raw = _weight(qtype, n, k, seed=3 * n + k)
        got = ops.dequantize(ops.Part(qtype, raw, 0), k, isa=isa)
        exact = ops.dequantize_rows(raw, qtype, k)
        assert torch.equal(got.view(torch.int16), exact.to(torch.bfloat16).view(torch.int16))
        f32 = ops.dequantize(ops.Part(qtype, raw, 0), k, torch.float32, isa=isa)
        assert torch.equal(f32.view(torch.int32), exact.view(torch.int32))


@pytest.mark.parametrize("qtype", LEGACY + KQUANTS, ids=lambda q: q.name)
def test_bf16_path_matches_reference(qtype: Q) -> None:
    """The prompt path (forced, so that it runs on any CPU): packed parts in scratch slices, the
    bias, a column slice of out."""
    n, k = SHAPES[qtype][0]
    raws = [_weight(qtype, n, k, seed=7), _weight(qtype, 29, k, seed=8)]
    parts = [ops.Part(qtype, raws[0], 0), ops.Part(qtype, raws[1], n)]
    bias = torch.randn(n + 29)
    for m in (7, 64):
        x = _x(m, k, seed=m)
        wide = torch.full((m, n + 31), float("nan"))
        ops.linear(x, parts, wide[:, 1 : n + 30], bias=bias, path="bf16")
        assert wide[:, 0].isnan().all() and wide[:, -1].isnan().all()
        out = wide[:, 1 : n + 30].double() - bias.double()
        w = torch.cat([ops.dequantize_rows(r, qtype, k) for r in raws]).double()
        wb = torch.cat([ops.dequantize(p, k) for p in parts]).double()
        xb = x.to(torch.bfloat16).double()
        ref = xb @ wb.t()
        bound = xb.abs() @ wb.abs().t()
        err = (out - ref).abs()
        assert (err <= 2**-8 * ref.abs() + SUM_TOL * bound + 1e-6).all()
        exact = x.double() @ w.t()
        assert ((out - exact).norm() / exact.norm()).item() < ROUND_TOL


def test_bf16_path_slices_large_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    """A weight larger than one scratch slice is dequantized and multiplied slice by slice."""
    monkeypatch.setattr(ops, "_BF16_CHUNK", 40 * 256)  # slices of 40 rows
    raw = _weight(Q.Q4_K, 130, 256, seed=9)
    x = _x(33, 256, seed=9)
    out = ops.linear(x, [ops.Part(Q.Q4_K, raw, 0)], torch.empty(33, 130), path="bf16")
    wb = ops.dequantize(ops.Part(Q.Q4_K, raw, 0), 256).double()
    ref = x.to(torch.bfloat16).double() @ wb.t()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 4e-3


def test_bf16_f32_path_keeps_a_float32_result() -> None:
    """Logits on the prompt path: float32 x and weights, bfloat16 products, a float32 result (not
    rounded to bfloat16: 2^-8 of the norm would be), and oneDNN's precision setting restored.
    Without AMX the prompt path is the int8 one, as `linear` documents (oneDNN's bfloat16 mode
    computes otherwise there: on an AVX-512 BF16 CPU without AMX, 6e-4 of the bound off)."""
    raw = _weight(Q.Q8_0, 300, 896, seed=4)
    x = _x(40, 896, seed=4) * 20
    before = torch.backends.mkldnn.matmul.fp32_precision
    out = ops.linear(x, [ops.Part(Q.Q8_0, raw, 0)], torch.empty(40, 300), path="bf16-f32")
    assert torch.backends.mkldnn.matmul.fp32_precision == before
    if not ops.bf16_path_available():
        int8 = ops.linear(x, [ops.Part(Q.Q8_0, raw, 0)], torch.empty(40, 300), path="int8")
        assert torch.equal(out, int8)
        return
    wb = ops.dequantize(ops.Part(Q.Q8_0, raw, 0), 896).double()
    ref = x.to(torch.bfloat16).double() @ wb.t()
    bound = x.to(torch.bfloat16).double().abs() @ wb.abs().t()
    assert ((out.double() - ref).abs() <= SUM_TOL * bound).all()
    assert (out != out.to(torch.bfloat16).float()).any()  # not a bfloat16 result


def test_path_choice() -> None:
    assert ops.BF16_MIN_ROWS > 1  # decode steps always take the int8 kernels
    with pytest.raises(ValueError, match="path must be one of int8, bf16, bf16-f32"):
        ops.linear(
            torch.randn(2, 64), [ops.Part(Q.Q5_0, _weight(Q.Q5_0, 8, 64, 0), 0)],
            torch.empty(2, 8), path="fp8",
        )  # fmt: skip
