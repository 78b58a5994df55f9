"""benchmarks/sse_client.py and serve_load's use of it: the decoders at every cut of a stream,
and whole requests against a scripted HTTP/1.1 server on loopback (chunks split mid-line and
mid-event, CRLF and LF lines, a non-200 status, a connection closed mid-stream, a stream with no
terminal event or an event after it, a server that goes quiet, connection reuse)."""

from __future__ import annotations

import asyncio
import json
import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import httpx
import pytest

from benchmarks import serve_load
from benchmarks.sse_client import ChunkedDecoder, Pool, ProtocolError, SSEDecoder

STARTED = b'event: started\ndata: {"job_id":"j","prompt_tokens":5}\n\n'
END = b'event: end\ndata: {"tokens_out":3,"first_token_ms":1.5}\n\n'


def token(i: int, text: str = " w") -> bytes:
    data = json.dumps({"t": text, "i": i}, ensure_ascii=False)
    return f"event: token\ndata: {data}\n\n".encode()


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def decode(body: bytes, cuts: list[int]) -> tuple[list[tuple[str | None, str]], bool, bytes]:
    """The SSE events of a chunked body fed in pieces cut at `cuts`."""
    chunks, events, out = ChunkedDecoder(), SSEDecoder(), []
    for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True):
        out += events.feed(chunks.feed(body[a:b]))
    return out, chunks.done, chunks.extra


def test_decoders_give_the_same_events_at_every_cut() -> None:
    stream = STARTED + token(0, "héllo") + b": a comment\r\nid: 7\r\n" + token(1) + END
    stream = stream.replace(token(1), token(1).replace(b"\n", b"\r\n"))  # CRLF lines
    body = chunked(stream[:10], stream[10:61], stream[61:62], stream[62:])  # cuts mid-line
    want = [
        ("started", '{"job_id":"j","prompt_tokens":5}'),
        ("token", '{"t": "héllo", "i": 0}'),  # its é cut in two at some cuts
        ("token", '{"t": " w", "i": 1}'),
        ("end", '{"tokens_out":3,"first_token_ms":1.5}'),
    ]
    assert decode(body, []) == (want, True, b"")
    for cut in range(1, len(body)):
        assert decode(body, [cut]) == (want, True, b""), cut
    assert decode(body, list(range(1, len(body)))) == (want, True, b"")  # a byte at a time


def test_sse_decoder_lines_and_fields() -> None:
    events = SSEDecoder()
    assert events.feed(b"data: a\rdata:b\r") == []  # CR alone ends a line; held back: CRLF?
    assert events.feed(b"\r\n") == [(None, "a\nb")]
    assert events.feed(b"event: x\n\nevent: y\ndata\n\n") == [("y", "")]  # no data: no event
    assert events.feed(b"data: [DONE]\n") == []
    assert events.feed(b"\n") == [(None, "[DONE]")]


