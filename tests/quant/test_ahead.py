"""The next GEMV weight asked into L2 (`kernels.quant.ahead`): the setting, the regions, the ring
of links in the order a decode step reads its weights (CPU), and on the GPU that the prefetching
kernels give bit for bit the result of the plain ones."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator

import pytest
import torch

from tests.quant.conftest import gpu, needs_cuda, random_planes, shapes_for
from worker_orcd.bench import PRESETS
from worker_orcd.kernels.quant import SUPPORTED, ahead
from worker_orcd.kernels.quant.formats import Q
from worker_orcd.kernels.quant.ops import GemvConfig, gemv_config, quant_gemv
from worker_orcd.loader import build_model
from worker_orcd.quant_mix import fill_random_q4_k_m


@pytest.fixture
def l2_mode(monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """set(value): WORKER_ORCD_L2_AHEAD for this test; the cached setting is cleared around it."""

    def set_mode(value: str | None) -> None:
        if value is None:
            monkeypatch.delenv("WORKER_ORCD_L2_AHEAD", raising=False)
        else:
            monkeypatch.setenv("WORKER_ORCD_L2_AHEAD", value)
        ahead.setting.cache_clear()

    yield set_mode
    ahead.setting.cache_clear()
    monkeypatch.delenv("WORKER_ORCD_L2_AHEAD", raising=False)
    ahead.setting.cache_clear()


def test_setting_modes_and_cap(l2_mode, caplog: pytest.LogCaptureFixture) -> None:  # noqa: ANN001
    mb = 1 << 20
    for value, expected in [
        (None, (ahead.OFF, 24 * mb)),
        ("0", (ahead.OFF, 24 * mb)),
        ("start", (ahead.START, 24 * mb)),
        ("END:16", (ahead.END, 16 * mb)),
    ]:
        l2_mode(value)
        assert ahead.setting() == expected
    for bad in ("later", "end:many", "end:-1"):
        l2_mode(bad)
        with caplog.at_level(logging.WARNING, logger="worker_orcd.kernels.quant.ahead"):
            assert ahead.setting() == (ahead.OFF, 24 * mb)
        assert f"WORKER_ORCD_L2_AHEAD={bad!r} ignored" in caplog.text


def test_regions_are_the_two_largest_planes_cut_to_the_cap() -> None:
    planes = random_planes(Q.Q5_K, 512, 3072, "cpu", seed=1)  # qs 768 KiB, qh 192 KiB, ...
    qs, qh = planes["qs"], planes["qh"]
    whole = ahead.Ahead.of(list(planes.values()), cap=1 << 30)
    assert whole.a.data_ptr() == qs.data_ptr() and whole.b.data_ptr() == qh.data_ptr()
    assert (whole.a_lines, whole.b_lines) == (qs.nbytes // 128, qh.nbytes // 128)
    cut = ahead.Ahead.of(list(planes.values()), cap=1 << 19)  # 512 KiB: shared 4 : 1
    assert cut.a_lines == (1 << 19) * 4 // 5 // 128 and cut.b_lines == (1 << 19) // 5 // 128
    assert cut.nbytes <= 1 << 19
    one = ahead.Ahead.of([qs], cap=1 << 30)
    assert one.a_lines == qs.nbytes // 128 and one.b_lines == 0


def test_launch_keywords_only_where_on(l2_mode) -> None:  # noqa: ANN001
    planes = random_planes(Q.Q4_K, 256, 3072, "cpu", seed=2)
    near = ahead.Ahead.of(list(planes.values()), cap=1 << 30)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    l2_mode(None)
    assert ahead.launch_args(near, cuda) == {} and ahead.int8_args(near, cuda) == {}
    l2_mode("end")
    assert ahead.launch_args(None, cuda) == {} and ahead.int8_args(near, cpu) == {}
    kw = ahead.int8_args(near, cuda)
    assert (kw["AHEAD"], kw["EVICT"], kw["ah_a_lines"]) == (ahead.END, "evict_first", near.a_lines)
    assert (
        kw["ah_a"] is near.a
        and kw["ah_b"] is near.b
        and "EVICT" not in ahead.launch_args(near, cuda)
    )


def test_step_weights_ring_in_the_order_a_step_reads_them(l2_mode) -> None:  # noqa: ANN001
    config = dataclasses.replace(
        PRESETS["qwen2.5-0.5b"], n_layers=2, vocab_size=512, intermediate_size=512
    )
    cpu = torch.device("cpu")
    model = build_model(config, device=cpu, dtype=torch.float32, max_positions=16, quantized=True)
    fill_random_q4_k_m(model, config, generator=torch.Generator().manual_seed(0))
    weights = model.projection_weights()
    # per layer: qkv (v in Q8_0 where the mix gives it more bits: a launch of its own), o,
    # gate/up, down (Q4_K or Q6_K); then the tied Q8_0 head
    assert [(w.qtype.name, w.n, w.k) for w in weights] == [
        ("Q5_0", 1152, 896), ("Q5_0", 896, 896), ("Q5_0", 1024, 896), ("Q4_K", 896, 512),
        ("Q5_0", 1024, 896), ("Q8_0", 128, 896), ("Q5_0", 896, 896), ("Q5_0", 1024, 896),
        ("Q6_K", 896, 512), ("Q8_0", 512, 896),
    ]  # fmt: skip
    assert weights[-1] is model.lm_head.quantized.parts[0][1]

    l2_mode(None)
    assert ahead.link(weights) == 0 and all(w.l2_ahead is None for w in weights)
    l2_mode("end:1")
    assert ahead.link(weights) == len(weights)
    for w, nxt in zip(weights, weights[1:] + weights[:1], strict=True):
        largest = max(nxt.planes.values(), key=lambda t: t.nbytes)
        assert w.l2_ahead.a.data_ptr() == largest.data_ptr()
        assert 0 < w.l2_ahead.nbytes <= min(1 << 20, sum(t.nbytes for t in nxt.planes.values()))


def test_dense_step_weights_are_the_projection_weights_in_order() -> None:
    config = dataclasses.replace(PRESETS["phi3-mini"], n_layers=2, vocab_size=512, hidden_size=256,
                                 n_heads=4, n_kv_heads=4, head_dim=64, rope_dim=64,
                                 intermediate_size=512)  # fmt: skip
    model = build_model(config, device=torch.device("cpu"), dtype=torch.float32, max_positions=16)
    expected = []
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        expected += [attn.qkv_proj.weight, attn.o_proj.weight, mlp.gate_up_proj.weight]
        expected.append(mlp.down_proj.weight)
    weights = model.projection_weights()
    assert [w.shape for w in weights] == [(768, 256), (256, 256), (1024, 256), (256, 512)] * 2 + [
        (512, 256)
    ]
    assert all(a is b for a, b in zip(weights, [*expected, model.lm_head.weight], strict=True))


# -- GPU ------------------------------------------------------------------------------------------


@gpu
@needs_cuda
@pytest.mark.parametrize("qtype", SUPPORTED, ids=lambda t: t.name)
def test_prefetching_gemvs_are_bit_equal(qtype: Q, l2_mode) -> None:  # noqa: ANN001
    nxt = random_planes(Q.Q4_K, 16384, 3072, "cuda", seed=3)  # a 28 MB next weight
    shapes = [(9216, 3072), (3072, 8192), (896, 4864), (1024, 896), (896, 896), (37, 768)]
    for n, k in shapes_for(qtype, shapes):
        planes = random_planes(qtype, n, k, "cuda", seed=n + k)
        cfg = gemv_config(qtype, n, k)
        configs = [cfg, dataclasses.replace(cfg, split_k=3), dataclasses.replace(cfg, early=True)]
        if cfg.int8_x:
            configs.append(GemvConfig(4, 2, 2, prequant=False))
        for m in (1, 3):
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            for c in configs:
                l2_mode(None)
                plain = quant_gemv(x, planes, qtype, n, k, config=c)
                for mode in ("start:8", "end", "end:64", "end:0"):
                    l2_mode(mode)
                    near = ahead.Ahead.of(list(nxt.values()), ahead.setting()[1])
                    y = quant_gemv(x, planes, qtype, n, k, config=c, ahead=near)
                    assert torch.equal(y, plain), (qtype.name, n, k, m, c, mode)


@gpu
@needs_cuda
def test_prefetching_dense_projections_are_bit_equal(l2_mode) -> None:  # noqa: ANN001
    """The bf16 GEMV (one row: plain, SwiGLU in, norm in, qkv + RoPE + cache write) and the
    few-row kernels (plain, qkv + RoPE) with `l2_ahead` on their weight: bit for bit the same."""
    from worker_orcd.kernels.rope import rope_cos_sin_cache
    from worker_orcd.kernels.triton import gemv

    bf16 = torch.bfloat16
    nxt = torch.randn(16384, 3072, device="cuda", dtype=bf16)  # 100 MB, cut to the cap
    h, hk, d, k = 14, 2, 64, 896  # Qwen2.5-0.5B's attention
    n = (h + 2 * hk) * d
    cos_sin = rope_cos_sin_cache(d, 4096, 1e6, device="cuda")
    w_qkv = torch.randn(n, k, device="cuda", dtype=bf16) * 0.05
    w_big = torch.randn(3072, 8192, device="cuda", dtype=bf16) * 0.02
    g = 1 + 0.1 * torch.randn(k, device="cuda", dtype=bf16)

    def run(rows: int) -> list[torch.Tensor]:
        gen = torch.Generator(device="cuda").manual_seed(rows)
        x = torch.randn(rows, k, device="cuda", generator=gen).to(bf16)
        r = torch.randn(rows, k, device="cuda", generator=gen).to(bf16)
        gate_up = torch.randn(rows, 2 * 8192, device="cuda", generator=gen).to(bf16)
        caches = [torch.zeros(64, hk, d, device="cuda", dtype=bf16) for _ in range(2)]
        positions = torch.arange(rows, device="cuda") + 100
        slots = torch.arange(rows, device="cuda") * 3
        q, s = gemv.norm_qkv_rope_store(
            x, r, g, 1e-6, w_qkv, None, positions, cos_sin, *caches, slots
        )
        outs = [q, s, *caches, gemv.linear(gate_up[:, :8192], w_big)]
        if rows == 1:
            outs.append(gemv.silu_and_mul_linear(gate_up, w_big))
            outs += list(gemv.add_rms_norm_linear(x, r, g, 1e-6, w_qkv))
        return outs

    for rows in (1, 4, 8):
        l2_mode(None)
        plain = run(rows)
        for mode in ("start", "end:8"):
            l2_mode(mode)
            for w in (w_qkv, w_big):
                w.l2_ahead = ahead.Ahead.of([nxt], ahead.setting()[1])
            for a, b in zip(run(rows), plain, strict=True):
                assert torch.equal(a, b), (rows, mode)
            del w_qkv.l2_ahead, w_big.l2_ahead
