"""Start-up, the ready callback, queue overflow, cancelling a waiting job, the inference timeout and
SIGTERM, on servers of their own (these need flags the shared server does not have, or end the
process)."""

from __future__ import annotations

import json
import logging
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.server.live_server import (
    BackgroundStream,
    check_one_terminal,
    serve_command,
    start_server,
)

logger = logging.getLogger(__name__)

pytestmark = pytest.mark.slow


def wait_for_health(
    client: httpx.Client, ready: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> dict[str, Any]:
    """/health once `ready` holds for it (a waiting job sends nothing to wait on)."""
    deadline = time.monotonic() + timeout
    while not ready(health := client.get("/health").json()):
        assert time.monotonic() < deadline, health
        time.sleep(0.01)
    return health


class CallbackReceiver:
    """A tiny HTTP server on 127.0.0.1 that records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        received: list[tuple[str, dict[str, Any]]] = []
        got = threading.Event()
        self.received, self.got = received, got

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                length = int(self.headers.get("Content-Length", "0"))
                received.append((self.path, json.loads(self.rfile.read(length))))
                got.set()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/ready"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def receiver() -> Iterator[CallbackReceiver]:
    r = CallbackReceiver()
    yield r
    r.close()


def test_unloadable_model_exits_nonzero_with_one_clear_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 60)
    proc = subprocess.run(
        serve_command(bad, "--worker-id", "doomed"),
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode != 0
    records = [json.loads(line) for line in proc.stderr.decode().splitlines() if line.strip()]
    errors = [r for r in records if r["level"] in ("ERROR", "CRITICAL")]
    assert len(errors) == 1, records
    assert errors[0]["event"] == "error" and errors[0]["code"] == "MODEL_LOAD_FAILED"
    assert errors[0]["path"] == str(bad) and errors[0]["worker_id"] == "doomed"
    assert errors[0]["message"]
    assert not [r for r in records if r.get("event") == "ready"]


def test_callback_overflow_timeout_and_sigterm(
    qwen_gguf_path: Path, receiver: CallbackReceiver
) -> None:
    server = start_server(
        qwen_gguf_path,
        "--worker-id",
        "lifecycle",
        "--max-num-seqs",
        "1",
        "--max-queue",
        "1",
        "--inference-timeout-sec",
        "2",
        "--max-context",
        "2048",
        "--max-tokens-out",
        "2048",
        "--callback-url",
        receiver.url,
    )
    try:
        # Ready callback: after the `ready` line, with the address that works.
        assert receiver.got.wait(30)
        path, body = receiver.received[0]
        assert path == "/ready"
        assert body == {
            "worker_id": "lifecycle",
            "uri": server.url,
            "vram_bytes": 0,
            "model": body["model"],
        }
        # The server logs its callback once the receiver has answered: wait for that line.
        server.wait_for_log("callback", timeout=30)
        events = [r.get("event") for r in server.logs if r.get("event")]
        order = ["startup", "model_load_start", "model_load_complete", "ready", "callback"]
        assert [e for e in events if e in order] == order
        with server.client() as client:
            assert client.get("/v1/models").json()["data"][0]["id"] == body["model"]

        # One job runs (--max-num-seqs 1), one waits (--max-queue 1), the third is refused.
        long_job = {"prompt": "Count: 1, 2, 3,", "max_tokens": 1500, "temperature": 0}
        running = BackgroundStream(server.url, {"job_id": "run", **long_job})
        running.wait_for("started")
        queued = BackgroundStream(server.url, {"job_id": "wait", **long_job})
        with server.client() as client:
            wait_for_health(client, lambda h: h["jobs_queued"] == 1)
            resp = client.post("/execute", json={"job_id": "third", **long_job})
            assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
            assert resp.json() == {
                "code": "QUEUE_FULL",
                "retriable": True,
                "message": "queue is full (1 waiting, --max-queue 1)",
            }
            resp = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
            assert resp.status_code == 503 and resp.json()["error"]["code"] == "QUEUE_FULL"
            health = client.get("/health").json()
            assert (health["seqs_running"], health["seqs_waiting"]) == (1, 1)

            # The waiting job, cancelled, ends at once and never starts; its place is free again.
            t0 = time.monotonic()
            assert client.post("/cancel", json={"job_id": "wait"}).status_code == 202
            events = queued.join(10)
            assert [e.event for e in events] == ["error"]
            assert events[0].json()["code"] == "CANCELLED"
            logger.info("cancel latency (waiting job): %.1f ms", (events[0].at - t0) * 1e3)
            wait_for_health(client, lambda h: h["jobs_queued"] == 0)

        # The running job passes --inference-timeout-sec 2 (counted from its submission).
        events = running.join(30)
        err = check_one_terminal(events).json()
        assert (err["code"], err["retriable"]) == ("INFERENCE_TIMEOUT", True)
        assert 2.0 <= events[-1].at - running.sent_at < 10

        # SIGTERM while the next job runs: its stream ends with an error event, port released.
        queued = BackgroundStream(server.url, {"job_id": "wait2", **long_job})
        queued.wait_for("token")
        t0 = time.monotonic()
        assert server.stop(signal.SIGTERM, timeout=30) == 0
        stop_s = time.monotonic() - t0
        err = check_one_terminal(queued.join(10)).json()
        assert (err["code"], err["retriable"]) == ("WORKER_SHUTDOWN", True)
        assert stop_s < 15
        host, port = server.url.removeprefix("http://").split(":")
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{server.url}/health", timeout=2)
        with socket.create_server((host, int(port))):
            pass  # the port is free again
        server.drain()
        phases = [r.get("phase") for r in server.logs if r.get("event") == "shutdown"]
        assert phases == ["begin", "complete"]
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()
