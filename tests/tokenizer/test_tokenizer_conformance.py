"""llama.cpp tokenizer test vectors: every case must match exactly; decode must invert encode."""

from __future__ import annotations

import pytest

from tests.support.vocab import vocab_cases
from worker_orcd.tokenizer import Tokenizer

NAMES = ("qwen2", "phi-3", "llama-spm")
CASES = [(name, i, text, ids) for name in NAMES for i, (text, ids) in enumerate(vocab_cases(name))]


@pytest.mark.parametrize(
    ("name", "index", "text", "expected"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
def test_matches_llama_cpp(
    tokenizers_by_name: dict[str, Tokenizer], name: str, index: int, text: str, expected: list[int]
) -> None:
    tok = tokenizers_by_name[name]
    ids = tok.encode(text, add_special=False)
    assert ids == expected
    assert tok.decode(ids) == text


@pytest.mark.parametrize("name", NAMES)
def test_roundtrip_with_bos(tokenizers_by_name: dict[str, Tokenizer], name: str) -> None:
    tok = tokenizers_by_name[name]
    for text, expected in vocab_cases(name):
        ids = tok.encode(text)
        body = ids[1:] if tok.add_bos else ids
        assert body == expected
        assert tok.decode(ids, skip_special=True) == text


def test_case_count() -> None:
    # 46 cases per file; a parser that lost some would make the parametrized test vacuous.
    assert [len(vocab_cases(n)) for n in NAMES] == [46, 46, 46]
