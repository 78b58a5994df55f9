"""Fused dequantize + small-batch matmul kernels (`batched`) against dequantize-then-matmul.

The kernels round the dequantized weight to x's dtype before the tensor-core product (as the
dequantize + cuBLAS path rounds its scratch weight) and sum in float32; float32 x multiplies in
IEEE float32. So y is held to x @ W^T in float64 with W from the gguf-exact dequantizers rounded to
x's dtype, at the output dtype's rounding, and, where y has at least 100 elements (a stable
measure), to the product with W itself within 1e-2 (the weight's rounding to bf16 is ~1e-3).
Outputs are written into a column slice of a NaN-poisoned buffer to catch unwritten or stray
elements.
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
from worker_orcd.kernels.quant import SUPPORTED, dequantize_reference
from worker_orcd.kernels.quant.formats import Q, block_format
from worker_orcd.kernels.quant.ops import (
    BATCHED_MAX_ROWS,
    GEMV_MAX_ROWS,
    PACKED_TYPES,
    PAIRS_ENV,
    BatchedConfig,
    batched_config,
    matmul_path,
    quant_batched,
    quant_matmul,
)
from worker_orcd.kernels.quant.weights import PackedWeight, QuantizedWeight

ROWS = (1, 2, 7, 16, 64)
# y's own rounding to its dtype, and float32 sums
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 8e-3}
# Triton's interpreter truncates to bf16 where the GPU and torch round to nearest (the weight and
# y): up to a unit of the weight off the reference's rounding, ~6e-3 from the unrounded product
TOL_INTERPRETED_BF16 = 1.2e-2


def check_batched(
    qtype: Q,
    n: int,
    k: int,
    m: int,
    dtype: torch.dtype,
    device: str,
    config: BatchedConfig | None = None,
    tol: float | None = None,
) -> None:
    planes = random_planes(qtype, n, k, device, seed=n * 5 + k)
    gen = torch.Generator(device=device).manual_seed(n * 131 + k * 7 + m)
    x = torch.randn(m, k, device=device, generator=gen).to(dtype)
    w = dequantize_reference(planes, qtype, n, k)  # float32, gguf-exact
    ref = x.double() @ w.to(dtype).double().T
    out = torch.full((m, n + 5), float("nan"), device=device, dtype=dtype)
    quant_batched(x, planes, qtype, n, k, out=out[:, 2 : 2 + n], config=config)
    y = out[:, 2 : 2 + n]
    where = f"{qtype.name} [{n}, {k}] m={m} {dtype} {config or batched_config(qtype, n, k, m)}"
    assert not y.isnan().any(), f"{where}: unwritten output"
    assert out[:, :2].isnan().all() and out[:, 2 + n :].isnan().all(), f"{where}: stray write"
    err = rel_err(y, ref)
    assert err < (tol or TOL[dtype]), f"{where}: rel err {err:.2e}"
    if n * m >= 100:
        err = rel_err(y, x.double() @ w.double().T)
        assert err < (tol or 1e-2), f"{where}: rel err {err:.2e} from the unrounded weight"


def test_matmul_path_by_rows() -> None:
    cuda = torch.device("cuda")  # a device name only: no GPU is touched
    paths = [matmul_path(m, cuda) for m in (1, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1, BATCHED_MAX_ROWS)]
    if paths[0] == "reference":
        pytest.skip("Triton is not installed: every path is the torch reference")
    assert paths == ["gemv", "gemv", "batched", "batched"]
    assert matmul_path(BATCHED_MAX_ROWS + 1, cuda) == "dense"
    assert matmul_path(16, torch.device("cpu")) == "reference"


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_default_configs_fit_their_batches(qtype: Q) -> None:
    """Every default launch shape is valid, holds a batch of up to 64 rows in one x tile, and
    splits K only into splits of at least two steps (of one, K-quants up to 16 rows)."""
    bs = block_format(qtype).block_size
    for n, k in shapes_for(qtype, REAL + ODD):
        for m in range(1, BATCHED_MAX_ROWS + 1):
            cfg = batched_config(qtype, n, k, m)
            cfg.check(qtype)
            assert cfg.block_b >= m or cfg.block_b == 64
            steps = 1 if m <= 16 and bs == 256 else 2
            assert cfg.split_k == 1 or k // 32 >= steps * cfg.tiles * cfg.split_k, (n, k, m, cfg)
    with pytest.raises(ValueError, match="block_b"):
        BatchedConfig(64, 8).check(qtype)
    if bs == 256:
        with pytest.raises(ValueError, match="steps are"):
            BatchedConfig(64, 16, tiles=3).check(qtype)


def test_pairs_default_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PAIRS_ENV, raising=False)
    assert not batched_config(Q.Q4_K, 3072, 3072, 8).pairs
    monkeypatch.setenv(PAIRS_ENV, "1")
    assert batched_config(Q.Q4_K, 3072, 3072, 8).pairs
    monkeypatch.setenv(PAIRS_ENV, "yes")
    with pytest.raises(ValueError, match=f"{PAIRS_ENV} must be 0 or 1, got 'yes'"):
        batched_config(Q.Q4_K, 3072, 3072, 8)


# -- CPU, Triton interpreter ---------------------------------------------------------------------


@needs_interpreter
@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_interpreted_batched(qtype: Q) -> None:
    bs = block_format(qtype).block_size
    unit = 32 if bs == 32 else 256
    for m in ROWS:  # default configs: rows past N (37 < 64) and of x past M masked
        check_batched(qtype, 37, 3 * unit, m, torch.float32, "cpu")
    for n, k, m, cfg in [
        (37, 5 * unit, 7, BatchedConfig(16, 16, split_k=3, tiles=2 if bs == 32 else 4)),
        (70, 2 * unit, 33, BatchedConfig(64, 32, stages=1)),  # two tiles of x
        (16, 9 * 32 if bs == 32 else 512, 20, BatchedConfig(32, 16, split_k=2, tiles=4)),
        (5, 3 * unit, 64, BatchedConfig(16, 64, tiles=3 if bs == 32 else 8)),
    ]:
        check_batched(qtype, n, k, m, torch.float32, "cpu", cfg)
    check_batched(qtype, 37, 2 * unit, 7, torch.float16, "cpu")
    for m in (7, 40):  # bf16 x: the PTX path's column order, x^T loaded permuted (7) or not (40)
        check_batched(qtype, 37, 2 * unit, m, torch.bfloat16, "cpu", tol=TOL_INTERPRETED_BF16)
        if qtype in PACKED_TYPES:  # and its weights made in bf16 pairs
            cfg = replace(batched_config(qtype, 37, 2 * unit, m), pairs=True)
            check_batched(qtype, 37, 2 * unit, m, torch.bfloat16, "cpu", cfg, TOL_INTERPRETED_BF16)


# -- GPU ------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_batched_real_and_odd_shapes(qtype: Q) -> None:
    for n, k in shapes_for(qtype, REAL + ODD):
        for m in ROWS:
            check_batched(qtype, n, k, m, torch.bfloat16, "cuda")
            if qtype in PACKED_TYPES:
                cfg = replace(batched_config(qtype, n, k, m), pairs=True)
                check_batched(qtype, n, k, m, torch.bfloat16, "cuda", cfg)
    for n, k in shapes_for(qtype, [(896, 4864), (3072, 3072), (9216, 3072)] + ODD):
        check_batched(qtype, n, k, 7, torch.float32, "cuda")
        check_batched(qtype, n, k, 16, torch.float16, "cuda")
        bs = block_format(qtype).block_size
        for m, cfg in [
            (7, BatchedConfig(16, 16, split_k=4, tiles=1 if bs == 32 else 4)),
            (16, BatchedConfig(128, 16, num_warps=8, stages=3)),
            (33, BatchedConfig(64, 32, split_k=2, tiles=8)),
            (64, BatchedConfig(32, 64, split_k=3, stages=1)),
            (50, BatchedConfig(64, 16, num_warps=8, tiles=2 if qtype != Q.Q6_K else 4)),
        ]:
            check_batched(qtype, n, k, m, torch.bfloat16, "cuda", cfg)
            if qtype in PACKED_TYPES:
                check_batched(qtype, n, k, m, torch.bfloat16, "cuda", replace(cfg, pairs=True))


@gpu
@needs_cuda
def test_quant_matmul_takes_each_path() -> None:
    """quant_matmul and a packed weight of several types at the row counts of each path: GEMV,
    small-batch kernel (into column slices of the packed output), dequantize + cuBLAS."""
    k = 3072
    shards = [
        QuantizedWeight(q, n, k, random_planes(q, n, k, "cuda", seed=n))
        for q, n in [(Q.Q4_K, 1000), (Q.Q6_K, 520), (Q.Q8_0, 333)]
    ]
    packed = PackedWeight.pack([*shards, torch.randn(64, k, device="cuda").to(torch.bfloat16)])
    dense = torch.cat(
        [dequantize_reference(s.planes, s.qtype, s.n, s.k) for s in shards]
        + [packed.parts[-1][1].float()]
    )
    for m in (1, 3, 4, 16, 64, 65, 200):
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        ref = x.double() @ dense.double().T
        path = matmul_path(m, x.device)
        # the GEMVs round x to int8 (~5e-3), the other paths the weight to bf16 (~1e-3)
        tol = 1.5e-2 if path == "gemv" else 8e-3
        assert rel_err(packed.matmul(x), ref) < tol, f"packed m={m} ({path})"
        s = shards[0]
        y = quant_matmul(x, s.planes, s.qtype, s.n, s.k)
        assert rel_err(y, ref[:, : s.n]) < tol, f"m={m} ({path})"
        if matmul_path(m, x.device) == "batched":
            assert torch.equal(y, quant_batched(x, s.planes, s.qtype, s.n, s.k))


@gpu
@needs_cuda
@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q5_0], ids=lambda t: t.name)
def test_batched_in_a_cuda_graph(qtype: Q) -> None:
    """Captured once per batch size, the kernels (K split included) replay on new inputs what
    eager launches compute, bit for bit."""
    n, k = 896, 4864 if qtype != Q.Q5_0 else 896
    planes = random_planes(qtype, n, k, "cuda", seed=3)
    for m, cfg in [(16, None), (7, BatchedConfig(32, 16, split_k=4)), (64, None)]:
        x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
        y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            quant_batched(x, planes, qtype, n, k, out=y, config=cfg)  # compile outside capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            quant_batched(x, planes, qtype, n, k, out=y, config=cfg)
        for seed in (1, 2):
            gen = torch.Generator("cuda").manual_seed(seed)
            x.copy_(torch.randn(m, k, device="cuda", generator=gen))
            graph.replay()
            torch.cuda.synchronize()
            want = quant_batched(x, planes, qtype, n, k, config=cfg)
            assert torch.equal(y, want), f"{qtype.name} m={m} {cfg}: replay differs from eager"
