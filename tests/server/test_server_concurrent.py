"""Many requests at once against the shared live server (CPU, real Qwen model): /execute and the
OpenAI endpoints run batched, each stream gets exactly its solo text and one terminal event, a
cancel takes one request out without touching the others, and /health and /metrics show the batch.

The reference for every request is the same request run alone on an in-process engine. The burst's
wall time beside the sum of the solo times is logged for the record (the rate itself is
benchmarks/serve_load.py's to measure).
"""

from __future__ import annotations

import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tests.server.live_server import BackgroundStream, LiveServer, SseEvent, check_one_terminal
from worker_orcd.engine.types import GenerationOutput, SamplingParams

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.slow

PROMPTS = (
    "def add(a, b):",
    "The capital of France is",
    "import numpy as",
    "Once upon a time,",
    "for i in range(",
    "SELECT name FROM",
    "Dear Sir or Madam,",
    "1, 2, 3, 4,",
    "class Stack:",
    "The quick brown fox",
    "<html>\n<head>",
    "Roses are red,",
)
CHATS = (
    "Name a colour.",
    "What is 3 + 4?",
    "Say hello in French.",
)


@dataclass(frozen=True, slots=True)
class Case:
    """One request: its /execute body (without job_id) and what it gives when run alone."""

    body: dict[str, Any]
    solo: GenerationOutput


def sampling(body: dict[str, Any]) -> SamplingParams:
    return SamplingParams(
        max_tokens=body["max_tokens"],
        temperature=body["temperature"],
        top_k=body.get("top_k", 0),
        seed=body.get("seed", 0),
    )


def solo(engine, body: dict[str, Any]) -> Case:  # noqa: ANN001
    """The request alone on the reference engine (a batch of one)."""
    if "messages" in body:
        ids = engine.encode_prompt(messages=body["messages"])
    else:
        ids = engine.encode_prompt(prompt=body["prompt"])
    return Case(body, engine.generate(ids, sampling(body)))


@pytest.fixture(scope="module")
def cases(engine) -> list[Case]:  # noqa: ANN001
    """Twelve prompts of different lengths and output lengths: ten greedy, two seeded sampled."""
    out = []
    for i, prompt in enumerate(PROMPTS):
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": 4 + 2 * (i % 4), "temperature": 0}
        if i in (3, 8):
            body |= {"temperature": 0.8, "top_k": 40, "seed": 1000 + i}
        out.append(solo(engine, body))
    return out


@pytest.fixture(scope="module")
def chat_cases(engine) -> list[Case]:  # noqa: ANN001
    bodies = [{"messages": [{"role": "user", "content": c}], "max_tokens": 6} for c in CHATS]
    return [solo(engine, {**b, "temperature": 0}) for b in bodies]


def job_id() -> str:
    return f"c-{uuid.uuid4().hex[:12]}"


def text_of(events: list[SseEvent]) -> str:
    return "".join(e.json()["t"] for e in events if e.event == "token")


def check_execute(events: list[SseEvent], case: Case) -> None:
    """One terminal event, token indices 0.. without a gap, and the solo text, token for token."""
    end = check_one_terminal(events)
    assert end.event == "end", end.data
    e = end.json()
    assert text_of(events) == case.solo.text, (case.body, text_of(events), case.solo.text)
    assert e["tokens_out"] == len(case.solo.token_ids)
    assert e["stop_reason"] == case.solo.stop_reason.value
    assert events[0].json()["prompt_tokens"] == len(case.solo.prompt_ids)


def scrape(client: httpx.Client) -> dict[str, float]:
    samples: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def wait_idle(client: httpx.Client, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        health = client.get("/health").json()
        if health["jobs_running"] == 0 and health["seqs_running"] + health["seqs_waiting"] == 0:
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.02)


def solo_seconds(cases: list[Case]) -> float:
    return sum(c.solo.timings.first_token_ms + c.solo.timings.decode_ms for c in cases) / 1e3


