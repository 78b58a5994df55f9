"""The decode attention that rotates q and this step's k itself and writes k and v into the caches
(`attention.rope_store_attend`) against the two launches it replaces: `rope_store_kv`, then the
decode attention of the rotated q. Real head shapes on the GPU (marker `gpu`); small ones on CPU
under Triton's interpreter (TRITON_INTERPRET=1), skipped otherwise."""

from __future__ import annotations

import pytest
import torch

from tests.kernels.conftest import GPU, INTERPRETED, rel_err, scattered_metadata
from worker_orcd.kernels.attention import attention_ref
from worker_orcd.kernels.rope import rope_cos_sin_cache

# (query heads, KV heads, head dim, rotary dims): Qwen2.5's GQA, Phi-3's MHA, a partial rotary
HEADS = {
    "cuda": [(14, 2, 64, 64), (32, 32, 96, 96), (4, 4, 96, 64)],
    "cpu": [(4, 2, 64, 64), (2, 2, 96, 64)],
}
CONTEXTS = {
    "cuda": [[1], [37], [200], [200, 129, 256], [3000, 5, 777]],
    "cpu": [[1], [37], [150, 5]],
}


def _decode_batch(ctx_lens: list[int], h: int, hk: int, d: int, device: str, dtype, page=16):
    """q, k, v (views of one fused projection output, before RoPE), the caches with every
    context but its last key written, and decode metadata: one token per sequence at position
    ctx - 1, blocks scattered over the cache in random order."""
    g = torch.Generator().manual_seed(sum(ctx_lens) + h + d)
    n_blocks = sum(-(-c // page) for c in ctx_lens) + 2
    kc = torch.randn(n_blocks * page, hk, d, generator=g).to(device, dtype)
    vc = torch.randn(n_blocks * page, hk, d, generator=g).to(device, dtype)
    free = torch.randperm(n_blocks, generator=g).tolist()
    b = len(ctx_lens)
    meta = scattered_metadata(ctx_lens, [1] * b, page, free, device)
    qkv = torch.randn(b, (h + 2 * hk) * d, generator=g).to(device, dtype)
    q = qkv[:, : h * d].view(b, h, d)
    k = qkv[:, h * d : (h + hk) * d].view(b, hk, d)
    v = qkv[:, (h + hk) * d :].view(b, hk, d)
    pos = torch.tensor([c - 1 for c in ctx_lens], device=device)
    bias = (torch.randn((h + 2 * hk) * d, generator=g) * 0.5).to(device, dtype)
    return q, k, v, pos, kc, vc, meta, bias


@pytest.mark.parametrize("device", [GPU, INTERPRETED])
@pytest.mark.parametrize("window", [None, 50])
@pytest.mark.parametrize("with_bias", [False, True])
def test_rope_store_attend_equals_the_two_launches(
    device: str, window: int | None, with_bias: bool
) -> None:
    from worker_orcd.kernels.quant.ops import RoundedX
    from worker_orcd.kernels.triton import rope
    from worker_orcd.kernels.triton.attention import FreshKV, decode_attention

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for h, hk, d, rope_dim in HEADS[device]:
        cs = rope_cos_sin_cache(rope_dim, 4096, 10000.0, device=device)
        for ctx in CONTEXTS[device]:
            q, k, v, pos, kc0, vc0, meta, bias = _decode_batch(ctx, h, hk, d, device, dtype)
            bias = bias if with_bias else None
            scale = d**-0.5
            kc_ref, vc_ref = kc0.clone(), vc0.clone()
            q_rot = rope.rope_store_kv(q, k, v, pos, cs, kc_ref, vc_ref, meta.slot_mapping, bias)
            full = attention_ref(q_rot, kc_ref, vc_ref, meta, scale=scale, sliding_window=window)
            variants = [{}, {"splits": 1}, {"splits": 3}, {"splits": 4, "fused_merge": True}]
            for kw in variants:
                case = (h, hk, d, ctx, kw)
                want = decode_attention(q_rot, kc_ref, vc_ref, meta, scale, window, **kw)
                kc, vc = kc0.clone(), vc0.clone()
                fresh = FreshKV(k, v, pos, cs, meta.slot_mapping, bias)
                rounded = RoundedX.empty(len(ctx), h * d, q.device) if d % 32 == 0 else None
                got = decode_attention(
                    q, kc, vc, meta, scale, window, rounded=rounded, fresh=fresh, **kw
                )
                # v is only biased and stored; k is rotated as the RoPE kernel rotates it
                assert torch.equal(vc, vc_ref), case
                assert rel_err(kc, kc_ref) < 1e-3, case
                assert rel_err(got, want) < 2e-3, case
                assert rel_err(got, full) < 1e-2, case
                if rounded is not None:
                    plain = decode_attention(q_rot, kc, vc, meta, scale, window, **kw)
                    assert rel_err(plain, got) < 2e-3, case


@pytest.mark.parametrize("device", [GPU, INTERPRETED])
def test_rope_store_attend_skips_padding_and_routes_prompts(device: str) -> None:
    """A negative slot (a padding row of a captured graph) writes nothing; a step that is not a
    decode, or a decode of one sequence, takes the two launches, with the same result as calling
    them."""
    from worker_orcd.kernels.triton import attention, rope

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    h, hk, d, _ = HEADS[device][0]
    cs = rope_cos_sin_cache(d, 4096, 10000.0, device=device)
    q, k, v, pos, kc, vc, meta, bias = _decode_batch([37, 20, 70], h, hk, d, device, dtype)
    meta.slot_mapping[1] = -1
    kc0, vc0 = kc.clone(), vc.clone()
    attention.rope_store_attend(q, k, v, pos, cs, kc, vc, meta, bias=bias)
    written = meta.slot_mapping[[0, 2]]
    untouched = torch.ones(kc.shape[0], dtype=torch.bool, device=device)
    untouched[written] = False
    assert torch.equal(kc[untouched], kc0[untouched]) and torch.equal(vc[untouched], vc0[untouched])
    assert not torch.equal(kc[written], kc0[written])

    q, k, v, pos, kc, vc, meta, bias = _decode_batch([200], h, hk, d, device, dtype)
    kc2, vc2 = kc.clone(), vc.clone()
    got = attention.rope_store_attend(q, k, v, pos, cs, kc, vc, meta, bias=bias)
    q_rot = rope.rope_store_kv(q, k, v, pos, cs, kc2, vc2, meta.slot_mapping, bias)
    assert torch.equal(got, attention.attention(q_rot, kc2, vc2, meta))
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)

    # a prompt of 5 tokens after 32 cached ones, one sequence
    q, k, v, pos, kc, vc, meta, bias = _decode_batch([37], h, hk, d, device, dtype)
    n = 5
    slots = meta.kv_slots[0][-n:]
    meta.slot_mapping = slots
    meta.query_start, meta.max_query_len = [0, n], n
    meta.query_start_t = torch.tensor([0, n], dtype=torch.int32, device=device)
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(n, (h + 2 * hk) * d, generator=g).to(device, dtype)
    q, k, v = (qkv[:, a:b_].view(n, -1, d) for a, b_ in _bounds(h, hk, d))
    pos = torch.arange(32, 37, device=device)
    kc2, vc2 = kc.clone(), vc.clone()
    got = attention.rope_store_attend(q, k, v, pos, cs, kc, vc, meta, bias=bias)
    q_rot = rope.rope_store_kv(q, k, v, pos, cs, kc2, vc2, slots, bias)
    assert torch.equal(got, attention.attention(q_rot, kc2, vc2, meta))
    assert torch.equal(kc, kc2) and torch.equal(vc, vc2)


def _bounds(h: int, hk: int, d: int) -> list[tuple[int, int]]:
    return [(0, h * d), (h * d, (h + hk) * d), ((h + hk) * d, (h + 2 * hk) * d)]
