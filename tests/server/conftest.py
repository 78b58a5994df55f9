"""Fixtures of the live-server tests: one shared `worker-orcd serve` process and a reference engine.

The shared server runs with a small context and token limits so that the limits themselves can be
tested, and a batch of at most 16 sequences over a KV cache of 256 tokens; tests that need other
flags (queue length, timeout, callback, shutdown) start their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.server.live_server import LiveServer, start_server

SHARED_FLAGS = (
    "--worker-id",
    "shared-test-worker",
    "--max-context",
    "256",
    "--max-tokens-in",
    "240",
    "--max-tokens-out",
    "64",
    "--max-queue",
    "4",
    "--max-num-seqs",
    "16",
    "--kv-cache-tokens",
    "256",
    # float32 weights: their results do not depend on what else a step carries, so a request's
    # text over HTTP, batched with others, can be held to its solo run token for token (the CPU
    # kernels of quantized weights round a decode row differently alone and in a prompt's pass).
    "--weights",
    "dequantized",
)


@pytest.fixture(scope="session")
def server(qwen_gguf_path: Path) -> Iterator[LiveServer]:
    live = start_server(qwen_gguf_path, *SHARED_FLAGS)
    try:
        yield live
    finally:
        live.stop()


@pytest.fixture(scope="session")
def engine(qwen_gguf_path: Path):  # noqa: ANN201 - Engine is imported lazily
    """The same model in-process, as the reference for what the server must stream."""
    from worker_orcd.engine.engine import Engine

    return Engine.load(
        qwen_gguf_path, device="cpu", dtype="float32", max_context=256, weights="dequantized"
    )
