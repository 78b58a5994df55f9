"""The real Qwen2.5-Coder-0.5B Q4_K_M file: greedy continuations match transformers loading the same
GGUF.

transformers dequantizes the file with gguf-py into float32; we must agree token for token. Each
continuation is checked by teacher forcing: one transformers forward over prompt + our tokens must
put its argmax on each of our tokens, and (short prompts) its logits must match ours at every
position.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from tests.model.conftest import rel_err
from worker_orcd.engine.engine import Engine
from worker_orcd.engine.types import SamplingParams, StopReason

pytestmark = pytest.mark.slow

N_TOKENS = 32


@pytest.fixture(scope="module")
def hf_qwen(qwen_gguf_path: Path) -> Iterator[PreTrainedModel]:
    model = AutoModelForCausalLM.from_pretrained(
        str(qwen_gguf_path.parent), gguf_file=qwen_gguf_path.name, dtype=torch.float32
    )
    yield model.eval()
    del model
    gc.collect()


def _long_prompt() -> str:
    colors = ["red", "green", "blue", "yellow", "purple", "orange", "black", "white"]
    animals = ["fox", "whale", "sparrow", "tiger", "otter", "beetle", "falcon"]
    lines = [
        f"Entry {i}: the {colors[i % 8]} {animals[i % 7]} walked {i * 3 + 1} miles to town {i % 5}."
        for i in range(60)
    ]
    return "Travel log.\n" + "\n".join(lines) + "\nSummary of the log:"


PROMPTS = {
    "plain": lambda e: e.encode_prompt("The history of the printing press begins"),
    "code": lambda e: e.encode_prompt("def quicksort(arr):\n"),
    "chat": lambda e: e.encode_prompt(
        messages=[{"role": "user", "content": "Explain what a hash map is, in detail."}]
    ),
    "zh_emoji": lambda e: e.encode_prompt("你好，世界！🌍🚀 今天我们来聊聊人工智能的未来"),
    "long": lambda e: e.encode_prompt(_long_prompt())[:600],
}


@pytest.mark.parametrize("name", list(PROMPTS))
def test_greedy_matches_transformers(
    name: str, qwen_engine: Engine, hf_qwen: PreTrainedModel
) -> None:
    prompt = PROMPTS[name](qwen_engine)
    if name == "long":
        assert len(prompt) == 600
    out = qwen_engine.generate(prompt, SamplingParams(max_tokens=N_TOKENS, temperature=0.0))
    assert out.stop_reason is StopReason.MAX_TOKENS, out
    tokens = out.token_ids
    full = prompt + tokens
    with torch.no_grad():
        ref = hf_qwen(torch.tensor([full[:-1]])).logits[0].float()  # [L - 1, V]
    ref_next = ref[len(prompt) - 1 :].argmax(-1).tolist()
    assert tokens == ref_next
    if len(full) < 100:  # logits too (the long prompt's prefill would double its cost)
        assert rel_err(qwen_engine.score(full[:-1]), ref) < 1e-4
