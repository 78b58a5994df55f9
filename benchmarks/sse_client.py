"""The HTTP/1.1 client serve_load's streams are read with: plain asyncio streams, no more.

httpx costs too much per event at serve_load's rates (64 streams of ~170 events/s from one
process): its connection pool scans every connection on each request start and end, and each
chunk passes through httpcore, h11 and anyio. Here a request is one write with a Content-Length
body, and the response is read incrementally: the head, then the body's bytes (chunked,
Content-Length or up to close) handed on as they arrive, with the time they were read.
`SSEDecoder` cuts them into events. Connections are kept alive and reused through `Pool`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from urllib.parse import urlparse

logger = logging.getLogger(__name__)

READ_SIZE = 65536
MAX_LINE = 8192  # a chunk-size or trailer line longer than this is not HTTP we expect

# ChunkedDecoder._left: > 0 bytes of chunk data to come, else what the next line is.
_SIZE, _DATA_END, _TRAILER = -1, -2, -3


class ProtocolError(Exception):
    """The server's bytes are not the HTTP/1.1 we expect, or the connection ended mid-response.
    The message is a fixed phrase, so that it can be counted as an error kind."""


class ChunkedDecoder:
    """Transfer-Encoding: chunked, incrementally: `feed` the bytes as they come, get the body's
    bytes back; `done` once the last chunk and the trailers are in. Lines may end in CRLF or LF."""

    __slots__ = ("_buf", "_left", "done")

    def __init__(self) -> None:
        self._buf = b""
        self._left = _SIZE
        self.done = False

    @property
    def extra(self) -> bytes:
        """Bytes after the body's end (none from a server that waits for our next request)."""
        return self._buf if self.done else b""

    def feed(self, data: bytes) -> bytes:
        buf = self._buf + data if self._buf else data
        out = []
        pos, n = 0, len(buf)
        while pos < n and not self.done:
            if self._left > 0:
                take = min(self._left, n - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self._left -= take
                if self._left == 0:
                    self._left = _DATA_END
                continue
            end = buf.find(b"\n", pos)
            if end < 0:
                if n - pos > MAX_LINE:
                    raise ProtocolError("chunk line too long")
                break
            line = buf[pos : end - 1] if end > pos and buf[end - 1] == 13 else buf[pos:end]
            pos = end + 1
            if self._left == _DATA_END:
                if line:
                    raise ProtocolError("chunk data longer than its size")
                self._left = _SIZE
            elif self._left == _SIZE:
                size_hex = line.split(b";", 1)[0].strip()
                try:
                    size = int(size_hex, 16)
                except ValueError:
                    size = -1
                if size < 0 or not size_hex.isalnum():
                    raise ProtocolError("bad chunk size")
                self._left = size if size else _TRAILER
            elif not line:  # the blank line after the last chunk's trailers
                self.done = True
        self._buf = buf[pos:]
        return b"".join(out)


class SSEDecoder:
    """Server-sent events from bytes fed in pieces cut anywhere: `feed` returns (event name or
    None, data) for each event completed and carrying data. Lines end in LF, CRLF or CR; comment
    lines and other fields (id, retry) are skipped; several data lines join with LF."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[tuple[str | None, str]]:
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            held = buf.endswith(b"\r")  # the LF of its CRLF may be in the next piece
            if held:
                buf = buf[:-1]
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
            if held:
                buf += b"\r"
        if b"\n\n" not in buf:
            self._buf = buf
            return []
        frames = buf.split(b"\n\n")
        self._buf = frames.pop()
        out: list[tuple[str | None, str]] = []
        for frame in frames:
            name, lines = None, []
            for line in frame.split(b"\n"):
                key, _, value = line.partition(b":")
                if value[:1] == b" ":
                    value = value[1:]
                if key == b"data":
                    lines.append(value)
                elif key == b"event":
                    name = value.decode()
            if lines:
                out.append((name, b"\n".join(lines).decode()))
        return out


class Connection:
    """One HTTP/1.1 connection: `request` sends and reads the response head, `read_body` the
    rest. `reusable` once a response was read to its end and the server keeps the connection."""

    __slots__ = ("_reader", "_writer", "_host", "_framing", "_length", "_keep_alive", "reusable")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self._reader, self._writer, self._host = reader, writer, host
        self._framing, self._length, self._keep_alive = "none", 0, False
        self.reusable = False

    def usable(self) -> bool:
        """Idle and still open: the server closes idle keep-alive connections after a while."""
        reader = self._reader
        return not (reader.at_eof() or reader.exception() or self._writer.is_closing())

    async def request(self, method: str, target: str, body: bytes) -> int:
        """Sends the request; returns the response's status once its head is in."""
        self.reusable = False
        self._writer.write(
            f"{method} {target} HTTP/1.1\r\nHost: {self._host}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Accept: */*\r\n\r\n".encode("latin-1")
            + body
        )
        while True:
            try:
                head = await self._reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                raise ProtocolError("connection closed before the response") from exc
            except asyncio.LimitOverrunError as exc:
                raise ProtocolError("response head too long") from exc
            status = self._parse_head(head.decode("latin-1"), method)
            if not 100 <= status < 200:
                return status

    def _parse_head(self, head: str, method: str) -> int:
        lines = head.split("\r\n")
        version, _, rest = lines[0].partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/1.") or not code.isdigit():
            raise ProtocolError("not an HTTP/1.x response")
        headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip().lower()
        status = int(code)
        self._keep_alive = version == "HTTP/1.1" and "close" not in headers.get("connection", "")
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            self._framing = "none"
        elif "chunked" in headers.get("transfer-encoding", ""):
            self._framing = "chunked"
        elif "content-length" in headers:
            if not headers["content-length"].isdigit():
                raise ProtocolError("bad Content-Length")
            self._framing, self._length = "length", int(headers["content-length"])
        else:
            self._framing, self._keep_alive = "close", False
        return status

    async def read_body(self, on_data: Callable[[bytes, float], None]) -> None:
        """Hands each piece of the body to on_data with the perf_counter time it was read."""
        read, clock = self._reader.read, time.perf_counter
        if self._framing == "chunked":
            chunks = ChunkedDecoder()
            while not chunks.done:
                data = await read(READ_SIZE)
                if not data:
                    raise ProtocolError("connection closed mid-response")
                body = chunks.feed(data)
                if body:
                    on_data(body, clock())
            self.reusable = self._keep_alive and not chunks.extra
        elif self._framing == "length":
            left = self._length
            while left:
                data = await read(min(left, READ_SIZE))
                if not data:
                    raise ProtocolError("connection closed mid-response")
                left -= len(data)
                on_data(data, clock())
            self.reusable = self._keep_alive
        elif self._framing == "close":
            while data := await read(READ_SIZE):
                on_data(data, clock())
        else:
            self.reusable = self._keep_alive

    def close(self) -> None:
        self._writer.close()

    async def wait_closed(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except OSError:
            pass  # reset by the server on the way out: closed all the same


class Pool:
    """Keep-alive connections to one server, each lent to one request at a time."""

    def __init__(self, url: str, connect_timeout: float = 30.0) -> None:
        parts = urlparse(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"an http:// URL with a host is needed, not {url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.prefix = parts.path.rstrip("/")
        name = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = name if parts.port is None else f"{name}:{self.port}"
        self.connect_timeout = connect_timeout
        self._idle: list[Connection] = []
        self._opened: list[Connection] = []

    async def acquire(self) -> Connection:
        while self._idle:
            conn = self._idle.pop()
            if conn.usable():
                return conn
            conn.close()
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(self.host, self.port, limit=READ_SIZE), self.connect_timeout
        )
        conn = Connection(reader, writer, self.host_header)
        self._opened.append(conn)
        return conn

    def release(self, conn: Connection) -> None:
        if conn.reusable:
            self._idle.append(conn)
        else:
            conn.close()

    async def aclose(self) -> None:
        self._idle.clear()
        await asyncio.gather(*(c.wait_closed() for c in self._opened))
        self._opened.clear()

    async def __aenter__(self) -> Pool:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
