"""Quantized matmuls on the CPU (kernels/cpu): per-shape speed, and one decode step's matmuls.

Prints, for this machine (its load average beside every table: the figures are only as quiet as
the machine was):
  1. read bandwidth of this process's threads (a sum over 512 MB), the ceiling for decode;
  2. per weight shape of Qwen2.5-0.5B Q4_K_M (random blocks, hot in cache): the int8 kernels at 1
     row (decode) and both paths at 32 and 512 rows (prompts), as ms wall, ms of CPU time (all
     threads) and GMAC per CPU-second;
  3. the matmuls of one decode token over the real file's mapped weights (every projection of
     every layer and the head, in order, x random), with 1 and all threads: ms per token and the
     GB/s of weights read, i.e. the matmul ceiling of decode tok/s.

    PYTHONPATH=. python benchmarks/cpu_quant.py [--model FILE] [--isa avx512|avx2|scalar]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

# isort: off
import worker_orcd  # noqa: F401  (sets OMP_WAIT_POLICY before torch loads OpenMP)
import torch
from gguf import GGMLQuantizationType as Q

from worker_orcd import hub
from worker_orcd.kernels.cpu import ops
from worker_orcd.kernels.quant.formats import random_blocks

# isort: on

SHAPES = [  # (what, type, n, k) of Qwen2.5-Coder-0.5B Q4_K_M's decode weights
    ("q+k", Q.Q5_0, 1024, 896),
    ("o", Q.Q5_0, 896, 896),
    ("gate+up", Q.Q5_0, 9728, 896),
    ("down", Q.Q6_K, 896, 4864),
    ("down", Q.Q4_K, 896, 4864),
    ("v", Q.Q8_0, 128, 896),
    ("head", Q.Q8_0, 151936, 896),
]


def _load() -> str:
    return f"load {os.getloadavg()[0]:.2f}"


def _time(fn, reps: int) -> tuple[float, float]:  # noqa: ANN001
    """(wall ms, CPU ms of all threads) per call, median wall of `reps` after a warm-up."""
    fn()
    walls, cpus = [], []
    for _ in range(reps):
        c, t = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return statistics.median(walls) * 1e3, statistics.median(cpus) * 1e3


def read_bandwidth() -> None:
    a = torch.ones(128 << 20)
    best = _time(a.sum, 5)[0]
    gbs = a.numel() * 4 / best / 1e6
    print(f"read bandwidth, {torch.get_num_threads()} threads: {gbs:.1f} GB/s ({_load()})")


def shapes(isa: str | None) -> None:
    print(f"\nper shape, random blocks, {torch.get_num_threads()} threads ({_load()})")
    print(
        f"{'weight':8} {'type':5} {'n x k':>12} {'rows':>4} {'path':8} {'wall ms':>8} "
        f"{'cpu ms':>8} {'GMAC/cpu-s':>10}"
    )
    g = torch.Generator().manual_seed(0)
    for what, qtype, n, k in SHAPES:
        raw = random_blocks(qtype, n, k, generator=g)
        part = [ops.Part(qtype, raw, 0)]
        for m, paths in ((1, ("int8",)), (32, ("int8", "bf16")), (512, ("int8", "bf16"))):
            if m > 1 and what == "head":
                continue
            x = torch.randn(m, k, generator=g)
            out = torch.empty(m, n)
            for path in paths:
                if path == "bf16" and not ops.bf16_path_available():
                    continue
                reps = max(3, min(50, int(2e8 / (n * k * m))))
                wall, cpu = _time(lambda: ops.linear(x, part, out, isa=isa, path=path), reps)  # noqa: B023
                rate = m * n * k / (cpu / 1e3) / 1e9
                shape = f"{n}x{k}"
                print(
                    f"{what:8} {qtype.name:5} {shape:>12} {m:4d} {path:8} {wall:8.3f} {cpu:8.3f} "
                    f"{rate:10.1f}"
                )


def decode_step(path: str, isa: str | None) -> None:
    """The real file's weights, as the engine maps them: every quantized matmul of one token."""
    from worker_orcd.config import ModelConfig
    from worker_orcd.gguf import GGUFFile
    from worker_orcd.loader import load_model

    with GGUFFile.open(path) as f:
        config = ModelConfig.from_gguf(f)
        model, _ = load_model(
            f, config, device=torch.device("cpu"), dtype=torch.float32, max_positions=64,
            weights="quantized",
        )  # fmt: skip
    weights = [m.quantized for n, m in model.named_modules() if getattr(m, "quantized", None)]
    weights = [w for w in weights if w is not model.model.embed_tokens.quantized]
    nbytes = sum(w.nbytes for w in weights)
    xs = [torch.randn(1, w.k) for w in weights]
    outs = [torch.empty(1, w.n) for w in weights]

    def step() -> None:
        for w, x, out in zip(weights, xs, outs, strict=True):
            ops.linear_specs(x, w._quant, w._specs, out, None) if isa is None else ops.linear(
                x, w._quant, out, isa=isa
            )

    print(
        f"\none decode token's matmuls over {path}\n({nbytes / 1e9:.3f} GB of weights, "
        f"{len(weights)} calls)"
    )
    old = torch.get_num_threads()
    for threads in sorted({1, old}):
        torch.set_num_threads(threads)
        wall, cpu = _time(step, 7)
        print(
            f"{threads} threads: {wall:7.2f} ms/token wall ({1e3 / wall:5.1f} tok/s ceiling), "
            f"{cpu:7.2f} ms CPU, {nbytes / (wall / 1e3) / 1e9:5.1f} GB/s ({_load()})"
        )
    torch.set_num_threads(old)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="GGUF file (default: the test model)")
    p.add_argument("--isa", default=None, choices=list(ops.ISAS))
    p.add_argument("--skip-shapes", action="store_true")
    args = p.parse_args()
    if not ops.available():
        raise SystemExit("the CPU extension is not built (pip install -e .)")
    print(f"CPU kernels: {', '.join(ops.isas())}; bf16 path (AMX): {ops.bf16_path_available()}")
    read_bandwidth()
    if not args.skip_shapes:
        shapes(args.isa)
    decode_step(args.model or str(hub.model_path()), args.isa)


if __name__ == "__main__":
    main()
