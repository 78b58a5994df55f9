"""The real Qwen2.5-Coder GGUF: same tokens as llama.cpp's qwen2 vocab and as transformers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from worker_orcd.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "def f(x):\n    return x**2  # 平方 🦙",
    "  leading\ttabs\r\n\n\nand 12345678 digits, I'm sure they'll",
    "ça va? Привет мир — “quotes” …",
    "I'm <tool_call> here",  # a USER_DEFINED token: split off even without parse_special
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
]


def test_same_tokens_as_qwen2_vocab(qwen_model_tok: Tokenizer, qwen2_tok: Tokenizer) -> None:
    # the older Qwen2 vocabulary has no <tool_call> token; everything else agrees
    assert qwen2_tok.token_to_id("<tool_call>") is None
    for text in (t for t in TEXTS if "<tool_call>" not in t):
        for parse in (False, True):
            assert qwen_model_tok.encode(text, parse_special=parse) == qwen2_tok.encode(
                text, parse_special=parse
            ), (text, parse)


@pytest.fixture(scope="module")
def hf_tokenizer(qwen_model_file: Path) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(
        str(qwen_model_file.parent), gguf_file=qwen_model_file.name
    )


@pytest.mark.slow
def test_matches_transformers(qwen_model_tok: Tokenizer, hf_tokenizer: Any) -> None:
    hf = hf_tokenizer
    for text in TEXTS:
        parsed = qwen_model_tok.encode(text, parse_special=True)
        assert parsed == hf.encode(text, add_special_tokens=False), text
        plain = hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        assert qwen_model_tok.encode(text) == plain, text
        assert qwen_model_tok.decode(parsed) == hf.decode(parsed) == text
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Write hello world in C."},
        {"role": "assistant", "content": "printf"},
        {"role": "user", "content": "Thanks"},
    ]
    for gen in (True, False):
        ours = qwen_model_tok.apply_chat_template(messages, add_generation_prompt=gen)
        theirs = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False)
        assert ours == theirs
    assert qwen_model_tok.eos_id == hf.eos_token_id
