"""N concurrent streaming clients against `worker-orcd serve`: the figures servers are compared by.

    python -m benchmarks.serve_load --url http://127.0.0.1:8000 --clients 1 4 8
    python -m benchmarks.serve_load --spawn --model FILE --clients 16 64 \\
        --prompt-tokens 128 --gen-tokens 128 --fixed --serve-args "--device cuda --max-context 512"
    python -m benchmarks.serve_load --spawn --model /tmp/phi3.gguf --random phi3-mini ...

For each client count N: N clients (asyncio tasks sharing one pool of keep-alive connections,
read by benchmarks/sse_client.py: httpx cost too much per event for one process), each sending
--rounds requests one after the other, streaming (`/execute` SSE, or `/v1/completions` with
`stream: true` under --endpoint openai). Request lengths are a seeded mix (prompt and output
lengths uniform in [L/2, 3L/2] around --prompt-tokens / --gen-tokens) or, with --fixed, exactly
those (sent with `ignore_eos`: no request ends early at an end-of-generation token). Prompts are
random common words (about one token each; the server reports the real count). Requests are greedy
(temperature 0) unless --temperature says otherwise.

Reported per N: output tok/s (output tokens of all requests / wall time from the first request
sent to the last one done), time to first token p50/p99 (request sent -> first text piece; and
"engine", the server's own submission -> first token from /execute's end event, which leaves out
HTTP, tokenization and the client),
inter-token latency p50/p99 (gaps between successive text pieces of a stream), errors (by kind: a
status other than 200 as `HTTP 503`, the server's error code, `no terminal event` or `event after
the terminal event` unless a stream ends with exactly one `end` / `error` or `[DONE]`, `timeout`, a
connection closed early), and from the server's /metrics the mean sequences per forward pass and
the preemptions during the run. Each piece is timed when its bytes are read.
Before each measured run an unmeasured burst of N short requests warms the server up (--no-warmup
skips it). Loopback only: the URL must be 127.0.0.1, ::1 or localhost. Each run is bounded:
--rounds requests per client, no new request after --time-limit seconds, --request-timeout seconds
for each whole request.

--spawn starts `worker-orcd serve --model FILE` on a free port of 127.0.0.1 (extra flags in
--serve-args) and stops it at the end; --random PRESET first writes a random-weight GGUF of that
preset's real dimensions to FILE if FILE does not exist (benchmarks/random_gguf.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import multiprocessing
import os
import queue
import random
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from benchmarks.sse_client import Pool, ProtocolError, SSEDecoder

logger = logging.getLogger("benchmarks.serve_load")

LOOPBACK = ("127.0.0.1", "::1", "localhost")
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which "
    "but have an they you were her she there one all we their can has more will would if its "
    "time so what about up out them some could other into than then now only like just over "
    "also new very after first well way even because these two may any most people us through "
    "back year work day good where much how made many before great must old right still own "
    "see long world under last never place same another while might home small found house "
    "water light city tree river book story music game road power table green window market"
).split()


@dataclass(frozen=True, slots=True)
class Workload:
    prompt: str
    prompt_words: int
    gen_tokens: int
    exact: bool = False  # exactly gen_tokens: end-of-generation tokens do not end it (ignore_eos)


@dataclass(slots=True)
class Result:
    sent: float
    first: float | None = None
    pieces: list[float] = field(default_factory=list)  # arrival time of each text piece
    engine_first_ms: float | None = None  # the server's own submit -> first token (/execute)
    prompt_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None
    done: float = 0.0


@dataclass(frozen=True, slots=True)
class Report:
    clients: int
    endpoint: str
    requests: int
    errors: int
    error_kinds: dict[str, int]
    prompt_tokens_mean: float
    output_tokens: int
    wall_s: float
    output_tok_s: float
    ttft_p50_ms: float
    ttft_p99_ms: float
    engine_ttft_p50_ms: float  # inside the server: the job's submission -> its first token
    engine_ttft_p99_ms: float
    itl_p50_ms: float
    itl_p99_ms: float
    batch_seqs_mean: float
    preemptions: int


def workloads(n: int, args: argparse.Namespace, rng: random.Random) -> list[Workload]:
    out = []
    for _ in range(n):
        if args.fixed:
            p, g = args.prompt_tokens, args.gen_tokens
        else:
            p = rng.randint(max(1, args.prompt_tokens // 2), args.prompt_tokens * 3 // 2)
            g = rng.randint(max(1, args.gen_tokens // 2), args.gen_tokens * 3 // 2)
        words = " ".join(rng.choice(WORDS) for _ in range(p))
        out.append(Workload(prompt=words, prompt_words=p, gen_tokens=g, exact=args.fixed))
    return out


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), linear between closest ranks; nan when there are none."""
    if not values:
        return math.nan
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _body(w: Workload, endpoint: str, temperature: float, seed: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt": w.prompt,
        "max_tokens": w.gen_tokens,
        "temperature": temperature,
        "seed": seed,
    }
    if w.exact:
        body["ignore_eos"] = True
    if endpoint == "openai":
        return {"model": "any", "stream": True, "stream_options": {"include_usage": True}, **body}
    return {"job_id": f"load-{seed}", **body}


