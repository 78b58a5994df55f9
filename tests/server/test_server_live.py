"""/execute, /cancel, /health and /metrics over real HTTP against one shared live server (CPU, real
Qwen model). Timings (cancel latency, /health latency) are logged for the record; the asserted
bounds leave room for a busy two-core CI machine."""

from __future__ import annotations

import logging
import statistics
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.server.live_server import (
    BackgroundStream,
    LiveServer,
    SseEvent,
    check_one_terminal,
    parse_sse,
    stream_execute,
)
from worker_orcd.engine.types import U64_MAX, SamplingParams

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.slow


def job_id() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


def text_of(events: list[SseEvent]) -> str:
    return "".join(e.json()["t"] for e in events if e.event == "token")


def wait_idle(client: httpx.Client, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        health = client.get("/health").json()
        if health["jobs_running"] == 0 and health["jobs_queued"] == 0:
            return health
        time.sleep(0.02)
    raise TimeoutError("server still busy")


def test_stream_matches_the_engine_for_the_same_seed(server: LiveServer, engine) -> None:  # noqa: ANN001
    body = {
        "job_id": job_id(),
        "prompt": "def quicksort(items):",
        "max_tokens": 24,
        "temperature": 0.8,
        "top_k": 40,
        "top_p": 0.95,
        "seed": 1234,
    }
    stream = BackgroundStream(server.url, body)
    first = stream.wait_for("token")
    # Flushed as produced: the first token is here while the job is still running.
    with server.client() as client:
        assert client.get("/health").json()["jobs_running"] == 1
    events = stream.join()
    end = check_one_terminal(events)
    assert end.event == "end" and first.at < end.at
    started = events[0].json()
    ids = engine.encode_prompt(prompt=body["prompt"])
    assert started["job_id"] == body["job_id"] and started["seed"] == 1234
    assert started["prompt_tokens"] == len(ids)
    assert started["model"] == engine.model_name and started["started_at"].endswith("Z")
    ref = engine.generate(
        ids, SamplingParams(max_tokens=24, temperature=0.8, top_k=40, top_p=0.95, seed=1234)
    )
    assert text_of(events) == ref.text
    e = end.json()
    assert e["tokens_out"] == len(ref.token_ids)
    assert e["stop_reason"] == ref.stop_reason.value
    assert e["first_token_ms"] > 0 and e["decode_time_ms"] > 0 and e["tokens_per_sec"] > 0
    assert "stop_sequence_matched" not in e


def test_seed_is_generated_when_absent_and_replays(server: LiveServer) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0}
    with server.client() as client:
        first = stream_execute(client, {"job_id": job_id(), **body})
        seed = first[0].json()["seed"]
        assert isinstance(seed, int) and 0 <= seed <= U64_MAX
        again = stream_execute(client, {"job_id": job_id(), **body, "seed": seed})
    assert text_of(again) == text_of(first)


def test_chat_messages_go_through_the_template(server: LiveServer, engine) -> None:  # noqa: ANN001
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What colour is the sky on a clear day?"},
    ]
    with server.client() as client:
        events = stream_execute(
            client, {"job_id": job_id(), "messages": messages, "max_tokens": 6, "temperature": 0}
        )
    ids = engine.encode_prompt(messages=messages)
    assert events[0].json()["prompt_tokens"] == len(ids)
    check_one_terminal(events)
    ref = engine.generate(ids, SamplingParams(max_tokens=6, temperature=0, seed=0))
    assert text_of(events) == ref.text and "blue" in ref.text.lower()