@pytest.mark.parametrize(
    ("body", "why"),
    [
        (b"zz\r\nab\r\n", "bad chunk size"),
        (b"-1\r\nab\r\n", "bad chunk size"),
        (b"2\r\nabc\r\n", "chunk data longer than its size"),
        (b"1" * 10_000, "chunk line too long"),
    ],
)
def test_chunked_decoder_rejects_what_is_not_chunked(body: bytes, why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        ChunkedDecoder().feed(body)


def test_chunked_decoder_extensions_trailers_and_extra_bytes() -> None:
    chunks = ChunkedDecoder()
    assert chunks.feed(b"3;ext=1\r\nabc\r\n0\r\nX-Trailer: 1\r\n") == b"abc"
    assert not chunks.done
    assert chunks.feed(b"\r\nHTTP/1.1") == b""
    assert chunks.done and chunks.extra == b"HTTP/1.1"


# -- whole requests against a scripted server ------------------------------------------------------

# Writes one response; False: close the connection after it.
Reply = Callable[[asyncio.StreamWriter, "ScriptedServer"], Awaitable[bool]]


def head(status: str = "200 OK", *headers: str) -> bytes:
    lines = [f"HTTP/1.1 {status}", *headers, "", ""]
    return "\r\n".join(lines).encode()


SSE_HEAD = head("200 OK", "content-type: text/event-stream", "Transfer-Encoding: chunked")


def pieces_reply(*pieces: bytes, keep: bool = True) -> Reply:
    """Writes each piece and lets it go out before the next."""

    async def reply(w: asyncio.StreamWriter, server: ScriptedServer) -> bool:
        for p in pieces:
            w.write(p)
            await w.drain()
        return keep

    return reply


@dataclass
class ScriptedServer:
    replies: list[Reply]
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    connections: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.replies:
                try:
                    raw = await r.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return
                first, *lines = raw.decode().split("\r\n")
                headers = {
                    k.lower(): v.strip() for k, _, v in (x.partition(":") for x in lines if x)
                }
                body = await r.readexactly(int(headers["content-length"]))
                self.requests.append((first, headers, body))
                if not await self.replies.pop(0)(w, self):
                    return
        finally:
            w.close()


async def quiet(w: asyncio.StreamWriter, server: ScriptedServer) -> bool:
    """A head and one event, then nothing until the test is over."""
    w.write(SSE_HEAD + chunked(STARTED)[:-5])
    await w.drain()
    await server.release.wait()
    return False


def run(
    replies: list[Reply], *argv: str, requests: int = 1
) -> tuple[list[serve_load.Result], ScriptedServer]:
    """`requests` serve_load requests one after the other through one Pool."""

    async def go() -> tuple[list[serve_load.Result], ScriptedServer]:
        server = ScriptedServer(list(replies))
        srv = await asyncio.start_server(server.handle, "127.0.0.1", 0)
        port = srv.sockets[0].getsockname()[1]
        args = serve_load.build_parser().parse_args(["--url", f"http://127.0.0.1:{port}", *argv])
        w = serve_load.Workload(prompt="the cat", prompt_words=2, gen_tokens=3)
        out = []
        async with srv, Pool(f"http://127.0.0.1:{port}") as pool:
            for seed in range(requests):
                out.append(await serve_load.one_request(pool, w, args, seed))
            server.release.set()
        return out, server

    return asyncio.run(go())


def test_a_stream_cut_mid_line_and_mid_event() -> None:
    stream = STARTED + token(0) + token(1) + token(2) + END
    body = chunked(stream)
    cuts = [5, len(SSE_HEAD) + 30, len(SSE_HEAD) + 80, len(SSE_HEAD) + len(body) - 3]
    data = SSE_HEAD + body
    parts = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    [r], server = run([pieces_reply(*parts)])
    assert r.error is None
    assert (r.prompt_tokens, r.output_tokens, r.engine_first_ms) == (5, 3, 1.5)
    assert len(r.pieces) == 3 and r.first == r.pieces[0] and r.sent <= r.first <= r.done
    first, headers, sent = server.requests[0]
    assert first == "POST /execute HTTP/1.1"
    want = serve_load._body(serve_load.Workload("the cat", 2, 3), "execute", 0.0, 0)
    assert sent == httpx.Request("POST", "http://x/execute", json=want).content  # httpx's bytes
    assert headers["content-length"] == str(len(sent)) and headers["host"].startswith("127.0.0.1:")


def test_openai_stream_and_keep_alive() -> None:
    def chunk(text: str) -> bytes:
        return b"data: " + json.dumps({"choices": [{"text": text}], "usage": None}).encode()

    usage = b'data: {"choices":[],"usage":{"prompt_tokens":4,"completion_tokens":2}}'
    frames = [chunk("a"), chunk(""), chunk("b"), usage, b"data: [DONE]"]
    stream = b"\r\n\r\n".join(frames) + b"\r\n\r\n"
    reply = pieces_reply(SSE_HEAD + chunked(stream[:7], stream[7:]))
    rs, server = run([reply, reply], "--endpoint", "openai", requests=2)
    assert [(r.error, len(r.pieces), r.prompt_tokens, r.output_tokens) for r in rs] == [
        (None, 2, 4, 2)
    ] * 2
    assert server.connections == 1  # kept alive
    assert server.requests[0][0] == "POST /v1/completions HTTP/1.1"
    assert json.loads(server.requests[1][2])["stream"] is True


def test_non_200_reads_the_body_and_names_the_status() -> None:
    error = b'{"code":"QUEUE_FULL"}'
    busy = pieces_reply(head("503 Service Unavailable", f"content-length: {len(error)}") + error)
    ok = pieces_reply(SSE_HEAD + chunked(STARTED + token(0) + END))
    rs, server = run([busy, ok], requests=2)
    assert [r.error for r in rs] == ["HTTP 503", None]
    assert server.connections == 1  # the 503's body was read: the connection was reused


def test_connection_closed_mid_stream() -> None:
    closes = pieces_reply(SSE_HEAD + chunked(STARTED + token(0) + token(1))[:-5], keep=False)
    ok = pieces_reply(SSE_HEAD + chunked(STARTED + token(0) + END))
    rs, server = run([closes, ok], requests=2)
    assert [r.error for r in rs] == ["connection closed mid-response", None]
    assert len(rs[0].pieces) == 2  # what came before the close is recorded
    assert server.connections == 2


def test_closed_before_the_response() -> None:
    [r], _ = run([pieces_reply(keep=False)])
    assert r.error == "connection closed before the response"


@pytest.mark.parametrize(
    ("stream", "error"),
    [
        (STARTED + token(0), "no terminal event"),
        (STARTED + token(0) + END + END, "event after the terminal event"),
        (STARTED + b'event: error\ndata: {"code":"CANCELLED"}\n\n', "CANCELLED"),
        (STARTED + END.replace(b"3", b"0"), "no output"),
        (STARTED + b"event: token\ndata: {not json\n\n", "JSONDecodeError"),
    ],
)
def test_what_a_stream_must_be(stream: bytes, error: str) -> None:
    [r], _ = run([pieces_reply(SSE_HEAD + chunked(stream))])
    assert r.error == error


def test_request_timeout() -> None:
    [r], _ = run([quiet], "--request-timeout", "0.2")
    assert r.error == "timeout"
    assert r.done - r.sent >= 0.2


def test_pool_url() -> None:
    pool = Pool("http://[::1]:8000/base/")
    assert (pool.host, pool.port, pool.prefix, pool.host_header) == (
        "::1",
        8000,
        "/base",
        "[::1]:8000",
    )
    with pytest.raises(ValueError, match="http:// URL"):
        Pool("https://127.0.0.1:8000")


@pytest.mark.parametrize("endpoint", ["execute", "openai"])
def test_serve_load_against_the_floor_server(endpoint: str) -> None:
    """Real uvicorn framing (benchmarks/sse_floor.py in this process, on a socket bound before
    it starts): every token of every request arrives as a piece, none of them an error."""
    import uvicorn

    from benchmarks.sse_floor import create_app

    async def go() -> serve_load.Report:
        # IPPROTO_TCP, as uvicorn's own socket: asyncio sets TCP_NODELAY on the connections of
        # no other (and Nagle's algorithm then holds the small events back for the peer's ACK).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.bind(("127.0.0.1", 0))
        sock.listen(64)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        server = uvicorn.Server(uvicorn.Config(create_app(0.001), log_level="warning"))
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        argv = ["--url", url, "--endpoint", endpoint, "--rounds", "2", "--fixed"]
        args = serve_load.build_parser().parse_args(
            [*argv, "--prompt-tokens", "4", "--gen-tokens", "5"]
        )
        try:
            return await serve_load.run_level(url, 8, args, random.Random(0), [0])
        finally:
            server.should_exit = True
            await serving

    report = asyncio.run(go())
    assert (report.requests, report.errors, report.output_tokens) == (16, 0, 80)
    assert 0 < report.itl_p50_ms <= report.itl_p99_ms  # pieces timed apart, not in one batch
