"""Stop strings: streamed matching equals matching on the whole text, for any split."""

from __future__ import annotations

import itertools
import random

import pytest

from worker_orcd.engine.stop import StopMatcher


def _expected(text: str, stops: list[str]) -> tuple[str, int | None]:
    """Reference on the whole text: the text before the earliest match, and where it starts."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[: min(found)], min(found)) if found else (text, None)


def _stream(stops: list[str], pieces: list[str]) -> tuple[str, str | None, list[str]]:
    m = StopMatcher(stops)
    out, matched, prefixes = "", None, []
    for piece in pieces:
        safe, hit = m.feed(piece)
        out += safe
        prefixes.append(out)
        if hit is not None:
            assert matched is None
            matched = hit
    out += m.flush()
    if matched is None:
        matched = m.matched
    else:
        assert m.matched == matched
    return out, matched, prefixes


def _split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, len(text) - 1))) if text else []
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)] + [""] * rng.randint(0, 1)


ALPHABET = ["a", "b", "c", " ", "\n", "é", "中", "🙂", "<", "|", ">"]


@pytest.mark.parametrize("seed", range(6))
def test_random_texts_and_splits_match_the_whole_text_reference(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(300):
        stops = [
            "".join(rng.choices(ALPHABET[:5] + ALPHABET[5:8], k=rng.randint(1, 4)))
            for _ in range(rng.randint(1, 3))
        ]
        text = "".join(rng.choices(ALPHABET, k=rng.randint(0, 40)))
        if rng.random() < 0.5:  # make a match likely
            at = rng.randint(0, len(text))
            text = text[:at] + rng.choice(stops) + text[at:]
        want, start = _expected(text, stops)
        pieces = _split(text, rng)
        got, matched, prefixes = _stream(stops, pieces)
        assert got == want, (stops, pieces)
        if start is None:
            assert matched is None
        else:
            assert matched in stops and text.find(matched) == start
        # streaming never emits text that the whole-text answer does not start with
        assert all(want.startswith(p) for p in prefixes)


def test_emits_everything_that_cannot_start_a_stop() -> None:
    m = StopMatcher(["<|end|>"])
    assert m.feed("Hello <") == ("Hello ", None)
    assert m.pending == "<"
    assert m.feed("|en") == ("", None)
    assert m.feed("x") == ("<|enx", None)
    assert m.feed(" world") == (" world", None)
    assert m.flush() == ""


def test_stop_split_over_many_deltas_is_not_emitted() -> None:
    m = StopMatcher(["</s>"])
    out = [m.feed(d) for d in ["abc<", "/", "s", ">tail"]]
    assert out == [("abc", None), ("", None), ("", None), ("", "</s>")]
    assert m.matched == "</s>"
    assert m.feed("more") == ("", None)
    assert m.flush() == ""


def test_earliest_match_wins_even_when_a_later_one_completes_first() -> None:
    m = StopMatcher(["abcd", "c"])
    assert m.feed("xabc") == ("x", None)  # "c" is complete, but "abcd" may start earlier
    assert m.feed("d!") == ("", "abcd")
    m = StopMatcher(["abcd", "c"])
    assert m.feed("xabc") == ("x", None)
    assert m.feed("e") == ("ab", "c")


def test_equal_starts_report_the_shortest_stop_whatever_the_split() -> None:
    assert StopMatcher(["abc", "ab"]).feed("xabcd") == ("x", "ab")
    m = StopMatcher(["abc", "ab"])
    assert m.feed("xa") == ("x", None)
    assert m.feed("bcd") == ("", "ab")


def test_unicode_stops() -> None:
    m = StopMatcher(["🙂中", "ß"])
    assert m.feed("naïve 🙂") == ("naïve ", None)
    assert m.feed("中文") == ("", "🙂中")
    m = StopMatcher(["🙂中"])
    assert m.feed("🙂🙂") == ("🙂", None)
    assert m.feed("!") == ("🙂!", None)


def test_flush_resolves_a_match_held_behind_a_longer_candidate() -> None:
    m = StopMatcher(["cbcb", "b"])
    assert m.feed("acb") == ("a", None)  # "b" is complete, but "cbcb" may start at "c"
    assert m.flush() == "c"
    assert m.matched == "b"
    m = StopMatcher(["cbcb", "b"])
    assert m.feed("acb") == ("a", None)
    assert m.feed("cb") == ("", "cbcb")


def test_no_stops_passes_text_through_and_bad_stops_are_rejected() -> None:
    m = StopMatcher([])
    assert m.feed("abc") == ("abc", None)
    assert m.flush() == ""
    with pytest.raises(ValueError, match="non-empty"):
        StopMatcher(["ok", ""])
