"""Every Triton kernel against its torch twin on random bf16 inputs (GPU only: -m gpu)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.kernels.conftest import rel_err, scattered_metadata
from worker_orcd import kernels
from worker_orcd.kernels import rope_store_kv_ref
from worker_orcd.kernels.activation import silu_and_mul_linear_ref, silu_and_mul_ref
from worker_orcd.kernels.attention import AttentionMetadata, attention_ref, store_kv_ref
from worker_orcd.kernels.norm import add_rms_norm_ref, rms_norm_ref
from worker_orcd.kernels.rope import apply_rope_ref, rope_cos_sin_cache

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEV = "cuda"
BF16 = torch.bfloat16


@pytest.mark.parametrize("d", [64, 96, 896, 3072, 3001])
@pytest.mark.parametrize("n", [1, 7, 130])
def test_rms_norm_and_add(n: int, d: int) -> None:
    from worker_orcd.kernels.triton import norm

    x = torch.randn(n, d, device=DEV, dtype=BF16)
    r = torch.randn(n, d, device=DEV, dtype=BF16)
    w = torch.randn(d, device=DEV, dtype=BF16)
    assert rel_err(norm.rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6)) < 1e-2
    y, s = norm.add_rms_norm(x, r, w, 1e-5)
    y_ref, s_ref = add_rms_norm_ref(x, r, w, 1e-5)
    assert torch.equal(s, s_ref)
    assert rel_err(y, y_ref) < 1e-2


@pytest.mark.parametrize("inter", [8192, 4864, 1001])
@pytest.mark.parametrize("n", [1, 5, 257])
def test_silu_and_mul(n: int, inter: int) -> None:
    from worker_orcd.kernels.triton import activation

    x = torch.randn(n, 2 * inter, device=DEV, dtype=BF16) * 3
    assert rel_err(activation.silu_and_mul(x), silu_and_mul_ref(x)) < 1e-2


def _qkv(n: int, h: int, hk: int, d: int) -> tuple[torch.Tensor, ...]:
    """q, k, v as views into one fused projection output, as the model makes them."""
    return _split(torch.randn(n, (h + 2 * hk) * d, device=DEV, dtype=BF16), h, hk, d)


def _split(qkv: torch.Tensor, h: int, hk: int, d: int) -> tuple[torch.Tensor, ...]:
    n = qkv.shape[0]
    q = qkv[:, : h * d].view(n, h, d)
    k = qkv[:, h * d : (h + hk) * d].view(n, hk, d)
    v = qkv[:, (h + hk) * d :].view(n, hk, d)
    return q, k, v


@pytest.mark.parametrize(
    ("h", "hk", "d", "rope_dim"),
    [(14, 2, 64, 64), (32, 32, 96, 96), (8, 2, 128, 128), (4, 4, 96, 64)],
)
@pytest.mark.parametrize("n", [1, 13])
def test_rope_and_rope_store_kv(n: int, h: int, hk: int, d: int, rope_dim: int) -> None:
    from worker_orcd.kernels.triton import rope

    q, k, v = _qkv(n, h, hk, d)
    cs = rope_cos_sin_cache(rope_dim, 4096, 10000.0, device=DEV)
    pos = torch.randint(0, 4096, (n,), device=DEV)
    q_ref, k_ref = apply_rope_ref(q, k, pos, cs)
    q_out, k_out = rope.apply_rope(q, k, pos, cs)
    assert rel_err(q_out, q_ref) < 1e-2 and rel_err(k_out, k_ref) < 1e-2

    slots = torch.randperm(50, device=DEV)[:n]
    kc = torch.randn(50, hk, d, device=DEV, dtype=BF16)
    vc = torch.randn(50, hk, d, device=DEV, dtype=BF16)
    kc_ref, vc_ref = kc.clone(), vc.clone()
    q_fused_ref = rope_store_kv_ref(q, k, v, pos, cs, kc_ref, vc_ref, slots)
    q_fused = rope.rope_store_kv(q, k, v, pos, cs, kc, vc, slots)
    assert rel_err(q_fused, q_fused_ref) < 1e-2
    assert rel_err(kc, kc_ref) < 1e-2 and torch.equal(vc, vc_ref)

    # The qkv projection's bias added inside (the quantized path leaves it to this kernel):
    # bit for bit the separate bf16 add, then the same rotation.
    bias = torch.randn((h + 2 * hk) * d, device=DEV, dtype=BF16)
    kc_b, vc_b = kc.clone(), vc.clone()
    kc_b_ref, vc_b_ref = kc.clone(), vc.clone()
    q_b_ref = rope_store_kv_ref(q, k, v, pos, cs, kc_b_ref, vc_b_ref, slots, bias)
    q_b = rope.rope_store_kv(q, k, v, pos, cs, kc_b, vc_b, slots, bias)
    assert rel_err(q_b, q_b_ref) < 1e-2 and rel_err(kc_b, kc_b_ref) < 1e-2
    assert torch.equal(vc_b, vc_b_ref)  # v is only biased and stored
    qkv = torch.cat([x.reshape(n, -1) for x in (q, k, v)], dim=1) + bias
    q_sep = rope.rope_store_kv(*_split(qkv, h, hk, d), pos, cs, kc.clone(), vc.clone(), slots)
    assert torch.equal(q_b, q_sep)

    kc2, vc2 = kc.clone(), vc.clone()
    k2, v2 = torch.randn_like(k_ref), torch.randn_like(k_ref)
    rope.store_kv(k2, v2, kc2, vc2, slots)
    store_kv_ref(k2, v2, kc, vc, slots)
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc)


def _paged_batch(
    ctx_lens: list[int], q_lens: list[int], h: int, hk: int, d: int, page: int = 16
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata]:
    """Random q and caches; each sequence's blocks scattered over the cache in random order."""
    n_blocks = sum(-(-c // page) for c in ctx_lens) + 2
    kc = torch.randn(n_blocks * page, hk, d, device=DEV, dtype=BF16)
    vc = torch.randn(n_blocks * page, hk, d, device=DEV, dtype=BF16)
    meta = scattered_metadata(ctx_lens, q_lens, page, torch.randperm(n_blocks).tolist(), DEV)
    q = torch.randn(sum(q_lens), h, d, device=DEV, dtype=BF16)
    return q, kc, vc, meta


HEADS = [(14, 2, 64), (32, 32, 96), (8, 2, 128), (4, 4, 128)]


@pytest.mark.parametrize(("h", "hk", "d"), HEADS)
@pytest.mark.parametrize("ctx", [[1], [37], [200], [200, 129, 256], [100, 4001], [3000, 5, 777]])
@pytest.mark.parametrize("window", [None, 50])
def test_decode_attention(ctx: list[int], h: int, hk: int, d: int, window: int | None) -> None:
    from worker_orcd.kernels.triton.attention import attention, decode_attention

    q, kc, vc, meta = _paged_batch(ctx, [1] * len(ctx), h, hk, d)
    ref = attention_ref(q, kc, vc, meta, sliding_window=window)
    out = attention(q, kc, vc, meta, sliding_window=window)
    assert rel_err(out, ref) < 1e-2
    # The merge in its own kernel, and the one-split case, compute the same function.
    scale = d**-0.5
    two_kernels = decode_attention(q, kc, vc, meta, scale, window, fused_merge=False)
    assert rel_err(two_kernels, ref) < 1e-2
    one_split = decode_attention(q, kc, vc, meta, scale, window, splits=1)
    assert rel_err(one_split, ref) < 1e-2
    assert torch.equal(attention(q, kc, vc, meta, sliding_window=window), out)  # re-armed counters
    if d % 32 == 0:  # the output also rounded for a quantized o projection, by every path
        check_rounded_output(q, kc, vc, meta, scale, window)


def check_rounded_output(q, kc, vc, meta, scale, window) -> None:
    """The decode kernels' int8 rounding of their output equals `round_x_reference` of what they
    stored, bit for bit: one split, split + merge kernel, merge by the last split."""
    from worker_orcd.kernels.quant.ops import RoundedX, round_x_reference
    from worker_orcd.kernels.triton.attention import decode_attention

    t, h, d = q.shape
    for kw in ({"splits": 1}, {"splits": 3}, {"splits": 4, "fused_merge": True}):
        rounded = RoundedX.empty(t, h * d, q.device)
        out = decode_attention(q, kc, vc, meta, scale, window, rounded=rounded, **kw)
        assert torch.equal(out, decode_attention(q, kc, vc, meta, scale, window, **kw))
        want = round_x_reference(out.reshape(t, h * d))
        for got, ref_part in zip(rounded, want, strict=True):
            assert torch.equal(got, ref_part), kw


@pytest.mark.parametrize(("h", "hk", "d"), HEADS)
@pytest.mark.parametrize(
    ("ctx", "q_lens"), [([1], [1]), ([129], [129]), ([77, 300], [77, 45]), ([513, 20], [200, 20])]
)
@pytest.mark.parametrize("window", [None, 64])
def test_prefill_attention(
    ctx: list[int], q_lens: list[int], h: int, hk: int, d: int, window: int | None
) -> None:
    from worker_orcd.kernels.triton.attention import attention

    q, kc, vc, meta = _paged_batch(ctx, q_lens, h, hk, d)
    ref = attention_ref(q, kc, vc, meta, sliding_window=window, scale=1 / math.sqrt(d))
    out = attention(q, kc, vc, meta, sliding_window=window)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize(
    ("n", "k"), [(9216, 3072), (3072, 8192), (1152, 896), (9728, 896), (896, 4864), (1001, 777)]
)
@pytest.mark.parametrize("bias", [False, True])
def test_gemv(n: int, k: int, bias: bool) -> None:
    from worker_orcd.kernels.triton import gemv, gemv_rows

    x = torch.randn(1, k, device=DEV, dtype=BF16)
    w = torch.randn(n, k, device=DEV, dtype=BF16) * 0.05
    b = torch.randn(n, device=DEV, dtype=BF16) if bias else None
    ref = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    assert rel_err(gemv.gemv(x, w, b), ref) < 1e-2
    assert rel_err(gemv.linear(x.view(1, 1, k), w, b).view(1, n), ref) < 1e-2
    many = torch.randn(gemv_rows.MAX_ROWS + 1, k, device=DEV, dtype=BF16)  # past the kernels
    assert torch.equal(gemv.linear(many, w, b), torch.nn.functional.linear(many, w, b))


@pytest.mark.parametrize("config", [(1, 256, 2, True), (2, 1024, 4, False), (8, 512, 8, True)])
@pytest.mark.parametrize(("n", "k"), [(1001, 777), (37, 3000)])
def test_gemv_configs(n: int, k: int, config: tuple[int, int, int, bool]) -> None:
    """Every tiling, with and without the next tile in flight, at odd shapes (tails in N and K)."""
    from worker_orcd.kernels.triton import gemv

    x = torch.randn(1, k, device=DEV, dtype=BF16)
    w = torch.randn(n, k, device=DEV, dtype=BF16) * 0.05
    ref = torch.nn.functional.linear(x.double(), w.double())
    out = torch.full((1, n + 3), float("nan"), device=DEV, dtype=BF16)
    gemv.gemv(x, w, config=config, out=out[:, :n])
    assert rel_err(out[:, :n], ref) < 1e-2
    assert torch.isnan(out[:, n:]).all()  # nothing written past N


@pytest.mark.parametrize(
    ("n", "k"), [(1152, 896), (9728, 896), (896, 896), (333, 1000), (9216, 3072)]
)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_add_rms_norm_linear(n: int, k: int, residual: bool, bias: bool) -> None:
    """The norm inside the GEMV (rows up to NORM_MAX_K) and the two-kernel fallback (longer rows,
    several rows) against the torch reference."""
    from worker_orcd.kernels import add_rms_norm_linear_ref
    from worker_orcd.kernels.triton import gemv

    for rows in (1, 5):
        x = torch.randn(rows, k, device=DEV, dtype=BF16) * 3
        r = torch.randn(rows, k, device=DEV, dtype=BF16) if residual else None
        g = 1 + 0.1 * torch.randn(k, device=DEV, dtype=BF16)
        w = torch.randn(n, k, device=DEV, dtype=BF16) * 0.05
        b = torch.randn(n, device=DEV, dtype=BF16) if bias else None
        y, s = gemv.add_rms_norm_linear(x, r, g, 1e-6, w, b)
        y_ref, s_ref = add_rms_norm_linear_ref(x, r, g, 1e-6, w, b)
        assert torch.equal(s, s_ref)
        ref = add_rms_norm_linear_ref(
            x.double(),
            None if r is None else r.double(),
            g.double(),
            1e-6,
            w.double(),
            None if b is None else b.double(),
        )[0]
        # within bf16 rounding of the reference's own bf16 result
        assert rel_err(y, ref) < max(1e-2, 2 * rel_err(y_ref, ref))


@pytest.mark.parametrize(
    ("h", "hk", "d", "k"),
    [(14, 2, 64, 896), (32, 32, 96, 3072), (4, 2, 128, 1000), (3, 1, 96, 777)],
)
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_norm_qkv_rope_store(h: int, hk: int, d: int, k: int, residual: bool, bias: bool) -> None:
    """Norm + qkv projection + RoPE + KV write in one kernel (a decode row) and the fallback
    (several rows) against the torch reference: rotated q, the cache rows written, nothing else
    touched, and no write for a padding token (slot -1)."""
    from worker_orcd.kernels import norm_qkv_rope_store_ref
    from worker_orcd.kernels.triton import gemv

    n = (h + 2 * hk) * d
    cos_sin = rope_cos_sin_cache(d, 4096, 1e6, device=DEV)
    for rows in (1, 3):
        x = torch.randn(rows, k, device=DEV, dtype=BF16) * 3
        r = torch.randn(rows, k, device=DEV, dtype=BF16) if residual else None
        g = 1 + 0.1 * torch.randn(k, device=DEV, dtype=BF16)
        w = torch.randn(n, k, device=DEV, dtype=BF16) * 0.05
        b = torch.randn(n, device=DEV, dtype=BF16) if bias else None
        positions = torch.randint(0, 4096, (rows,), device=DEV)
        slots = torch.randperm(40, device=DEV)[:rows]
        caches = [torch.randn(40, hk, d, device=DEV, dtype=BF16) for _ in range(2)]
        ours, ref = [c.clone() for c in caches], [c.clone() for c in caches]
        q, s = gemv.norm_qkv_rope_store(x, r, g, 1e-6, w, b, positions, cos_sin, *ours, slots)
        q_ref, s_ref = norm_qkv_rope_store_ref(x, r, g, 1e-6, w, b, positions, cos_sin, *ref, slots)
        assert torch.equal(s, s_ref)
        assert rel_err(q, q_ref) < 1e-2
        for c, c_ref, c0 in zip(ours, ref, caches, strict=True):
            assert rel_err(c[slots], c_ref[slots]) < 1e-2
            others = torch.ones(40, dtype=torch.bool, device=DEV)
            others[slots] = False
            assert torch.equal(c[others], c0[others])
        padded = [c.clone() for c in caches]
        minus = torch.full_like(slots, -1)
        gemv.norm_qkv_rope_store(x, r, g, 1e-6, w, b, positions, cos_sin, *padded, minus)
        assert all(torch.equal(p, c) for p, c in zip(padded, caches, strict=True))


def test_programmatic_launch_keeps_order(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chain of dependent kernels captured in a graph, launched as programmatic dependents (the
    next starts while the previous drains), gives exactly what plain launches give. A kernel that
    read its input before its predecessor finished would see a stale value."""
    from worker_orcd.kernels.triton import gemv, norm, pdl

    if not pdl.enabled(torch.device(DEV)):
        pytest.skip("programmatic dependent launch needs compute capability 9.0")
    d = 896
    ws = [torch.randn(d, d, device=DEV, dtype=BF16) * 0.05 for _ in range(4)]
    g = 1 + 0.1 * torch.randn(d, device=DEV, dtype=BF16)

    def chain(x: torch.Tensor) -> torch.Tensor:
        r = x
        for i in range(24):
            y, r = gemv.add_rms_norm_linear(x, r, g, 1e-6, ws[i % 4])
            x = gemv.gemv(y, ws[(i + 1) % 4])
            x, r = norm.add_rms_norm(x, r, g, 1e-6)
        return x

    x0 = torch.randn(1, d, device=DEV, dtype=BF16)
    static_x = x0.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        chain(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(static_x)
    graph.replay()
    torch.cuda.synchronize()
    monkeypatch.setattr(pdl, "enabled", lambda device: False)
    plain = chain(x0)
    assert torch.equal(out, plain)


@pytest.mark.parametrize(("n", "inter"), [(3072, 8192), (896, 4864), (1001, 777)])
def test_silu_and_mul_linear(n: int, inter: int) -> None:
    from worker_orcd.kernels.triton import activation, gemv

    gate_up = torch.randn(1, 2 * inter, device=DEV, dtype=BF16) * 2
    w = torch.randn(n, inter, device=DEV, dtype=BF16) * 0.05
    fused = gemv.silu_and_mul_linear(gate_up, w)
    assert torch.equal(fused, gemv.gemv(activation.silu_and_mul(gate_up), w))
    ref = silu_and_mul_linear_ref(gate_up.double(), w.double())
    assert rel_err(fused, ref) < 1e-2
    bias = torch.randn(n, device=DEV, dtype=BF16)
    with_bias = gemv.silu_and_mul_linear(gate_up, w, bias)
    bias_ref = silu_and_mul_linear_ref(gate_up.double(), w.double(), bias.double())
    assert rel_err(with_bias, bias_ref) < 1e-2
    many = torch.randn(7, 2 * inter, device=DEV, dtype=BF16)
    assert rel_err(gemv.silu_and_mul_linear(many, w), silu_and_mul_linear_ref(many, w)) < 1e-2


def test_register_all_routes_the_fused_entry_points() -> None:
    from worker_orcd.kernels.triton import attention, gemv, register_all, rope

    register_all()
    dev = torch.device(DEV)
    assert kernels.implementation("rope_store_kv", dev) is rope.rope_store_kv
    assert kernels.implementation("rope_store_attend", dev) is attention.rope_store_attend
    assert kernels.implementation("silu_and_mul_linear", dev) is gemv.silu_and_mul_linear


def test_negative_slots_write_nothing() -> None:
    """Padding tokens of a captured graph carry slot -1: the store kernels skip them."""
    from worker_orcd.kernels.triton import rope

    q, k, v = _qkv(4, 4, 2, 96)
    cs = rope_cos_sin_cache(96, 64, 10000.0, device=DEV)
    pos = torch.tensor([0, 1, 2, 3], device=DEV)
    slots = torch.tensor([5, -1, 7, -1], device=DEV)
    for store in ("store_kv", "rope_store_kv"):
        kc = torch.randn(10, 2, 96, device=DEV, dtype=BF16)
        vc = torch.randn(10, 2, 96, device=DEV, dtype=BF16)
        kc0, vc0 = kc.clone(), vc.clone()
        if store == "store_kv":
            rope.store_kv(k, v, kc, vc, slots)
        else:
            rope.rope_store_kv(q, k, v, pos, cs, kc, vc, slots)
        untouched = [0, 1, 2, 3, 4, 6, 8, 9]
        assert torch.equal(kc[untouched], kc0[untouched])
        assert torch.equal(vc[untouched], vc0[untouched])
        assert torch.equal(vc[5], v[0]) and torch.equal(vc[7], v[2])
