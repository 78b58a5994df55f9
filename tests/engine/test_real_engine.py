"""The engine on the real Qwen2.5-Coder-0.5B file: chat coherence, seeds, limits, stops, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker_orcd.engine.engine import Engine
from worker_orcd.engine.types import SamplingParams, StopReason
from worker_orcd.errors import InvalidRequestError

pytestmark = pytest.mark.slow


def test_chat_answer_is_coherent(qwen_engine: Engine) -> None:
    ids = qwen_engine.encode_prompt(
        messages=[
            {"role": "user", "content": "What is the capital of France? Answer in one sentence."}
        ]
    )
    out = qwen_engine.generate(ids, SamplingParams(max_tokens=24, temperature=0.0))
    assert "Paris" in out.text
    assert out.stop_reason is StopReason.EOS
    assert out.token_ids[-1] in qwen_engine.tokenizer.eog_ids
    assert "<|im_end|>" not in out.text


def test_same_seed_same_tokens(qwen_engine: Engine) -> None:
    params = SamplingParams(max_tokens=8, temperature=0.9, top_k=40, top_p=0.95, seed=20240601)
    a = qwen_engine.generate("Once upon a time", params)
    b = qwen_engine.generate("Once upon a time", params)
    assert a.token_ids == b.token_ids and a.text == b.text and a.seed == 20240601


def test_prompt_too_long_for_context(qwen_engine: Engine) -> None:
    ids = qwen_engine.encode_prompt("word " * 2000)
    assert 1900 < len(ids) <= 2048
    with pytest.raises(InvalidRequestError, match=rf"{len(ids)} tokens \+ max_tokens 200 .* 2048"):
        qwen_engine.generate(ids, SamplingParams(max_tokens=200, temperature=0.0))


def test_stop_string_across_tokens(qwen_engine: Engine) -> None:
    prompt = "def add(a, b):\n"
    plain = qwen_engine.generate(prompt, SamplingParams(max_tokens=16, temperature=0.0))
    assert "return" in plain.text
    out = qwen_engine.generate(
        prompt, SamplingParams(max_tokens=16, temperature=0.0, stop=("eturn",))
    )
    assert out.stop_reason is StopReason.STOP_SEQUENCE and out.stop_sequence == "eturn"
    assert out.text == plain.text[: plain.text.index("eturn")]


def test_cli_generate_json(qwen_engine: Engine, qwen_gguf_path: Path) -> None:
    """One subprocess (it loads the model again): --json output agrees with the engine."""
    cmd = [
        sys.executable,
        "-m",
        "worker_orcd.cli",
        "--log-level",
        "warning",
        "generate",
        "--model",
        str(qwen_gguf_path),
        "--prompt",
        "Hello, world!",
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--max-context",
        "64",
        "--weights",
        "dequantized",  # as qwen_engine
        "--json",
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONUTF8": "1"}
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    ref = qwen_engine.generate("Hello, world!", SamplingParams(max_tokens=6, temperature=0.0))
    assert data["prompt_ids"] == ref.prompt_ids
    assert data["token_ids"] == ref.token_ids and data["text"] == ref.text
    assert data["stop_reason"] == ref.stop_reason.value and data["stop_sequence"] is None
    assert isinstance(data["seed"], int)
    assert data["timings"]["prompt_tokens"] == len(ref.prompt_ids)
    assert data["timings"]["tokens_out"] == len(ref.token_ids)
    assert data["timings"]["prefill_ms"] > 0
