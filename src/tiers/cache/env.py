"""The process's cache cluster, built from the environment an app server is given.

``tiers up`` gives every app server ``TIERS_CACHE_NODES``, the cache nodes
as ``host:port`` entries joined by commas (``[v6]:port`` for IPv6; a bare
host means port 11211). Optional settings, each checked when read:

    TIERS_CACHE_TIMEOUT           seconds per socket send or receive (default 0.5)
    TIERS_CACHE_CONNECT_TIMEOUT   seconds to connect (default 0.25)
    TIERS_CACHE_FAILURE_LIMIT     failures in a row that eject a node (default 2)
    TIERS_CACHE_DEAD_TIMEOUT      seconds an ejected node is skipped before one
                                  request probes it (default 2.0)

``cluster_from_env()`` returns the ``CacheCluster`` of the current process,
built on first use and then shared by every thread of the process; None when
``TIERS_CACHE_NODES`` is unset or empty, and the app then runs without a
cache. A malformed entry or setting raises ``ConfigError`` naming the
variable, on every call, so a mistake is never mistaken for "no cache".

Processes. A cluster's pooled connections belong to the process that made
them, and a forked child must not use them. The cluster is
therefore built lazily, in the process that uses it, and built anew when the
pid has changed: an app imported by the gunicorn master before the fork gets
a cluster of its own in each worker. Nothing connects until the first
request; the parent's cluster is left alone in the child (its sockets are
already dropped there by ``tiers.cache.client``).

``close_cluster()`` closes this process's cluster, if built; the next
``cluster_from_env()`` builds a new one from the environment as it is then.
``cluster_from(environ)`` builds a new, unshared cluster from a mapping.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass

from tiers.cache.cluster import CacheCluster
from tiers.cache.nodes import NodeFactory, memcached_factory
from tiers.cache.policy import FailureSettings
from tiers.cache.ring import NodeSpec
from tiers.errors import ConfigError

NODES_ENV = "TIERS_CACHE_NODES"
TIMEOUT_ENV = "TIERS_CACHE_TIMEOUT"
CONNECT_TIMEOUT_ENV = "TIERS_CACHE_CONNECT_TIMEOUT"
FAILURE_LIMIT_ENV = "TIERS_CACHE_FAILURE_LIMIT"
DEAD_TIMEOUT_ENV = "TIERS_CACHE_DEAD_TIMEOUT"

_SOURCE = "environment"


@dataclass(frozen=True)
class CacheSettings:
    """What the environment asks for: the nodes and their failure handling."""

    nodes: tuple[NodeSpec, ...]
    failure: FailureSettings


def parse_nodes(text: str, variable: str = NODES_ENV) -> tuple[NodeSpec, ...]:
    """The nodes in ``text`` (``host:port`` entries joined by commas), in order.

    Blank text gives no nodes. An empty entry, a malformed one or the same
    address twice raises ConfigError naming ``variable`` and the entry.
    """
    if not text.strip():
        return ()
    nodes: list[NodeSpec] = []
    seen: set[str] = set()
    for position, raw in enumerate(text.split(","), start=1):
        entry = raw.strip()
        if not entry:
            raise ConfigError(_SOURCE, variable, f"entry {position} is empty in {text!r}")
        try:
            node = NodeSpec.parse(entry)
        except ValueError as exc:
            raise ConfigError(_SOURCE, variable, f"entry {entry!r}: {exc}") from exc
        if node.address in seen:
            raise ConfigError(_SOURCE, variable, f"{node.address} is listed twice")
        seen.add(node.address)
        nodes.append(node)
    return tuple(nodes)


def _number(
    environ: Mapping[str, str], variable: str, default: float, *, integer: bool = False
) -> float:
    text = environ.get(variable, "").strip()
    if not text:
        return default
    try:
        value = int(text) if integer else float(text)
    except ValueError:
        kind = "a whole number" if integer else "a number of seconds"
        raise ConfigError(_SOURCE, variable, f"expected {kind}, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(_SOURCE, variable, f"must be positive, got {text!r}")
    return value


def settings_from_env(environ: Mapping[str, str] | None = None) -> CacheSettings | None:
    """The settings in ``environ`` (default ``os.environ``); None without nodes.

    Raises ConfigError naming the first variable that is malformed.
    """
    env = os.environ if environ is None else environ
    nodes = parse_nodes(env.get(NODES_ENV, ""))
    if not nodes:
        return None
    defaults = FailureSettings()
    failure = FailureSettings(
        failure_limit=int(_number(env, FAILURE_LIMIT_ENV, defaults.failure_limit, integer=True)),
        dead_timeout=_number(env, DEAD_TIMEOUT_ENV, defaults.dead_timeout),
        connect_timeout=_number(env, CONNECT_TIMEOUT_ENV, defaults.connect_timeout),
        timeout=_number(env, TIMEOUT_ENV, defaults.timeout),
    )
    return CacheSettings(nodes, failure)


def cluster_from(
    environ: Mapping[str, str] | None = None, *, factory: NodeFactory = memcached_factory
) -> CacheCluster | None:
    """A new cluster from ``environ`` (default ``os.environ``), not shared; None without nodes.

    ``factory`` opens node clients (``tiers.cache.fake.FakeNodes`` in tests).
    Raises ConfigError as ``settings_from_env`` does. Connects to nothing.
    """
    settings = settings_from_env(environ)
    if settings is None:
        return None
    return CacheCluster(settings.nodes, factory, failure=settings.failure)


class _ProcessCluster:
    """One cluster per process, made on first use; see the module notes on forking."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = 0
        self._cluster: CacheCluster | None = None

    def get(self) -> CacheCluster | None:
        cluster, pid = self._cluster, os.getpid()
        if cluster is not None and self._pid == pid:
            return cluster
        with self._lock:
            if self._cluster is None or self._pid != pid:
                # Not cached while there is none: "no cache" stays cheap to ask,
                # and a variable set later in the process is seen.
                self._cluster = cluster_from()
                self._pid = pid
            return self._cluster

    def close(self) -> None:
        with self._lock:
            cluster, owned = self._cluster, self._pid == os.getpid()
            self._cluster, self._pid = None, 0
        if cluster is not None and owned:
            cluster.close()


_process = _ProcessCluster()


def cluster_from_env() -> CacheCluster | None:
    """This process's cluster from ``os.environ``, built on first use; None without nodes.

    Every call in one process returns the same cluster; a forked child gets
    its own. Raises ConfigError naming a malformed variable.
    """
    return _process.get()


def close_cluster() -> None:
    """Close this process's cluster, if one was built, and forget it."""
    _process.close()
