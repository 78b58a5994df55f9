"""Prometheus metrics on a registry of our own (not the process-global default)."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
_SECONDS_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)


class Metrics:
    """Counters and histograms fed by the scheduler and routes; gauges read live state on scrape."""

    def __init__(
        self,
        *,
        gpu_memory_bytes: Callable[[], float],
    ) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "worker_orcd_requests",
            "Requests by endpoint and outcome",
            ["endpoint", "outcome"],
            registry=r,
        )
        self.tokens_generated = Counter(
            "worker_orcd_tokens_generated", "Tokens generated", registry=r
        )
        self.prompt_tokens = Counter(
            "worker_orcd_prompt_tokens", "Prompt tokens processed", registry=r
        )
        self.prefill_seconds = Histogram(
            "worker_orcd_prefill_seconds",
            "Prefill time per job",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.decode_seconds = Histogram(
            "worker_orcd_decode_seconds",
            "Decode time per job",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "worker_orcd_time_to_first_token_seconds",
            "From job start to its first token",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "worker_orcd_queue_wait_seconds",
            "Time a job waited in the queue",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self._queue_length = Gauge("worker_orcd_queue_length", "Jobs waiting", registry=r)
        self._jobs_running = Gauge("worker_orcd_jobs_running", "Jobs running", registry=r)
        started = time.monotonic()
        Gauge(
            "worker_orcd_uptime_seconds", "Seconds since the worker started", registry=r
        ).set_function(lambda: time.monotonic() - started)
        Gauge(
            "worker_orcd_gpu_memory_used_bytes",
            "GPU memory held by the worker (0 on CPU)",
            registry=r,
        ).set_function(gpu_memory_bytes)

    def watch(
        self, *, queue_length: Callable[[], float], jobs_running: Callable[[], float]
    ) -> None:
        """Read the scheduler's live counts on every scrape."""
        self._queue_length.set_function(queue_length)
        self._jobs_running.set_function(jobs_running)

    def count_request(self, endpoint: str, outcome: str) -> None:
        self.requests.labels(endpoint=endpoint, outcome=outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