def _request_body(w: Workload, endpoint: str, temperature: float, seed: int) -> bytes:
    """_body as the bytes sent, serialized as httpx's `json=` does."""
    body = _body(w, endpoint, temperature, seed)
    return json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


async def one_request(pool: Pool, w: Workload, args: argparse.Namespace, seed: int) -> Result:
    r = Result(sent=time.perf_counter())
    try:
        await asyncio.wait_for(_exchange(pool, w, args, seed, r), args.request_timeout)
        if r.error is None and r.output_tokens == 0 and not r.pieces:
            r.error = "no output"
    except asyncio.TimeoutError:
        r.error = "timeout"
    except (ProtocolError, StreamError) as exc:
        r.error = str(exc)
    except (OSError, json.JSONDecodeError) as exc:
        r.error = type(exc).__name__
    finally:
        r.done = time.perf_counter()
    return r


async def _exchange(
    pool: Pool, w: Workload, args: argparse.Namespace, seed: int, r: Result
) -> None:
    """One request on a pooled connection, its events recorded into r as they are read."""
    path = "/execute" if args.endpoint == "execute" else "/v1/completions"
    body = _request_body(w, args.endpoint, args.temperature, seed)
    conn = await pool.acquire()
    try:
        status = await conn.request("POST", pool.prefix + path, body)
        if status != 200:
            await conn.read_body(_ignore)
            r.error = f"HTTP {status}"
            return
        stream = _Stream(r, _execute_frame if args.endpoint == "execute" else _openai_frame)
        await conn.read_body(stream.on_data)
        if not stream.ended:
            raise StreamError("no terminal event")
    finally:
        pool.release(conn)


def _ignore(data: bytes, now: float) -> None:
    pass


class StreamError(Exception):
    """A stream that is valid HTTP but not the events a stream must be; the message is its kind."""


class _Stream:
    """A response's SSE events into a Result: text pieces with the time their bytes were read,
    and exactly one terminal event (`end` / `error`, or OpenAI's `[DONE]`), last."""

    __slots__ = ("r", "frame", "events", "ended")

    def __init__(self, r: Result, frame: Callable[[Result, str | None, str, float], bool]) -> None:
        self.r, self.frame, self.events, self.ended = r, frame, SSEDecoder(), False

    def on_data(self, data: bytes, now: float) -> None:
        for name, payload in self.events.feed(data):
            if self.ended:
                raise StreamError("event after the terminal event")
            self.ended = self.frame(self.r, name, payload, now)


def _piece(r: Result, now: float) -> None:
    if r.first is None:
        r.first = now
    r.pieces.append(now)


def _execute_frame(r: Result, name: str | None, payload: str, now: float) -> bool:
    """Records one /execute event; True for the terminal one."""
    data = json.loads(payload)
    if name == "token":
        _piece(r, now)
    elif name == "started":
        r.prompt_tokens = data["prompt_tokens"]
    elif name == "end":
        r.output_tokens = data["tokens_out"]
        r.engine_first_ms = data.get("first_token_ms")
        return True
    elif name == "error":
        r.error = data.get("code", "error")
        return True
    return False


def _openai_frame(r: Result, name: str | None, payload: str, now: float) -> bool:
    """Records one /v1/completions chunk; True for `[DONE]`."""
    if payload == "[DONE]":
        return True
    data = json.loads(payload)
    if "error" in data:
        r.error = data["error"].get("code", "error")
        return False
    if data.get("choices") and data["choices"][0].get("text"):
        _piece(r, now)
    usage = data.get("usage")
    if usage:
        r.prompt_tokens = usage["prompt_tokens"]
        r.output_tokens = usage["completion_tokens"]
    return False


_REPLICA_LABEL = re.compile(r'replica="[^"]*",?')


async def _metrics(client: httpx.AsyncClient) -> dict[str, float]:
    samples: dict[str, float] = {}
    try:
        text = (await client.get("/metrics")).text
    except httpx.HTTPError:
        return samples
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            # Behind a data-parallel front each replica's samples carry a replica label: summed.
            name = _REPLICA_LABEL.sub("", name).replace(",}", "}").replace("{}", "")
            samples[name] = samples.get(name, 0.0) + float(value)
    return samples


