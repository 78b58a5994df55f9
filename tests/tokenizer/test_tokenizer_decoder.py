"""Incremental decoder: UTF-8 safe streaming whose concatenated output equals `decode`."""

from __future__ import annotations

import random

import pytest

from worker_orcd.tokenizer import Tokenizer

TEXTS = [
    "Hello 世界! 🦙🚀 naïve 𝔘",
    "  two leading spaces, 平方根 and 👩‍👩‍👧 family\n\ttab",
    "ÄÖÜ äöü ß — “quotes” … 😀😃😄",
]
KINDS = ["qwen2_tok", "phi3_tok", "llama_spm_tok"]


def _stream(tok: Tokenizer, ids: list[int], **kwargs: object) -> list[str]:
    dec = tok.decoder(**kwargs)  # type: ignore[arg-type]
    return [dec.push(i) for i in ids] + [dec.flush()]


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("text", TEXTS)
def test_stream_equals_text(name: str, text: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(name)
    ids = tok.encode(text)
    chunks = _stream(tok, ids)
    assert "".join(chunks) == text == tok.decode(ids, skip_special=True)
    assert all("\ufffd" not in c for c in chunks)  # no split character ever comes out


@pytest.mark.parametrize("name", KINDS)
def test_multibyte_characters_are_held_back(name: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(name)
    ids = tok.encode("𝔘", add_special=False)  # U+1D518, four UTF-8 bytes
    assert len(ids) > 1  # several tokens in every vocabulary here
    # nothing comes out until its last byte arrives, then the whole character
    assert _stream(tok, ids) == [""] * (len(ids) - 1) + ["𝔘", ""]


def test_spm_byte_fallback_tokens(phi3_tok: Tokenizer) -> None:
    ids = phi3_tok.encode("🦙", add_special=False)
    assert [phi3_tok.id_to_piece(i) for i in ids] == ["▁", "<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]
    assert _stream(phi3_tok, ids) == ["", "", "", "", "🦙", ""]


def test_spm_leading_space(phi3_tok: Tokenizer) -> None:
    ids = phi3_tok.encode("Hello world")
    assert [phi3_tok.id_to_piece(i) for i in ids] == ["<s>", "▁Hello", "▁world"]
    # the dummy-prefix space goes once, after BOS; the space of later words stays
    assert _stream(phi3_tok, ids) == ["", "Hello", " world", ""]
    assert _stream(phi3_tok, ids, skip_special=False) == ["<s>", "Hello", " world", ""]
    # continuing a text: the first generated token keeps its space
    assert _stream(phi3_tok, ids[2:], prev_id=ids[1]) == [" world", ""]
    # after a special token (e.g. a chat prompt ending in <|assistant|>) it is dropped
    assert _stream(phi3_tok, ids[1:], prev_id=32001) == ["Hello", " world", ""]


def test_gpt2_leading_space_kept(qwen2_tok: Tokenizer) -> None:
    ids = qwen2_tok.encode(" Hello")
    assert "".join(_stream(qwen2_tok, ids)) == " Hello"


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("skip_special", [True, False])
def test_random_ids_match_decode(
    name: str, skip_special: bool, request: pytest.FixtureRequest
) -> None:
    """Arbitrary ids (specials, lone byte tokens, invalid UTF-8): the stream still equals decode."""
    tok: Tokenizer = request.getfixturevalue(name)
    rng = random.Random(7)
    pool = list(range(tok.vocab_size))
    specials = sorted(tok.special_ids)
    for _ in range(200):
        ids = rng.choices(pool, k=rng.randint(0, 12)) + rng.choices(specials, k=rng.randint(0, 2))
        rng.shuffle(ids)
        assert "".join(_stream(tok, ids, skip_special=skip_special)) == tok.decode(
            ids, skip_special=skip_special
        )


@pytest.mark.parametrize("name", KINDS)
@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_join_to_the_text(name: str, text: str, request: pytest.FixtureRequest) -> None:
    """A token's bytes as they read inside a text (logprob reports): joined, the text's UTF-8,
    with SentencePiece's dummy-prefix space where decode drops it at the start; a special token
    reads as its text."""
    tok: Tokenizer = request.getfixturevalue(name)
    ids = tok.encode(text, add_special=False)
    joined = b"".join(tok.token_bytes(i) for i in ids)
    assert joined in (text.encode(), b" " + text.encode())
    assert joined.decode() == tok.decode(ids) or joined.decode() == " " + tok.decode(ids)
    eos = tok.eos_id
    assert eos is not None and tok.token_bytes(eos) == tok.id_to_piece(eos).encode()
