"""Device ceilings and the batch-1 GEMV question, in one GPU session.

Prints: copy bandwidth (read + written), bf16 matmul TFLOP/s, and for every decode weight shape of
Phi-3-mini and Qwen2.5-0.5B the time and GB/s of torch's matmul on one row against the Triton
GEMV kernel over a sweep of block shapes. Each timing replays a CUDA graph of calls that rotate over
enough weight copies to overflow the L2 cache, as a real decode step does. With --peer, also
transformers' prefill and decode speed at real dims with random weights.

    PYTHONPATH=. python benchmarks/ceilings.py [--peer] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys

import torch

from worker_orcd.benchtools import cuda_time_ms, measure_ceilings, peer_transformers
from worker_orcd.kernels.triton.gemv import gemv, pick_config

logger = logging.getLogger("benchmarks.ceilings")

SHAPES = {
    "phi3.qkv": (9216, 3072),
    "phi3.o": (3072, 3072),
    "phi3.gate_up": (16384, 3072),
    "phi3.down": (3072, 8192),
    "phi3.lm_head": (32064, 3072),
    "qwen.qkv": (1152, 896),
    "qwen.o": (896, 896),
    "qwen.gate_up": (9728, 896),
    "qwen.down": (896, 4864),
    "qwen.lm_head": (151936, 896),
}
CONFIGS = [
    (bn, bk, nw)
    for bn, bk, nw in itertools.product([1, 2, 4, 8, 16], [256, 512, 1024], [4, 8])
    if bn * bk <= 8192
]


def graph_time_us(calls: list, reps: int = 20) -> float:
    """Microseconds per call of a CUDA graph replaying `calls` once each."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for c in calls:
            c()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    ms = cuda_time_ms(graph.replay, warmup=3, iters=reps)
    return ms * 1e3 / len(calls)


def gemv_sweep(device: torch.device) -> list[dict]:
    results = []
    for name, (n, k) in SHAPES.items():
        nbytes = n * k * 2
        copies = max(2, -(-512 * 2**20 // nbytes))
        ws = [torch.randn(n, k, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
        x = torch.randn(1, k, device=device, dtype=torch.bfloat16)
        outs = [torch.empty(1, n, device=device, dtype=torch.bfloat16) for _ in range(copies)]
        ref = (x.double() @ ws[0].double().T).float()

        pairs = list(zip(ws, outs, strict=True))
        t_torch = graph_time_us(
            [lambda x=x, w=w, o=o: torch.matmul(x, w.T, out=o) for w, o in pairs]
        )
        row = {
            "shape": name,
            "n": n,
            "k": k,
            "torch_us": t_torch,
            "torch_gbs": nbytes / t_torch / 1e3,
            "triton": {},
        }
        for cfg in CONFIGS:
            y = gemv(x, ws[0], config=cfg)
            err = ((y.float() - ref).norm() / ref.norm()).item()
            if not err < 1e-2:
                raise RuntimeError(f"gemv {name} {cfg}: relative error {err}")
            t = graph_time_us(
                [lambda x=x, w=w, o=o, c=cfg: gemv(x, w, config=c, out=o) for w, o in pairs]
            )
            row["triton"][str(cfg)] = t
        best = min(row["triton"], key=row["triton"].get)
        row["best"] = best
        row["best_us"] = row["triton"][best]
        row["best_gbs"] = nbytes / row["best_us"] / 1e3
        row["picked"] = str(pick_config(n, k))
        row["picked_us"] = row["triton"].get(row["picked"], float("nan"))
        results.append(row)
        logger.info(
            "%s torch %.1f us  best %s %.1f us  picked %s %.1f us",
            name,
            t_torch,
            best,
            row["best_us"],
            row["picked"],
            row["picked_us"],
        )
        del ws, outs, pairs
        torch.cuda.empty_cache()
    return results


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", action="store_true")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr
    )
    device = torch.device("cuda")
    ceil = measure_ceilings(device)
    sweep = gemv_sweep(device)
    peers = {}
    if args.peer:
        for preset in ("qwen2.5-0.5b", "phi3-mini"):
            rows = peer_transformers(preset, device, [128, 512, 2048], [100, 4000], 64)
            peers[preset] = [_row(r) for r in rows]
    with open(os.path.join(args.out, "ceilings.json"), "w") as f:
        json.dump({"ceilings": _row(ceil), "gemv": sweep, "peers": peers}, f, indent=1)

    print(
        f"\n{ceil.device_name}: copy {ceil.copy_gbs:.0f} GB/s, "
        f"bf16 matmul {ceil.matmul_tflops:.0f} TFLOP/s"
    )
    print(
        f"{'shape':14} {'torch us':>9} {'GB/s':>6} {'triton us':>9} {'GB/s':>6}  best config"
        f"  {'picked us':>9}"
    )
    for r in sweep:
        print(
            f"{r['shape']:14} {r['torch_us']:9.1f} {r['torch_gbs']:6.0f} {r['best_us']:9.1f}"
            f" {r['best_gbs']:6.0f}  {r['best']:14} {r['picked_us']:9.1f}"
        )
    for preset, rows in peers.items():
        for r in rows:
            print(
                f"peer {preset:13} {r['phase']:8} ctx {r['context']:5}: {r['tok_s']:9.0f} tok/s"
                f" {r['ms']:8.2f} ms"
            )
    return 0


def _row(obj: object) -> dict:
    return {s: getattr(obj, s) for s in obj.__slots__}


if __name__ == "__main__":
    raise SystemExit(main())
