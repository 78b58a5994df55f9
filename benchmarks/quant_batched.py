"""Quantized matmuls at 2-64 rows of x on the GPU: the fused small-batch kernels (`quant_batched`)
against dequantize + cuBLAS and the GEMV kernel over the same rows, per type, shape and batch.

For every quant type, every decode weight shape of Qwen2.5-0.5B and Phi-3-mini (K-quants only where
rows are whole super-blocks) and B in (2, 4, 8, 16, 32, 64): the time of each path per call, from
the replay of a CUDA graph that calls it once for each of enough copies of the weight to overflow
L2, as a decode step meets its weights (`do_bench`, used before 2026-12-06, timed each call alone
and read 10-20% high where the host's launch was slower than the kernel); GB/s of the weight's
quantized bytes and their share of the copy bandwidth measured in the same run, and how the
small-batch kernel compares with the better of the other two; a table at the end and JSON under
--out. For Q4_K, Q5_K and Q6_K, also the default config with the weights made the other way
(`BatchedConfig.pairs`: in bf16 pairs or in float32), in the log and as `twin_us`. x and y are
bf16, weights random GGUF blocks made on the GPU (speed does not depend on the values).

With --tune, instead: a sweep of the small-batch kernels' launch configs for the weights of the
two models' Q4_K_M mixes (K-quants' super-block steps both ways, `pairs`), each batch's best
config and its time against the default's.

    PYTHONPATH=. python benchmarks/quant_kernels.py --batched [--types Q4_K,Q6_K] [--out DIR]
        [--rows 2,4,8] [--model phi3]
    PYTHONPATH=. python benchmarks/quant_kernels.py --batched --tune [--types Q4_K] [--out DIR]
        [--rows 8,32,64] [--model phi3]
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from functools import partial

import quant_kernels as qk  # this script's directory is on sys.path
import torch
import triton

from worker_orcd.benchtools import copy_bandwidth_gbs
from worker_orcd.kernels.quant.formats import (
    SUPPORTED,
    Q,
    block_format,
    nbytes,
    random_blocks,
    to_planes,
)
from worker_orcd.kernels.quant.ops import (
    PACKED_TYPES,
    BatchedConfig,
    batched_config,
    dequantize_planes,
    quant_batched,
    quant_gemv,
)

logger = logging.getLogger("benchmarks.quant_batched")

SHAPES = [
    ("qwen.o", (896, 896)), ("qwen.qkv", (1152, 896)), ("qwen.gate_up", (9728, 896)),
    ("qwen.down", (896, 4864)), ("qwen.lm_head", (151936, 896)),
    ("phi3.o", (3072, 3072)), ("phi3.qkv", (9216, 3072)), ("phi3.gate_up", (16384, 3072)),
    ("phi3.down", (3072, 8192)), ("phi3.lm_head", (32064, 3072)),
]  # fmt: skip
# The two models' Q4_K_M mixes (the weights --tune sweeps)
MIX = [
    (Q.Q5_K, "phi3.qkv"), (Q.Q4_K, "phi3.o"), (Q.Q4_K, "phi3.gate_up"), (Q.Q6_K, "phi3.down"),
    (Q.Q4_K, "phi3.down"), (Q.Q6_K, "phi3.lm_head"), (Q.Q5_0, "qwen.qkv"), (Q.Q5_0, "qwen.o"),
    (Q.Q5_0, "qwen.gate_up"), (Q.Q6_K, "qwen.down"), (Q.Q4_K, "qwen.down"),
    (Q.Q8_0, "qwen.lm_head"),
]  # fmt: skip
ROWS = (2, 4, 8, 16, 32, 64)


def graph_us(fn: Callable[[dict], object], weights: list[dict]) -> float:
    """Microseconds per call of a CUDA graph calling fn(planes) once for each weight copy
    (`quant_kernels.weight_copies`), or inf where it fails (reported, not fatal)."""
    return qk.timed_or_inf([partial(fn, p) for p in weights])


def _dense(
    x: torch.Tensor, planes: dict, qtype: Q, n: int, k: int, w: torch.Tensor, y: torch.Tensor
) -> None:
    dequantize_planes(planes, qtype, n, k, out=w)
    torch.matmul(x, w.t(), out=y)


def _points(
    types: list[Q], shapes: list[tuple[str, tuple[int, int]]]
) -> Iterator[tuple[Q, str, int, int]]:
    for qtype in types:
        for name, (n, k) in shapes:
            if k % block_format(qtype).block_size == 0:
                yield qtype, name, n, k


def sweep(
    types: list[Q], copy_gbs: float, batches: tuple[int, ...] = ROWS, model: str = ""
) -> list[dict]:
    rows = []
    shapes = [(name, shape) for name, shape in SHAPES if name.startswith(model)]
    for qtype, name, n, k in _points(types, shapes):
        size = nbytes(qtype, n, k)
        planes = to_planes(random_blocks(qtype, n, k, device="cuda"), qtype, n, k)
        weights = qk.weight_copies(planes, size, most=256)
        scratch = torch.empty(n, k, device="cuda", dtype=torch.bfloat16)
        for m in batches:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            shape = dict(qtype=qtype, n=n, k=k)  # each call: fn(planes)
            us = {
                "batched": graph_us(partial(quant_batched, x, **shape, out=y), weights),
                "dense": graph_us(partial(_dense, x, **shape, w=scratch, y=y), weights),
                "gemv": graph_us(partial(quant_gemv, x, **shape, out=y), weights),
            }
            twin = ""  # the default config with the weights made the other way (`pairs`)
            if qtype in PACKED_TYPES:
                cfg = batched_config(qtype, n, k, m)
                cfg = replace(cfg, pairs=not cfg.pairs)
                fn = partial(quant_batched, x, **shape, out=y, config=cfg)
                us["twin"] = graph_us(fn, weights)
                twin = f" | pairs={cfg.pairs} {us['twin']:8.2f} us"
            other = min(us["dense"], us["gemv"])
            row = {
                "qtype": qtype.name, "name": name, "n": n, "k": k, "m": m, "mb": size / 1e6,
                "config": asdict(batched_config(qtype, n, k, m)),
                **{f"{p}_us": t for p, t in us.items()},
                "batched_gbs": size / us["batched"] / 1e3,
                "speedup": other / us["batched"],
            }  # fmt: skip
            rows.append(row)
            logger.info(
                "%-5s %-13s [%6d, %5d] B=%2d  batched %8.2f us %5.0f GB/s %3.0f%% | "
                "dequant+cuBLAS %8.2f us | GEMV %8.2f us | %5.2fx the better other%s",
                qtype.name, name, n, k, m, us["batched"], row["batched_gbs"],
                100 * row["batched_gbs"] / copy_gbs, us["dense"], us["gemv"], row["speedup"], twin,
            )  # fmt: skip
        del planes, weights, scratch
        torch.cuda.empty_cache()
    return rows


def tune_configs(qtype: Q, m: int) -> list[BatchedConfig]:
    """Launch configs tried per weight and batch: rows per program and warps, K split, tiles per
    step (Q6_K: 4 or 8) and pipeline stages; x in one tile of the batch's size."""
    bb = batched_config(qtype, 4096, 4096, m).block_b
    shapes = [(32, 4), (64, 4), (64, 8), (128, 8), (128, 4), (16, 4)]
    cfgs = [BatchedConfig(bn, bb, w, split_k=s) for bn, w in shapes for s in (1, 2, 4)]
    if qtype in PACKED_TYPES:  # 8 tiles a step (a super-block), K split up to 8
        cfgs += [BatchedConfig(64, bb, 4, split_k=s, tiles=8) for s in (1, 2, 4, 8)]
        cfgs += [BatchedConfig(64, bb, 4, split_k=8, tiles=8, stages=st) for st in (3, 4)]
        cfgs += [BatchedConfig(128, bb, 8, split_k=s, tiles=8) for s in (2, 4)]
        cfgs += [BatchedConfig(64, bb, 4, split_k=8), BatchedConfig(64, bb, 4, tiles=8, stages=1)]
        # and the super-block steps with the weights made in bf16 pairs
        cfgs += [replace(c, pairs=True) for c in cfgs if c.tiles == 8]
    else:
        cfgs += [BatchedConfig(64, bb, 4, tiles=t) for t in (2, 8)]
        cfgs += [BatchedConfig(64, bb, 4, stages=st) for st in (1, 3, 4)]
    return cfgs


