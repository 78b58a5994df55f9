"""`serve --data-parallel-size 2` on the real Qwen model (CPU): two replicas behind one front, over
real HTTP. Requests split over both and give one engine's greedy text; /cancel and a client that
leaves reach the replica running the job; a replica killed mid-stream ends that stream with one
error event and is restarted while the front keeps serving; SIGTERM stops everything."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.live_server import (
    BackgroundStream,
    LiveServer,
    SseEvent,
    check_one_terminal,
    parse_sse,
    start_server,
    stream_execute,
)
from worker_orcd.engine.types import SamplingParams

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

FLAGS = ("--data-parallel-size", "2", "--worker-id", "dp-test", "--max-context", "256")
FLAGS += ("--weights", "dequantized")  # as the reference engine: results independent of batching
FLAGS += ("--max-tokens-out", "64")
COUNTING = "Count: 1, 2, 3,"  # a greedy continuation that runs to max_tokens
# A chat whose greedy reply runs to max_tokens ("1,2,3,...,24,2"). COUNTING as a chat is answered
# "1, 2, 3" and EOS; sampled (OpenAI's default temperature is 1) often in one token or two.
CHAT_COUNTING = [{"role": "user", "content": "Count from 1 to 500, separated by commas."}]


@pytest.fixture(scope="module")
def front(qwen_gguf_path: Path) -> Iterator[LiveServer]:
    live = start_server(qwen_gguf_path, *FLAGS)
    try:
        yield live
    finally:
        if live.proc.poll() is None:
            live.stop()


def job_id() -> str:
    return f"dp-{uuid.uuid4().hex[:12]}"


def text_of(events: list[SseEvent]) -> str:
    return "".join(e.json()["t"] for e in events if e.event == "token")


def greedy(engine, max_tokens: int, **prompt: Any):  # noqa: ANN001, ANN201
    ids = engine.encode_prompt(**prompt)
    return engine.generate(ids, SamplingParams(max_tokens=max_tokens, temperature=0, seed=0))


def health(front: LiveServer) -> dict[str, Any]:
    with front.client() as client:
        return client.get("/health").json()


def owner_of(front: LiveServer, jid: str) -> int:
    """The replica that started the job, from its relayed `execute_start` line."""
    return front.wait_for_log("execute_start", 30, job_id=jid)["replica"]


def wait_for_count(front: LiveServer, name: str, count: int, timeout: float, **match: Any) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        seen = [r for r in front.events(name) if all(r.get(k) == v for k, v in match.items())]
        if len(seen) >= count:
            return
        time.sleep(0.05)
    raise TimeoutError(f"fewer than {count} {name} {match} logs within {timeout} s")


def test_requests_split_over_both_replicas_and_match_one_engine(front: LiveServer, engine) -> None:  # noqa: ANN001
    prompts = ["def quicksort(items):", "SELECT name FROM", "The capital of France is"]
    messages = [{"role": "user", "content": "What colour is the sky on a clear day?"}]
    client = openai.OpenAI(base_url=f"{front.url}/v1", api_key="-", max_retries=0, timeout=120)
    streams = [
        BackgroundStream(
            front.url, {"job_id": job_id(), "prompt": p, "max_tokens": 8, "temperature": 0}
        )
        for p in prompts
    ]
    chat: list[Any] = []
    completion: list[Any] = []

    def chat_stream() -> None:
        chunks = client.chat.completions.create(
            model="any", messages=messages, max_tokens=8, temperature=0, stream=True
        )
        chat.extend(chunks)

    def complete() -> None:
        out = client.completions.create(model="any", prompt=prompts[0], max_tokens=8, temperature=0)
        completion.append(out)

    threads = [threading.Thread(target=chat_stream), threading.Thread(target=complete)]
    for t in threads:
        t.start()
    for stream, prompt in zip(streams, prompts, strict=True):
        end = check_one_terminal(stream.join(120))
        assert end.event == "end", end.data
        assert text_of(stream.events) == greedy(engine, 8, prompt=prompt).text
    for t in threads:
        t.join(120)
    chat_text = "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
    assert chat_text == greedy(engine, 8, messages=messages).text
    assert [c.choices[0].finish_reason for c in chat if c.choices][-1] is not None
    assert completion[0].choices[0].text == greedy(engine, 8, prompt=prompts[0]).text

    h = health(front)
    assert h["status"] == "healthy" and h["data_parallel_size"] == 2 and h["replicas_up"] == 2
    assert h["worker_id"] == "dp-test" and h["jobs_running"] == 0
    served = [r["requests"] for r in h["replicas"]]
    assert sum(served) >= 5 and min(served) >= 2, served  # five at once: balanced by load
    with front.client() as http:
        metrics = http.get("/metrics").text
    for replica in ("0", "1"):  # each replica's own count of what it completed
        done = [
            line
            for line in metrics.splitlines()
            if line.startswith("worker_orcd_requests_total{")
            and 'outcome="completed"' in line
            and f'replica="{replica}"' in line
        ]
        assert sum(float(line.rpartition(" ")[2]) for line in done) >= 2, metrics


def test_cancel_and_a_client_that_leaves_reach_the_replica_running_the_job(
    front: LiveServer,
) -> None:
    jid = job_id()
    stream = BackgroundStream(
        front.url, {"job_id": jid, "prompt": COUNTING, "max_tokens": 64, "temperature": 0}
    )
    stream.wait_for("token", 2)
    owner = owner_of(front, jid)
    with front.client() as client:
        resp = client.post("/execute", json={"job_id": jid, "prompt": "x"})  # on either replica
        assert resp.status_code == 400 and resp.json()["fields"][0]["field"] == "job_id"
        resp = client.post("/cancel", json={"job_id": jid})
        assert resp.status_code == 202 and resp.json()["status"] == "cancelling"
        assert client.post("/cancel", json={"job_id": "never-seen"}).json()["status"] == "not_live"
        assert client.post("/cancel", json={"jobid": jid}).status_code == 400
    err = check_one_terminal(stream.join())
    assert err.json()["code"] == "CANCELLED"
    cancels = [r for r in front.events("cancel") if r.get("job_id") == jid]
    assert [(r["replica"], r["reason"]) for r in cancels] == [(owner, "CANCELLED")]

    gone = job_id()
    body = {"job_id": gone, "prompt": COUNTING, "max_tokens": 64, "temperature": 0}
    with front.client() as client, client.stream("POST", "/execute", json=body) as resp:
        tokens = 0
        for event in parse_sse(resp.iter_raw()):
            tokens += event.event == "token"
            if tokens == 2:
                break  # leaving the block closes the connection mid-stream
    cancel = front.wait_for_log("cancel", 30, job_id=gone)
    assert cancel["reason"] == "CLIENT_DISCONNECTED" and cancel["replica"] == owner_of(front, gone)

    # An OpenAI stream's id is the replica's: the front learns it from the first chunk. Greedy,
    # and a reply that runs to max_tokens: the job is still running when the cancel comes.
    body = {"messages": CHAT_COUNTING, "max_tokens": 64, "temperature": 0, "stream": True}
    chat = BackgroundStream(front.url, body, path="/v1/chat/completions")
    third = chat.wait_for(None, 3)  # the role chunk and two pieces of text
    assert third.json()["choices"][0]["finish_reason"] is None, chat.events
    cid = chat.events[0].json()["id"]
    with front.client() as client:
        answer = client.post("/cancel", json={"job_id": cid}).json()
    assert answer["status"] == "cancelling", (answer, chat.join())
    events = chat.join()
    assert events[-1].data == "[DONE]" and events[-2].json()["error"]["code"] == "CANCELLED"
    cancels = [r for r in front.events("cancel") if r.get("job_id") == cid]
    assert [r["replica"] for r in cancels] == [owner_of(front, cid)]


def test_a_killed_replica_ends_its_stream_with_one_error_and_is_restarted(
    front: LiveServer,
    engine,  # noqa: ANN001
) -> None:
    jid = job_id()
    stream = BackgroundStream(
        front.url, {"job_id": jid, "prompt": COUNTING, "max_tokens": 64, "temperature": 0}
    )
    stream.wait_for("token", 2)
    victim = owner_of(front, jid)
    before = health(front)["replicas"][victim]
    os.kill(before["pid"], signal.SIGKILL)
    err = check_one_terminal(stream.join(30))
    assert err.event == "error", err.data
    assert err.json()["code"] == "REPLICA_FAILED" and err.json()["retriable"] is True
    # The front stays up and serves on the other replica while this one restarts.
    with front.client() as client:
        events = stream_execute(
            client, {"job_id": job_id(), "prompt": "import", "max_tokens": 4, "temperature": 0}
        )
    assert check_one_terminal(events).event == "end"
    assert text_of(events) == greedy(engine, 4, prompt="import").text
    wait_for_count(front, "replica_ready", 2, 240, replica=victim)
    after = health(front)
    assert after["status"] == "healthy" and after["replicas_up"] == 2
    back = after["replicas"][victim]
    assert back["restarts"] == 1 and back["pid"] != before["pid"]
    assert [r["restarts"] for r in after["replicas"]].count(0) == 1
    # Two requests one after the other: both replicas are idle, so one goes to each.
    with front.client() as client:
        for _ in range(2):
            events = stream_execute(
                client, {"job_id": job_id(), "prompt": "import", "max_tokens": 4, "temperature": 0}
            )
            assert text_of(events) == greedy(engine, 4, prompt="import").text
    assert health(front)["replicas"][victim]["requests"] == back["requests"] + 1


def test_sigterm_stops_the_replicas_and_then_the_front(front: LiveServer) -> None:
    pids = [r["pid"] for r in health(front)["replicas"]]
    stream = BackgroundStream(
        front.url, {"job_id": job_id(), "prompt": COUNTING, "max_tokens": 64, "temperature": 0}
    )
    stream.wait_for("token")
    assert front.stop(signal.SIGTERM, timeout=60) == 0
    err = check_one_terminal(stream.join(10))
    assert err.json()["code"] == "WORKER_SHUTDOWN"
    for pid in pids:  # reaped by the front: no such process any more
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    done = front.wait_for_log("shutdown", 5, phase="complete")
    assert done["worker_id"] == "dp-test" and done["replicas_stopped"] is True
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{front.url}/health", timeout=5)
