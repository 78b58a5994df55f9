"""`worker-orcd bench --device cpu`: what a user of the CPU path gets, on the real model by default.

    worker-orcd bench --device cpu [--model FILE] [--weights quantized|dequantized]
                      [--prefill N ...] [--decode-context N ...] [--decode-steps N]
                      [--max-context N] [--json FILE]
    worker-orcd bench --device cpu [--model FILE] --streams B ... [--prompt-tokens N]
                      [--gen-tokens N] [--json FILE]

Figures, each the median of `REPEATS` runs:
- command to first token: `worker-orcd generate` started as a new process (default settings, a
  warm page cache) until the first generated text reaches its stdout;
- load: Engine.load in this process;
- prefill: Engine.generate of one token after N random prompt tokens (its prefill timing);
- decode: greedy steps through the engine's scheduler and runner at a mean context (the host
  picks each argmax and feeds it back, as the engine does on the CPU), with achieved GB/s (weights
  read per token plus the KV cache) and its share of the measured read bandwidth;
- peak resident memory (RSS, the file pages the weights are read from included), and how much of
  it is the KV cache (sized by the engine for its whole context, `--max-context` bounds it).
The machine's load average is printed beside them: on a shared machine, other work slows all of
these.

With `--streams`, the many-requests workload instead (`bench_streams`): for each count B, B
random prompts of --prompt-tokens and --gen-tokens greedy tokens through Engine.generate_batch,
the step loop a server runs, with a KV cache of B such sequences.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from worker_orcd.benchtools import SpeedRow

logger = logging.getLogger(__name__)

REPEATS = 3
PREFILL = [512]
DECODE_CONTEXT = [100]
TTFT_PROMPT = "def fib(n):"


@dataclass(slots=True)
class CpuFacts:
    cpu: str
    threads: int
    load_before: tuple[float, float, float]
    load_after: tuple[float, float, float]
    read_gbs: float  # sum of a 512 MB float32 tensor on all threads


def run_cpu_bench(args: argparse.Namespace) -> int:
    from worker_orcd import hub

    if args.preset:
        print("the CPU bench loads a GGUF file (--model, default the test model); presets are GPU")
        return 2
    path = Path(args.model) if args.model else hub.model_path()
    if not path.is_file():
        print(f"model file not found: {path} (run `worker-orcd pull`)")
        return 1
    if args.streams:
        return run_cpu_streams(path, args)
    load_before = os.getloadavg()
    first_token = [command_to_first_token(path, args.weights) for _ in range(REPEATS)]
    engine, load_s = _load(path, args.weights, args.max_context)
    rows = prefill_rows(engine, args.prefill or PREFILL)
    rows += decode_rows(engine, args.decode_context or DECODE_CONTEXT, args.decode_steps)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the probe below
    facts = CpuFacts(
        _cpu_name(), torch.get_num_threads(), load_before, os.getloadavg(), read_bandwidth_gbs()
    )
    weight_bytes = _decode_weight_bytes(engine)
    for r in rows:
        if r.phase == "decode":
            r.gbs = (weight_bytes + _kv_bytes(engine, r.context)) / (r.ms / 1e3) / 1e9
    info = engine.info()
    _print(path, info, facts, weight_bytes, first_token, load_s, peak_rss, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "model": str(path),
                    "weights": info.weights,
                    "weight_mix": info.weight_mix,
                    "machine": asdict(facts),
                    "weight_bytes_per_token": weight_bytes,
                    "command_to_first_token_s": first_token,
                    "load_s": load_s,
                    "peak_rss_bytes": peak_rss,
                    "kv_cache_bytes": info.kv_cache_bytes,
                    "context_length": info.context_length,
                    "rows": [asdict(r) for r in rows],
                },
                f,
                indent=1,
            )
    return 0


def run_cpu_streams(path: Path, args: argparse.Namespace) -> int:
    """The streams workload on the CPU engine: one Engine with room for max(--streams) sequences
    of --prompt-tokens + --gen-tokens, each count run as `bench_streams.run_streams` runs it."""
    from worker_orcd.bench_streams import EngineStreams, print_streams, run_streams
    from worker_orcd.errors import InvalidRequestError

    most = max(args.streams)
    per_stream = args.prompt_tokens + args.gen_tokens + 1  # run_streams asks gen + 1 tokens
    engine, load_s = _load(
        path,
        args.weights,
        args.max_context,
        max_num_seqs=most,
        kv_cache_tokens=most * per_stream,
    )
    logger.info("loaded %s in %.1f s", path, load_s)
    try:
        engine.check_fits(args.prompt_tokens, args.gen_tokens + 1)
    except InvalidRequestError as exc:
        print(f"bench --streams: {exc.message}")
        return 2
    weight_bytes = _decode_weight_bytes(engine)
    rows = run_streams(
        EngineStreams(engine), args.streams, args.prompt_tokens, args.gen_tokens, weight_bytes
    )
    read_gbs = read_bandwidth_gbs()
    name = f"{path.name} ({engine.info().weights}, CPU, {torch.get_num_threads()} threads)"
    print_streams(name, None, weight_bytes, rows, args.prompt_tokens, args.gen_tokens, read_gbs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"model": str(path), "weight_bytes": weight_bytes, "read_gbs": read_gbs,
                 "streams": [asdict(r) for r in rows]},
                f,
                indent=1,
            )  # fmt: skip
    return 0


def command_to_first_token(path: Path, weights: str | None) -> float:
    """Seconds from starting `worker-orcd generate` to the first byte of generated text."""
    cmd = [sys.executable, "-m", "worker_orcd.cli", "--log-level", "warning", "generate"]
    cmd += ["--model", str(path), "--prompt", TTFT_PROMPT, "--max-tokens", "1"]
    cmd += ["--temperature", "0"] + (["--weights", weights] if weights else [])
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    elapsed = time.perf_counter() - t0
    _, err = proc.communicate()
    if proc.returncode != 0 or not first:
        raise SystemExit(f"`{' '.join(cmd)}` failed: {err.decode(errors='replace')[-2000:]}")
    logger.info("command to first token: %.2f s", elapsed)
    return elapsed


def _load(path: Path, weights: str | None, max_context: int | None, **batching):  # noqa: ANN003
    """(Engine, seconds to load it) on the CPU; `batching`: Engine.load's max_num_seqs and
    kv_cache_tokens."""
    from worker_orcd.engine.engine import Engine

    t0 = time.perf_counter()
    engine = Engine.load(path, device="cpu", weights=weights, max_context=max_context, **batching)
    return engine, time.perf_counter() - t0


def _ids(engine, n: int, seed: int) -> list[int]:  # noqa: ANN001
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, engine.tokenizer.vocab_size, (n,), generator=g).tolist()


def prefill_rows(engine, lengths: list[int]) -> list[SpeedRow]:  # noqa: ANN001
    """Engine.generate of one greedy token after n random prompt tokens: its prefill time."""
    from worker_orcd.engine.types import SamplingParams

    one = SamplingParams(max_tokens=1, temperature=0.0)
    engine.generate(_ids(engine, 16, seed=0), one)  # warm-up
    rows = []
    for n in lengths:
        ms = statistics.median(
            engine.generate(_ids(engine, n, seed=i), one).timings.prefill_ms for i in range(REPEATS)
        )
        rows.append(SpeedRow("worker-orcd", "prefill", n, n / (ms / 1e3), ms))
        logger.info("prefill %d tokens: %.1f ms (%.1f tok/s)", n, ms, n / (ms / 1e3))
    return rows


@torch.inference_mode()
def decode_rows(engine, contexts: list[int], steps: int) -> list[SpeedRow]:  # noqa: ANN001
    """Greedy decode of `steps` tokens whose mean context is each of `contexts`, through the
    engine's scheduler and runner (argmax read on the host and fed back)."""
    from worker_orcd.engine.sequence import Sequence

    rows = []
    for ctx in contexts:
        start = max(1, ctx - steps // 2)
        runs = []
        for rep in range(REPEATS):
            seq = Sequence.from_prompt(_ids(engine, start, seed=100 + rep))
            sched = engine.scheduler
            sched.add(seq)
            try:
                token, t0 = 0, 0.0
                for i in range(5 + steps):  # the prefill, 4 warm-up steps, then the timed ones
                    if i == 5:
                        t0 = time.perf_counter()
                    if i:
                        seq.append(token)
                    batch = sched.schedule()
                    token = int(engine.runner.forward(batch)[-1].argmax())
                    sched.postprocess(batch)
                runs.append((time.perf_counter() - t0) * 1e3 / steps)
            finally:
                sched.finish(seq)
        ms = statistics.median(runs)
        rows.append(SpeedRow("worker-orcd", "decode", ctx, 1e3 / ms, ms))
        logger.info("decode at context %d: %.2f ms/token (%.1f tok/s)", ctx, ms, 1e3 / ms)
    return rows


def read_bandwidth_gbs() -> float:
    """Read bandwidth of this process's threads: the best of 5 sums of a 512 MB tensor."""
    a = torch.ones(128 << 20)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a.sum()
        best = min(best, time.perf_counter() - t0)
    return a.numel() * 4 / best / 1e9


def _decode_weight_bytes(engine) -> int:  # noqa: ANN001
    from worker_orcd.bench import _decode_weight_bytes

    return _decode_weight_bytes(engine.model, engine.config)


def _kv_bytes(engine, context: int) -> int:  # noqa: ANN001
    c = engine.config
    return 2 * c.n_layers * context * c.n_kv_heads * c.head_dim * engine.dtype.itemsize


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _print(
    path: Path,
    info,  # noqa: ANN001 - EngineInfo
    facts: CpuFacts,
    weight_bytes: int,
    first_token: list[float],
    load_s: float,
    peak_rss: int,
    rows: list[SpeedRow],
) -> None:
    from worker_orcd.kernels.cpu import ops

    kernels = f"kernels {ops.isas()[-1]}" if ops.available() else "no compiled kernels"
    lb, la = facts.load_before, facts.load_after
    print(
        f"\n{facts.cpu}: {os.cpu_count()} cores, {facts.threads} threads, {kernels}, "
        f"read {facts.read_gbs:.1f} GB/s; load average {lb[0]:.2f} before, {la[0]:.2f} after"
    )
    print(f"{path.name} ({info.weights}): {weight_bytes / 1e9:.3f} GB of weights read per token")
    runs = ", ".join(f"{t:.2f}" for t in first_token)
    print(
        f"command to first token {statistics.median(first_token):.2f} s (runs {runs}); "
        f"load {load_s:.2f} s; peak RSS {peak_rss / 1e9:.2f} GB, of which KV cache "
        f"{info.kv_cache_bytes / 1e9:.2f} GB ({info.context_length} tokens)"
    )
    print(f"{'phase':8} {'context':>7} {'tok/s':>8} {'ms':>9} {'GB/s':>6} {'%read':>5}")
    for r in rows:
        bw = f"{r.gbs:6.1f} {100 * r.gbs / facts.read_gbs:4.0f}%" if r.gbs else ""
        print(f"{r.phase:8} {r.context:7d} {r.tok_s:8.1f} {r.ms:9.2f} {bw}")