def tune(types: list[Q], batches: tuple[int, ...] = ROWS, model: str = "") -> list[dict]:
    rows = []
    shapes = dict(SHAPES)
    for qtype, name in MIX:
        if qtype not in types or not name.startswith(model):
            continue
        n, k = shapes[name]
        size = nbytes(qtype, n, k)
        planes = to_planes(random_blocks(qtype, n, k, device="cuda"), qtype, n, k)
        weights = qk.weight_copies(planes, size, most=256)
        for m in batches:
            x = torch.randn(m, k, device="cuda").to(torch.bfloat16)
            y = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
            default = batched_config(qtype, n, k, m)
            fn = partial(quant_batched, x, qtype=qtype, n=n, k=k, out=y)  # each call: fn(planes)
            timed = [(graph_us(fn, weights), default)]
            cfgs = tune_configs(qtype, m)
            if qtype in PACKED_TYPES:  # the default with its weights made the other way
                cfgs.append(replace(default, pairs=not default.pairs))
            for cfg in cfgs:
                if cfg != default:
                    timed.append((graph_us(partial(fn, config=cfg), weights), cfg))
            best_us, best = min(timed, key=lambda t: t[0])
            rows.append({
                "qtype": qtype.name, "name": name, "n": n, "k": k, "m": m, "mb": size / 1e6,
                "default": asdict(default), "default_us": timed[0][0],
                "best": asdict(best), "best_us": best_us,
                "all": [[asdict(c), us] for us, c in timed],
            })  # fmt: skip
            logger.info(
                "tune %-5s %-13s B=%2d default %8.2f us | best %8.2f us %5.0f GB/s %s",
                qtype.name, name, m, timed[0][0], best_us, size / best_us / 1e3, best,
            )  # fmt: skip
        del planes, weights
        torch.cuda.empty_cache()
    return rows


