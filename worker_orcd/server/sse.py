"""Server-sent event framing.

An event is `event: NAME\\ndata: JSON\\n\\n`. JSON never holds a raw newline (json.dumps escapes
them), so one `data:` line always carries the whole payload. The OpenAI streaming format is `data:`
lines only and ends with `data: [DONE]`.
"""

from __future__ import annotations

import json
from typing import Any

MEDIA_TYPE = "text/event-stream"
# No proxy buffering, no caching: each event must reach the client when it happens.
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
OPENAI_DONE = b"data: [DONE]\n\n"


def _json(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":"))


def event(name: str, data: Any) -> bytes:
    if not name or any(c in name for c in "\r\n:"):
        raise ValueError(f"SSE event name must be a non-empty single token (got {name!r})")
    return f"event: {name}\ndata: {_json(data)}\n\n".encode()


def data_only(data: Any) -> bytes:
    return f"data: {_json(data)}\n\n".encode()
