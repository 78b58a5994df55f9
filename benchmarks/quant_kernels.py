"""Quantized kernels on the GPU: GEMV GB/s per type and shape, per-token estimates, prefill options.

Prints, in one session:
  1. copy bandwidth of the card (bytes read + written), the ceiling for decode;
  2. for every decode weight of Phi-3-mini Q4_K_M and Qwen2.5-0.5B Q4_K_M: the fused GEMV's time and
     achieved GB/s (quantized bytes / time) with the float kernels (`int8_x=False`, their default
     config), the int8-activation kernels' default config and the best of a sweep of theirs;
     every timing replays a CUDA graph whose calls rotate over enough weight copies to overflow L2;
  3. the matmul part of a decode token for both models from those times (tok/s, GB/s);
  4. rows of x where dequantize + cuBLAS overtakes the GEMV;
  5. prefill at 512 and 2048 tokens: dequantize into a bf16 scratch + cuBLAS vs the fused Q4_K
     Triton matmul, beside cuBLAS on bf16 weights.
Weights are random blocks made on the GPU (speed does not depend on the values).
With --batched, instead: 2-64 rows of x, the fused small-batch kernels against dequantize + cuBLAS
and the GEMV over the same rows (quant_batched.py).

    PYTHONPATH=. python benchmarks/quant_kernels.py [--out DIR] [--quick] [--prequant [--rounded]
        --repeats 5]
    PYTHONPATH=. python benchmarks/quant_kernels.py --batched [--tune] [--types ...] [--out DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import math
import os
import statistics
import sys
from collections.abc import Callable
from functools import partial

import torch

from worker_orcd.kernels.quant.formats import Q, nbytes, random_blocks, to_planes
from worker_orcd.kernels.quant.ops import (
    GemvConfig,
    dequantize_planes,
    gemv_config,
    quant_gemv,
    quant_matmul_fused_q4_k,
    quantize_x,
)

logger = logging.getLogger("benchmarks.quant_kernels")

# (name, qtype, [out, in], launches per token)
PHI3 = [
    ("qkv", Q.Q5_K, (9216, 3072), 32),
    ("o", Q.Q4_K, (3072, 3072), 32),
    ("gate_up", Q.Q4_K, (16384, 3072), 32),
    ("down", Q.Q6_K, (3072, 8192), 16),
    ("down", Q.Q4_K, (3072, 8192), 16),
    ("lm_head", Q.Q6_K, (32064, 3072), 1),
]
QWEN = [
    ("qk", Q.Q5_0, (1024, 896), 24),
    ("v", Q.Q8_0, (128, 896), 24),
    ("o", Q.Q5_0, (896, 896), 24),
    ("gate_up", Q.Q5_0, (9728, 896), 24),
    ("down", Q.Q6_K, (896, 4864), 12),
    ("down", Q.Q4_K, (896, 4864), 12),
    ("lm_head", Q.Q8_0, (151936, 896), 1),
]
EXTRA = [("q4_0", Q.Q4_0, (3072, 3072), 0)]
L2_FLUSH_BYTES = 200 << 20


def sweep(qtype: Q, prequant: bool = False) -> list[GemvConfig]:
    """int8-activation launch configs tried per shape: (rows, tile, warps, split_k) x stages; with
    `prequant`, x rounded once by its own launch (no stages: they never helped) and fewer rows per
    program, which no longer re-round x, and for the K-quants fewer warps than `_i8_warps` would
    leave and 16 super-blocks a step (the shapes that a repeated probe found for the 2026-12-07
    Q4_K defaults)."""
    if prequant:
        if qtype in (Q.Q4_K, Q.Q5_K):
            shapes = [(8, 4, 4, 1), (4, 4, 4, 1), (2, 4, 4, 1), (16, 4, 4, 1), (8, 2, 4, 1),
                      (8, 4, 4, 2), (4, 4, 4, 2), (4, 2, 4, 1), (4, 8, 4, 1), (2, 8, 4, 1),
                      (4, 4, 4, 4), (2, 4, 4, 4), (4, 2, 1, 1), (4, 4, 1, 1), (8, 4, 2, 1),
                      (2, 16, 4, 1), (4, 16, 4, 1), (2, 16, 2, 1)]  # fmt: skip
            if qtype == Q.Q5_K:
                shapes += [(8, 4, 1, 1), (8, 2, 1, 1), (8, 2, 2, 1), (4, 8, 1, 1), (4, 8, 2, 1),
                           (2, 16, 1, 1), (2, 8, 2, 1), (16, 2, 2, 1)]  # fmt: skip
        elif qtype == Q.Q6_K:
            shapes = [(8, 8, 4, 1), (4, 8, 4, 1), (8, 4, 4, 1), (8, 8, 4, 2), (4, 4, 4, 1),
                      (16, 8, 4, 1), (2, 8, 4, 1), (4, 8, 4, 2), (4, 8, 4, 4), (2, 16, 4, 1),
                      (4, 16, 4, 1), (4, 8, 1, 1), (2, 32, 4, 1), (2, 32, 2, 1), (4, 16, 2, 1),
                      (8, 8, 2, 1), (8, 16, 4, 1)]  # fmt: skip
        else:
            shapes = [(8, 16, 4, 1), (4, 16, 4, 1), (4, 32, 4, 1), (2, 32, 4, 1), (16, 16, 4, 1),
                      (2, 16, 4, 1), (8, 8, 4, 1)]  # fmt: skip
        return [GemvConfig(*c, prequant=True) for c in shapes]
    if qtype in (Q.Q4_K, Q.Q5_K):
        shapes = [(8, 4, 4, 1), (16, 2, 4, 1), (16, 4, 4, 1), (8, 2, 4, 1), (32, 2, 4, 1),
                  (8, 2, 4, 4), (16, 2, 4, 4), (8, 4, 4, 2), (16, 2, 4, 2), (4, 4, 4, 1),
                  (8, 8, 4, 1), (4, 4, 4, 4)]  # fmt: skip
    elif qtype == Q.Q6_K:
        shapes = [(16, 4, 4, 2), (32, 4, 4, 2), (8, 4, 4, 4), (16, 4, 4, 1), (8, 4, 4, 1),
                  (8, 8, 4, 1), (16, 8, 4, 1), (32, 4, 4, 1), (8, 8, 4, 2), (4, 8, 4, 4),
                  (16, 2, 4, 4)]  # fmt: skip
    else:
        shapes = [(8, 16, 4, 1), (16, 16, 4, 1), (32, 16, 4, 1), (4, 16, 4, 1), (8, 32, 4, 1),
                  (16, 8, 4, 1), (4, 32, 4, 1), (2, 32, 4, 1), (8, 16, 2, 1), (16, 16, 2, 1),
                  (8, 16, 1, 1), (16, 8, 2, 1), (8, 8, 1, 1)]  # fmt: skip
    stages = (1, 2, 4) if qtype in (Q.Q4_K, Q.Q5_K) else (1, 3)
    return [GemvConfig(*c, stages=st) for c in shapes for st in stages]


def events_ms(fn: Callable[[], object], reps: int = 20) -> float:
    """Median milliseconds of fn() timed with CUDA events (after warm-up)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def graph_us(calls: list[Callable[[], object]], reps: int = 15) -> float:
    """Microseconds per call of a CUDA graph that makes every call once."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls[:2]:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    return events_ms(graph.replay, reps) * 1000 / len(calls)


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    ms = events_ms(lambda: dst.copy_(src), 10)
    return 2 * src.numel() / ms / 1e6  # GB/s


def _cfg(c: GemvConfig) -> list:
    return [c.block_n, c.tile, c.num_warps, c.split_k, int(c.one_plus), int(c.int8_x), c.stages,
            int(c.prequant)]  # fmt: skip


def timed_or_inf(calls: list[Callable[[], object]]) -> float:
    """graph_us(calls), or inf where it fails: a config that fails to build is reported, not
    fatal."""
    try:
        return graph_us(calls)
    except Exception:  # noqa: BLE001
        logger.exception("config failed")
        return math.inf


def weight_copies(planes: dict, size: int, most: int = 2048) -> list[dict]:
    """planes and clones of it, up to `most` in all: enough that a graph calling a kernel once on
    each reads L2_FLUSH_BYTES of weights, so every call meets its weight in memory, not in L2, as
    a decode step does."""
    copies = max(1, min(most, math.ceil(L2_FLUSH_BYTES / size)))
    return [planes] + [{a: t.clone() for a, t in planes.items()} for _ in range(copies - 1)]


def gemv_rows(
    entries: list, quick: bool, prequant: bool = False, repeats: int = 1, rounded: bool = False
) -> dict[tuple, dict]:
    """Per weight shape, every config timed `repeats` times, the configs interleaved within each
    round (so that a drift of the card's clocks meets all of them), and the median kept. With
    `rounded`, the configs that read x rounded once get it rounded before the timed calls, as
    the kernel producing x (norm, attention, SwiGLU) rounds it in the model; else each call
    rounds it by its own launch."""
    results: dict[tuple, dict] = {}
    for _, qtype, (n, k), _ in entries:
        key = (qtype.name, n, k)
        if key in results:
            continue
        size = nbytes(qtype, n, k)
        planes = to_planes(random_blocks(qtype, n, k, device="cuda"), qtype, n, k)
        weights = weight_copies(planes, size)
        x = torch.randn(1, k, device="cuda").to(torch.bfloat16)
        y = torch.empty(1, n, device="cuda", dtype=torch.bfloat16)
        x_rounded = quantize_x(x) if rounded else None
        float_cfg = gemv_config(qtype, n, k, int8_x=False)
        default = gemv_config(qtype, n, k)
        configs = [float_cfg, default]
        if prequant:
            configs += [c for c in sweep(qtype, prequant=True) if c != default]
        elif not quick:
            configs += [c for c in sweep(qtype) if c != default]
        runs: list[list[float]] = [[] for _ in configs]
        for _ in range(repeats):
            for cfg, us in zip(configs, runs, strict=True):
                r = x_rounded if cfg.prequant else None
                calls = [
                    partial(quant_gemv, x, p, qtype, n, k, out=y, config=cfg, rounded=r)
                    for p in weights
                ]
                us.append(timed_or_inf(calls))
        timed = [(statistics.median(us), cfg) for us, cfg in zip(runs, configs, strict=True)]
        float_us = timed[0][0]
        best_us, best = min(timed[1:], key=lambda t: t[0])
        default_us = timed[1][0]
        results[key] = {
            "qtype": qtype.name, "n": n, "k": k, "mb": size / 1e6, "copies": len(weights),
            "float": _cfg(float_cfg), "float_us": float_us,
            "default": _cfg(default), "default_us": default_us,
            "best": _cfg(best), "best_us": best_us,
            "all": [[*_cfg(c), us] for us, c in timed], "runs": runs,
        }  # fmt: skip
        logger.info(
            "gemv %-5s [%6d, %5d] %8.2f MB  float %7.2f us | default %s %7.2f us %6.0f GB/s | "
            "best %s %7.2f us %6.0f GB/s",
            qtype.name, n, k, size / 1e6, float_us, results[key]["default"], default_us,
            size / default_us / 1e3,
            results[key]["best"], best_us, size / best_us / 1e3,
        )  # fmt: skip
        del weights
        torch.cuda.empty_cache()
    return results


def token_estimate(model: str, entries: list, gemv: dict, copy_gbs: float) -> dict:
    out = {}
    for which in ("float_us", "default_us", "best_us"):
        us = sum(gemv[(q.name, n, k)][which] * count for _, q, (n, k), count in entries)
        total = sum(nbytes(q, n, k) * count for _, q, (n, k), count in entries)
        out[which] = {"us": us, "tok_s": 1e6 / us, "gb": total / 1e9, "gbs": total / us / 1e3}
        logger.info(
            "%s matmuls per token (%s): %.1f us -> %.0f tok/s, %.2f GB/token at %.0f GB/s "
            "(%.0f%% of copy)",
            model, which.removesuffix("_us"), us, 1e6 / us, total / 1e9, total / us / 1e3,
            100 * total / us / 1e3 / copy_gbs,
        )  # fmt: skip
    return out


def _dense(
    x: torch.Tensor, planes: dict, qtype: Q, n: int, k: int, scratch: torch.Tensor, y: torch.Tensor
) -> None:
    dequantize_planes(planes, qtype, n, k, out=scratch)
    torch.matmul(x, scratch.t(), out=y)


def rows_crossover() -> list[dict]:
    rows = []
    for qtype, (n, k) in [(Q.Q4_K, (3072, 3072)), (Q.Q4_K, (16384, 3072)), (Q.Q5_0, (9728, 896))]:
        planes = to_planes(random_blocks(qtype, n, k, device="cuda"), qtype, n, k)
        scratch = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
        for m in (1, 2, 4, 8, 16, 32):
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            g = events_ms(partial(quant_gemv, x, planes, qtype, n, k, out=y)) * 1000
            d = events_ms(partial(_dense, x, planes, qtype, n, k, scratch, y)) * 1000
            rows.append({"qtype": qtype.name, "n": n, "k": k, "m": m, "gemv_us": g, "dense_us": d})
            logger.info("rows %-5s [%5d, %4d] m=%2d gemv %8.1f us  dequant+cuBLAS %8.1f us",
                        qtype.name, n, k, m, g, d)  # fmt: skip
    return rows


def prefill(entries: list) -> list[dict]:
    rows = []
    fused_cfgs = [(128, 128, 8, 3), (128, 64, 4, 4), (64, 128, 4, 4), (128, 256, 8, 3)]
    for name, qtype, (n, k), count in entries:
        planes = to_planes(random_blocks(qtype, n, k, device="cuda"), qtype, n, k)
        scratch = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
        deq_us = events_ms(partial(dequantize_planes, planes, qtype, n, k, out=scratch)) * 1000
        for m in (512, 2048):
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            mm_us = events_ms(partial(torch.matmul, x, scratch.t(), out=y)) * 1000
            row = {"name": name, "qtype": qtype.name, "n": n, "k": k, "m": m, "count": count,
                   "dequant_us": deq_us, "cublas_us": mm_us,
                   "scratch_total_us": deq_us + mm_us}  # fmt: skip
            if qtype == Q.Q4_K:
                best = None
                for bm, bn, nw, ns in fused_cfgs:
                    try:
                        fn = partial(quant_matmul_fused_q4_k, x, planes, n, k, block_m=bm,
                                     block_n=bn, num_warps=nw, num_stages=ns)  # fmt: skip
                        us = events_ms(fn) * 1000
                    except Exception as e:  # noqa: BLE001 - a config may not fit shared memory
                        logger.info("fused %s skipped: %s", (bm, bn, nw, ns), type(e).__name__)
                        continue
                    if best is None or us < best[0]:
                        best = (us, [bm, bn, nw, ns])
                if best:
                    row["fused_us"], row["fused_cfg"] = best
            rows.append(row)
            logger.info(
                "prefill %-7s %-5s [%5d, %4d] m=%4d  dequant %6.1f + cuBLAS %7.1f = %7.1f us "
                "(%5.0f TFLOP/s on bf16)  fused %s",
                name, qtype.name, n, k, m, deq_us, mm_us, deq_us + mm_us,
                2 * m * n * k / mm_us / 1e6,
                f"{row['fused_us']:.1f} us {row['fused_cfg']}" if "fused_us" in row else "-",
            )  # fmt: skip
        del scratch
        torch.cuda.empty_cache()
    return rows


def _guarded(fn: Callable[[], list], default: list) -> list:
    try:
        return fn()
    except Exception:  # noqa: BLE001 - keep the other sections' numbers
        logger.exception("section failed")
        return default


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--quick", action="store_true", help="default configs only")
    ap.add_argument("--gemv-only", action="store_true", help="skip the rows and prefill sections")
    ap.add_argument("--types", default="", help="sweeps of these types only, e.g. Q4_K,Q6_K")
    ap.add_argument("--prequant", action="store_true",
                    help="sweep configs with x rounded once by its own launch")  # fmt: skip
    ap.add_argument("--batched", action="store_true",
                    help="2-64 rows: small-batch kernels, dequantize + cuBLAS, GEMV")  # fmt: skip
    ap.add_argument("--tune", action="store_true",
                    help="with --batched: sweep the small-batch launch configs")  # fmt: skip
    ap.add_argument("--rows", default="", help="with --batched: these batch sizes, e.g. 8,32,64")
    ap.add_argument("--model", default="", help="with --batched: one model's weights (phi3, qwen)")
    ap.add_argument("--rounded", action="store_true",
                    help="GEMV sweep: x rounded before timing, as in a model")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=1,
                    help="GEMV sweep: time each config N times, interleaved; median")  # fmt: skip
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    torch.manual_seed(0)
    if args.batched:
        import quant_batched  # this script's directory is on sys.path

        batches = tuple(int(b) for b in args.rows.split(",")) if args.rows else quant_batched.ROWS
        return quant_batched.run(
            args.out, args.types, tune_only=args.tune, batches=batches, model=args.model
        )
    import triton

    info = {
        "device": torch.cuda.get_device_name(), "date": datetime.date.today().isoformat(),
        "torch": torch.__version__, "triton": triton.__version__,
    }  # fmt: skip
    logger.info("%s", info)
    copy_gbs = copy_bandwidth()
    logger.info("copy bandwidth: %.0f GB/s (read + written)", copy_gbs)
    entries = PHI3 + QWEN + EXTRA
    if args.types:
        entries = [e for e in entries if e[1].name in args.types.split(",")]
    gemv = gemv_rows(entries, args.quick, args.prequant, args.repeats, args.rounded)
    tokens = {}
    if not args.types:
        tokens = {
            "phi3": token_estimate("Phi-3-mini Q4_K_M", PHI3, gemv, copy_gbs),
            "qwen": token_estimate("Qwen2.5-0.5B Q4_K_M", QWEN, gemv, copy_gbs),
        }
    cross = [] if args.gemv_only else _guarded(rows_crossover, [])
    pre = [] if args.gemv_only else _guarded(lambda: prefill(PHI3), [])
    for m in (512, 2048) if pre else ():
        sel = [r for r in pre if r["m"] == m]
        scratch = sum(r["scratch_total_us"] * r["count"] for r in sel)
        bf16 = sum(r["cublas_us"] * r["count"] for r in sel)
        logger.info("Phi-3 prefill %d matmuls: scratch+cuBLAS %.0f us (%.0f tok/s), bf16 cuBLAS "
                    "alone %.0f us", m, scratch, m * 1e6 / scratch, bf16)  # fmt: skip
    with open(os.path.join(args.out, "quant_kernels.json"), "w") as f:
        json.dump({**info, "copy_gbs": copy_gbs, "gemv": list(gemv.values()), "tokens": tokens,
                   "rows": cross, "prefill": pre}, f, indent=1)  # fmt: skip

    logger.info("\n%-5s %-15s %7s %9s %6s %9s %6s %9s %6s %5s %s", "type", "[out, in]", "MB",
                "float", "GB/s", "default", "GB/s", "best", "GB/s", "%copy",
                "best config")  # fmt: skip
    for r in gemv.values():
        logger.info(
            "%-5s %-15s %7.2f %7.2fus %6.0f %7.2fus %6.0f %7.2fus %6.0f %4.0f%% %s",
            r["qtype"], f"[{r['n']}, {r['k']}]", r["mb"],
            r["float_us"], r["mb"] * 1e3 / r["float_us"],
            r["default_us"], r["mb"] * 1e3 / r["default_us"], r["best_us"],
            r["mb"] * 1e3 / r["best_us"], 100 * r["mb"] * 1e3 / r["best_us"] / copy_gbs,
            r["best"],
        )  # fmt: skip
    for model, t in tokens.items():
        logger.info("%s matmuls per token: float %.0f us (%.0f tok/s), int8 default %.0f us "
                    "(%.0f tok/s), best %.0f us (%.0f tok/s); copy %.0f GB/s", model,
                    t["float_us"]["us"], t["float_us"]["tok_s"], t["default_us"]["us"],
                    t["default_us"]["tok_s"], t["best_us"]["us"], t["best_us"]["tok_s"],
                    copy_gbs)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