def run(
    out_dir: str,
    types: str = "",
    tune_only: bool = False,
    batches: tuple[int, ...] = ROWS,
    model: str = "",
) -> int:
    chosen = [t for t in SUPPORTED if not types or t.name in types.split(",")]
    info = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__,
    }  # fmt: skip
    logger.info("%s", info)
    copy_gbs = copy_bandwidth_gbs(torch.device("cuda"))
    logger.info("copy bandwidth: %.0f GB/s (read + written)", copy_gbs)
    if tune_only:
        rows = tune(chosen, batches, model)
        with open(os.path.join(out_dir, "quant_batched_tune.json"), "w") as f:
            json.dump({**info, "copy_gbs": copy_gbs, "tune": rows}, f, indent=1)
        logger.info("\n%-5s %-13s %3s %10s %10s %6s  best config", "type", "weight", "B",
                    "default", "best", "GB/s")  # fmt: skip
        for r in rows:
            b = r["best"]
            logger.info(
                "%-5s %-13s %3d %8.2fus %8.2fus %6.0f  block_n %d, block_b %d, warps %d, "
                "split_k %d, tiles %d, stages %d, pairs %s",
                r["qtype"], r["name"], r["m"], r["default_us"], r["best_us"],
                r["mb"] * 1e3 / r["best_us"], b["block_n"], b["block_b"], b["num_warps"],
                b["split_k"], b["tiles"], b["stages"], b["pairs"],
            )  # fmt: skip
        return 0
    rows = sweep(chosen, copy_gbs, batches, model)
    with open(os.path.join(out_dir, "quant_batched.json"), "w") as f:
        json.dump({**info, "copy_gbs": copy_gbs, "batched": rows}, f, indent=1)
    logger.info(
        "\n%-5s %-13s %-15s %7s %3s %10s %6s %5s %12s %10s %6s",
        "type", "weight", "[out, in]", "MB", "B", "batched", "GB/s", "%copy", "dequant+cuBLAS",
        "GEMV", "vs best",
    )  # fmt: skip
    for r in rows:
        logger.info(
            "%-5s %-13s %-15s %7.2f %3d %8.2fus %6.0f %4.0f%% %12.2fus %8.2fus %5.2fx",
            r["qtype"], r["name"], f"[{r['n']}, {r['k']}]", r["mb"], r["m"], r["batched_us"],
            r["batched_gbs"], 100 * r["batched_gbs"] / copy_gbs, r["dense_us"], r["gemv_us"],
            r["speedup"],
        )  # fmt: skip
    return 0
