"""`worker-orcd bench`: prefill and decode speed, beside a peer.

    worker-orcd bench --preset phi3-mini|qwen2.5-0.5b [--peer transformers] [--weights quantized]
    worker-orcd bench --model FILE [--peer transformers] [--weights quantized]
    worker-orcd bench --device cpu [--model FILE]      (bench_cpu.py)

A preset builds the model with random bf16 weights at the real dimensions directly on the GPU (speed
does not depend on the values); with `--weights quantized` its projections, embedding and head are
random GGUF blocks of a Q4_K_M-style mix (quant_mix.py) made on the GPU. The card's copy bandwidth
and bf16 matmul rate are measured first in the same run, so decode is reported as achieved GB/s
(weights plus the KV cache read per token) and its share of that bandwidth. With `--peer
transformers`, the same figures come from transformers (bf16, sdpa) in the same process, with the
ratio ours / peer. Decode rows: the graph fed by its own argmax (worker-orcd), Engine.generate of
a greedy request (ours generate: what a user gets), and the graph fed from the host each step (ours
host-fed: the path of sampled requests).

`--tensor-parallel-size N` splits the model over N GPUs (engine/parallel.py; a preset's ranks each
draw their own random part): every pass runs eagerly on all ranks, weights and GB/s are per GPU,
and the all-reduce and logits all-gather of a decode step are timed alone on the same ranks.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import asdict, dataclass

import torch

from worker_orcd.benchtools import (
    Ceilings,
    CollectiveTiming,
    SpeedRow,
    cuda_time_ms,
    measure_ceilings,
    peer_transformers,
)
from worker_orcd.config import ModelConfig
from worker_orcd.engine.options import add_parallel_arguments, positive_int
from worker_orcd.parallel import SINGLE, Parallel, rank_config

logger = logging.getLogger(__name__)

_COMMON = dict(
    rope_scaling_type=None,
    rope_scaling_factor=None,
    rope_original_context=None,
    has_rope_factors=False,
    sliding_window=None,
    fused_qkv=True,
    fused_gate_up=True,
)
PRESETS: dict[str, ModelConfig] = {
    "phi3-mini": ModelConfig(
        architecture="phi3",
        n_layers=32,
        hidden_size=3072,
        n_heads=32,
        n_kv_heads=32,
        head_dim=96,
        intermediate_size=8192,
        vocab_size=32064,
        context_length=4096,
        rope_theta=10000.0,
        rope_dim=96,
        rms_eps=1e-5,
        qkv_bias=False,
        tied_embeddings=False,
        **_COMMON,
    ),
    "qwen2.5-0.5b": ModelConfig(
        architecture="qwen2",
        n_layers=24,
        hidden_size=896,
        n_heads=14,
        n_kv_heads=2,
        head_dim=64,
        intermediate_size=4864,
        vocab_size=151936,
        context_length=32768,
        rope_theta=1000000.0,
        rope_dim=64,
        rms_eps=1e-6,
        qkv_bias=True,
        tied_embeddings=True,
        **_COMMON,
    ),
}


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        choices=["cuda", "cpu"],
        default="cuda",
        help="cpu: the CPU path on a GGUF file, the test model by default (bench_cpu.py)",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="GGUF file to load")
    src.add_argument("--preset", choices=sorted(PRESETS), help="random bf16 weights at real dims")
    p.add_argument("--peer", choices=["transformers"], default=None, help="also measure a peer")
    p.add_argument(
        "--weights",
        choices=["dequantized", "quantized"],
        default=None,
        help="quantized: GGUF blocks on the GPU (presets: a random Q4_K_M-style mix); default "
        "dequantized on cuda, the engine's default (quantized) on cpu",
    )
    p.add_argument(
        "--prefill",
        type=positive_int,
        nargs="+",
        default=None,
        metavar="N",
        help="default 128 512 2048",
    )
    p.add_argument(
        "--decode-context",
        type=positive_int,
        nargs="+",
        default=None,
        metavar="N",
        help="mean context of the timed decode steps (default 100 4000)",
    )
    p.add_argument("--decode-steps", type=positive_int, default=128)
    p.add_argument(
        "--streams",
        type=positive_int,
        nargs="+",
        default=None,
        metavar="B",
        help="the many-requests workload instead: B streams of --prompt-tokens + --gen-tokens",
    )
    p.add_argument("--prompt-tokens", type=positive_int, default=128)
    p.add_argument("--gen-tokens", type=positive_int, default=128)
    p.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="cpu: the engine's max_context (default the model's; its KV cache counts in RSS)",
    )
    p.add_argument("--no-graph", action="store_true", help="decode eagerly (no CUDA graph)")
    add_parallel_arguments(p)
    p.add_argument("--json", default=None, metavar="FILE", help="also write the results here")


def run_bench(args: argparse.Namespace) -> int:
    if args.device == "cpu":
        from worker_orcd.bench_cpu import run_cpu_bench

        return run_cpu_bench(args)
    if not (args.model or args.preset):
        print("bench needs --model FILE or --preset NAME")
        return 2
    args.weights = args.weights or "dequantized"
    args.prefill = args.prefill or [128, 512, 2048]
    args.decode_context = args.decode_context or [100, 4000]
    if not torch.cuda.is_available():
        print("bench needs a CUDA GPU")
        return 1
    device = torch.device("cuda")
    ceil = measure_ceilings(device)
    name = args.preset or args.model
    if args.weights == "quantized":
        name = f"{name} (quantized)"
    model, config, kv, group = _load(args, device)
    parallel = SINGLE if group is None else group.parallel
    if parallel.size > 1:
        name = f"{name} (tensor parallel {parallel.size})"
    weight_bytes = _decode_weight_bytes(model, config)
    need = _context_needed(args)
    if need > kv.num_slots:
        raise SystemExit(f"bench needs a context of {need} tokens; the cache holds {kv.num_slots}")
    tokenizer = _tokenizer(args, config)
    max_seqs = max(args.streams) if args.streams else 1
    ours = OurBench(
        model,
        config,
        kv,
        weight_bytes,
        graph=not args.no_graph and group is None,
        tokenizer=tokenizer,
        group=group,
        max_num_seqs=max_seqs,
    )
    if args.streams:
        from worker_orcd.bench_streams import print_streams, run_streams

        if group is not None:
            raise SystemExit("--streams runs on one GPU; leave out --tensor-parallel-size")
        srows = run_streams(ours, args.streams, args.prompt_tokens, args.gen_tokens, weight_bytes)
        print_streams(name, ceil, weight_bytes, srows, args.prompt_tokens, args.gen_tokens)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(
                    {
                        "model": name,
                        "ceilings": asdict(ceil),
                        "weight_bytes": weight_bytes,
                        "streams": [asdict(r) for r in srows],
                    },
                    f,
                    indent=1,
                )
        return 0
    rows = ours.prefill(args.prefill) + ours.decode(args.decode_context, args.decode_steps)
    ttft = ours.ttft(512) if 512 <= kv.num_slots else None
    collectives = None
    if group is not None:
        timing = CollectiveTiming(config.hidden_size, config.vocab_size, torch.bfloat16)
        collectives = group.call(timing)
        group.close()  # the peer runs on rank 0's GPU alone
    del ours, model, kv
    torch.cuda.empty_cache()
    peer_rows: list[SpeedRow] = []
    if args.peer == "transformers":
        if config.architecture not in ("qwen2", "phi3"):
            logger.warning("no transformers peer for %s; peer skipped", config.architecture)
        else:
            peer_rows = peer_transformers(
                config, device, args.prefill, args.decode_context, min(args.decode_steps, 64)
            )
    kv_config = rank_config(config, parallel)  # one rank's: GB/s are per GPU
    peers = peer_rows if parallel.size == 1 else []  # the peer reads the whole model, not a part
    for r in rows + peers:
        if r.phase == "decode":
            r.gbs = (weight_bytes + _kv_bytes(kv_config, r.context)) / (r.ms / 1e3) / 1e9
    _print(name, ceil, weight_bytes, rows, peer_rows, ttft)
    if collectives is not None:
        _print_collectives(config, parallel, collectives)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "model": name,
                    "ceilings": asdict(ceil),
                    "weight_bytes": weight_bytes,
                    "ttft_512_ms": ttft,
                    "tensor_parallel_size": parallel.size,
                    "all_reduce_us": None if collectives is None else collectives[0],
                    "logits_all_gather_us": None if collectives is None else collectives[1],
                    "ours": [asdict(r) for r in rows],
                    "peer": [asdict(r) for r in peer_rows],
                },
                f,
                indent=1,
            )
    return 0


def _load(args: argparse.Namespace, device: torch.device):  # -> (CausalLM, ModelConfig, KVCache,
    # RankGroup | None)
    from worker_orcd.engine.kv_cache import KVCache
    from worker_orcd.kernels import triton as triton_kernels

    if triton_kernels.available(device):
        triton_kernels.register_all()
    else:
        logger.warning("Triton not installed: benchmarking the torch reference kernels")
    need = _context_needed(args)
    slots = need * max(args.streams) if args.streams else need
    if args.tensor_parallel_size > 1:
        return _load_ranks(args, device, need)
    if args.preset:
        config = PRESETS[args.preset]
        context = max(need, 512)
        t0 = time.perf_counter()
        model = random_model(
            config,
            device,
            max_positions=max(context, config.context_length),
            quantized=args.weights == "quantized",
        )
        kv = KVCache.allocate(config, max(slots, context), dtype=torch.bfloat16, device=device)
        logger.info("built %s with random weights in %.1fs", args.preset, time.perf_counter() - t0)
        return model, config, kv, None
    from worker_orcd.gguf import GGUFFile
    from worker_orcd.loader import load_model

    t0 = time.perf_counter()
    with GGUFFile.open(args.model) as f:
        config = ModelConfig.from_gguf(f)
        if need > config.context_length:
            raise SystemExit(
                f"bench needs a context of {need} tokens; {args.model} has {config.context_length}"
            )
        model, _ = load_model(
            f,
            config,
            device=device,
            dtype=torch.bfloat16,
            max_positions=config.context_length,
            weights=args.weights,
        )
    kv = KVCache.allocate(config, slots, dtype=torch.bfloat16, device=device)
    logger.info("loaded %s in %.1fs", args.model, time.perf_counter() - t0)
    return model, config, kv, None


def _load_ranks(args: argparse.Namespace, device: torch.device, need: int):  # -> as _load
    """The model split over --tensor-parallel-size GPUs: every rank builds its part with the same
    callable (a preset's random weights, or its part of the file), rank 0 here."""
    from worker_orcd.engine.parallel import GGUFShard, start_ranks
    from worker_orcd.gguf import GGUFFile

    t0 = time.perf_counter()
    if args.preset:
        config = PRESETS[args.preset]
        context = max(need, 512)
        build = PresetShard(
            args.preset, args.weights == "quantized", max(context, config.context_length), context
        )
    else:
        with GGUFFile.open(args.model) as f:
            config = ModelConfig.from_gguf(f)
        if need > config.context_length:
            raise SystemExit(
                f"bench needs a context of {need} tokens; {args.model} has {config.context_length}"
            )
        build = GGUFShard(args.model, torch.bfloat16, config.context_length, args.weights)
    group = start_ranks(build, args.tensor_parallel_size, device, config, args.preset or args.model)
    try:
        model, kv = build(group.parallel, device)
        group.wait_ready()
    except BaseException:
        group.close()
        raise
    logger.info(
        "%s over %d ranks in %.1fs",
        args.preset or args.model,
        group.parallel.size,
        time.perf_counter() - t0,
    )
    return model, config, kv, group


@dataclass(frozen=True, slots=True)
class PresetShard:
    """One rank's part of a preset with random weights (each rank draws its own) and its KV
    cache: what every rank of `bench --preset P --tensor-parallel-size N` builds."""

    preset: str
    quantized: bool
    max_positions: int
    context: int

    def __call__(self, parallel: Parallel, device: torch.device):  # -> (CausalLM, KVCache)
        from worker_orcd.engine.kv_cache import KVCache

        config = PRESETS[self.preset]
        model = random_model(
            config,
            device,
            max_positions=self.max_positions,
            quantized=self.quantized,
            parallel=parallel,
        )
        kv_config = rank_config(config, parallel)
        return model, KVCache.allocate(kv_config, self.context, dtype=torch.bfloat16, device=device)


def _tokenizer(args: argparse.Namespace, config: ModelConfig):  # -> Tokenizer
    """The file's tokenizer, or for a preset a stand-in with no special ids (never stops early)."""
    from worker_orcd.tokenizer import Tokenizer

    if args.model:
        return Tokenizer.from_gguf(args.model)
    return stand_in_tokenizer(config.vocab_size)


def stand_in_tokenizer(vocab_size: int):  # -> Tokenizer
    """A byte-level BPE vocabulary of plain words (" w0", " w1", ...) and no special tokens, so
    generation from a preset goes through the real detokenizer and stops only at max_tokens."""
    from worker_orcd.tokenizer import Tokenizer

    metadata = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": [f"\u0120w{i}" for i in range(vocab_size)],  # \u0120: a space
        "tokenizer.ggml.merges": [],
    }
    return Tokenizer.from_gguf(metadata)


