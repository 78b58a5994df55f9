"""The compiled CPU operations between the matmuls (kernels/cpu/layer.py) against the torch
references they replace: RMSNorm (with and without the residual add), RoPE with the KV-cache write
(bit-exact), and attention over the cache (decode and short chunks; GQA and MHA, head_dim 64, 96
and 80, sliding window, contiguous and scattered slots, several sequences), plus the fallbacks."""

from __future__ import annotations

import pytest
import torch

from worker_orcd import kernels
from worker_orcd.kernels.activation import silu_and_mul_ref
from worker_orcd.kernels.attention import AttentionMetadata, attention_ref
from worker_orcd.kernels.cpu import layer, ops
from worker_orcd.kernels.norm import add_rms_norm_ref, rms_norm_ref
from worker_orcd.kernels.rope import rope_cos_sin_cache

pytestmark = pytest.mark.skipif(not ops.available(), reason="CPU extension not built")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("d", [896, 3072, 100])
def test_rms_norm(rows: int, d: int) -> None:
    g = _gen(rows + d)
    x, res = (torch.randn(rows, d, generator=g) * 4 for _ in range(2))
    w = torch.randn(d, generator=g)
    normed, summed = layer.add_rms_norm(x, res, w, 1e-6)
    ref_normed, ref_summed = add_rms_norm_ref(x, res, w, 1e-6)
    assert torch.equal(summed, ref_summed)
    torch.testing.assert_close(normed, ref_normed, rtol=1e-5, atol=1e-6)
    alone, same = layer.add_rms_norm(x, None, w, 1e-6)
    assert same is x
    torch.testing.assert_close(alone, rms_norm_ref(x, w, 1e-6), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(layer.rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))


@pytest.mark.parametrize(
    ("heads", "kv", "d", "rope_dim"), [(14, 2, 64, 64), (32, 32, 96, 96), (8, 4, 80, 48)]
)
@pytest.mark.parametrize("rows", [1, 5, 300])
def test_rope_store_kv_is_exact(heads: int, kv: int, d: int, rope_dim: int, rows: int) -> None:
    """q, k, v as views of one qkv row (the layer's split), partial rotary included."""
    g = _gen(heads + rows)
    cos_sin = rope_cos_sin_cache(rope_dim, 4096, 10000.0)
    qkv = torch.randn(rows, (heads + 2 * kv) * d, generator=g)
    q, k, v = kernels.split_qkv(qkv, torch.empty(0, kv, d))
    positions = torch.randint(0, 4096, (rows,), generator=g)
    slots = torch.randperm(600, generator=g)[:rows]
    caches = [torch.randn(600, kv, d, generator=g) for _ in range(2)]
    ref_caches = [c.clone() for c in caches]
    out = layer.rope_store_kv(q, k, v, positions, cos_sin, *caches, slots)
    ref = kernels.rope_store_kv_ref(q, k, v, positions, cos_sin, *ref_caches, slots)
    assert torch.equal(out, ref)
    assert all(torch.equal(a, b) for a, b in zip(caches, ref_caches, strict=True))


