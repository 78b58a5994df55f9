"""Measuring helpers for `worker-orcd bench` and `benchmarks/`: device ceilings, timing, the peer.

Everything here runs on a CUDA device and returns numbers; printing is the CLI's job.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


def cuda_time_ms(fn: Callable[[], object], *, warmup: int = 3, iters: int = 10) -> float:
    """Median milliseconds of `fn()` on the current stream, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times: list[float] = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, gib: float = 1.0) -> float:
    """Device-to-device copy rate in GB/s, counting bytes read plus bytes written."""
    n = int(gib * 2**30) // 2
    src = torch.randn(n, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = cuda_time_ms(lambda: dst.copy_(src), warmup=3, iters=20)
    return 2 * n * 2 / (ms / 1e3) / 1e9


def matmul_tflops(device: torch.device, size: int = 8192) -> float:
    """bf16 matrix product rate in TFLOP/s on random data."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    ms = cuda_time_ms(lambda: a @ b, warmup=3, iters=10)
    return 2 * size**3 / (ms / 1e3) / 1e12


@dataclass(slots=True)
class Ceilings:
    device_name: str
    copy_gbs: float
    matmul_tflops: float


def measure_ceilings(device: torch.device) -> Ceilings:
    name = torch.cuda.get_device_name(device)
    copy = copy_bandwidth_gbs(device)
    mm = matmul_tflops(device)
    logger.info("%s: copy %.0f GB/s, bf16 matmul %.0f TFLOP/s", name, copy, mm)
    return Ceilings(name, copy, mm)


@dataclass(slots=True)
class SpeedRow:
    """One line of the bench table; `None` where a figure does not apply."""

    engine: str
    phase: str  # "prefill" | "decode"
    context: int  # prompt length (prefill) or tokens already in the cache (decode)
    tok_s: float
    ms: float  # per prefill, or per decoded token
    gbs: float | None = None


def hf_config(preset: str):  # -> transformers.PretrainedConfig
    """A transformers config with the real dimensions of a preset (no sliding window)."""
    from transformers import Phi3Config, Qwen2Config

    if preset == "phi3-mini":
        return Phi3Config(
            vocab_size=32064,
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
            original_max_position_embeddings=4096,
            rope_theta=10000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            sliding_window=None,
            pad_token_id=0,
        )
    if preset == "qwen2.5-0.5b":
        return Qwen2Config(
            vocab_size=151936,
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            use_sliding_window=False,
        )
    raise ValueError(f"unknown preset {preset!r}; expected phi3-mini or qwen2.5-0.5b")


def peer_transformers(
    preset: str,
    device: torch.device,
    prefill_lens: list[int],
    decode_contexts: list[int],
    decode_steps: int,
    weight_bytes: int | None = None,
) -> list[SpeedRow]:
    """transformers (bf16, sdpa, random weights) prefill and greedy decode speed in this process."""
    from transformers import AutoModelForCausalLM, DynamicCache

    cfg = hf_config(preset)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            cfg, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    model.eval()
    if weight_bytes is None:
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    logger.info("peer transformers %s built in %.1f s", preset, time.perf_counter() - t0)
    gen = torch.Generator(device=device).manual_seed(0)
    rows: list[SpeedRow] = []
    with torch.inference_mode():
        for n in prefill_lens:
            ids = torch.randint(0, cfg.vocab_size, (1, n), device=device, generator=gen)
            ms = cuda_time_ms(lambda m=model, ids=ids: m(input_ids=ids, use_cache=False), iters=5)
            rows.append(SpeedRow("transformers", "prefill", n, n / (ms / 1e3), ms))
            logger.info("peer prefill %d: %.2f ms", n, ms)
        for ctx in decode_contexts:
            ids = torch.randint(0, cfg.vocab_size, (1, ctx), device=device, generator=gen)
            cache = DynamicCache(config=cfg)
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            for _ in range(3):  # warm-up steps
                out = model(input_ids=tok, past_key_values=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(decode_steps):
                out = model(input_ids=tok, past_key_values=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize()
            ms = (time.perf_counter() - t0) * 1e3 / decode_steps
            gbs = weight_bytes / (ms / 1e3) / 1e9
            rows.append(SpeedRow("transformers", "decode", ctx, 1e3 / ms, ms, gbs))
            logger.info("peer decode at %d: %.2f ms/token", ctx, ms)
            del cache, out
    return rows
