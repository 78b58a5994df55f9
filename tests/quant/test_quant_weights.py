"""Weight containers on CPU (reference path): stacking shards, mixed-type fused weights, lookups."""

from __future__ import annotations

import gguf.quants
import pytest
import torch

from worker_orcd.kernels.quant import random_blocks
from worker_orcd.kernels.quant.formats import Q
from worker_orcd.kernels.quant.weights import PackedWeight, QuantizedWeight


def _shard(qtype: Q, n: int, k: int, seed: int) -> tuple[QuantizedWeight, torch.Tensor]:
    raw = random_blocks(qtype, n, k, generator=torch.Generator().manual_seed(seed))
    dense = torch.from_numpy(gguf.quants.dequantize(raw.numpy(), qtype))
    return QuantizedWeight.from_gguf(raw.numpy(), qtype, (n, k), "cpu"), dense


def test_packed_weight_merges_same_type_neighbours_and_matches_dense() -> None:
    k = 256
    q, dq = _shard(Q.Q5_0, 24, k, 1)
    kk, dk = _shard(Q.Q5_0, 8, k, 2)
    v, dv = _shard(Q.Q8_0, 8, k, 3)
    extra = torch.randn(5, k, generator=torch.Generator().manual_seed(4))
    packed = PackedWeight.pack([q, kk, v, extra])
    assert [row for row, _ in packed.parts] == [0, 32, 40]
    assert (packed.n, packed.k) == (45, k)
    assert packed.quant_mix() == {
        "Q5_0": q.nbytes + kk.nbytes, "Q8_0": v.nbytes, "float32": extra.numel() * 4,
    }  # fmt: skip
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(5))
    bias = torch.randn(45, generator=torch.Generator().manual_seed(6))
    dense = torch.cat([dq, dk, dv, extra])
    expected = x.double() @ dense.double().T + bias.double()
    torch.testing.assert_close(packed.matmul(x, bias).double(), expected, rtol=1e-5, atol=1e-4)


def test_embedding_rows_and_dequantize() -> None:
    w, dense = _shard(Q.Q6_K, 11, 512, 7)
    ids = torch.tensor([[3, 10], [0, 3]])
    torch.testing.assert_close(w.embedding(ids, torch.float32), dense[ids], rtol=0, atol=0)
    torch.testing.assert_close(PackedWeight.pack([w]).embedding(ids, torch.float32), dense[ids])
    torch.testing.assert_close(w.dequantize(), dense, rtol=0, atol=0)


def test_stacking_refuses_mixed_types() -> None:
    a, _ = _shard(Q.Q4_K, 2, 256, 8)
    b, _ = _shard(Q.Q6_K, 2, 256, 9)
    with pytest.raises(ValueError, match="cannot stack Q6_K"):
        QuantizedWeight.cat_rows([a, b])
    with pytest.raises(ValueError, match="one part"):
        PackedWeight.pack([a, b]).embedding(torch.tensor([0]), torch.float32)
