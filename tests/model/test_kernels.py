"""Torch reference kernels against straightforward independent math."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from worker_orcd import kernels
from worker_orcd.kernels import AttentionMetadata


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("t,d", [(1, 64), (7, 96), (33, 128), (5, 3072)])
def test_rms_norm_matches_formula(t: int, d: int) -> None:
    g = torch.Generator().manual_seed(t * d)
    x = torch.randn(t, d, generator=g) * 3
    w = torch.randn(d, generator=g)
    x64 = x.double()
    want = x64 / torch.sqrt((x64 * x64).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert _rel(kernels.rms_norm(x, w, 1e-6), want) < 1e-6
    res = torch.randn(t, d, generator=g)
    normed, summed = kernels.add_rms_norm(x, res, w, 1e-6)
    s64 = x64 + res.double()
    assert torch.equal(summed, x + res)
    want2 = s64 / torch.sqrt((s64 * s64).mean(-1, keepdim=True) + 1e-6) * w.double()
    assert _rel(normed, want2) < 1e-6


def test_silu_and_mul_matches_formula() -> None:
    x = torch.randn(9, 2 * 37)
    gate, up = x[:, :37].double(), x[:, 37:].double()
    want = gate / (1 + torch.exp(-gate)) * up
    assert _rel(kernels.silu_and_mul(x), want) < 1e-6


@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("t", [1, 13])
def test_rope_matches_transformers_rotate_half(head_dim: int, t: int) -> None:
    g = torch.Generator().manual_seed(head_dim + t)
    n_heads, n_kv, theta = 6, 2, 1_000_000.0
    q = torch.randn(t, n_heads, head_dim, generator=g)
    k = torch.randn(t, n_kv, head_dim, generator=g)
    positions = torch.randint(0, 500, (t,), generator=g)
    cache = kernels.rope_cos_sin_cache(head_dim, 512, theta)
    got_q, got_k = kernels.apply_rope(q, k, positions, cache)

    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = positions.double()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)  # [T, D]
    cos, sin = emb.cos()[None], emb.sin()[None]  # [1, T, D]
    want_q, want_k = apply_rotary_pos_emb(
        q.double().transpose(0, 1)[None], k.double().transpose(0, 1)[None], cos, sin
    )
    assert _rel(got_q, want_q[0].transpose(0, 1)) < 1e-5
    assert _rel(got_k, want_k[0].transpose(0, 1)) < 1e-5


@pytest.mark.parametrize(("head_dim", "rope_dim"), [(64, 64), (96, 96), (128, 128), (96, 32)])
@pytest.mark.parametrize("t", [1, 13])
def test_rope_store_kv_equals_rope_then_store(head_dim: int, rope_dim: int, t: int) -> None:
    """The fused entry point: the rotated q back, rotated k and raw v in the cache at the slots,
    nothing else written."""
    g = torch.Generator().manual_seed(head_dim + rope_dim + t)
    n_heads, n_kv, n_slots = 6, 2, 37
    qkv = torch.randn(t, (n_heads + 2 * n_kv) * head_dim, generator=g)  # views, as the model has
    q = qkv[:, : n_heads * head_dim].view(t, n_heads, head_dim)
    k = qkv[:, n_heads * head_dim : (n_heads + n_kv) * head_dim].view(t, n_kv, head_dim)
    v = qkv[:, (n_heads + n_kv) * head_dim :].view(t, n_kv, head_dim)
    positions = torch.randint(0, 300, (t,), generator=g)
    factors = torch.linspace(1.0, 3.0, rope_dim // 2)
    cos_sin = kernels.rope_cos_sin_cache(rope_dim, 301, 10000.0, factors=factors)
    slots = torch.randperm(n_slots, generator=g)[:t]
    k_cache, v_cache = torch.randn(2, n_slots, n_kv, head_dim, generator=g)
    k_want, v_want = k_cache.clone(), v_cache.clone()

    got_q = kernels.rope_store_kv(q, k, v, positions, cos_sin, k_cache, v_cache, slots)
    want_q, want_k = kernels.apply_rope(q, k, positions, cos_sin)
    kernels.store_kv(want_k, v, k_want, v_want, slots)
    assert torch.equal(got_q, want_q)
    assert torch.equal(k_cache, k_want) and torch.equal(v_cache, v_want)


@pytest.mark.parametrize(("t", "inter", "out"), [(1, 37, 64), (13, 96, 96), (5, 128, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_silu_and_mul_linear_equals_unfused(t: int, inter: int, out: int, bias: bool) -> None:
    g = torch.Generator().manual_seed(t + inter + out)
    gate_up = torch.randn(t, 2 * inter, generator=g)
    w = torch.randn(out, inter, generator=g)
    b = torch.randn(out, generator=g) if bias else None
    got = kernels.silu_and_mul_linear(gate_up, w, b)
    assert got.shape == (t, out)
    assert torch.equal(got, kernels.linear(kernels.silu_and_mul(gate_up), w, b))
    gate, up = gate_up[:, :inter].double(), gate_up[:, inter:].double()
    want = (gate / (1 + torch.exp(-gate)) * up) @ w.double().T
    if b is not None:
        want = want + b.double()
    assert _rel(got, want) < 1e-6


def test_rope_partial_rotary_and_factors() -> None:
    head_dim, rope_dim, t = 96, 32, 5
    q = torch.randn(t, 4, head_dim)
    k = torch.randn(t, 4, head_dim)
    positions = torch.arange(t) * 7
    factors = torch.linspace(1.0, 4.0, rope_dim // 2)
    cache = kernels.rope_cos_sin_cache(
        rope_dim, 64, 10000.0, factors=factors, attention_scaling=1.5
    )
    got_q, _ = kernels.apply_rope(q, k, positions, cache)
    assert torch.equal(got_q[..., rope_dim:], q[..., rope_dim:])
    inv = 1.0 / (10000.0 ** (torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim))
    inv = inv / factors.double()
    ang = positions.double()[:, None, None] * inv  # [T, 1, R/2]
    x1, x2 = q[..., : rope_dim // 2].double(), q[..., rope_dim // 2 : rope_dim].double()
    want = torch.cat([x1 * ang.cos() - x2 * ang.sin(), x2 * ang.cos() + x1 * ang.sin()], -1) * 1.5
    assert _rel(got_q[..., :rope_dim], want) < 1e-5


def _paged_batch(
    q_lens: list[int], ctx_lens: list[int], n_kv: int, head_dim: int, block_size: int, seed: int
) -> tuple[AttentionMetadata, torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Random K/V for each sequence's full context, scattered into a paged cache in random
    blocks."""
    g = torch.Generator().manual_seed(seed)
    n_blocks_per = [math.ceil(c / block_size) for c in ctx_lens]
    n_blocks = sum(n_blocks_per) + 3
    perm = torch.randperm(n_blocks, generator=g).tolist()
    k_cache = torch.zeros(n_blocks * block_size, n_kv, head_dim)
    v_cache = torch.zeros_like(k_cache)
    tables, kv_slots, ks, vs, slot_mapping = [], [], [], [], []
    for c, nb in zip(ctx_lens, n_blocks_per, strict=True):
        table = [perm.pop() for _ in range(nb)]
        tables.append(table)
        slots = torch.tensor(
            [table[p // block_size] * block_size + p % block_size for p in range(c)]
        )
        kv_slots.append(slots)
        ks.append(torch.randn(c, n_kv, head_dim, generator=g))
        vs.append(torch.randn(c, n_kv, head_dim, generator=g))
    # Earlier context is already cached; the query tokens' k/v are stored by store_kv.
    new_k, new_v = [], []
    for b, (ql, c) in enumerate(zip(q_lens, ctx_lens, strict=True)):
        k_cache[kv_slots[b][: c - ql]] = ks[b][: c - ql]
        v_cache[kv_slots[b][: c - ql]] = vs[b][: c - ql]
        slot_mapping.append(kv_slots[b][c - ql :])
        new_k.append(ks[b][c - ql :])
        new_v.append(vs[b][c - ql :])
    kernels.store_kv(torch.cat(new_k), torch.cat(new_v), k_cache, v_cache, torch.cat(slot_mapping))
    width = max(len(t) for t in tables)
    starts = [0]
    for ql in q_lens:
        starts.append(starts[-1] + ql)
    meta = AttentionMetadata(
        slot_mapping=torch.cat(slot_mapping),
        query_start=starts,
        context_lens=list(ctx_lens),
        kv_slots=kv_slots,
        query_start_t=torch.tensor(starts, dtype=torch.int32),
        context_lens_t=torch.tensor(ctx_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [-1] * (width - len(t)) for t in tables], dtype=torch.int32),
        block_size=block_size,
        max_query_len=max(q_lens),
        max_context_len=max(ctx_lens),
    )
    return meta, k_cache, v_cache, ks, vs


@pytest.mark.parametrize(
    "n_heads,n_kv,head_dim",
    [(14, 2, 64), (32, 32, 96), (8, 4, 128)],
    ids=["gqa64", "mha96", "gqa128"],
)
@pytest.mark.parametrize("window", [None, 5])
def test_attention_matches_sdpa_with_explicit_mask(
    n_heads: int, n_kv: int, head_dim: int, window: int | None
) -> None:
    # Mixed batch: a fresh prefill, a chunk after prior context, and two decodes (odd lengths).
    q_lens, ctx_lens = [11, 6, 1, 1], [11, 23, 17, 1]
    meta, k_cache, v_cache, ks, vs = _paged_batch(q_lens, ctx_lens, n_kv, head_dim, 4, head_dim)
    q = torch.randn(sum(q_lens), n_heads, head_dim)
    got = kernels.attention(q, k_cache, v_cache, meta, sliding_window=window)
    for b, (ql, c) in enumerate(zip(q_lens, ctx_lens, strict=True)):
        qb = q[meta.query_start[b] : meta.query_start[b + 1]].transpose(0, 1)  # [H, L, D]
        kb = ks[b].repeat_interleave(n_heads // n_kv, dim=1).transpose(0, 1)  # [H, C, D]
        vb = vs[b].repeat_interleave(n_heads // n_kv, dim=1).transpose(0, 1)
        allowed = torch.zeros(ql, c, dtype=torch.bool)
        for i in range(ql):
            p = c - ql + i
            for j in range(c):
                allowed[i, j] = j <= p and (window is None or p - j < window)
        want = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=allowed)
        assert _rel(got[meta.query_start[b] : meta.query_start[b + 1]], want.transpose(0, 1)) < 1e-5


def test_attention_contiguous_slice_slots() -> None:
    meta, k_cache, v_cache, ks, vs = _paged_batch([9], [9], 2, 64, 16, 0)
    q = torch.randn(9, 4, 64)
    want = kernels.attention(q, k_cache, v_cache, meta)
    start = int(meta.kv_slots[0][0])
    assert torch.equal(meta.kv_slots[0], torch.arange(start, start + 9))
    meta.kv_slots = [slice(start, start + 9)]
    assert torch.equal(kernels.attention(q, k_cache, v_cache, meta), want)
