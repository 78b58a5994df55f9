"""Where a decode step's time goes: the device time of each kernel of one eager step (torch
profiler), their sum, and the same step replayed from its CUDA graph. The gap between the sum and
the replay is what the kernel boundaries cost (drain, launch, ramp-up).

    PYTHONPATH=. python benchmarks/profile_decode.py --preset qwen2.5-0.5b [--weights quantized]
        [--batch B]   # B sequences of the same context in one step
        [--warm-up-only]   # three eager steps and no profiler, e.g. under
                           # ncu --clock-control none -k regex:KERNEL -c N
"""

from __future__ import annotations

import argparse
import logging
import time
from collections import defaultdict

import torch

from worker_orcd.bench import PRESETS, random_model
from worker_orcd.engine.cuda_graphs import CudaGraphRunner, DeviceFedSteps
from worker_orcd.engine.kv_cache import KVCache
from worker_orcd.engine.model_runner import ModelRunner
from worker_orcd.engine.scheduler import ScheduledBatch
from worker_orcd.engine.sequence import Sequence
from worker_orcd.kernels import triton as triton_kernels

logger = logging.getLogger("benchmarks.profile_decode")


def _device_us(evt) -> float:
    for name in ("device_time_total", "cuda_time_total"):
        if hasattr(evt, name):
            return float(getattr(evt, name))
    return 0.0


@torch.inference_mode()
def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--weights", choices=["dequantized", "quantized"], default="dequantized")
    p.add_argument("--context", type=int, default=100)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    p.add_argument(
        "--warm-up-only",
        action="store_true",
        help="stop after the three warm-up steps: for a run under a kernel profiler (ncu), which "
        "cannot share the device's profiling interface with torch's profiler",
    )
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    dev = torch.device("cuda")
    triton_kernels.register_all()
    config = PRESETS[args.preset]
    ctx = args.context + 2 * args.steps + 300
    model = random_model(
        config, dev, max_positions=max(ctx, 4096), quantized=args.weights == "quantized"
    )
    b = args.batch
    kv = KVCache.allocate(config, ctx * b, dtype=torch.bfloat16, device=dev)
    runner = ModelRunner(model, kv, cuda_graphs=False)
    per = kv.num_blocks // b
    seqs = [Sequence.from_prompt(list(range(1, args.context + 1))) for _ in range(b)]
    for i, seq in enumerate(seqs):
        seq.block_table = list(range(i * per, (i + 1) * per))
    runner.forward(ScheduledBatch(seqs, [args.context] * b, is_prefill=True))
    for seq in seqs:
        seq.n_cached = args.context

    def eager_step() -> None:
        for seq in seqs:
            seq.append(1)
        runner.forward(ScheduledBatch(seqs, [1] * b, is_prefill=False)).argmax(-1)
        for seq in seqs:
            seq.n_cached += 1

    for _ in range(3):
        eager_step()
    torch.cuda.synchronize()
    if args.warm_up_only:
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            eager_step()
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for evt in prof.key_averages():
        us = _device_us(evt)
        if us <= 0:
            continue
        per_kernel[evt.key][0] += evt.count / args.steps
        per_kernel[evt.key][1] += us / args.steps
    total = sum(v[1] for v in per_kernel.values())
    launches = sum(v[0] for v in per_kernel.values())
    print(
        f"== {args.preset} {args.weights}, batch {b}, context {args.context}: one eager decode step"
    )
    print(f"{'kernel':60} {'per step':>8} {'us each':>8} {'us/step':>8} {'share':>6}")
    for name, (n, us) in sorted(per_kernel.items(), key=lambda kv: -kv[1][1]):
        print(f"{name[:60]:60} {n:8.1f} {us / max(n, 1e-9):8.2f} {us:8.1f} {us / total:6.1%}")
    print(f"{'sum of kernel time':60} {launches:8.0f} {'':8} {total:8.1f}")

    graphs = CudaGraphRunner.create(model, kv, batch_sizes=(b,), prompt_buckets=())
    assert graphs is not None
    fed = DeviceFedSteps(graphs.decode)
    tables = [seq.block_table for seq in seqs]
    pos = [seq.n_cached for seq in seqs]
    steps = 200
    for timed in (False, True):  # a warm-up pass, then the timed one
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ticket = fed.start([1] * b, pos, tables)
        for _ in range(steps - 1 if timed else 8):
            nxt = fed.chain(tables)
            fed.read(ticket)
            ticket = nxt
        fed.read(ticket)
    ms = (time.perf_counter() - t0) * 1e3 / steps
    print(
        f"graph replay: {ms * 1e3:.1f} us/step ({b * 1e3 / ms:.0f} tok/s); "
        f"kernel sum {total:.1f} us; boundaries {ms * 1e3 - total:.1f} us over {launches:.0f} "
        f"launches ({(ms * 1e3 - total) / max(launches, 1):.2f} us each)"
    )


if __name__ == "__main__":
    main()
