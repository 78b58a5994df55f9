"""/health and /metrics of the data-parallel front: every replica's, gathered.

/health keeps a single worker's fields (summing the job counts and GPU memory over the replicas)
and adds `replicas`: each one's state, device, pid, requests in flight and sent, restarts and its
own /health. /metrics is the front's per-replica counters followed by each replica's metrics under
a `replica` label (sum them with `sum without (replica)`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
from prometheus_client import CollectorRegistry, Metric, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families

from worker_orcd.server.replicas import Replica, ReplicaSet, ReplicaState

logger = logging.getLogger(__name__)

SCRAPE_TIMEOUT_S = 5.0
_SUMMED = ("jobs_running", "jobs_queued", "vram_bytes_used")


async def _get(r: Replica, path: str) -> httpx.Response | None:
    if r.client is None:
        return None
    try:
        resp = await r.client.get(path, timeout=SCRAPE_TIMEOUT_S)
    except httpx.HTTPError as exc:
        logger.warning("replica %d: GET %s failed: %s", r.index, path, exc)
        return None
    return resp if resp.status_code == 200 else None


async def gather(replicas: ReplicaSet, path: str) -> dict[int, httpx.Response]:
    """The up replicas' answers to GET `path` (those that answered 200), by replica index."""
    up = replicas.up()
    answers = await asyncio.gather(*(_get(r, path) for r in up))
    return {r.index: a for r, a in zip(up, answers, strict=True) if a is not None}


async def health(
    replicas: ReplicaSet, *, worker_id: str, started: float, shutting_down: bool
) -> dict[str, Any]:
    answers = {i: resp.json() for i, resp in (await gather(replicas, "/health")).items()}
    healthy = [i for i, h in answers.items() if h.get("status") == "healthy"]
    out: dict[str, Any] = dict(answers[min(answers)]) if answers else {}
    if shutting_down or not healthy:
        status = "unhealthy"
    else:
        status = "healthy" if len(healthy) == len(replicas.replicas) else "degraded"
    out.update(
        status=status,
        worker_id=worker_id,
        device=",".join(dict.fromkeys(r.plan.device for r in replicas.replicas)),
        uptime_seconds=round(time.monotonic() - started, 3),
        data_parallel_size=len(replicas.replicas),
        replicas_up=len(replicas.up()),
    )
    for key in _SUMMED:
        out[key] = sum(int(h.get(key, 0)) for h in answers.values())
    out["replicas"] = [
        {
            "replica": r.index,
            "state": r.state.value,
            "device": r.plan.device,
            "pid": r.pid if r.state is not ReplicaState.DOWN else None,
            "url": r.url,
            "in_flight": r.in_flight,
            "requests": sum(r.served.values()),
            "restarts": r.restarts,
            "health": answers.get(r.index),
        }
        for r in replicas.replicas
    ]
    return out


async def metrics(replicas: ReplicaSet) -> bytes:
    texts = {i: resp.text for i, resp in (await gather(replicas, "/metrics")).items()}
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(replicas, texts))
    return generate_latest(registry)


class _Collector:
    """One scrape: the front's counters per replica, then each replica's metrics relabelled."""

    def __init__(self, replicas: ReplicaSet, texts: dict[int, str]) -> None:
        self._replicas, self._texts = replicas, texts

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "worker_orcd_replica_up", "1 while the replica is ready, else 0", labels=["replica"]
        )
        in_flight = GaugeMetricFamily(
            "worker_orcd_replica_in_flight",
            "Requests sent to the replica that have not ended",
            labels=["replica"],
        )
        restarts = CounterMetricFamily(
            "worker_orcd_replica_restarts", "Times the replica was restarted", labels=["replica"]
        )
        routed = CounterMetricFamily(
            "worker_orcd_replica_requests",
            "Requests the front sent to the replica, by endpoint",
            labels=["replica", "endpoint"],
        )
        for r in self._replicas.replicas:
            label = str(r.index)
            up.add_metric([label], float(r.state is ReplicaState.UP))
            in_flight.add_metric([label], r.in_flight)
            restarts.add_metric([label], r.restarts)
            for endpoint, n in sorted(r.served.items()):
                routed.add_metric([label, endpoint], n)
        yield from (up, in_flight, restarts, routed)
        merged: dict[str, Metric] = {}
        for index, text in sorted(self._texts.items()):
            for family in text_string_to_metric_families(text):
                m = merged.setdefault(
                    family.name,
                    Metric(family.name, family.documentation, family.type, family.unit),
                )
                for s in family.samples:
                    labels = {**s.labels, "replica": str(index)}
                    m.add_sample(s.name, labels, s.value, s.timestamp, s.exemplar)
        yield from merged.values()
