"""The real Qwen2.5-Coder-0.5B Q4_K_M file (14 heads, 2 KV heads, FFN 4864) over 2 ranks on CPU,
float32 dequantized: the greedy tokens of one process for a chat prompt."""

from __future__ import annotations

from pathlib import Path

import pytest

from worker_orcd.engine.engine import Engine
from worker_orcd.engine.types import SamplingParams

pytestmark = pytest.mark.slow


def test_two_ranks_give_the_greedy_tokens_of_one(qwen_engine: Engine, qwen_gguf_path: Path) -> None:
    two = Engine.load(
        qwen_gguf_path, device="cpu", dtype="float32", max_context=256, tensor_parallel_size=2
    )
    try:
        assert two.model.model.layers[0].self_attn.attn.n_heads == 7
        assert two.runner.kv.k.shape[2] == 1  # one KV head per rank
        question = "Write a Python function that checks whether a string is a palindrome."
        ids = qwen_engine.encode_prompt(messages=[{"role": "user", "content": question}])
        assert two.encode_prompt(messages=[{"role": "user", "content": question}]) == ids
        params = SamplingParams(max_tokens=24, temperature=0.0)
        ours = two.generate(ids, params)
        assert ours.token_ids == qwen_engine.generate(ids, params).token_ids
        assert len(ours.token_ids) == 24
    finally:
        two.runner.close()
