"""Test harness: run `worker-orcd serve` in a subprocess; read its SSE streams over real HTTP."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

START_TIMEOUT_S = 240.0


@dataclass(slots=True)
class SseEvent:
    event: str | None
    data: str
    at: float  # time.monotonic() when the frame was complete

    def json(self) -> Any:
        return json.loads(self.data)


def parse_sse(chunks: Iterable[bytes]) -> Iterator[SseEvent]:
    """Frames from raw bytes. Each frame must be valid UTF-8 on its own (strict decoding), so a
    character split across two events would fail here."""
    buf = b""
    for chunk in chunks:
        buf += chunk.replace(b"\r\n", b"\n")
        while b"\n\n" in buf:
            raw, buf = buf.split(b"\n\n", 1)
            frame = raw.decode("utf-8", errors="strict")
            name: str | None = None
            data: list[str] = []
            for line in frame.split("\n"):
                if not line or line.startswith(":"):
                    continue
                key, _, value = line.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if key == "event":
                    name = value
                elif key == "data":
                    data.append(value)
                else:
                    raise ValueError(f"unexpected SSE field {key!r} in frame {frame!r}")
            if name is not None or data:
                yield SseEvent(event=name, data="\n".join(data), at=time.monotonic())
    if buf.strip():
        raise ValueError(f"stream ended inside a frame: {buf!r}")


@dataclass(slots=True)
class LiveServer:
    """A running `worker-orcd serve` process and what it has logged so far (JSON lines)."""

    proc: subprocess.Popen[bytes]
    url: str
    logs: list[dict[str, Any]] = field(default_factory=list)
    _lines: queue.Queue[dict[str, Any] | None] = field(default_factory=queue.Queue)

    def client(self, timeout: float = 120.0) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def events(self, name: str) -> list[dict[str, Any]]:
        self.drain()
        return [r for r in self.logs if r.get("event") == name]

    def drain(self) -> None:
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                return
            if line is not None:
                self.logs.append(line)

    def wait_for_log(self, name: str, timeout: float, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rec in self.events(name):
                if all(rec.get(k) == v for k, v in match.items()):
                    return rec
            time.sleep(0.02)
        raise TimeoutError(f"no {name} {match} log within {timeout} s; logs: {self.logs[-20:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


def _pump(stream: Any, sink: queue.Queue[dict[str, Any] | None]) -> None:
    for raw in stream:
        text = raw.decode("utf-8", errors="replace").strip()
        if not text:
            continue
        try:
            sink.put(json.loads(text))
        except json.JSONDecodeError:
            sink.put({"event": None, "message": text})
    sink.put(None)


def serve_command(model: Path | str, *extra: str) -> list[str]:
    """`worker-orcd serve` on CPU, a free port of 127.0.0.1, JSON logs, plus `extra` flags."""
    return [
        sys.executable,
        "-m",
        "worker_orcd.cli",
        "serve",
        "--model",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--device",
        "cpu",
        "--log-format",
        "json",
        *extra,
    ]


def start_server(model: Path | str, *extra: str, wait_ready: bool = True) -> LiveServer:
    """Start a server on a free port of 127.0.0.1 (port 0) and learn its address from `ready`."""
    cmd = serve_command(model, *extra)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    server = LiveServer(proc=proc, url="")
    threading.Thread(target=_pump, args=(proc.stderr, server._lines), daemon=True).start()
    if not wait_ready:
        return server
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        ready = server.events("ready")
        if ready:
            server.url = ready[0]["uri"]
            return server
        if proc.poll() is not None:
            server.drain()
            raise RuntimeError(f"server exited with {proc.returncode}: {server.logs[-10:]}")
        time.sleep(0.05)
    proc.kill()
    raise TimeoutError(f"server not ready within {START_TIMEOUT_S} s: {server.logs[-10:]}")


def stream_execute(client: httpx.Client, body: dict[str, Any]) -> list[SseEvent]:
    with client.stream("POST", "/execute", json=body) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"].startswith("text/event-stream")
        return list(parse_sse(resp.iter_raw()))


class BackgroundStream:
    """POST a streaming request on a thread and collect its events as they arrive."""

    def __init__(self, url: str, body: dict[str, Any], path: str = "/execute") -> None:
        self.url, self.body, self.path = url, body, path
        self.events: list[SseEvent] = []
        self.status: int | None = None
        self.error_body: bytes = b""
        self.sent_at = 0.0  # time.monotonic() when the request went out
        self.done = threading.Event()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with httpx.Client(base_url=self.url, timeout=120) as client:
                self.sent_at = time.monotonic()
                self._read(client)
        finally:
            with self._changed:
                self.done.set()
                self._changed.notify_all()

    def _read(self, client: httpx.Client) -> None:
        with client.stream("POST", self.path, json=self.body) as resp:
            self.status = resp.status_code
            if resp.status_code != 200:
                self.error_body = resp.read()
                return
            for event in parse_sse(resp.iter_raw()):
                with self._changed:
                    self.events.append(event)
                    self._changed.notify_all()

    def wait_for(self, name: str | None, count: int = 1, timeout: float = 60.0) -> SseEvent:
        """The `count`-th event called `name`, waiting for it to arrive (None: the `count`-th
        unnamed one, as OpenAI's data-only frames are)."""
        with self._changed:
            seen: list[SseEvent] = []

            def arrived() -> bool:
                seen[:] = [e for e in self.events if e.event == name]
                return len(seen) >= count or self.done.is_set()

            if not self._changed.wait_for(arrived, timeout):
                raise TimeoutError(f"no {count} {name} events within {timeout} s")
            if len(seen) < count:
                raise AssertionError(f"stream ended without {count} {name} events: {self.events}")
            return seen[count - 1]

    def join(self, timeout: float = 60.0) -> list[SseEvent]:
        assert self.done.wait(timeout), f"stream did not end within {timeout} s"
        return self.events


def check_one_terminal(events: list[SseEvent]) -> SseEvent:
    """Events are started, token..., then exactly one end or error, with `i` counting from 0."""
    names = [e.event for e in events]
    assert names[0] == "started", names
    terminal = [n for n in names if n in ("end", "error")]
    assert len(terminal) == 1 and names[-1] == terminal[0], names
    assert set(names[1:-1]) <= {"token"}, names
    assert [e.json()["i"] for e in events[1:-1]] == list(range(len(events) - 2))
    return events[-1]
