"""`worker-orcd bench --streams 1 8 32 64`: the many-requests workload of llama-batched-bench.

For each stream count B: B requests, each a random prompt of --prompt-tokens and --gen-tokens
greedy tokens, run together. Two ways:

- engine: Engine.generate_batch, the continuous-batching step loop a server runs (scheduler,
  sampler mask, detokenizer, stop checks, device-fed greedy steps). Prefill tok/s is B prompts over
  the time until the last request has its first token; decode tok/s is the tokens generated after
  each stream's first over the time from there to the last request's end (a sequence may decode a
  token during the last prompt chunk's step, so this can overstate decode by at most one token per
  stream); ms/token is that decode time over the longest stream's decode steps, what each stream
  sees. End-of-generation tokens do not end a stream (`ignore_eos`), so each generates exactly
  --gen-tokens, as in llama-batched-bench, whatever the model and its tokenizer.
- graph: the model alone, as llama-batched-bench measures it: the B prompts prefilled in one flat
  batch, then gen tokens of device-fed decode steps of batch B on the captured graph, timed from
  the host (no sampling, text or scheduling).

Decode GB/s counts the weights read per step plus the KV cache of every stream at its mean
context, against the card's copy bandwidth measured in the same run.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from worker_orcd.benchtools import Ceilings

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class StreamsRow:
    streams: int
    prefill_tok_s: float  # engine: all prompts
    decode_tok_s: float  # engine: all streams together
    ms_per_token: float  # engine: per stream
    graph_decode_tok_s: float | None  # the model alone on the decode graph
    graph_ms_per_step: float | None
    decode_gbs: float  # engine decode, weights + KV read per step
    graph_gbs: float | None


def kv_bytes_per_token(config) -> int:  # noqa: ANN001 - ModelConfig
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * 2


def run_streams(
    bench,  # noqa: ANN001 - bench.OurBench, or anything with .engine, .config and ._ids(n)
    counts: list[int],
    prompt_tokens: int,
    gen_tokens: int,
    weight_bytes: int,
) -> list[StreamsRow]:
    rows = []
    per_tok = kv_bytes_per_token(bench.config)
    for b in counts:
        if b > bench.engine.scheduler.max_seqs:
            raise SystemExit(f"--streams {b} is above the engine's max_num_seqs")
        _warm(bench, b, prompt_tokens)
        prefill, decode_s, decoded, steps = _engine_run(bench, b, prompt_tokens, gen_tokens)
        graph_ms = None
        if bench.engine.device.type == "cuda":
            graph_ms = _graph_run(bench, b, prompt_tokens, gen_tokens)
        step_bytes = weight_bytes + b * (prompt_tokens + gen_tokens // 2) * per_tok
        ms_tok = decode_s * 1e3 / steps
        row = StreamsRow(
            streams=b,
            prefill_tok_s=b * prompt_tokens / prefill,
            decode_tok_s=decoded / decode_s,
            ms_per_token=ms_tok,
            graph_decode_tok_s=None if graph_ms is None else b * 1e3 / graph_ms,
            graph_ms_per_step=graph_ms,
            decode_gbs=step_bytes / (ms_tok / 1e3) / 1e9,
            graph_gbs=None if graph_ms is None else step_bytes / (graph_ms / 1e3) / 1e9,
        )
        logger.info("streams %d: %s", b, row)
        rows.append(row)
    return rows


def _warm(bench, b: int, prompt_tokens: int) -> None:  # noqa: ANN001
    from worker_orcd.engine.types import SamplingParams

    prompts = [bench._ids(prompt_tokens) for _ in range(b)]
    warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    bench.engine.generate_batch(prompts, warm)


def _engine_run(bench, b: int, prompt_tokens: int, gen_tokens: int):  # noqa: ANN001, ANN202
    """(seconds until every stream has its first token, seconds of decode after that, tokens
    decoded after the first of each stream, decode steps of the longest stream)."""
    from worker_orcd.engine.types import SamplingParams

    prompts = [bench._ids(prompt_tokens) for _ in range(b)]
    params = SamplingParams(max_tokens=gen_tokens + 1, temperature=0.0, ignore_eos=True)
    if bench.engine.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = bench.engine.generate_batch(prompts, params)
    end = time.perf_counter() - t0
    short = [o for o in outs if o.timings.tokens_out < gen_tokens + 1]
    if short:
        logger.warning("%d of %d streams stopped early (%s)", len(short), b, short[0].stop_reason)
    # first_token_ms is from each request's submit; all were submitted within a few ms of t0
    first = max(o.timings.first_token_ms for o in outs) / 1e3
    decoded = sum(max(o.timings.tokens_out - 1, 0) for o in outs)
    steps = max(max(o.timings.tokens_out - 1, 1) for o in outs)
    return first, end - first, decoded, steps


@torch.inference_mode()
def _graph_run(bench, b: int, prompt_tokens: int, gen_tokens: int) -> float | None:  # noqa: ANN001
    """ms per decode step of batch b on the decode graph, fed by its own argmax."""
    from worker_orcd.engine.scheduler import ScheduledBatch
    from worker_orcd.engine.sequence import Sequence

    runner = bench.engine.runner
    fed = runner.device_fed_steps()
    if fed is None:
        return None
    blocks = bench.engine.blocks
    seqs = [Sequence.from_prompt(bench._ids(prompt_tokens)) for _ in range(b)]
    try:
        for s in seqs:
            blocks.reserve(s, prompt_tokens + gen_tokens + 8)
        logits = runner.forward(ScheduledBatch(seqs, [prompt_tokens] * b, is_prefill=True))
        first = logits.argmax(dim=-1).tolist()
        tables = [s.block_table for s in seqs]
        pos = [prompt_tokens] * b
        ticket = fed.start(first, pos, tables)
        for _ in range(3):  # warm-up
            nxt = fed.chain(tables)
            fed.read(ticket)
            ticket = nxt
        fed.read(ticket)
        pos = [prompt_tokens + 4] * b
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ticket = fed.start(first, pos, tables)
        for _ in range(gen_tokens - 1):
            nxt = fed.chain(tables)
            fed.read(ticket)
            ticket = nxt
        fed.read(ticket)
        return (time.perf_counter() - t0) * 1e3 / gen_tokens
    finally:
        for s in seqs:
            blocks.release(s)


class EngineStreams:
    """run_streams over a loaded Engine (any device): random prompts from a seeded generator."""

    def __init__(self, engine) -> None:  # noqa: ANN001 - Engine
        self.engine = engine
        self.config = engine.config
        self.gen = torch.Generator(device="cpu").manual_seed(0)

    def _ids(self, n: int) -> list[int]:
        vocab = self.engine.tokenizer.vocab_size
        return torch.randint(0, vocab, (n,), generator=self.gen).tolist()


def print_streams(
    name: str,
    ceil: Ceilings | None,
    weight_bytes: int,
    rows: list[StreamsRow],
    prompt: int,
    gen: int,
    read_gbs: float | None = None,
) -> None:
    """The streams table; each GB/s also as a share of the card's copy bandwidth (`ceil`), or on
    a CPU of this process's read bandwidth (`read_gbs`, the single-request CPU bench's %read)."""
    if ceil is not None:
        print(
            f"\n{ceil.device_name}: copy {ceil.copy_gbs:.0f} GB/s (read + written), "
            f"bf16 matmul {ceil.matmul_tflops:.0f} TFLOP/s"
        )
    elif read_gbs is not None:
        print(f"\nread bandwidth of this process's threads: {read_gbs:.1f} GB/s")
    ref = ceil.copy_gbs if ceil is not None else read_gbs
    label = "%copy" if ceil is not None or read_gbs is None else "%read"
    print(f"{name}: {weight_bytes / 1e9:.2f} GB of weights; {prompt} prompt + {gen} generated")
    print(
        f"{'streams':>7} {'prefill tok/s':>13} {'decode tok/s':>12} {'ms/tok':>7} "
        f"{'GB/s':>6} {label:>5} | {'graph tok/s':>11} {'ms/step':>7} {'%copy':>5}"
    )
    for r in rows:
        g = (
            f"{r.graph_decode_tok_s:11.0f} {r.graph_ms_per_step:7.2f} "
            f"{_share(r.graph_gbs or 0, ref)}"
            if r.graph_decode_tok_s is not None
            else ""
        )
        print(
            f"{r.streams:7d} {r.prefill_tok_s:13.0f} {r.decode_tok_s:12.1f} {r.ms_per_token:7.2f} "
            f"{r.decode_gbs:6.1f} {_share(r.decode_gbs, ref)} | {g}"
        )


def _share(gbs: float, copy: float | None) -> str:
    return f"{100 * gbs / copy:4.0f}%" if copy else f"{'':>4}-"
