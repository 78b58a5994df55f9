"""Prometheus metrics on a registry of our own (not the process-global default).

Counters and histograms are fed by the scheduler, the routes and the engine's step observer; the
engine's live state (sequences running and waiting, KV blocks, preemptions) is read from
`Engine.stats()` once per scrape.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from worker_orcd.engine.steps import EngineStats

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
# Sequences per forward pass: the CUDA-graph batch buckets and a few beyond.
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


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
            "From job submission to its first token",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.queue_wait_seconds = Histogram(
            "worker_orcd_queue_wait_seconds",
            "Time a job waited for its first forward pass",
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )
        self.batch_sequences = Histogram(
            "worker_orcd_batch_sequences",
            "Sequences carried by each forward pass of the engine",
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_tokens = Histogram(
            "worker_orcd_batch_tokens",
            "Tokens (prompt chunks and decode tokens) carried by each forward pass",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self._queue_length = Gauge(
            "worker_orcd_queue_length", "Jobs waiting beyond the running batch", registry=r
        )
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

    def watch_engine(self, stats: Callable[[], EngineStats]) -> None:
        """Report the engine's running and waiting sequences, KV blocks and preemptions."""
        self.registry.register(_EngineCollector(stats))

    def observe_step(self, seqs: int, tokens: int) -> None:
        """The engine's step observer: called on its thread after every forward pass."""
        self.batch_sequences.observe(seqs)
        self.batch_tokens.observe(tokens)

    def count_request(self, endpoint: str, outcome: str) -> None:
        self.requests.labels(endpoint=endpoint, outcome=outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    def __init__(self, stats: Callable[[], EngineStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self._stats()
        yield GaugeMetricFamily(
            "worker_orcd_running_sequences", "Sequences in the running batch", value=s.running
        )
        yield GaugeMetricFamily(
            "worker_orcd_waiting_sequences",
            "Sequences waiting for the batch (new, or preempted)",
            value=s.waiting,
        )
        yield GaugeMetricFamily(
            "worker_orcd_kv_blocks_used", "KV cache blocks in use", value=s.kv_blocks_used
        )
        yield GaugeMetricFamily(
            "worker_orcd_kv_blocks_total", "KV cache blocks in all", value=s.kv_blocks_total
        )
        yield CounterMetricFamily(
            "worker_orcd_preemptions",
            "Sequences preempted (blocks freed, recomputed later) for lack of KV blocks",
            value=s.preemptions,
        )
        yield CounterMetricFamily(
            "worker_orcd_engine_steps", "Forward passes of the engine", value=s.steps
        )
