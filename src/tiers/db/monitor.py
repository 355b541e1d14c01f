"""A background thread that probes every database node and publishes their health.

Each round probes all nodes at once (one short-lived thread per probe),
applies :func:`tiers.db.health.update` and publishes the resulting
:class:`~tiers.db.health.ClusterHealth`. That value is immutable and is
swapped in with one assignment, so :meth:`HealthMonitor.snapshot` reads it
from any thread without a lock. Rounds start every ``interval`` seconds, or
back to back when one takes longer.

A round lasts at most ``timeout`` plus a short grace: the real probe keeps
its own deadline, and a probe that has not returned by then (an injected
one that hangs) is reported unreachable. A node whose previous probe is
still running is not probed again until it returns, so a hung probe costs
one thread, not one per round. A probe that raises is reported unreachable
with the exception text; the thread never dies of a probe.

Every change (a node joining or leaving the read pool, a role change, a
newly flagged second primary) is logged on the ``tiers.db`` logger.

Until the first round, every node is NEW and the read pool is empty, so
readers use the primary. Callers read from the primary whenever the read
pool is empty.

Processes that fork (gunicorn's prefork workers): a thread does not survive
``fork``. Build the monitor anywhere, but call :meth:`HealthMonitor.start`
in each worker after the fork (gunicorn's ``post_fork`` hook, or lazily on
first use). ``start`` is idempotent and notices a changed process id: in a
child it starts a fresh thread with fresh locks, and the snapshot the child
inherited stays readable, ageing, until then.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType, TracebackType

from tiers.db.engine import Engine, engine_for_dsns
from tiers.db.health import (
    Check,
    ClusterHealth,
    HealthPolicy,
    NodeHealth,
    NodeObservation,
    update,
)
from tiers.db.nodes import describe_dsn

log = logging.getLogger("tiers.db")

# (dsn, timeout in seconds) -> what the node looked like; must not take much longer.
Probe = Callable[[str, float], NodeObservation]

# How long past its own timeout a probe may take to report before the round gives up on it.
_GRACE = 0.25


def changes(before: ClusterHealth, after: ClusterHealth) -> list[str]:
    """Log lines: role changes, read-pool joins and leaves, newly flagged second primaries."""
    lines = []
    for node in after.nodes:
        try:
            old = before.node(node.name)
        except KeyError:
            old = NodeHealth(node.name)
        if node.role is not old.role:
            lines.append(f"{node.name}: role {old.role.value} -> {node.role.value}")
        if node.in_read_pool != old.in_read_pool:
            verb = "joined" if node.in_read_pool else f"left ({node.reason})"
            lines.append(f"{node.name}: {verb} the read pool")
        if node.check is Check.SECOND_PRIMARY and old.check is not Check.SECOND_PRIMARY:
            lines.append(f"{node.name}: not in recovery while {after.primary or 'another node'} "
                         f"is the primary: a second primary?")
    return lines


@dataclass
class _Job:
    done: threading.Event = field(default_factory=threading.Event)
    result: NodeObservation | None = None


class HealthMonitor:
    """Probe ``nodes`` (name -> DSN) every ``interval`` seconds and keep their health.

    ``policy`` decides lag limits and the fall/rise hysteresis; ``timeout``
    bounds each probe; ``primary`` names the node expected to be the primary,
    which settles the role if two nodes claim it from the first round on.
    ``engine`` is the nodes' engine (default: by the DSNs' scheme); its
    probe is used unless ``probe`` replaces it (for tests). Raises
    ValueError for an empty node map, a ``primary`` that is not one of the
    nodes, a non-positive interval or timeout, or DSNs of an engine tiers
    has no adapter for (UnsupportedEngine) or of several engines.
    """

    def __init__(
        self,
        nodes: Mapping[str, str],
        policy: HealthPolicy | None = None,
        interval: float = 0.25,
        probe: Probe | None = None,
        *,
        timeout: float = 0.5,
        primary: str | None = None,
        engine: Engine | None = None,
    ) -> None:
        if not nodes:
            raise ValueError("no nodes to monitor")
        if primary is not None and primary not in nodes:
            raise ValueError(f"primary {primary!r} is not one of the nodes")
        if interval <= 0 or timeout <= 0:
            raise ValueError("interval and timeout must be positive")
        self.nodes: Mapping[str, str] = MappingProxyType(dict(nodes))
        self.engine = engine if engine is not None else engine_for_dsns(self.nodes.values())
        self.policy = policy if policy is not None else HealthPolicy()
        self.interval = interval
        self.timeout = timeout
        self._probe: Probe = probe if probe is not None else self.engine.probe
        self._snapshot = ClusterHealth.initial(self.nodes, primary)
        self._pid = os.getpid()
        self._fresh_process_state()

    def _fresh_process_state(self) -> None:
        # Everything a fork leaves broken: threads, and locks that a thread of
        # the parent may have held at the moment of the fork.
        self._control = threading.Lock()
        self._round_lock = threading.Lock()
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inflight: dict[str, _Job] = {}

    def _adopt_process(self) -> None:
        pid = os.getpid()
        if pid != self._pid:
            self._pid = pid
            self._fresh_process_state()

    # -- public API --------------------------------------------------------

    def snapshot(self) -> ClusterHealth:
        """The latest published health; lock-free, never blocks."""
        return self._snapshot

    def start(self) -> None:
        """Start the probing thread unless it runs in this process already (idempotent)."""
        self._adopt_process()
        with self._control:
            if self._thread is not None and self._thread.is_alive():
                return
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, args=(self._stop,),
                                            name="tiers-db-health", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Stop the thread and wait for it, at most ``timeout`` seconds (default: one round).

        Returns whether the thread has ended. Safe to call when not started.
        """
        self._adopt_process()
        with self._control:
            thread, self._thread = self._thread, None
            self._stop.set()
        if thread is None:
            return True
        if thread is not threading.current_thread():
            thread.join(timeout if timeout is not None else self.timeout + _GRACE + 1.0)
        return not thread.is_alive()

    @property
    def running(self) -> bool:
        """Whether this process's probing thread is alive."""
        thread = self._thread
        return self._pid == os.getpid() and thread is not None and thread.is_alive()

    def check_now(self) -> ClusterHealth:
        """Run one round in the calling thread, publish it and return it.

        Rounds never overlap: this waits for a round the thread is running.
        """
        self._adopt_process()
        return self._round()

    def wait_for(self, predicate: Callable[[ClusterHealth], bool],
                 timeout: float) -> ClusterHealth | None:
        """The first published health (the current one included) that satisfies ``predicate``.

        Returns None if none did within ``timeout`` seconds. Only waits: rounds
        come from the running thread or from ``check_now`` in another thread.
        """
        self._adopt_process()
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                current = self._snapshot
                if predicate(current):
                    return current
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._changed.wait(remaining)

    def __enter__(self) -> HealthMonitor:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- internals ---------------------------------------------------------

    def _run(self, stop: threading.Event) -> None:
        next_at = time.monotonic()
        # A thread left over from before a restart (or a test's simulated
        # fork) ends at its next wake-up instead of running beside its successor.
        while not stop.is_set() and self._thread is threading.current_thread():
            try:
                self._round()
            except Exception:
                log.exception("database health round failed")
            next_at = max(next_at + self.interval, time.monotonic())
            stop.wait(next_at - time.monotonic())

    def _round(self) -> ClusterHealth:
        with self._round_lock:
            before = self._snapshot
            after = update(before, self._observe_all(), self.policy, self.engine)
            with self._changed:
                self._snapshot = after
                self._changed.notify_all()
        for line in changes(before, after):
            log.info("database health: %s", line)
        return after

    def _observe_all(self) -> list[NodeObservation]:
        jobs: dict[str, _Job] = {}
        for name, dsn in self.nodes.items():
            job = self._inflight.get(name)
            if job is None or job.done.is_set():
                # A finished job still here is one a round gave up on: its answer is stale.
                job = _Job()
                self._inflight[name] = job
                threading.Thread(target=self._run_probe, args=(job, name, dsn),
                                 name=f"tiers-db-probe-{name}", daemon=True).start()
            jobs[name] = job
        deadline = time.monotonic() + self.timeout + _GRACE
        for job in jobs.values():
            job.done.wait(max(0.0, deadline - time.monotonic()))
        observations = []
        for name, job in jobs.items():
            if job.done.is_set() and job.result is not None:
                del self._inflight[name]
                observations.append(job.result)
            else:
                observations.append(NodeObservation(
                    name, describe_dsn(self.nodes[name]), reachable=False,
                    error=f"probe did not return within {self.timeout + _GRACE:g} s",
                    checked_at=time.monotonic()))
        return observations

    def _run_probe(self, job: _Job, name: str, dsn: str) -> None:
        try:
            result = replace(self._probe(dsn, self.timeout), name=name)
        except Exception as exc:
            result = NodeObservation(name, describe_dsn(dsn), reachable=False,
                                     error=f"probe raised {exc!r}", checked_at=time.monotonic())
        job.result = result
        job.done.set()
