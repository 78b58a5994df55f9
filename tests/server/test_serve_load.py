"""benchmarks/serve_load.py and benchmarks/random_gguf.py: the load generator's accounting against
the live server's own counters, its percentiles against numpy's, and the random GGUF writer's
file through the real loader."""

from __future__ import annotations

import argparse
import asyncio
import random
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest

from benchmarks import serve_load
from benchmarks.random_gguf import preset, write_random_gguf
from tests.server.live_server import LiveServer
from worker_orcd.engine.types import SamplingParams, StopReason


def test_percentile_is_numpys_linear_percentile() -> None:
    rng = np.random.default_rng(0)
    for n in (1, 2, 7, 100):
        xs = rng.exponential(size=n).tolist()
        for q in (0, 50, 90, 99, 100):
            assert serve_load.percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    assert np.isnan(serve_load.percentile([], 50))


@pytest.mark.slow
@pytest.mark.parametrize(("endpoint", "processes"), [("execute", 1), ("openai", 1), ("execute", 2)])
def test_load_run_counts_what_the_server_counts(
    server: LiveServer, endpoint: str, processes: int
) -> None:
    """Every request counted once, whether the clients run in this process or are split over
    client processes."""
    argv = ["--url", server.url, "--endpoint", endpoint, "--rounds", "2", "--no-warmup"]
    argv += ["--processes", str(processes)]
    args = serve_load.build_parser().parse_args(
        [*argv, "--prompt-tokens", "8", "--gen-tokens", "4"]
    )

    async def run() -> tuple[serve_load.Report, dict[str, float], dict[str, float]]:
        async with httpx.AsyncClient(base_url=server.url) as client:
            before = await serve_load._metrics(client)
            report = await serve_load.run_level(server.url, 3, args, random.Random(1), [0])
            after = await serve_load._metrics(client)
        return report, before, after

    report, before, after = asyncio.run(run())
    assert (report.clients, report.requests, report.errors) == (3, 6, 0)
    generated = after["worker_orcd_tokens_generated_total"]
    generated -= before["worker_orcd_tokens_generated_total"]
    assert report.output_tokens == generated
    assert 2 <= report.prompt_tokens_mean <= 20  # 4..12 words, about a token each
    assert report.ttft_p50_ms <= report.ttft_p99_ms and report.itl_p50_ms <= report.itl_p99_ms
    assert report.output_tok_s == pytest.approx(report.output_tokens / report.wall_s)
    assert report.batch_seqs_mean >= 1
    assert "out tok/s" in serve_load.format_table([report])


def test_fixed_lengths_are_exact_requests() -> None:
    """--fixed: every request its exact lengths, sent with ignore_eos on both endpoints; the seeded
    mix leaves end-of-generation tokens to end a request."""
    base = ["--url", "http://127.0.0.1:1", "--prompt-tokens", "6", "--gen-tokens", "5"]
    fixed = serve_load.workloads(
        3, serve_load.build_parser().parse_args([*base, "--fixed"]), random.Random(0)
    )
    assert {(w.prompt_words, w.gen_tokens, w.exact) for w in fixed} == {(6, 5, True)}
    for endpoint in ("execute", "openai"):
        body = serve_load._body(fixed[0], endpoint, 0.0, 7)
        assert body["ignore_eos"] is True and body["max_tokens"] == 5
    mix = serve_load.workloads(3, serve_load.build_parser().parse_args(base), random.Random(0))
    assert not any(w.exact for w in mix)
    assert "ignore_eos" not in serve_load._body(mix[0], "execute", 0.0, 7)


def test_a_client_process_that_dies_ends_the_run_at_once() -> None:
    """A client process that fails (here the options it reads are missing) ends the run with its
    exit code as soon as it dies, not after the minute that the wait for it allows."""
    args = argparse.Namespace(request_timeout=60.0, time_limit=60.0)
    w = serve_load.Workload("the cat", 2, 3)
    run = serve_load._run_processes("http://127.0.0.1:1", 1, [w], [0], [[w]], [[1]], args)
    with pytest.raises(SystemExit, match=r"client process \d+ exited with code 1 before warming"):
        asyncio.run(run)


def test_loopback_only() -> None:
    assert serve_load.check_loopback("http://127.0.0.1:8000/") == "http://127.0.0.1:8000"
    with pytest.raises(SystemExit, match="must point at this machine"):
        serve_load.check_loopback("http://10.1.2.3:8000")


def test_random_gguf_loads_and_never_stops_early(tmp_path: Path) -> None:
    """Phi-3's real vocabulary and layout at toy width: the loader takes every tensor exactly
    once, and greedy decoding runs to max_tokens (the end-of-generation rows are zero)."""
    from worker_orcd.engine.engine import Engine
    from worker_orcd.gguf import GGUFFile

    config = replace(
        preset("phi3-mini"),
        n_layers=2,
        hidden_size=64,
        n_heads=4,
        n_kv_heads=4,
        head_dim=16,
        rope_dim=16,
        intermediate_size=128,
    )
    path = write_random_gguf(config, tmp_path / "phi3.gguf", dtype="bf16")
    with GGUFFile.open(path) as f:
        assert f.tensors["blk.0.attn_qkv.weight"].qtype.name == "BF16"
        assert f.tensors["blk.0.attn_norm.weight"].qtype.name == "F32"
    engine = Engine.load(path, max_context=128)
    assert engine.tokenizer.eog_ids  # <|end|>, <|endoftext|>: present, and never drawn
    head = engine.model.state_dict()["lm_head.weight"]
    assert head[sorted(engine.tokenizer.eog_ids)].abs().sum() == 0
    outs = engine.generate_batch(
        ["the cat sat on", "hello"], SamplingParams(max_tokens=40, temperature=0)
    )
    assert all(o.stop_reason is StopReason.MAX_TOKENS and len(o.token_ids) == 40 for o in outs)
    engine.close()
