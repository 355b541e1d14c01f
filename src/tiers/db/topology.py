"""Which node of a cluster is the primary and which replicas may serve reads, now.

:class:`Topology` is the layer of :class:`tiers.db.router.Cluster` above its
connections (:mod:`tiers.db.links`). The cluster knows every node by name;
the primary given to the constructor is a first guess. With a health monitor
(:class:`tiers.db.monitor.HealthMonitor`), writes go to the monitor's current
primary and reads to its read pool (healthy replicas within the lag limits),
so a failover needs no restart: once another node is the only writable one,
writes go there. While the monitor knows no primary, writes raise
:class:`~tiers.db.errors.NodeUnavailable` at once. Without a monitor the
topology is fixed: every node but the primary may serve reads.

The monitor starts on first use in each process, not when the cluster is
built, so a cluster built in a gunicorn master before the fork works in
every worker: each starts its own monitor thread (a fork is noticed through
:data:`tiers.db.links.fork_generation`). The read pool is built once per
snapshot of the monitor, and counts the changes of the monitor's primary it
has seen: positions remembered before one may belong to another history.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

from tiers.db import links
from tiers.db.consistency import ReplicaView
from tiers.db.errors import Failure, NodeUnavailable
from tiers.db.health import ClusterHealth
from tiers.db.links import Intent, Link, NodeLinks

__all__ = ["HealthSource", "Pool", "Topology"]


class HealthSource(Protocol):
    """What the cluster needs of a health monitor (:class:`tiers.db.monitor.HealthMonitor`)."""

    def snapshot(self) -> ClusterHealth: ...

    def start(self) -> None: ...

    def stop(self, timeout: float | None = None) -> bool: ...

    def check_now(self) -> ClusterHealth: ...


@dataclass(frozen=True, slots=True)
class Pool:
    """The read pool as one health snapshot shows it, built once per snapshot.

    ``epoch`` counts the changes of the monitor's primary seen so far:
    positions remembered under an older epoch may belong to another history.
    """

    snapshot: ClusterHealth | None
    views: tuple[ReplicaView, ...]
    names: tuple[str, ...]
    primary: str | None
    epoch: int


class Topology(NodeLinks):
    """The part of a Cluster that follows its monitor (see the module docstring);
    :meth:`_init_topology` sets it up, after :meth:`_init_links`."""

    primary_hint: str | None
    monitor: HealthSource | None

    def _init_topology(self, primary: str | None, monitor: HealthSource | None) -> None:
        self.primary_hint = primary
        self.monitor = monitor
        self._monitor_lock = threading.Lock()
        self._monitor_generation = -1
        self._pool_lock = threading.Lock()
        # Without a monitor the pool never changes; with one, rebuilt per snapshot.
        replicas = tuple(name for name in self.nodes if name != primary)
        self._pool_cache = Pool(None, tuple(ReplicaView(name) for name in replicas),
                                replicas, primary, 0)

    def _renew_locks(self) -> None:
        super()._renew_locks()
        self._monitor_lock = threading.Lock()
        self._pool_lock = threading.Lock()

    def health(self) -> ClusterHealth | None:
        """The monitor's latest snapshot (None without a monitor); starts the monitor."""
        self._ensure_monitor()
        return None if self.monitor is None else self.monitor.snapshot()

    def primary(self) -> str:
        """The name of the node writes go to now; NodeUnavailable if no node is known as primary."""
        name = self._known_primary()
        if name is None:
            raise NodeUnavailable("primary", Failure.NODE_GONE,
                                  "no node is known to be the primary (failover under way?)")
        return name

    def read_pool(self) -> tuple[str, ...]:
        """The replicas reads may use now, before this router's own down marks."""
        return self._pool().names

    def stop(self) -> None:
        """Close this thread's connections and stop the monitor's thread in this process."""
        self.close()
        if self.monitor is not None:
            self.monitor.stop()
            self._monitor_generation = -1

    # -- the monitor -----------------------------------------------------------

    def _ensure_monitor(self) -> None:
        if self.monitor is not None and self._monitor_generation != links.fork_generation:
            self._start_monitor()

    def _start_monitor(self) -> None:
        monitor = self.monitor
        assert monitor is not None
        with self._monitor_lock:
            generation = links.fork_generation
            if self._monitor_generation != generation:
                monitor.start()
                self._monitor_generation = generation

    def _rediscover(self) -> None:
        """Have the monitor look for the primary at once (a write found it moved)."""
        if self.monitor is not None:
            self.monitor.check_now()

    # -- the primary and the read pool -----------------------------------------

    def _known_primary(self) -> str | None:
        monitor = self.monitor
        if monitor is None:
            return self.primary_hint
        if self._monitor_generation != links.fork_generation:
            self._start_monitor()
        snapshot = monitor.snapshot()
        if snapshot.primary is None and snapshot.rounds == 0:
            snapshot = monitor.check_now()
        return snapshot.primary

    def _checkout_primary(self, intent: Intent) -> tuple[str, Link]:
        """The primary's name and this thread's connection to it, in transaction mode,
        counted as serving ``intent``; NodeUnavailable if it cannot be reached."""
        name = self.primary()
        state = self._state()
        try:
            link = self._checkout(state, name)
        except NodeUnavailable:
            # Nothing was sent, so if the monitor has meanwhile found another
            # primary, that one may be tried; once, to fail fast.
            again = self._known_primary()
            if again is None or again == name:
                raise
            name, link = again, self._checkout(state, again)
        if link.autocommit:
            link.use_autocommit(False)
        self._count(state, name, intent)
        return name, link

    def _pool(self) -> Pool:
        """The read pool of the monitor's latest snapshot (the fixed one without a monitor)."""
        # Every read comes here: the monitor's start is checked inline, as in
        # _known_primary, rather than through one more call.
        monitor = self.monitor
        if monitor is None:
            return self._pool_cache
        if self._monitor_generation != links.fork_generation:
            self._start_monitor()
        snapshot = monitor.snapshot()
        pool = self._pool_cache
        if pool.snapshot is snapshot:
            return pool
        with self._pool_lock:
            # Under the lock, so that each snapshot is compared with the one
            # before it and no thread puts back an older pool.
            pool = self._pool_cache
            if pool.snapshot is not snapshot:
                pool = self._rebuild_pool(snapshot, pool)
                self._pool_cache = pool
            return pool

    def _rebuild_pool(self, snapshot: ClusterHealth, before: Pool) -> Pool:
        views = []
        for node in snapshot.nodes:
            if not node.in_read_pool or node.name not in self.nodes:
                continue
            last = node.last
            if last is None:
                views.append(ReplicaView(node.name))
            else:
                views.append(ReplicaView(node.name, last.position, last.replay_lag_seconds,
                                         last.checked_at))
        moved = before.snapshot is not None and snapshot.primary != before.primary
        return Pool(snapshot, tuple(views), tuple(view.name for view in views),
                    snapshot.primary, before.epoch + moved)