def _meta(seqs: list[tuple[int, int]], block_size: int, scatter: bool, g: torch.Generator):
    """AttentionMetadata of sequences (new tokens, context length) over a cache of blocks, and the
    number of slots; scatter: each sequence's blocks in random places (slots as an index)."""
    n_blocks = sum(-(-ctx // block_size) for _, ctx in seqs) + 3
    order = torch.randperm(n_blocks, generator=g) if scatter else torch.arange(n_blocks)
    query_start, context_lens, kv_slots, slot_mapping, first = [0], [], [], [], 0
    for new, ctx in seqs:
        nb = -(-ctx // block_size)
        blocks = order[first : first + nb]
        first += nb
        slots = (blocks[:, None] * block_size + torch.arange(block_size)).flatten()[:ctx]
        contiguous = bool((slots == torch.arange(slots[0], slots[0] + ctx)).all())
        kv_slots.append(slice(int(slots[0]), int(slots[0]) + ctx) if contiguous else slots)
        slot_mapping.append(slots[ctx - new :])
        query_start.append(query_start[-1] + new)
        context_lens.append(ctx)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slot_mapping), query_start=query_start, context_lens=context_lens,
        kv_slots=kv_slots, query_start_t=torch.tensor(query_start),
        context_lens_t=torch.tensor(context_lens), block_tables=torch.zeros(1),
        block_size=block_size,
        max_query_len=max(n for n, _ in seqs), max_context_len=max(c for _, c in seqs),
    )  # fmt: skip
    return meta, n_blocks * block_size


CASES = {
    "decode": [(1, 100)],
    "decode_long": [(1, 3001)],
    "batch": [(1, 37), (1, 1), (1, 250)],
    "chunk": [(16, 40), (3, 3), (9, 130)],
}


@pytest.mark.parametrize("isa", [i for i in ops.isas() if i in ("scalar", "avx512")])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize(("heads", "kv", "d"), [(14, 2, 64), (32, 32, 96), (6, 3, 80)])
@pytest.mark.parametrize("scatter", [False, True])
@pytest.mark.parametrize("window", [None, 17])
def test_attention(
    case: str,
    heads: int,
    kv: int,
    d: int,
    scatter: bool,
    window: int | None,
    isa: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ops, "_DEFAULT_ISA", ops.ISAS.index(isa) + 1)
    g = _gen(heads * 7 + d + len(case))
    meta, n_slots = _meta(CASES[case], 16, scatter, g)
    q = torch.randn(meta.num_tokens, heads, d, generator=g)
    k_cache, v_cache = (torch.randn(n_slots, kv, d, generator=g) * 2 for _ in range(2))
    out = layer.attention(q, k_cache, v_cache, meta, scale=d**-0.5, sliding_window=window)
    ref = attention_ref(q, k_cache, v_cache, meta, scale=d**-0.5, sliding_window=window)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(v_cache.abs().max()))


def test_fallbacks_are_the_reference() -> None:
    """A prompt longer than ATTENTION_MAX_ROWS, bfloat16 inputs, strided rows: the references."""
    g = _gen(9)
    meta, n_slots = _meta([(layer.ATTENTION_MAX_ROWS + 1, 40)], 16, False, g)
    q = torch.randn(meta.num_tokens, 4, 64, generator=g)
    kc, vc = (torch.randn(n_slots, 2, 64, generator=g) for _ in range(2))
    assert torch.equal(layer.attention(q, kc, vc, meta), attention_ref(q, kc, vc, meta))
    x, w = torch.randn(3, 64, generator=g).bfloat16(), torch.randn(64, generator=g).bfloat16()
    assert torch.equal(layer.add_rms_norm(x, x, w, 1e-6)[0], add_rms_norm_ref(x, x, w, 1e-6)[0])
    wide = torch.randn(3, 128, generator=g)[:, :64]  # rows with a stride of 128
    w32 = w.float()
    assert torch.equal(layer.rms_norm(wide, w32, 1e-6), rms_norm_ref(wide, w32, 1e-6))


def test_register_all_routes_the_cpu_entry_points(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(kernels._BACKENDS, "cpu", {})
    layer.register_all()
    cpu = torch.device("cpu")
    assert kernels.implementation("attention", cpu) is layer.attention
    assert kernels.implementation("add_rms_norm", cpu) is layer.add_rms_norm
    assert kernels.implementation("rope_store_kv", cpu) is layer.rope_store_kv
    silu = layer.silu_and_mul if "avx512" in ops.isas() else kernels.REFERENCE["silu_and_mul"]
    assert kernels.implementation("silu_and_mul", cpu) is silu


@pytest.mark.skipif("avx512" not in ops.isas(), reason="AVX-512 only")
@pytest.mark.parametrize(("rows", "n"), [(1, 4864), (7, 8192), (3, 37)])
def test_silu_and_mul(rows: int, n: int) -> None:
    x = torch.randn(rows, 2 * n, generator=_gen(n)) * 6
    x[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
    torch.testing.assert_close(layer.silu_and_mul(x), silu_and_mul_ref(x), rtol=2e-6, atol=1e-7)
