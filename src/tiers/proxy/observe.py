"""What the admin listener shows: the running proxy as JSON status and Prometheus metrics.

``status`` is one worker's document; the metrics are made from it, so that
the admin listener of a proxy with several workers can make them from what
each worker reports (``tiers.proxy.peers``). ``RequestCounters`` are the
per-request counts they show.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import TYPE_CHECKING, Any, Final

from tiers.proxy.admin import Metric

if TYPE_CHECKING:
    from tiers.proxy.server import ProxyServer

_CLASSES: Final = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")
# Per-server counters exported as tiers_proxy_server_<name>_total.
_SERVER_COUNTERS: Final = (
    "requests", "connect_errors", "server_errors", "timeouts", "broken", "downs")


def status(server: ProxyServer) -> dict[str, Any]:
    """Pools and their servers, request counts, abuse limits, connections, as JSON data."""
    counters = server.counters
    return {
        "worker": server.settings.worker,
        "pid": os.getpid(),
        "workers": server.settings.workers,
        "uptime_seconds": round(time.time() - server.started_at, 3),
        "connections": len(server.connections),
        "requests": {name: count for name, count in zip(_CLASSES, counters.by_class,
                                                        strict=True) if count},
        "bytes_out": counters.bytes_out,
        "pools": [dataclasses.asdict(pool) for pool in server.pools.stats()],
        "abuse": dataclasses.asdict(server.abuse.stats(server.loop.time())),
        "cache": server.cache.metrics(),
    }


def metrics(server: ProxyServer) -> list[Metric]:
    """The proxy's metrics in Prometheus terms."""
    return metrics_of(status(server))


def metrics_of(state: dict[str, Any], labels: dict[str, str] | None = None) -> list[Metric]:
    """The metrics of one worker's ``status`` document, each sample also carrying ``labels``."""
    extra = labels or {}
    pools = state["pools"]
    abuse = state["abuse"]
    cache = state["cache"]
    by_class = state["requests"]

    def one(value: float, **more: str) -> tuple[dict[str, str], float]:
        return ({**more, **extra}, value)

    def per_server(field: str) -> list[tuple[dict[str, str], float]]:
        return [one(s[field], pool=p["name"], server=s["address"])
                for p in pools for s in p["servers"]]

    found = [
        Metric("tiers_proxy_requests_total", "counter", "Requests answered, by status class.",
               [one(by_class.get(name, 0), code=name) for name in _CLASSES]),
        Metric("tiers_proxy_response_bytes_total", "counter", "Response body bytes sent.",
               [one(state["bytes_out"])]),
        Metric("tiers_proxy_connections", "gauge", "Client connections open now.",
               [one(state["connections"])]),
        Metric("tiers_proxy_server_up", "gauge", "1 if the server is in rotation.",
               [one(0 if s["state"] == "down" else 1, pool=p["name"], server=s["address"])
                for p in pools for s in p["servers"]]),
        Metric("tiers_proxy_server_active", "gauge", "Requests in flight per server.",
               per_server("active")),
        Metric("tiers_proxy_pool_queued", "gauge", "Requests waiting for a server slot.",
               [one(p["queued"], pool=p["name"]) for p in pools]),
        Metric("tiers_proxy_abuse_requests_total", "counter",
               "Requests by abuse verdict.",
               [one(abuse[v], verdict=v) for v in ("allowed", "denied", "limited")]),
        Metric("tiers_proxy_abuse_blocked_clients", "gauge", "Clients blocked now.",
               [one(abuse["blocked"])]),
        Metric("tiers_proxy_uptime_seconds", "gauge", "Seconds since the proxy started.",
               [one(state["uptime_seconds"])]),
        Metric("tiers_proxy_cache_lookups_total", "counter", "Page cache lookups by result.",
               [one(cache[r], result=r) for r in ("hits", "misses", "stale") if r in cache]),
        Metric("tiers_proxy_cache_bytes", "gauge", "Bytes held by the page cache.",
               [one(cache.get("bytes", 0))]),
        Metric("tiers_proxy_cache_entries", "gauge", "Pages held by the page cache.",
               [one(cache.get("entries", 0))]),
        Metric("tiers_proxy_cache_evictions_total", "counter", "Pages evicted for memory.",
               [one(cache.get("evictions", 0))]),
    ]
    found += [Metric(f"tiers_proxy_server_{name}_total", "counter",
                     f"Per-server {name.replace('_', ' ')}.", per_server(name))
              for name in _SERVER_COUNTERS]
    return found


def metrics_of_workers(states: list[dict[str, Any] | None]) -> list[Metric]:
    """Every answering worker's metrics, each sample labelled with ``worker``.

    Counters stay per worker rather than summed, so that a restarted worker
    reads as a counter reset of its own series, which Prometheus handles;
    ``sum without (worker)`` gives the whole proxy.
    """
    families: dict[str, Metric] = {}
    for index, state in enumerate(states):
        if state is None:
            continue
        for metric in metrics_of(state, {"worker": str(index)}):
            known = families.get(metric.name)
            if known is None:
                families[metric.name] = Metric(metric.name, metric.kind, metric.help,
                                               list(metric.samples))
            else:
                assert isinstance(known.samples, list)
                known.samples.extend(metric.samples)
    return list(families.values())


class RequestCounters:
    """Answers counted by status class, and response body bytes, for metrics."""

    __slots__ = ("by_class", "bytes_out")

    def __init__(self) -> None:
        self.by_class = [0] * 6  # index: status // 100; 0 counts exchanges with no status
        self.bytes_out = 0

    def count(self, status: int, size: int) -> None:
        self.by_class[min(status // 100, 5)] += 1
        self.bytes_out += size
