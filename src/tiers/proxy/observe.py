"""What the admin listener shows: the running proxy as JSON status and Prometheus metrics."""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING, Any

from tiers.proxy.admin import Metric

if TYPE_CHECKING:
    from tiers.proxy.server import ProxyServer

_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")
# Per-server counters exported as tiers_proxy_server_<name>_total.
_SERVER_COUNTERS = ("requests", "connect_errors", "server_errors", "timeouts", "broken", "downs")


def status(server: ProxyServer) -> dict[str, Any]:
    """Pools and their servers, request counts, abuse limits, connections, as JSON data."""
    counters = server.counters
    return {
        # With several workers, this is worker 0's view only.
        "worker": server.settings.worker,
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
    counters = server.counters
    pools = server.pools.stats()
    abuse = server.abuse.stats(server.loop.time())

    def per_server(field: str) -> list[tuple[dict[str, str], float]]:
        return [({"pool": p.name, "server": s.address}, getattr(s, field))
                for p in pools for s in p.servers]

    found = [
        Metric("tiers_proxy_requests_total", "counter", "Requests answered, by status class.",
               [({"code": name}, count) for name, count in zip(_CLASSES, counters.by_class,
                                                               strict=True)]),
        Metric("tiers_proxy_response_bytes_total", "counter", "Response body bytes sent.",
               [({}, counters.bytes_out)]),
        Metric("tiers_proxy_connections", "gauge", "Client connections open now.",
               [({}, len(server.connections))]),
        Metric("tiers_proxy_server_up", "gauge", "1 if the server is in rotation.",
               [({"pool": p.name, "server": s.address}, 0 if s.state == "down" else 1)
                for p in pools for s in p.servers]),
        Metric("tiers_proxy_server_active", "gauge", "Requests in flight per server.",
               per_server("active")),
        Metric("tiers_proxy_pool_queued", "gauge", "Requests waiting for a server slot.",
               [({"pool": p.name}, p.queued) for p in pools]),
        Metric("tiers_proxy_abuse_requests_total", "counter",
               "Requests by abuse verdict.",
               [({"verdict": "allowed"}, abuse.allowed), ({"verdict": "denied"}, abuse.denied),
                ({"verdict": "limited"}, abuse.limited)]),
        Metric("tiers_proxy_abuse_blocked_clients", "gauge", "Clients blocked now.",
               [({}, abuse.blocked)]),
        Metric("tiers_proxy_uptime_seconds", "gauge", "Seconds since the proxy started.",
               [({}, time.time() - server.started_at)]),
    ]
    cache = server.cache.metrics()
    found += [
        Metric("tiers_proxy_cache_lookups_total", "counter", "Page cache lookups by result.",
               [({"result": r}, cache[r]) for r in ("hits", "misses", "stale") if r in cache]),
        Metric("tiers_proxy_cache_bytes", "gauge", "Bytes held by the page cache.",
               [({}, cache.get("bytes", 0))]),
        Metric("tiers_proxy_cache_entries", "gauge", "Pages held by the page cache.",
               [({}, cache.get("entries", 0))]),
        Metric("tiers_proxy_cache_evictions_total", "counter", "Pages evicted for memory.",
               [({}, cache.get("evictions", 0))]),
    ]
    found += [Metric(f"tiers_proxy_server_{name}_total", "counter",
                     f"Per-server {name.replace('_', ' ')}.", per_server(name))
              for name in _SERVER_COUNTERS]
    return found