async def run_level(
    url: str, n: int, args: argparse.Namespace, rng: random.Random, seeds: list[int]
) -> Report:
    warm = [] if args.no_warmup else workloads(n, args, rng)
    warm = [Workload(w.prompt, w.prompt_words, min(8, w.gen_tokens), w.exact) for w in warm]
    warm_seeds = [_next(seeds) for _ in warm]
    plans = [workloads(args.rounds, args, rng) for _ in range(n)]
    plan_seeds = [[_next(seeds) for _ in plan] for plan in plans]
    procs = max(1, min(args.processes, n))
    if procs == 1:
        async with _metrics_client(url) as client, Pool(url) as pool:
            await _warm_up(pool, warm, warm_seeds, args)
            before = await _metrics(client)
            t0 = time.perf_counter()
            per_client = await _drive(pool, plans, plan_seeds, args, t0 + args.time_limit)
            wall = time.perf_counter() - t0
            after = await _metrics(client)
        results = [r for rs in per_client for r in rs]
    else:
        results, before, after, wall = await _run_processes(
            url, procs, warm, warm_seeds, plans, plan_seeds, args
        )
    return summarize(n, args.endpoint, results, wall, before, after)


def _metrics_client(url: str) -> httpx.AsyncClient:
    """For /metrics, outside the timed part: the streams go through a Pool."""
    return httpx.AsyncClient(base_url=url, timeout=30.0)


async def _warm_up(
    pool: Pool, warm: list[Workload], seeds: list[int], args: argparse.Namespace
) -> None:
    """The warm-up's connections stay open in the pool for the measured requests."""
    pairs = zip(warm, seeds, strict=True)
    await asyncio.gather(*(one_request(pool, w, args, s) for w, s in pairs))


async def _drive(
    pool: Pool,
    plans: list[list[Workload]],
    seeds: list[list[int]],
    args: argparse.Namespace,
    deadline: float,
) -> list[list[Result]]:
    """Each plan is one client: its requests one after the other, none started past deadline."""

    async def client_task(plan: list[Workload], plan_seeds: list[int]) -> list[Result]:
        out = []
        for w, seed in zip(plan, plan_seeds, strict=True):
            if time.perf_counter() >= deadline:
                break
            out.append(await one_request(pool, w, args, seed))
        return out

    return await asyncio.gather(*(client_task(p, s) for p, s in zip(plans, seeds, strict=True)))


async def _run_processes(
    url: str,
    procs: int,
    warm: list[Workload],
    warm_seeds: list[int],
    plans: list[list[Workload]],
    plan_seeds: list[list[int]],
    args: argparse.Namespace,
) -> tuple[list[Result], dict[str, float], dict[str, float], float]:
    """The clients split over `procs` processes (one asyncio loop each, so no one loop bounds
    the figures): each warms up its share, then all start together; wall time runs from the
    first request sent to the last one done, on the machine's monotonic clock."""
    ctx = multiprocessing.get_context("spawn")
    ready, results, start = ctx.Queue(), ctx.Queue(), ctx.Event()
    children = []
    for i in range(procs):
        share = slice(i, None, procs)
        child = ctx.Process(
            target=_child,
            args=(url, warm[share], warm_seeds[share], plans[share], plan_seeds[share], args),
            kwargs={"ready": ready, "start": start, "results": results},
            daemon=True,
        )
        child.start()
        children.append(child)
    try:
        for _ in children:
            await asyncio.to_thread(_get, ready, children, args.request_timeout, "warming up")
        async with _metrics_client(url) as client:
            before = await _metrics(client)
            start.set()
            out: list[Result] = []
            for _ in children:
                limit = args.time_limit + 600
                out.extend(await asyncio.to_thread(_get, results, children, limit, "its results"))
            after = await _metrics(client)
    finally:
        for child in children:
            child.join(timeout=10)
            if child.is_alive():
                child.kill()
    wall = max((r.done for r in out), default=0.0) - min((r.sent for r in out), default=0.0)
    return out, before, after, wall