def test_ignore_eos_runs_past_the_end_of_the_answer(server: LiveServer, engine) -> None:  # noqa: ANN001
    messages = [
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What colour is the sky on a clear day?"},
    ]
    ids = engine.encode_prompt(messages=messages)
    answer = engine.generate(ids, SamplingParams(max_tokens=12, temperature=0, seed=0))
    assert answer.stop_reason.value == "EOS" and len(answer.token_ids) < 12  # what is run past
    body = {"messages": messages, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    with server.client() as client:
        events = stream_execute(client, {"job_id": job_id(), **body})
    end = check_one_terminal(events).json()
    assert end["stop_reason"] == "MAX_TOKENS" and end["tokens_out"] == 12
    ref = engine.generate(
        ids, SamplingParams(max_tokens=12, temperature=0, seed=0, ignore_eos=True)
    )
    assert text_of(events) == ref.text and ref.text.startswith(answer.text)


def test_chinese_and_emoji_stream_whole_characters(server: LiveServer, engine) -> None:  # noqa: ANN001
    # Each of 🦩, 🫠, 龘 and 靐 takes two or three byte-level tokens in Qwen's vocabulary; a pattern
    # repeated three times is continued by greedy decoding. 13 tokens are one more repetition; a
    # limit inside a character would end the text with U+FFFD for its incomplete bytes.
    prompt = "你好 🦩🫠 龘靐\n" * 3
    body = {"job_id": job_id(), "prompt": prompt, "max_tokens": 13, "temperature": 0}
    with server.client() as client:
        events = stream_execute(client, body)  # the parser decodes each frame strictly
    check_one_terminal(events)
    pieces = [e.json()["t"] for e in events if e.event == "token"]
    assert all("\ufffd" not in p for p in pieces), pieces
    ref = engine.generate(
        engine.encode_prompt(prompt=prompt), SamplingParams(max_tokens=13, temperature=0, seed=0)
    )
    assert "".join(pieces) == ref.text
    split = [ch for ch in ref.text if len(engine.tokenizer.encode(ch, add_special=False)) > 1]
    assert len(split) >= 2, ref.text  # characters the stream had to hold back bytes of


def test_stop_sequence_is_reported_and_not_returned(server: LiveServer, engine) -> None:  # noqa: ANN001
    prompt = "def add(a, b):\n    return a + b\n\n\ndef"
    ref = engine.generate(
        engine.encode_prompt(prompt=prompt), SamplingParams(max_tokens=24, temperature=0, seed=0)
    )
    stop = ref.text.strip()[:6][-3:]  # a few characters the greedy continuation is sure to hold
    assert stop
    with server.client() as client:
        events = stream_execute(
            client,
            {
                "job_id": job_id(),
                "prompt": prompt,
                "max_tokens": 24,
                "temperature": 0,
                "stop": [stop],
            },
        )
    end = check_one_terminal(events).json()
    assert end["stop_reason"] == "STOP_SEQUENCE" and end["stop_sequence_matched"] == stop
    assert text_of(events) == ref.text[: ref.text.index(stop)]


def test_every_invalid_field_is_named_at_once(server: LiveServer) -> None:
    body = {
        "job_id": "",
        "prompt": "",
        "max_tokens": 65,
        "temperature": 2.5,
        "top_p": 0,
        "top_k": -1,
        "min_p": 2,
        "repetition_penalty": 0,
        "stop": ["a"] * 5,
        "seed": -1,
        "colour": "blue",
    }
    with server.client() as client:
        resp = client.post("/execute", json=body)
        assert resp.status_code == 400
        out = resp.json()
        assert out["code"] == "INVALID_REQUEST" and out["retriable"] is False
        fields = {f["field"]: f["constraint"] for f in out["fields"]}
        assert set(fields) == set(body)
        assert "[1, 64]" in fields["max_tokens"]  # --max-tokens-out
        resp = client.post("/execute", content=b"{not json")
        assert resp.status_code == 400 and resp.json()["fields"][0]["field"] == "body"
        resp = client.post("/execute", json={"job_id": "x", "messages": [{"role": "bot"}]})
        assert {f["field"] for f in resp.json()["fields"]} == {
            "messages[0].role",
            "messages[0].content",
        }


def counted_prompt(engine, lo: int, hi: int) -> tuple[str, int]:  # noqa: ANN001
    """A prompt of between lo and hi tokens."""
    for repeats in range(1, 100):
        prompt = "one two three four five six seven eight nine ten " * repeats
        n = len(engine.encode_prompt(prompt=prompt))
        if lo <= n <= hi:
            return prompt, n
    raise AssertionError(f"no prompt of {lo}..{hi} tokens")


def test_prompt_limits_in_tokens(server: LiveServer, engine) -> None:  # noqa: ANN001
    # The shared server: --max-context 256, --max-tokens-in 240, --max-tokens-out 64.
    too_long, n = counted_prompt(engine, 241, 300)
    tight, m = counted_prompt(engine, 256 - 64 + 1, 240)
    with server.client() as client:
        resp = client.post("/execute", json={"job_id": job_id(), "prompt": too_long})
        assert resp.status_code == 400
        assert resp.json()["fields"] == [
            {"field": "prompt", "constraint": f"is {n} tokens, more than --max-tokens-in 240"}
        ]
        resp = client.post("/execute", json={"job_id": job_id(), "prompt": tight, "max_tokens": 64})
        assert resp.status_code == 400
        assert resp.json()["message"] == (
            f"invalid request: prompt of {m} tokens + max_tokens 64 = {m + 64} exceeds the "
            "context of 256 tokens"
        )
        # Without max_tokens a job gets what is left of the context, capped by --max-tokens-out.
        events = stream_execute(client, {"job_id": job_id(), "prompt": tight, "temperature": 0})
    end = check_one_terminal(events).json()
    assert end["tokens_out"] <= 256 - m
    assert end["stop_reason"] in ("MAX_TOKENS", "EOS", "CONTEXT_FULL")


def test_duplicate_live_job_id_is_rejected(server: LiveServer) -> None:
    jid = job_id()
    stream = BackgroundStream(
        server.url, {"job_id": jid, "prompt": "Count: 1, 2, 3,", "max_tokens": 64, "temperature": 0}
    )
    stream.wait_for("started")
    with server.client() as client:
        resp = client.post("/execute", json={"job_id": jid, "prompt": "x"})
        assert resp.status_code == 400
        assert resp.json()["fields"][0]["field"] == "job_id"
        assert "already queued or running" in resp.json()["fields"][0]["constraint"]
        assert client.post("/cancel", json={"job_id": jid}).status_code == 202
    stream.join()


def test_cancel_running_job_is_fast_and_idempotent(server: LiveServer) -> None:
    jid = job_id()
    stream = BackgroundStream(
        server.url, {"job_id": jid, "prompt": "Count: 1, 2, 3,", "max_tokens": 64, "temperature": 0}
    )
    stream.wait_for("token", 2)
    with server.client() as client:
        t0 = time.monotonic()
        resp = client.post("/cancel", json={"job_id": jid})
        assert resp.status_code == 202 and resp.json()["status"] == "cancelling"
        error = stream.wait_for("error", timeout=10)
        latency_ms = (error.at - t0) * 1e3
        assert client.post("/cancel", json={"job_id": jid}).status_code == 202
        assert client.post("/cancel", json={"job_id": "never-seen"}).status_code == 202
        assert client.post("/cancel", json={"jobid": jid}).status_code == 400
    logger.info("cancel latency (running job, CPU): %.1f ms", latency_ms)
    events = stream.join()
    err = check_one_terminal(events).json()
    assert err == {"code": "CANCELLED", "message": "job cancelled", "retriable": False}
    assert len([e for e in events if e.event == "token"]) < 64
    assert latency_ms < 100, latency_ms  # the engine polls the cancel between layers


def test_client_disconnect_cancels_its_job(server: LiveServer) -> None:
    jid = job_id()
    with server.client() as client:
        with client.stream(
            "POST",
            "/execute",
            json={"job_id": jid, "prompt": "Count: 1, 2, 3,", "max_tokens": 64, "temperature": 0},
        ) as resp:
            seen = 0
            for event in parse_sse(resp.iter_raw()):
                seen += event.event == "token"
                if seen == 2:
                    break  # leaving the block closes the connection mid-stream
        t0 = time.monotonic()
        wait_idle(client, timeout=10)
        logger.info("disconnect -> job stopped: %.1f ms", (time.monotonic() - t0) * 1e3)
    cancel = server.wait_for_log("cancel", 5, job_id=jid)
    assert cancel["reason"] == "CLIENT_DISCONNECTED"
    error = server.wait_for_log("error", 5, job_id=jid)
    assert error["code"] == "CLIENT_DISCONNECTED" and error["tokens_out"] < 64


def test_health_is_fast_and_complete_while_a_job_runs(server: LiveServer) -> None:
    stream = BackgroundStream(
        server.url,
        {"job_id": job_id(), "prompt": "Count: 1, 2, 3,", "max_tokens": 64, "temperature": 0},
    )
    stream.wait_for("token")
    latencies: list[float] = []
    with server.client() as client:
        client.get("/health")  # warm the connection
        for _ in range(30):
            t0 = time.perf_counter()
            health = client.get("/health").json()
            latencies.append((time.perf_counter() - t0) * 1e3)
        assert health["jobs_running"] == 1
        client.post("/cancel", json={"job_id": stream.body["job_id"]})
    stream.join()
    with server.client() as client:
        idle = wait_idle(client)
    median, worst = statistics.median(latencies), max(latencies)
    logger.info("/health during a job: median %.2f ms, max %.2f ms", median, worst)
    assert median < 10, latencies
    assert health["status"] == "healthy" and health["resident"] is True
    assert health["worker_id"] == "shared-test-worker"
    assert health["quant_kind"] == "Q4_K_M" and health["tokenizer_kind"]
    assert health["weights"] == "dequantized"  # as the shared server asks (--weights)
    assert health["weight_mix"] and all(n > 0 for n in health["weight_mix"].values())
    assert health["vocab_size"] > 150_000 and health["context_length"] == 256
    assert health["vram_bytes_used"] == 0  # CPU
    assert health["uptime_seconds"] > 0 and health["jobs_queued"] == 0
    # The engine's batch (--max-num-seqs 16, --kv-cache-tokens 256 in 16-token blocks).
    assert (health["max_num_seqs"], health["max_queue"]) == (16, 4)
    assert health["seqs_running"] == 1 and health["seqs_waiting"] == 0
    assert (health["kv_blocks_total"], health["kv_block_size"]) == (16, 16)
    assert 1 <= health["kv_blocks_used"] <= 16
    assert health["steps"] >= 1 and health["mean_batch_seqs"] >= 1
    assert health["preemptions"] >= 0
    assert (idle["seqs_running"], idle["kv_blocks_used"]) == (0, 0)  # its blocks are back


def test_metrics_report_requests_tokens_and_timings(server: LiveServer) -> None:
    with server.client() as client:
        stream_execute(client, {"job_id": job_id(), "prompt": "Hello", "max_tokens": 4})
        client.post("/execute", json={"job_id": ""})
        wait_idle(client)
        text = client.get("/metrics").text
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    assert samples['worker_orcd_requests_total{endpoint="execute",outcome="completed"}'] >= 1
    assert samples['worker_orcd_requests_total{endpoint="execute",outcome="invalid_request"}'] >= 1
    assert samples["worker_orcd_tokens_generated_total"] >= 4
    assert samples["worker_orcd_prompt_tokens_total"] >= 1
    for hist in ("prefill_seconds", "decode_seconds", "time_to_first_token_seconds"):
        assert samples[f"worker_orcd_{hist}_count"] >= 1
        assert f'worker_orcd_{hist}_bucket{{le="+Inf"}}' in samples
    assert samples["worker_orcd_queue_length"] == 0
    assert samples["worker_orcd_running_sequences"] == 0
    assert samples["worker_orcd_waiting_sequences"] == 0
    assert samples["worker_orcd_kv_blocks_total"] == 16
    assert samples["worker_orcd_kv_blocks_used"] == 0
    assert samples["worker_orcd_preemptions_total"] >= 0
    steps = samples["worker_orcd_batch_sequences_count"]
    assert steps >= 1 and samples['worker_orcd_batch_sequences_bucket{le="+Inf"}'] == steps
    assert samples["worker_orcd_batch_sequences_sum"] >= steps  # at least one sequence each
    assert samples["worker_orcd_batch_tokens_sum"] >= samples["worker_orcd_batch_sequences_sum"]
    assert samples["worker_orcd_engine_steps_total"] == steps
    assert samples["worker_orcd_uptime_seconds"] > 0
    assert samples["worker_orcd_gpu_memory_used_bytes"] == 0
