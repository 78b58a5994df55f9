"""The floor of serve_load's latency figures: a server with no model that streams /execute's events
at a fixed interval, so what serve_load reports against it is the HTTP stack and the client alone.

    python -m benchmarks.sse_floor --port 18731 --interval-ms 6 &
    python -m benchmarks.serve_load --url http://127.0.0.1:18731 --clients 16 64 --rounds 4 \\
        --fixed --prompt-tokens 128 --gen-tokens 128

Each request gets `started`, `max_tokens` token events `--interval-ms` apart and `end`, framed as
`worker-orcd serve` frames them (FastAPI + uvicorn, as the server); /v1/completions (serve_load
--endpoint openai) streams the same tokens as OpenAI chunks, then the usage chunk and `[DONE]`.
/health and /metrics answer what serve_load reads. Loopback only.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import Response, StreamingResponse

from worker_orcd.server import sse

logger = logging.getLogger("benchmarks.sse_floor")


def create_app(interval_s: float) -> FastAPI:
    app = FastAPI()

    @app.post("/execute")
    async def execute(body: dict[str, Any]) -> StreamingResponse:
        n = int(body.get("max_tokens", 16))

        async def events() -> AsyncIterator[bytes]:
            yield sse.event("started", {"job_id": "floor", "prompt_tokens": 0})
            for i in range(n):
                await asyncio.sleep(interval_s)
                yield sse.event("token", {"t": " w", "i": i})
            yield sse.event("end", {"tokens_out": n, "first_token_ms": interval_s * 1e3})

        return StreamingResponse(events(), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)

    @app.post("/v1/completions")
    async def completions(body: dict[str, Any]) -> StreamingResponse:
        n = int(body.get("max_tokens", 16))
        envelope = {"id": "cmpl-floor", "object": "text_completion", "created": 0, "model": "floor"}

        def chunk(text: str, finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            return sse.data_only({**envelope, "choices": [choice], "usage": None})

        async def events() -> AsyncIterator[bytes]:
            for _ in range(n):
                await asyncio.sleep(interval_s)
                yield chunk(" w")
            usage = {"prompt_tokens": 0, "completion_tokens": n, "total_tokens": n}
            yield chunk("", "length") + sse.data_only({**envelope, "choices": [], "usage": usage})
            yield sse.OPENAI_DONE

        return StreamingResponse(events(), media_type=sse.MEDIA_TYPE, headers=sse.HEADERS)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"model": "sse-floor (no model)", "device": "none", "dtype": "none"}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response("", media_type="text/plain")

    return app


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=18731)
    p.add_argument("--interval-ms", type=float, default=6.0, help="time between token events")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logger.info("sse floor on 127.0.0.1:%d, a token every %.1f ms", args.port, args.interval_ms)
    uvicorn.run(
        create_app(args.interval_ms / 1e3), host="127.0.0.1", port=args.port, log_level="warning"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
