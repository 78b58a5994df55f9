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

from worker_orcd.config import ModelConfig
from worker_orcd.parallel import Parallel

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


def hf_config(config: ModelConfig):  # -> transformers.PretrainedConfig
    """A transformers config with the dimensions of `config` (qwen2 or phi3; no sliding window), so
    the peer is built from the same numbers as our model."""
    from transformers import Phi3Config, Qwen2Config

    common = dict(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.n_layers,
        num_attention_heads=config.n_heads,
        num_key_value_heads=config.n_kv_heads,
        max_position_embeddings=config.context_length,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.rms_eps,
        tie_word_embeddings=config.tied_embeddings,
    )
    if config.architecture == "phi3":
        original = config.rope_original_context or config.context_length
        return Phi3Config(
            **common, original_max_position_embeddings=original, sliding_window=None, pad_token_id=0
        )
    if config.architecture == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    raise ValueError(f"no transformers peer for architecture {config.architecture!r} (qwen2, phi3)")


def peer_transformers(
    config: ModelConfig,
    device: torch.device,
    prefill_lens: list[int],
    decode_contexts: list[int],
    decode_steps: int,
    weight_bytes: int | None = None,
) -> list[SpeedRow]:
    """transformers (bf16, sdpa, random weights) prefill and greedy decode speed in this process."""
    from transformers import AutoModelForCausalLM, DynamicCache

    cfg = hf_config(config)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            cfg, dtype=torch.bfloat16, attn_implementation="sdpa"
        )
    model.eval()
    if weight_bytes is None:
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    logger.info(
        "peer transformers %s built in %.1f s", config.architecture, time.perf_counter() - t0
    )
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


@dataclass(frozen=True, slots=True)
class CollectiveTiming:
    """Run on every rank of a tensor-parallel model (RankGroup.call): median microseconds of one
    all-reduce of [1, hidden] in `dtype` (a decode step makes 2 per layer and one for the
    embedding) and of the head's all-gather of [1, vocab] float32 logits, each timed alone."""

    hidden: int
    vocab: int
    dtype: torch.dtype
    iters: int = 200

    def __call__(self, parallel: Parallel, device: torch.device) -> tuple[float, float]:
        x = torch.ones(1, self.hidden, dtype=self.dtype, device=device)
        logits = torch.ones(1, len(parallel.part(self.vocab)), device=device)
        reduce_ms = cuda_time_ms(lambda: parallel.all_reduce(x), warmup=20, iters=self.iters)
        gather_ms = cuda_time_ms(
            lambda: parallel.all_gather(logits, self.vocab), warmup=20, iters=self.iters
        )
        return reduce_ms * 1e3, gather_ms * 1e3
