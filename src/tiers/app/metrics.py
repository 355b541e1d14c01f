"""``/_tiers/metrics`` on every app server: this worker's cache cluster, for Prometheus.

The answer is the Prometheus text format (0.0.4), like the proxy admin's
``/metrics``, for the cluster ``tiers.cache.cluster_from_env()`` gives this
process (built on the spot if the app has not used it yet, so every node is
listed from the first scrape):

    tiers_app_worker_info{server,worker}                     1
    tiers_cache_hits_total{server,worker,pool,node}          counter
    tiers_cache_misses_total{...}                            counter
    tiers_cache_errors_total{...}                            counter
    tiers_cache_ejections_total{...}                         counter
    tiers_cache_node_state{...,state="up|ejected|probing"}   gauge, 1 for the current state
    tiers_cache_request_duration_seconds{...}                histogram
    tiers_cache_unrouted_total{server,worker}                counter: requests no live node took

``pool`` is ``nodes`` or ``gutter``, ``node`` the node's ``host:port``.

Workers. gunicorn runs several worker processes behind one port, each with
its own cluster and counters, and any of them may take a scrape: each
answers for itself, labelled ``worker`` with its pid (and ``server`` with the
app server's name). Sum over ``worker`` for the server; a worker that was
replaced (max_requests) starts from zero under a new pid, which Prometheus'
``rate`` and ``increase`` handle as a counter reset.

Who may ask. The proxy forwards every path to the app servers from loopback,
so a loopback peer alone proves nothing. The path is answered only to a
peer on loopback (``REMOTE_ADDR`` 127.0.0.0/8 or ::1) whose request carries
no ``X-Forwarded-For`` (the proxy adds it to every request it forwards) and
no ``Forwarded`` header: a scraper on the host talking to the app server's
own port. Anyone else gets 404, as if the path did not exist, and the app
never sees the request. Any other reverse proxy put on the same host in
front of app servers must add one of those headers too.
Without a cache configured the answer holds only ``tiers_app_worker_info``.
A cluster that cannot be built (a malformed ``TIERS_CACHE_*`` variable) is
reported as a comment in the answer and logged, never an error page.
"""

from __future__ import annotations

import ipaddress
import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from tiers.cache.cluster import CacheCluster
from tiers.cache.env import cluster_from_env
from tiers.errors import TiersError

log = logging.getLogger("tiers.app")

METRICS_PATH = "/_tiers/metrics"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NODE_STATES = ("up", "ejected", "probing")

_NOT_FOUND = b"not found\n"


@dataclass(frozen=True)
class Family:
    """One metric family: name, type, help and samples ``(suffix, labels, value)``.

    ``suffix`` is appended to the name (``_bucket``, ``_sum``, ``_count`` of a
    histogram; empty otherwise).
    """

    name: str
    kind: str
    help: str
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)


