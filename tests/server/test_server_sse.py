"""SSE framing on the server side and the parser the live tests read streams with."""

from __future__ import annotations

import json

import pytest

from tests.server.live_server import parse_sse
from worker_orcd.server import sse


def test_event_frame_is_one_event_and_one_json_data_line() -> None:
    frame = sse.event("token", {"t": "a\nb 你好 🙂", "i": 3})
    assert frame.endswith(b"\n\n")
    lines = frame.decode().split("\n")
    assert lines[0] == "event: token"
    assert lines[1].startswith("data: ")
    assert lines[2:] == ["", ""]
    assert json.loads(lines[1][len("data: ") :]) == {"t": "a\nb 你好 🙂", "i": 3}
    assert "你好".encode() in frame  # not \u escapes


def test_event_name_must_be_a_token() -> None:
    with pytest.raises(ValueError):
        sse.event("a\nb", {})
    with pytest.raises(ValueError):
        sse.event("", {})


def test_parser_round_trip_across_arbitrary_chunking() -> None:
    frames = (
        sse.event("started", {"job_id": "x"})
        + sse.event("token", {"t": "🙂", "i": 0})
        + sse.data_only({"k": 1})
        + sse.OPENAI_DONE
    )
    for size in (1, 2, 3, 7, len(frames)):
        chunks = [frames[i : i + size] for i in range(0, len(frames), size)]
        events = list(parse_sse(chunks))
        assert [e.event for e in events] == ["started", "token", None, None]
        assert events[1].json() == {"t": "🙂", "i": 0}
        assert events[3].data == "[DONE]"


def test_parser_rejects_a_character_split_between_frames() -> None:
    emoji = "🙂".encode()
    broken = b"event: token\ndata: " + emoji[:2] + b"\n\nevent: token\ndata: " + emoji[2:] + b"\n\n"
    with pytest.raises(UnicodeDecodeError):
        list(parse_sse([broken]))


def test_parser_rejects_a_truncated_stream() -> None:
    with pytest.raises(ValueError):
        list(parse_sse([b"event: end\ndata: {}\n"]))