def _context_needed(args: argparse.Namespace) -> int:
    """Cache slots one sequence of the runs needs: the longest prompt, or decode run with its
    warm-up steps; with --streams, a prompt and its generated tokens."""
    if args.streams:
        return args.prompt_tokens + args.gen_tokens + 16
    return max(args.prefill + [c + args.decode_steps // 2 + 8 for c in args.decode_context])


def random_model(
    config: ModelConfig,
    device: torch.device,
    *,
    max_positions: int,
    quantized: bool = False,
    parallel: Parallel = SINGLE,
):  # -> CausalLM
    """The model with random bf16 weights (std 0.02, norms 1) made on `device`; `quantized`: its
    projections, embedding and head random blocks of a Q4_K_M-style mix instead; `parallel`: one
    rank's part of it."""
    from worker_orcd.layers import RMSNorm
    from worker_orcd.loader import build_model
    from worker_orcd.quant_mix import fill_random_q4_k_m

    model = build_model(
        config,
        device=device,
        dtype=torch.bfloat16,
        max_positions=max_positions,
        quantized=quantized,
        parallel=parallel,
    )
    gen = torch.Generator(device=device).manual_seed(parallel.rank)
    norms = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    with torch.no_grad():
        for p in model.parameters():
            if p.is_meta:
                continue
            if id(p) in norms:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    if quantized:
        mix = fill_random_q4_k_m(model, config, generator=gen)
        logger.info("random Q4_K_M-style mix: %s", {k: f"{v / 1e6:.0f} MB" for k, v in mix.items()})
    model.finish_loading()
    return model.eval()


def _decode_weight_bytes(model: torch.nn.Module, config: ModelConfig) -> int:
    """Bytes of weights one decode step reads: all but the embedding table (one row of it).
    Quantized layers count their blocks (a tied head's once)."""
    quantized = {id(m.quantized): m for m in model.modules() if getattr(m, "quantized", None)}
    placeholders = {id(m.weight) for m in quantized.values()}
    total = sum(
        p.numel() * p.element_size() for p in model.parameters() if id(p) not in placeholders
    )
    total += sum(m.quantized.nbytes for m in quantized.values())
    if not config.tied_embeddings:
        emb = model.model.embed_tokens
        w = emb.weight
        total -= emb.quantized.nbytes if emb.quantized is not None else w.numel() * w.element_size()
    return total


def _kv_bytes(config: ModelConfig, context: int) -> int:
    return 2 * config.n_layers * context * config.n_kv_heads * config.head_dim * 2


def _preset_like(config: ModelConfig) -> str | None:
    """The preset with the same shapes as `config`: the peer is built from its config."""
    keys = ("n_layers", "hidden_size", "n_heads", "n_kv_heads", "intermediate_size", "vocab_size")
    for name, p in PRESETS.items():
        if all(getattr(p, k) == getattr(config, k) for k in keys):
            return name
    return None


def _print(
    name: str,
    ceil: Ceilings,
    weight_bytes: int,
    rows: list[SpeedRow],
    peer_rows: list[SpeedRow],
    ttft: float | None,
) -> None:
    print(
        f"\n{ceil.device_name}: copy {ceil.copy_gbs:.0f} GB/s (read + written), "
        f"bf16 matmul {ceil.matmul_tflops:.0f} TFLOP/s"
    )
    print(f"{name}: {weight_bytes / 1e9:.2f} GB of weights read per decoded token")
    if ttft is not None:
        print(f"time to first token, 512-token prompt: {ttft:.2f} ms")
    print(
        f"{'engine':13} {'phase':8} {'context':>7} {'tok/s':>9} {'ms':>8} {'GB/s':>6} "
        f"{'%copy':>5} {'ours/peer':>9}"
    )
    peer = {(r.phase, r.context): r for r in peer_rows}
    for key in dict.fromkeys((r.phase, r.context) for r in rows):
        p = peer.get(key)
        for r in rows:
            if (r.phase, r.context) == key:
                _print_row(r, ceil, r.tok_s / p.tok_s if p is not None else None)
        if p is not None:
            _print_row(p, ceil, None)


def _print_collectives(
    config: ModelConfig, parallel: Parallel, collectives: tuple[float, float]
) -> None:
    reduce_us, gather_us = collectives
    per_token = 2 * config.n_layers + 1  # o_proj and down_proj of every layer, the embedding
    ms = per_token * reduce_us / 1e3
    print(
        f"tensor parallel {parallel.size}: all-reduce of [1, {config.hidden_size}] bf16 "
        f"{reduce_us:.1f} us, {per_token} per decoded token = {ms:.3f} ms; "
        f"logits all-gather {gather_us:.1f} us"
    )


def _print_row(r: SpeedRow, ceil: Ceilings, ratio: float | None) -> None:
    gbs = f"{r.gbs:6.0f} {100 * r.gbs / ceil.copy_gbs:4.0f}%" if r.gbs else f"{'':6} {'':5}"
    ratio_s = f"{ratio:8.1f}x" if ratio is not None else ""
    print(f"{r.engine:13} {r.phase:8} {r.context:7d} {r.tok_s:9.0f} {r.ms:8.2f} {gbs} {ratio_s}")


class OurBench:
    """Times this engine's model: prompt passes (CUDA graph per length bucket, and eager), time to
    first token through the runner path, greedy decode through the decode graph, and greedy
    generation through Engine.generate (an Engine built around the same model and cache)."""

    def __init__(
        self,
        model,
        config: ModelConfig,
        kv,
        weight_bytes: int,
        *,
        graph: bool,
        tokenizer,
        max_num_seqs: int = 1,
        group=None,  # RankGroup of a model split over ranks: every pass goes to all of them
    ) -> None:
        from worker_orcd.engine.engine import Engine, EngineInfo
        from worker_orcd.engine.model_runner import ModelRunner
        from worker_orcd.engine.parallel import TensorParallelRunner

        self.model = model
        self.config = config
        self.kv = kv
        self.device = kv.k.device
        context = min(kv.num_slots, model.max_positions)
        batch_tokens = min(4096, kv.num_slots)
        info = EngineInfo(
            model_name="bench",
            architecture=config.architecture,
            device=str(self.device),
            dtype="bfloat16",
            weights="bench",
            weight_bytes=weight_bytes,
            weight_mix={},
            kv_cache_bytes=kv.nbytes,
            kv_cache_tokens=kv.num_slots,
            max_num_seqs=max_num_seqs,
            max_batch_tokens=batch_tokens,
            quant_mix={},
            tokenizer_kind=tokenizer.kind,
            vocab_size=config.vocab_size,
            context_length=context,
        )
        self.engine = Engine(
            model=model,
            config=config,
            tokenizer=tokenizer,
            kv=kv,
            context_length=context,
            info=info,
            cuda_graphs=graph,
            max_num_seqs=max_num_seqs,
            max_batch_tokens=batch_tokens,
        )
        # The engine's graphs, driven directly by the graph rows; this runner stays eager (the
        # "ours eager" rows).
        self.runner = ModelRunner(model, kv)
        if group is not None:
            self.runner = TensorParallelRunner(self.runner, group)
            self.engine.runner = TensorParallelRunner(self.engine.runner, group)
        self.graphs = self.engine.runner.graphs
        if graph and self.graphs is None:
            logger.warning("CUDA graphs unavailable: running eagerly")
        self.gen = torch.Generator(device="cpu").manual_seed(0)

    def _ids(self, n: int) -> list[int]:
        return torch.randint(0, self.config.vocab_size, (n,), generator=self.gen).tolist()

    def _sequence(self, ids: list[int]):  # -> Sequence with a contiguous block table
        from worker_orcd.engine.sequence import Sequence

        seq = Sequence.from_prompt(ids)
        seq.block_table = list(range(self.kv.num_blocks))
        return seq

    def _forward(self, seq, n: int, *, prefill: bool) -> torch.Tensor:
        """One step through the graph when one fits, else the runner (what the engine does)."""
        from worker_orcd.engine.scheduler import ScheduledBatch

        batch = ScheduledBatch([seq], [n], is_prefill=prefill)
        logits = None
        if self.graphs is not None:
            logits = self.graphs.try_forward(batch, self.kv.block_size)
        if logits is None:
            logits = self.runner.forward(batch)
        seq.n_cached += n
        return logits

    @torch.inference_mode()
    def prefill(self, lengths: list[int]) -> list[SpeedRow]:
        """Prompt tok/s of one forward pass with the last token's logits, inputs on the host."""
        from worker_orcd.engine.scheduler import ScheduledBatch

        rows = []
        for n in lengths:
            ids = self._ids(n)

            def graph_step(ids=ids, n=n) -> torch.Tensor:
                seq = self._sequence(ids)
                return self._forward(seq, n, prefill=True)

            def eager_step(ids=ids, n=n) -> torch.Tensor:
                seq = self._sequence(ids)
                return self.runner.forward(ScheduledBatch([seq], [n], is_prefill=True))

            for name, step in (("worker-orcd", graph_step), ("ours eager", eager_step)):
                if name == "ours eager" and self.graphs is None:
                    continue
                ms = cuda_time_ms(step, warmup=2, iters=10)
                rows.append(SpeedRow(name, "prefill", n, n / (ms / 1e3), ms))
                logger.info(
                    "%s prefill %d tokens: %.2f ms (%.0f tok/s)", name, n, ms, n / (ms / 1e3)
                )
        return rows

    @torch.inference_mode()
    def ttft(self, n: int, repeats: int = 7) -> float:
        """Milliseconds from prompt ids on the host to the first greedy id on the host."""
        times = []
        for _ in range(repeats + 1):
            seq = self._sequence(self._ids(n))
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            logits = self._forward(seq, n, prefill=True)
            int(torch.argmax(logits[-1]).item())
            times.append((time.perf_counter() - t0) * 1e3)
        rest = sorted(times[1:])
        return rest[len(rest) // 2]

    @torch.inference_mode()
    def decode(self, contexts: list[int], steps: int) -> list[SpeedRow]:
        """Greedy decode of `steps` tokens whose mean context is each of `contexts`.

        worker-orcd: the decode graph feeding its argmax back, the host reading each id one step
        behind. "ours generate": Engine.generate, greedy (what a greedy request gets: sampler
        mask, detokenizer, stop checks; pipelined on the graph). "ours host-fed": each step's id
        read, then the next step's inputs written from the host, as the engine's path for sampled
        requests does.
        """
        rows = []
        for ctx in contexts:
            start = max(1, ctx - steps // 2)
            for name in ("worker-orcd", "ours host-fed"):
                if name == "ours host-fed" and self.graphs is None:
                    continue
                seq = self._sequence(self._ids(start))
                token = int(torch.argmax(self._forward(seq, start, prefill=True)[-1]).item())
                if name == "worker-orcd" and self.graphs is not None:
                    decode = self.graphs.decode
                    decode.decode_greedy(token, start, seq.block_table, 4)  # warm-up
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    decode.decode_greedy(token, start, seq.block_table, steps)
                else:
                    for i in range(4 + steps):
                        if i == 4:
                            torch.cuda.synchronize()
                            t0 = time.perf_counter()
                        seq.append(token)
                        token = int(torch.argmax(self._forward(seq, 1, prefill=False)[-1]).item())
                ms = (time.perf_counter() - t0) * 1e3 / steps
                rows.append(SpeedRow(name, "decode", ctx, 1e3 / ms, ms))
                logger.info("%s decode at context %d: %.3f ms/token", name, ctx, ms)
                if name == "worker-orcd":
                    rows.append(self.generate(ctx, steps))
        return rows

    def generate(self, ctx: int, steps: int, *, pipelined: bool = True) -> SpeedRow:
        """Engine.generate, greedy, of steps + 1 tokens after a prompt of ctx - steps / 2; decode
        time and tokens from its own timings (the first token comes out of the prefill)."""
        from worker_orcd.engine.types import SamplingParams

        start = max(1, ctx - steps // 2)
        loop = self.engine.loop
        saved = loop.device_fed
        if not pipelined:
            loop.device_fed = None
        try:
            self.engine.generate(self._ids(16), SamplingParams(max_tokens=8, temperature=0.0))
            out = self.engine.generate(
                self._ids(start), SamplingParams(max_tokens=steps + 1, temperature=0.0)
            )
        finally:
            loop.device_fed = saved
        t = out.timings
        if t.tokens_out < steps + 1:
            logger.warning("generate stopped after %d tokens (%s)", t.tokens_out, out.stop_reason)
        ms = t.decode_ms / max(t.tokens_out - 1, 1)
        name = "ours generate" if pipelined else "ours gen-host"
        logger.info("%s decode at context %d: %.3f ms/token", name, ctx, ms)
        return SpeedRow(name, "decode", ctx, 1e3 / ms, ms)
