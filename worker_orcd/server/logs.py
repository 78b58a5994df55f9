"""Event-style log lines: one line per event, `event key=value ...` or one JSON object.

Every event carries the worker id, and the job id where there is one. Prompts are never logged, only
their length.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
from typing import Any


def log_event(
    logger: logging.Logger,
    event: str,
    *,
    worker_id: str,
    job_id: str | None = None,
    level: int = logging.INFO,
    **fields: Any,
) -> None:
    data: dict[str, Any] = {"worker_id": worker_id}
    if job_id is not None:
        data["job_id"] = job_id
    data.update((k, v) for k, v in fields.items() if v is not None)
    text = " ".join([event, *(f"{k}={_text_value(v)}" for k, v in data.items())])
    logger.log(level, "%s", text, extra={"event": event, "event_fields": data})


def _text_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.1f}"
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if (" " in text or not text) else text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, then either event + fields or message."""

    def format(self, record: logging.LogRecord) -> str:
        ts = dt.datetime.fromtimestamp(record.created, dt.timezone.utc)
        out: dict[str, Any] = {
            "ts": ts.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
        }
        event = getattr(record, "event", None)
        if event is not None:
            out["event"] = event
            out.update(getattr(record, "event_fields", {}))
        else:
            out["message"] = record.getMessage()
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


def configure_json_logging(level: str) -> None:
    """Route every logger through one stderr handler that writes JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