def _get(q: Any, children: list[Any], timeout: float, what: str) -> Any:
    """The next item of the queue q, within `timeout` seconds; SystemExit, at once, naming a
    client process that died first (an exception in it ends it with a nonzero code), and on
    timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return q.get(True, min(0.5, max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            dead = [c for c in children if c.exitcode not in (None, 0)]
            if dead:
                raise SystemExit(
                    f"client process {dead[0].pid} exited with code {dead[0].exitcode} "
                    f"before {what}"
                ) from None
            if time.monotonic() >= deadline:
                raise SystemExit(f"no client process finished {what} in {timeout:g} s") from None


def _child(
    url: str,
    warm: list[Workload],
    warm_seeds: list[int],
    plans: list[list[Workload]],
    plan_seeds: list[list[int]],
    args: argparse.Namespace,
    *,
    ready: Any,
    start: Any,
    results: Any,
) -> None:
    async def run() -> list[Result]:
        async with Pool(url) as pool:
            await _warm_up(pool, warm, warm_seeds, args)
            ready.put(True)
            await asyncio.to_thread(start.wait)
            deadline = time.perf_counter() + args.time_limit
            per_client = await _drive(pool, plans, plan_seeds, args, deadline)
        return [r for rs in per_client for r in rs]

    results.put(asyncio.run(run()))


def _next(seeds: list[int]) -> int:
    seeds[0] += 1
    return seeds[0]


def summarize(
    n: int,
    endpoint: str,
    results: list[Result],
    wall: float,
    before: dict[str, float],
    after: dict[str, float],
) -> Report:
    ok = [r for r in results if r.error is None]
    kinds: dict[str, int] = {}
    for r in results:
        if r.error is not None:
            kinds[r.error] = kinds.get(r.error, 0) + 1
    ttft = [(r.first - r.sent) * 1e3 for r in ok if r.first is not None]
    engine_ttft = [r.engine_first_ms for r in ok if r.engine_first_ms is not None]
    itl = [(b - a) * 1e3 for r in ok for a, b in zip(r.pieces, r.pieces[1:], strict=False)]
    out_tokens = sum(r.output_tokens for r in ok)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    steps = delta("worker_orcd_batch_sequences_count")
    return Report(
        clients=n,
        endpoint=endpoint,
        requests=len(results),
        errors=len(results) - len(ok),
        error_kinds=kinds,
        prompt_tokens_mean=sum(r.prompt_tokens for r in ok) / len(ok) if ok else math.nan,
        output_tokens=out_tokens,
        wall_s=wall,
        output_tok_s=out_tokens / wall if wall > 0 else math.nan,
        ttft_p50_ms=percentile(ttft, 50),
        ttft_p99_ms=percentile(ttft, 99),
        engine_ttft_p50_ms=percentile(engine_ttft, 50),
        engine_ttft_p99_ms=percentile(engine_ttft, 99),
        itl_p50_ms=percentile(itl, 50),
        itl_p99_ms=percentile(itl, 99),
        batch_seqs_mean=delta("worker_orcd_batch_sequences_sum") / steps if steps else math.nan,
        preemptions=int(delta("worker_orcd_preemptions_total")),
    )


def format_table(reports: list[Report]) -> str:
    head = (
        f"{'clients':>7} {'reqs':>5} {'err':>4} {'prompt':>6} {'out tok':>8} {'wall s':>7} "
        f"{'out tok/s':>9} {'TTFT p50':>9} {'p99 ms':>8} {'engine p50':>10} {'p99 ms':>7} "
        f"{'ITL p50':>8} {'p99 ms':>7} "
        f"{'seqs/step':>9} {'preempt':>7}"
    )
    lines = [head]
    for r in reports:
        lines.append(
            f"{r.clients:>7} {r.requests:>5} {r.errors:>4} {r.prompt_tokens_mean:>6.0f} "
            f"{r.output_tokens:>8} {r.wall_s:>7.2f} {r.output_tok_s:>9.1f} "
            f"{r.ttft_p50_ms:>9.1f} {r.ttft_p99_ms:>8.1f} {r.engine_ttft_p50_ms:>10.1f} "
            f"{r.engine_ttft_p99_ms:>7.1f} {r.itl_p50_ms:>8.1f} "
            f"{r.itl_p99_ms:>7.1f} {r.batch_seqs_mean:>9.2f} {r.preemptions:>7}"
        )
        if r.error_kinds:
            lines.append(f"{'':>7} errors: {r.error_kinds}")
    return "\n".join(lines)


# -- spawning the server ---------------------------------------------------------------------------


class Spawned:
    """`worker-orcd serve` in a subprocess; its address comes from its `ready` log line."""

    def __init__(self, model: str, serve_args: list[str], start_timeout: float) -> None:
        cmd = [
            sys.executable,
            "-m",
            "worker_orcd.cli",
            "serve",
            "--model",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--log-format",
            "json",
            *serve_args,
        ]
        logger.info("starting: %s", shlex.join(cmd))
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env
        )
        self._lines: queue.Queue[dict[str, Any] | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        self.url = self._wait_ready(start_timeout)

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            text = raw.decode("utf-8", errors="replace").strip()
            try:
                rec = json.loads(text)
            except json.JSONDecodeError:
                rec = {"message": text}
            if rec.get("level") in ("WARNING", "ERROR", "CRITICAL") or "level" not in rec:
                logger.info("server: %s", text)
            self._lines.put(rec)
        self._lines.put(None)

    def _wait_ready(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self.stop()
                raise TimeoutError(f"server not ready within {timeout:.0f} s")
            try:
                rec = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if rec is None:
                raise RuntimeError(f"server exited with {self.proc.wait()} before it was ready")
            if rec.get("event") == "model_load_complete":
                logger.info("server: model loaded in %.1f s", rec.get("load_ms", 0) / 1e3)
            if rec.get("event") == "ready":
                return str(rec["uri"])

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def check_loopback(url: str) -> str:
    host = urlparse(url).hostname
    if host not in LOOPBACK:
        raise SystemExit(f"--url must point at this machine ({', '.join(LOOPBACK)}), not {host!r}")
    return url.rstrip("/")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="N concurrent streaming clients against worker-orcd serve"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running server on this machine, e.g. http://127.0.0.1:8000")
    src.add_argument("--spawn", action="store_true", help="start `worker-orcd serve --model`")
    p.add_argument("--model", help="GGUF file to serve (--spawn)")
    p.add_argument(
        "--random",
        metavar="PRESET",
        help="with --spawn: first write a random-weight GGUF of this preset (phi3-mini, "
        "qwen2.5-0.5b) to --model unless it exists",
    )
    p.add_argument("--random-dtype", choices=["bf16", "f16"], default="bf16")
    p.add_argument("--random-vocab", default=None, help="vocab GGUF for --random (its tokenizer)")
    p.add_argument("--serve-args", default="", help="extra flags for serve, one string")
    p.add_argument("--start-timeout", type=float, default=900.0)
    p.add_argument("--endpoint", choices=["execute", "openai"], default="execute")
    p.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8], metavar="N")
    p.add_argument("--rounds", type=int, default=2, help="requests per client, one at a time")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument(
        "--fixed", action="store_true", help="every request exactly --prompt/--gen-tokens"
    )
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0, help="seeds the lengths, words and sampling")
    p.add_argument("--time-limit", type=float, default=300.0, help="seconds per client count")
    p.add_argument("--request-timeout", type=float, default=600.0)
    p.add_argument("--no-warmup", action="store_true")
    p.add_argument(
        "--processes",
        type=int,
        default=1,
        help="client processes the clients are split over (default 1: one asyncio loop)",
    )
    p.add_argument("--json", default=None, metavar="FILE", help="also write the reports here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    if min(args.clients) < 1 or args.rounds < 1 or min(args.prompt_tokens, args.gen_tokens) < 1:
        raise SystemExit("--clients, --rounds, --prompt-tokens and --gen-tokens must be >= 1")
    server: Spawned | None = None
    if args.spawn:
        if not args.model:
            raise SystemExit("--spawn needs --model FILE")
        if args.random and not Path(args.model).exists():
            from benchmarks.random_gguf import preset, write_random_gguf

            write_random_gguf(
                preset(args.random), args.model, vocab=args.random_vocab, dtype=args.random_dtype
            )
        server = Spawned(args.model, shlex.split(args.serve_args), args.start_timeout)
        url = server.url
    else:
        url = check_loopback(args.url)
    rng = random.Random(args.seed)
    seeds = [args.seed * 1_000_003]
    reports = []
    try:
        health = httpx.get(f"{url}/health", timeout=30).json()
        logger.info(
            "server: %s on %s (%s), max_num_seqs %s, KV %s blocks of %s",
            health["model"],
            health["device"],
            health["dtype"],
            health.get("max_num_seqs"),
            health.get("kv_blocks_total"),
            health.get("kv_block_size"),
        )
        for n in args.clients:
            report = asyncio.run(run_level(url, n, args, rng, seeds))
            logger.info("%d clients: %.1f output tok/s", n, report.output_tok_s)
            reports.append(report)
    finally:
        if server is not None:
            server.stop()
    lengths = "fixed" if args.fixed else "mix around"
    print(
        f"serve_load: {args.endpoint}, {lengths} {args.prompt_tokens} prompt + "
        f"{args.gen_tokens} generated tokens, {args.rounds} requests per client, "
        f"temperature {args.temperature}"
    )
    print(format_table(reports))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in reports], indent=2))
    return 1 if any(r.errors for r in reports) else 0


if __name__ == "__main__":
    raise SystemExit(main())