def test_concurrent_execute_streams_match_their_solo_runs(
    server: LiveServer,
    cases: list[Case],
) -> None:
    with server.client() as client:
        wait_idle(client)
        before = scrape(client)
    t0 = time.monotonic()
    streams = [BackgroundStream(server.url, {"job_id": job_id(), **c.body}) for c in cases]
    # While the burst runs: the batch holds several sequences and KV blocks.
    streams[0].wait_for("started")
    with server.client() as client:
        health = client.get("/health").json()
    results = [s.join(240) for s in streams]
    wall = time.monotonic() - t0
    for events, case in zip(results, cases, strict=True):
        check_execute(events, case)
    assert health["seqs_running"] + health["seqs_waiting"] >= 1
    assert health["kv_blocks_used"] >= 1
    logger.info(
        "%d concurrent /execute: %.2f s wall; the same requests alone: %.2f s",
        len(cases),
        wall,
        solo_seconds(cases),
    )
    with server.client() as client:
        health = wait_idle(client)
        after = scrape(client)
    # Every block is back, and some forward passes carried more than one sequence.
    assert health["kv_blocks_used"] == 0 and health["seqs_waiting"] == 0
    assert health["kv_blocks_total"] * health["kv_block_size"] == 256
    assert after["worker_orcd_kv_blocks_used"] == 0
    assert after["worker_orcd_kv_blocks_total"] == health["kv_blocks_total"]
    assert after["worker_orcd_running_sequences"] == 0
    assert after["worker_orcd_waiting_sequences"] == 0
    assert after["worker_orcd_preemptions_total"] == health["preemptions"]
    steps = after["worker_orcd_batch_sequences_count"] - before["worker_orcd_batch_sequences_count"]
    single = 'worker_orcd_batch_sequences_bucket{le="1.0"}'
    assert steps >= 1 and after[single] - before[single] < steps
    assert after["worker_orcd_engine_steps_total"] == health["steps"]
    completed = 'worker_orcd_requests_total{endpoint="execute",outcome="completed"}'
    assert after[completed] - before.get(completed, 0) == len(cases)
    logger.info(
        "preemptions so far %d, mean sequences per forward pass %.2f",
        health["preemptions"],
        health["mean_batch_seqs"],
    )


def test_concurrent_openai_requests_match_their_solo_runs(
    server: LiveServer, cases: list[Case], chat_cases: list[Case]
) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(
        base_url=f"{server.url}/v1", api_key="not-checked", max_retries=0, timeout=240
    )

    def params(case: Case) -> dict[str, Any]:
        b = case.body
        extra = {"top_k": b["top_k"]} if "top_k" in b else {}
        return dict(
            model="any",
            max_tokens=b["max_tokens"],
            temperature=b["temperature"],
            seed=b.get("seed"),
            extra_body=extra,
        )

    def completion(case: Case) -> tuple[str, list[str]]:
        if case is cases[0]:  # one of them not streamed
            out = client.completions.create(prompt=case.body["prompt"], **params(case))
            return out.choices[0].text, [out.choices[0].finish_reason]
        chunks = list(
            client.completions.create(prompt=case.body["prompt"], stream=True, **params(case))
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        return text, [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]

    def chat(case: Case) -> tuple[str, list[str]]:
        stream = client.chat.completions.create(
            messages=case.body["messages"], stream=True, **params(case)
        )
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return text, [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]

    # The OpenAI requests and a few /execute streams, all at once.
    t0 = time.monotonic()
    extra = [BackgroundStream(server.url, {"job_id": job_id(), **c.body}) for c in cases[-3:]]
    with ThreadPoolExecutor(len(cases) + len(chat_cases)) as pool:
        futures = [(c, pool.submit(completion, c)) for c in cases[:9]]
        futures += [(c, pool.submit(chat, c)) for c in chat_cases]
        got = [(c, f.result(240)) for c, f in futures]
    for stream, case in zip(extra, cases[-3:], strict=True):
        check_execute(stream.join(240), case)
    wall = time.monotonic() - t0
    for case, (text, finish) in got:
        assert text == case.solo.text, (case.body, text, case.solo.text)
        length = len(case.solo.token_ids) == case.body["max_tokens"]
        assert finish == ["length" if length else "stop"]  # exactly one finishing chunk
    all_cases = cases + chat_cases
    logger.info(
        "%d concurrent OpenAI + /execute: %.2f s wall; alone: %.2f s",
        len(all_cases),
        wall,
        solo_seconds(all_cases),
    )


def test_cancel_of_one_leaves_the_others_equal_to_their_solo_runs(
    server: LiveServer,
    engine,
    cases: list[Case],  # noqa: ANN001
) -> None:
    victim_case = solo(engine, {"prompt": "Count: 1, 2, 3,", "max_tokens": 24, "temperature": 0})
    others = cases[:5]
    victim = BackgroundStream(server.url, {"job_id": job_id(), **victim_case.body})
    streams = [BackgroundStream(server.url, {"job_id": job_id(), **c.body}) for c in others]
    victim.wait_for("token", 2)
    with server.client() as client:
        resp = client.post("/cancel", json={"job_id": victim.body["job_id"]})
        assert resp.status_code == 202 and resp.json()["status"] == "cancelling"
    events = victim.join(120)
    err = check_one_terminal(events).json()
    assert err == {"code": "CANCELLED", "message": "job cancelled", "retriable": False}
    # The text so far is kept: a prefix of what it would have said.
    text = text_of(events)
    assert len(text) < len(victim_case.solo.text) and victim_case.solo.text.startswith(text)
    for stream, case in zip(streams, others, strict=True):
        check_execute(stream.join(240), case)
    with server.client() as client:
        health = wait_idle(client)
    assert health["kv_blocks_used"] == 0