def render(families: Iterable[Family]) -> bytes:
    """The Prometheus text format of ``families``."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {family.help}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for suffix, labels, value in family.samples:
            text = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
            name = family.name + suffix + (f"{{{text}}}" if text else "")
            lines.append(f"{name} {_number(value)}")
    return ("\n".join(lines) + "\n").encode() if lines else b""


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return str(int(value)) if float(value).is_integer() else repr(float(value))


_COUNTERS = (
    ("hits", "tiers_cache_hits_total", "Keys found, per node."),
    ("misses", "tiers_cache_misses_total", "Keys asked for and not found, per node."),
    ("errors", "tiers_cache_errors_total",
     "Requests that failed or got an error answer, per node."),
    ("ejections", "tiers_cache_ejections_total", "Times the node was ejected after failures."),
)


def cache_families(stats: Mapping[str, Any], labels: Mapping[str, str]) -> list[Family]:
    """Families for ``CacheCluster.stats()``, every sample carrying ``labels``."""
    counters = {key: Family(name, "counter", text) for key, name, text in _COUNTERS}
    state = Family("tiers_cache_node_state", "gauge",
                   "1 for the node's current state in this worker's failure policy.")
    latency = Family("tiers_cache_request_duration_seconds", "histogram",
                     "Time of each request to the node, connecting included.")
    for pool in ("nodes", "gutter"):
        members: Mapping[str, Mapping[str, Any]] = stats.get(pool) or {}
        for address, node in members.items():
            node_labels = {**labels, "pool": pool, "node": address}
            for key, family in counters.items():
                family.samples.append(("", node_labels, float(node[key])))
            for name in NODE_STATES:
                state.samples.append(("", {**node_labels, "state": name},
                                      1.0 if node["state"] == name else 0.0))
            timing = node["latency"]
            for bound, count in timing["buckets"]:
                latency.samples.append(("_bucket", {**node_labels, "le": bound}, float(count)))
            latency.samples.append(("_sum", node_labels, float(timing["sum"])))
            latency.samples.append(("_count", node_labels, float(timing["count"])))
    unrouted = Family("tiers_cache_unrouted_total", "counter",
                      "Requests no live node could take (every candidate ejected).",
                      [("", dict(labels), float(stats.get("unrouted", 0)))])
    return [*counters.values(), state, latency, unrouted]


def _worker_info(labels: Mapping[str, str]) -> Family:
    return Family("tiers_app_worker_info", "gauge",
                  "The app server and worker pid that answered this scrape.",
                  [("", dict(labels), 1.0)])


def is_loopback(address: object) -> bool:
    """True for an IPv4 127.0.0.0/8 or IPv6 ::1 address (an IPv4-mapped one included)."""
    if not isinstance(address, str) or not address:
        return False
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


def local_request(environ: WSGIEnvironment) -> bool:
    """A request straight from this host: loopback peer, and no proxy said it forwarded it."""
    if "HTTP_X_FORWARDED_FOR" in environ or "HTTP_FORWARDED" in environ:
        return False
    return is_loopback(environ.get("REMOTE_ADDR"))


class MetricsMiddleware:
    """Answer ``GET``/``HEAD`` of ``path`` for local scrapers; pass everything else to ``app``.

    ``server`` names the app server in the labels; ``cache`` gives this
    process's cluster (default ``tiers.cache.cluster_from_env``).
    """

    def __init__(self, app: WSGIApplication, *, server: str = "", path: str = METRICS_PATH,
                 cache: Callable[[], CacheCluster | None] = cluster_from_env) -> None:
        self.app = app
        self.server = server
        self.path = path
        self._cache = cache

    def families(self) -> list[Family]:
        """What a scrape of this worker shows now; ConfigError if the cluster cannot be built."""
        labels = {"server": self.server, "worker": str(os.getpid())}
        families = [_worker_info(labels)]
        cluster = self._cache()
        if cluster is not None:
            families += cache_families(cluster.stats(), labels)
        return families

    def body(self) -> bytes:
        """The scrape's answer; a cluster that cannot be built is a comment in it."""
        try:
            return render(self.families())
        except TiersError as exc:
            log.error("metrics: the cache cluster cannot be built: %s", exc)
            labels = {"server": self.server, "worker": str(os.getpid())}
            reason = " ".join(str(exc).split())
            return render([_worker_info(labels)]) + f"# cache unavailable: {reason}\n".encode()

    def __call__(self, environ: WSGIEnvironment,
                 start_response: StartResponse) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != self.path:
            return self.app(environ, start_response)
        if not local_request(environ):
            return _answer(start_response, "404 Not Found", "text/plain; charset=utf-8",
                           _NOT_FOUND, environ=environ)
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _answer(start_response, "405 Method Not Allowed",
                           "text/plain; charset=utf-8", b"method not allowed\n",
                           environ=environ, extra=[("Allow", "GET, HEAD")])
        return _answer(start_response, "200 OK", CONTENT_TYPE, self.body(), environ=environ)


def _answer(start_response: StartResponse, status: str, content_type: str, body: bytes, *,
            environ: WSGIEnvironment, extra: Sequence[tuple[str, str]] = ()) -> list[bytes]:
    start_response(status, [("Content-Type", content_type),
                            ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store"), *extra])
    return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]
