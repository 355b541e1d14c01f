"""What the admin listener shows: the running proxy as JSON status and Prometheus metrics."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from tiers.proxy.admin import Metric

if TYPE_CHECKING:
    from tiers.proxy.server import ProxyServer

_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")


def status(server: ProxyServer) -> dict[str, Any]:
    """Pools and their servers, request counts and connections, as plain JSON data."""
    counters = server.counters
    return {
        "uptime_seconds": round(time.time() - server.started_at, 3),
        "connections": len(server.connections),
        "requests": {name: count for name, count in zip(_CLASSES, counters.by_class,
                                                        strict=True) if count},
        "bytes_out": counters.bytes_out,
        "backends": [
            {"address": backend.label, "state": "up" if backend.up else "down",
             "idle_connections": len(backend.pool)}
            for backend in server.upstreams.backends
        ],
    }


def metrics(server: ProxyServer) -> list[Metric]:
    """The proxy's metrics in Prometheus terms."""
    counters = server.counters
    return [
        Metric("tiers_proxy_requests_total", "counter", "Requests answered, by status class.",
               [({"code": name}, count) for name, count in zip(_CLASSES, counters.by_class,
                                                               strict=True)]),
        Metric("tiers_proxy_response_bytes_total", "counter", "Response body bytes sent.",
               [({}, counters.bytes_out)]),
        Metric("tiers_proxy_connections", "gauge", "Client connections open now.",
               [({}, len(server.connections))]),
        Metric("tiers_proxy_backend_up", "gauge", "1 if the backend is in rotation.",
               [({"backend": b.label}, 1 if b.up else 0) for b in server.upstreams.backends]),
        Metric("tiers_proxy_uptime_seconds", "gauge", "Seconds since the proxy started.",
               [({}, time.time() - server.started_at)]),
    ]
