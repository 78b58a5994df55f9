"""Byte-level BPE pre-tokenizers per `tokenizer.ggml.pre` (llama.cpp regexes), tiny vocabulary."""

from __future__ import annotations

import pytest

from worker_orcd.tokenizer import Tokenizer
from worker_orcd.tokenizer.tokenizer import _BYTE_DECODER

BYTE_CHARS = sorted(_BYTE_DECODER, key=_BYTE_DECODER.__getitem__)  # the 256 byte stand-ins


def _tiny(pre: str, extra: list[str] | None = None, merges: list[str] | None = None) -> Tokenizer:
    tokens = BYTE_CHARS + (extra or [])
    return Tokenizer.from_gguf(
        {
            "tokenizer.ggml.model": "gpt2",
            "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.merges": merges or [],
            "tokenizer.ggml.add_bos_token": False,
        }
    )


def _pieces(tok: Tokenizer, text: str) -> list[str]:
    splits = tok._hf.pre_tokenizer.pre_tokenize_str(text)
    return [tok.decode([tok.token_to_id(c) for c in piece]) for piece, _ in splits]


TEXT = "Hello 12345!!\n\n  x I'M"


@pytest.mark.parametrize(
    ("pre", "expected"),
    [
        ("qwen2", ["Hello", " ", "1", "2", "3", "4", "5", "!!\n\n", " ", " x", " I", "'M"]),
        ("llama-bpe", ["Hello", " ", "123", "45", "!!\n\n", " ", " x", " I", "'M"]),
        ("gpt-2", ["Hello", " 12345", "!!", "\n\n ", " x", " I", "'", "M"]),
        ("default", ["Hello", " ", "123", "45", "!!", "\n\n ", " x", " I", "'", "M"]),
    ],
)
def test_pre_tokenizer_splits(pre: str, expected: list[str]) -> None:
    tok = _tiny(pre)
    assert _pieces(tok, TEXT) == expected
    assert tok.decode(tok.encode(TEXT)) == TEXT


def test_llama_bpe_keeps_whole_vocabulary_words() -> None:
    # llama3 ("llama-bpe") takes a pre-token that is a vocabulary entry as is, merges or not
    extra, merges = ["ab", "abc"], ["a b"]
    abc = len(BYTE_CHARS) + 1
    assert _tiny("llama-bpe", extra, merges).encode("abc") == [abc]
    assert _tiny("qwen2", extra, merges).encode("abc") == [abc - 1, BYTE_CHARS.index("c")]
