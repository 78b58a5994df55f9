"""Planes hold the GGUF bytes exactly, and the references dequantize them like gguf-py."""

from __future__ import annotations

import gguf.quants
import numpy as np
import pytest
import torch

from worker_orcd.kernels.quant import (
    SUPPORTED,
    dequantize_reference,
    from_planes,
    quant_matmul_reference,
    random_blocks,
    to_planes,
)
from worker_orcd.kernels.quant.formats import Q, block_format, check_shape, planes_nbytes

# one shape per block family, with a row count that is not a power of two
SHAPES = {t: (7, 3 * block_format(t).block_size) for t in SUPPORTED}


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_planes_round_trip_and_keep_bytes_per_weight(qtype: Q) -> None:
    n, k = SHAPES[qtype]
    g = torch.Generator().manual_seed(int(qtype))
    raw = random_blocks(qtype, n, k, generator=g)
    planes = to_planes(raw, qtype, n, k)
    assert planes_nbytes(planes) == raw.numel()
    assert all(p.is_contiguous() and p.shape[0] == n for p in planes.values())
    assert torch.equal(from_planes(planes, qtype, n, k), raw)


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_reference_dequant_is_gguf_exact(qtype: Q) -> None:
    n, k = SHAPES[qtype]
    raw = random_blocks(qtype, n, k, generator=torch.Generator().manual_seed(1))
    planes = to_planes(raw, qtype, n, k)
    expected = gguf.quants.dequantize(raw.numpy(), qtype)
    got = dequantize_reference(planes, qtype, n, k)
    np.testing.assert_array_equal(got.numpy(), expected)
    ids = torch.tensor([5, 0, 5, 2])
    np.testing.assert_array_equal(
        dequantize_reference(planes, qtype, n, k, ids=ids).numpy(), expected[ids.numpy()]
    )


@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_random_blocks_have_finite_scales(qtype: Q) -> None:
    n, k = SHAPES[qtype]
    raw = random_blocks(qtype, n, k, generator=torch.Generator().manual_seed(2))
    w = gguf.quants.dequantize(raw.numpy(), qtype)
    assert np.isfinite(w).all() and np.abs(w).max() > 0


def test_q5_0_high_bits_are_re_laid_for_word_reads() -> None:
    # fifth bits of elements 4t + i (low nibble of byte i of qs word t) go to bit 8i + t, of
    # elements 16 + 4t + i (high nibble) to bit 8i + 4 + t
    for element, bit in [(0, 0), (1, 8), (4, 1), (7, 25), (16, 4), (31, 31)]:
        raw = torch.zeros(22, dtype=torch.uint8)
        raw[2 + element // 8] = 1 << (element % 8)
        word = to_planes(raw, Q.Q5_0, 1, 32)["qh"]
        assert int(word) & 0xFFFFFFFF == 1 << bit, (element, bit)


def test_matmul_reference_matches_dense_float64() -> None:
    n, k = 9, 512
    raw = random_blocks(Q.Q4_K, n, k, generator=torch.Generator().manual_seed(3))
    planes = to_planes(raw, Q.Q4_K, n, k)
    x = torch.randn(3, k, generator=torch.Generator().manual_seed(4))
    w = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), Q.Q4_K)).double()
    torch.testing.assert_close(
        quant_matmul_reference(x, planes, Q.Q4_K, n, k).double(),
        x.double() @ w.T,
        rtol=1e-5,
        atol=1e-5,
    )


def test_bad_shapes_name_the_problem() -> None:
    with pytest.raises(ValueError, match="Q4_K weight \\[4, 896\\].*256-element blocks"):
        check_shape(Q.Q4_K, 4, 896)
    with pytest.raises(ValueError, match="not kept quantized"):
        block_format(Q.Q2_K)
    with pytest.raises(ValueError, match="needs 68 uint8 bytes"):
        to_planes(torch.zeros(35, dtype=torch.uint8), Q.Q8_0, 1, 64)
