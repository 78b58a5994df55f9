"""`serve --data-parallel-size 2` on two GPUs (real Qwen file): each replica on its own card, both
serving, each stream the text of one engine's greedy run on the first card. float32, so that a
request batched with others (in a replica) keeps the greedy ids of its run alone."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
import torch

from tests.server.live_server import check_one_terminal, start_server, stream_execute
from worker_orcd.engine.types import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices"),
]


def test_two_replicas_on_two_gpus_share_the_requests(qwen_gguf_path: Path) -> None:
    from worker_orcd.engine.engine import Engine

    flags = ("--data-parallel-size", "2", "--max-context", "512", "--gpu-memory-utilization", "0.3")
    front = start_server(qwen_gguf_path, *flags, "--device", "cuda", "--dtype", "float32")
    try:
        prompts = [f"def f{i}(x):" for i in range(8)]
        results: dict[int, str] = {}

        def run(i: int) -> None:
            body = {"job_id": uuid.uuid4().hex, "prompt": prompts[i], "max_tokens": 24}
            with front.client() as client:
                events = stream_execute(client, {**body, "temperature": 0})
            assert check_one_terminal(events).event == "end"
            results[i] = "".join(e.json()["t"] for e in events if e.event == "token")

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        with front.client() as client:
            health = client.get("/health").json()
    finally:
        assert front.stop() == 0
    replicas = health["replicas"]
    assert [r["device"] for r in replicas] == ["cuda:0", "cuda:1"]
    assert all(r["health"]["vram_bytes_used"] > 0 for r in replicas)
    assert all(r["requests"] >= 3 for r in replicas), replicas
    engine = Engine.load(
        qwen_gguf_path, device="cuda", dtype="float32", max_context=512, kv_cache_tokens=2048
    )
    for i, prompt in enumerate(prompts):
        ref = engine.generate(
            engine.encode_prompt(prompt=prompt),
            SamplingParams(max_tokens=24, temperature=0, seed=0),
        )
        assert results[i] == ref.text, (prompt, results[i], ref.text)
