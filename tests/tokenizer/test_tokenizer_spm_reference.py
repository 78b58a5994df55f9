"""The SentencePiece path (a BPE with merges derived from scores) against a direct transcription of
llama.cpp's score-driven merge loop (`llm_tokenizer_spm_session`), on random text."""

from __future__ import annotations

import heapq
import random

import pytest

from worker_orcd.tokenizer import Tokenizer
from worker_orcd.tokenizer.metadata import NORMAL


def _reference_spm(tok: Tokenizer, text: str) -> list[int]:
    """Symbols start as characters; repeatedly merge the adjacent pair whose concatenation is the
    highest-scoring vocabulary piece (leftmost on ties); unknown characters become <0xNN> tokens."""
    v = tok._v
    text = (" " + text).replace(" ", "\u2581")
    syms = list(text)
    alive = [True] * len(syms)
    nxt = list(range(1, len(syms))) + [-1]
    prv = list(range(-1, len(syms) - 1))
    heap: list[tuple[float, int, int, str]] = []

    def push(left: int, right: int) -> None:
        if left == -1 or right == -1:
            return
        piece = syms[left] + syms[right]
        tid = tok.token_to_id(piece)
        if tid is not None and v.types[tid] == NORMAL:
            heapq.heappush(heap, (-float(v.scores[tid]), left, right, piece))

    for i in range(len(syms) - 1):
        push(i, i + 1)
    while heap:
        _, left, right, piece = heapq.heappop(heap)
        if not (alive[left] and alive[right]) or syms[left] + syms[right] != piece:
            continue
        syms[left] = piece
        alive[right] = False
        nxt[left] = nxt[right]
        if nxt[right] != -1:
            prv[nxt[right]] = left
        push(prv[left], left)
        push(left, nxt[left])
    out: list[int] = []
    for i, s in enumerate(syms):
        if not alive[i]:
            continue
        tid = tok.token_to_id(s)
        if tid is not None:
            out.append(tid)
        else:
            out.extend(tok.token_to_id(f"<0x{b:02X}>") for b in s.encode())
    return out


@pytest.mark.parametrize("name", ["phi3_tok", "llama_spm_tok"])
def test_derived_merges_match_score_merging(name: str, request: pytest.FixtureRequest) -> None:
    tok: Tokenizer = request.getfixturevalue(name)
    rng = random.Random(1234)
    alphabet = list("aeiou rstlnmkp.,'\n\t0123") + ["ß", "é", "平", "方", "🦙", "  ", "ing", "the"]
    words = [tok.id_to_piece(i).replace("\u2581", " ") for i in rng.sample(range(300, 30000), 400)]
    for _ in range(300):
        parts = rng.choices(words, k=rng.randint(1, 6)) + rng.choices(alphabet, k=rng.randint(0, 8))
        rng.shuffle(parts)
        text = "".join(parts)
        assert tok.encode(text, add_special=False) == _reference_spm(tok, text), repr(text)
