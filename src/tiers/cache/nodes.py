"""The cluster's nodes: what it needs of one, what it keeps per node, and requests to them.

``CacheNode`` is the narrow interface ``tiers.cache.cluster`` talks to a node
through: the blocking one-node ``tiers.cache.client.Client`` in service
(``memcached_factory``), the in-memory ``tiers.cache.fake`` nodes in tests.
A ``Pool`` is the nodes on one ring with one failure policy (the main nodes,
or the gutter); each ``Member`` of it holds its node's idle connections and
counters (hits, misses, errors, a latency histogram), and gives them as
plain data with ``stats``.

``Dispatcher`` runs the cluster's requests on members. A request takes an
idle connection (or opens one), runs, and records how it ended: its latency,
and for the failure policy (``tiers.cache.policy``) a success or a failure.
A node failure (``NodeError``, ``ProtocolError``, an ``OSError`` a client
failed to translate) closes the connection and counts towards ejection; an
error answer (``ServerError``) is an error of a healthy node; the caller's
own mistakes (``CacheKeyError``, ``SerdeError``) are not recorded. A
connection not closed goes back to the idle pool (at most ``max_idle`` per
node). ``each`` runs one request on each of several members: on tiers'
``Client`` nodes in one pipelined round (``tiers.cache.rounds``), every
request sent before any reply is read, in the calling thread; on other
nodes one after another.

Threads. A request has its connection to itself, so threads never share
one. The idle pools, counters and failure policies are behind one lock,
which the routing (``tiers.cache.routing``) shares and which is held only
between requests.
"""

from __future__ import annotations

import contextlib
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol, TypeVar

from tiers.cache.client import Client
from tiers.cache.errors import CacheError, CacheKeyError, NodeError, ProtocolError, SerdeError
from tiers.cache.policy import FailurePolicy, FailureSettings
from tiers.cache.ring import KetamaRing, NodeSpec, PointNames
from tiers.cache.rounds import Exchange, exchange_all

R = TypeVar("R")

# Upper bounds (seconds) of the latency histogram's buckets; the last is +Inf.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class CacheNode(Protocol):
    """One connection's worth of a memcached node, as the cluster uses it.

    ``tiers.cache.client.Client`` is one. Every method raises
    ``tiers.cache.errors.NodeError`` (or ``ProtocolError``) when the node
    cannot be reached, times out or answers garbage, and ``ServerError`` when
    it answers with an error line. A miss is not an error. TTLs are
    memcached's: seconds, 0 for none, above 30 days a Unix time.
    """

    def get_many(self, keys: Sequence[str], /) -> Mapping[str | bytes, Any]:
        """The values of the keys present, under the keys as given; absent keys left out."""
        ...

    def set(self, key: str, value: Any, ttl: int = 0, /) -> bool: ...

    def add(self, key: str, value: Any, ttl: int = 0, /) -> bool:
        """Store only if absent; False when the key exists."""
        ...

    def delete(self, key: str, /) -> bool:
        """False when the key was absent."""
        ...

    def incr(self, key: str, delta: int = 1, /) -> int | None:
        """The new value, or None when the key is absent."""
        ...

    def touch(self, key: str, ttl: int, /) -> bool:
        """Give the key a new TTL; False when absent."""
        ...

    def close(self) -> None: ...


class NodeFactory(Protocol):
    """Opens a client for one node with the cluster's timeouts (connecting lazily or not)."""

    def __call__(self, spec: NodeSpec, *, connect_timeout: float, timeout: float) -> CacheNode: ...


def memcached_factory(spec: NodeSpec, *, connect_timeout: float, timeout: float) -> CacheNode:
    """The real thing: a ``tiers.cache.client.Client`` (default serde) for ``spec``."""
    return Client(spec.host, spec.port, connect_timeout=connect_timeout, timeout=timeout)


MISSING: Any = object()


def get_one(client: CacheNode, key: str) -> Any:
    """``key``'s value on ``client``, or ``MISSING``."""
    if type(client) is Client:
        # tiers' own client reads one key without get_many's dict of keys and values.
        return client.get(key, MISSING)
    return client.get_many([key]).get(key, MISSING)


def method_call(operation: str, args: tuple[Any, ...]) -> Callable[[CacheNode], Any]:
    """A call of the ``CacheNode`` method ``operation`` with ``args``."""
    return lambda client: getattr(client, operation)(*args)


class Counters:
    """What a member's requests came to: hits, misses, errors and latency."""

    __slots__ = ("buckets", "errors", "hits", "latency_count", "latency_sum", "misses")

    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0
        self.errors = 0
        self.latency_sum = 0.0
        self.latency_count = 0
        self.buckets = [0] * (len(LATENCY_BUCKETS) + 1)

    def observe(self, seconds: float) -> None:
        self.latency_sum += seconds
        self.latency_count += 1
        # The first bucket whose bound is >= seconds; past the last bound, +Inf.
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1


class Member:
    """One node of a pool: its spec, idle clients and counters."""

    __slots__ = ("counters", "gutter", "idle", "index", "policy", "spec")

    def __init__(self, spec: NodeSpec, index: int, policy: FailurePolicy, gutter: bool) -> None:
        self.spec = spec
        self.index = index
        self.policy = policy
        self.gutter = gutter
        self.idle: deque[CacheNode] = deque()
        self.counters = Counters()

    def stats(self, now: float) -> dict[str, object]:
        """Counters and failure state as plain data; the caller holds the cluster's lock."""
        status = self.policy.status(self.index, now)
        c = self.counters
        cumulative = 0
        buckets: list[tuple[str, int]] = []
        for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), c.buckets, strict=True):
            cumulative += count
            buckets.append((bound, cumulative))
        return {
            "state": status.health.value,
            "weight": self.spec.weight,
            "hits": c.hits,
            "misses": c.misses,
            "errors": c.errors,
            "ejections": status.ejections,
            "failures": status.failures,
            "retry_in": status.retry_in,
            "latency": {"count": c.latency_count, "sum": c.latency_sum, "buckets": buckets},
        }


class Pool:
    """Nodes on one ring with one failure policy: the main nodes, or the gutter."""

    def __init__(
        self, specs: Sequence[NodeSpec], settings: FailureSettings, names: PointNames, gutter: bool
    ) -> None:
        self.ring = KetamaRing(specs, names)
        self.policy = FailurePolicy(len(specs), settings)
        self.members = [Member(s, i, self.policy, gutter) for i, s in enumerate(specs)]


# One request of a round (``Dispatcher.each``): the member, the ``CacheNode`` method, its
# arguments.
Job = tuple[Member, str, tuple[Any, ...]]


class Dispatcher:
    """Runs requests on members over pooled connections; see the module notes."""

    def __init__(
        self,
        factory: NodeFactory,
        settings: FailureSettings,
        *,
        max_idle: int,
        lock: threading.Lock,
        clock: Callable[[], float],
    ) -> None:
        self._factory = factory
        self.settings = settings
        self._max_idle = max_idle
        self._lock = lock
        self._clock = clock
        self._closed = False

    def close(self, members: Sequence[Member]) -> None:
        """Close the idle connections and pool no more; connections in use close when done."""
        with self._lock:
            self._closed = True
            clients = [c for m in members for c in m.idle]
            for m in members:
                m.idle.clear()
        for client in clients:
            client.close()

    def call(self, member: Member, op: Callable[[CacheNode], R]) -> R:
        """Run ``op`` on a pooled client of ``member``, recording outcome and latency."""
        with self._lock:
            client = member.idle.pop() if member.idle else None
        return self._run(member, client, op)

    def count_hit(self, member: Member, hit: bool) -> None:
        """Count one key read from ``member``: a hit, or a miss."""
        with self._lock:
            if hit:
                member.counters.hits += 1
            else:
                member.counters.misses += 1

    def count(self, counts: Iterable[tuple[Member, int, int]]) -> None:
        """Add ``(member, hits, misses)`` to the members' counters."""
        with self._lock:
            for member, hits, misses in counts:
                member.counters.hits += hits
                member.counters.misses += misses

    def each(self, jobs: Sequence[Job], captured: tuple[type[CacheError], ...]) -> list[Any]:
        """Run one request on each of several members (one job per member).

        The results in order, or for a job that failed its ``captured`` error.
        Jobs on tiers ``Client`` nodes make one pipelined round
        (``tiers.cache.rounds.exchange_all``): every request is sent before any
        reply is read, so the round costs one round trip of latency across the
        nodes, in this thread. Jobs on other nodes (the in-memory fakes) run
        one after another. Invalid keys and values that cannot be encoded are
        raised before any request of the round is sent; any other exception
        (a bug) is raised once the round is over.
        """
        if len(jobs) == 1:
            member, operation, args = jobs[0]
            try:
                return [self.call(member, method_call(operation, args))]
            except captured as exc:
                return [exc]
        clients: list[CacheNode | None] = []
        with self._lock:
            for member, _, _ in jobs:
                clients.append(member.idle.pop() if member.idle else None)
        results: list[Any] = [None] * len(jobs)
        exchanges: list[tuple[int, Exchange]] = []
        try:
            for position, (member, operation, args) in enumerate(jobs):
                client = clients[position]
                if client is None:
                    # A factory that fails is left to _run, which records the failure.
                    with contextlib.suppress(NodeError, ProtocolError, OSError):
                        client = clients[position] = self._new_client(member)
                if isinstance(client, Client):
                    exchanges.append((position, client.prepare(operation, *args)))
        except BaseException:
            # Nothing was sent: the clients go back as they were.
            for (member, _, _), client in zip(jobs, clients, strict=True):
                self._release(member, client)
            raise
        start = time.perf_counter()
        if exchanges:
            try:
                exchange_all([exchange for _, exchange in exchanges])
            except BaseException:
                for client in clients:
                    if client is not None:
                        client.close()
                raise
        raised: BaseException | None = None
        for position, exchange in exchanges:
            member = jobs[position][0]
            error = exchange.error
            self._settle(member, exchange.client, exchange.done - start, error)
            if error is None:
                results[position] = exchange.result
            elif isinstance(error, captured):
                results[position] = error
            else:
                raised = raised or error
        done = {position for position, _ in exchanges}
        rest = [position for position in range(len(jobs)) if position not in done]
        for index, position in enumerate(rest):
            member, operation, args = jobs[position]
            try:
                results[position] = self._run(
                    member, clients[position], method_call(operation, args)
                )
            except captured as exc:
                results[position] = exc
            except Exception as exc:
                raised = raised or exc
            except BaseException:
                for later in rest[index + 1 :]:
                    self._release(jobs[later][0], clients[later])
                raise
        if raised is not None:
            raise raised
        return results

    def _run(self, member: Member, client: CacheNode | None, op: Callable[[CacheNode], R]) -> R:
        """``call`` with the client already taken from the pool (None: make one)."""
        start = time.perf_counter()
        try:
            if client is None:
                client = self._new_client(member)
            result = op(client)
        except (NodeError, ProtocolError, OSError) as exc:
            # The connection is in an unknown state: closed, not pooled.
            self._settle(member, client, time.perf_counter() - start, exc)
            if isinstance(exc, OSError):
                raise NodeError(member.spec.address, str(exc) or type(exc).__name__) from exc
            raise
        except CacheError as exc:
            # The caller's mistake, or an answer (ServerError): the connection is in step.
            self._settle(member, client, time.perf_counter() - start, exc)
            raise
        except BaseException:
            if client is not None:
                client.close()
            raise
        self._settle(member, client, time.perf_counter() - start, None)
        return result

    def _new_client(self, member: Member) -> CacheNode:
        return self._factory(
            member.spec,
            connect_timeout=self.settings.connect_timeout,
            timeout=self.settings.timeout,
        )

    def _settle(
        self, member: Member, client: CacheNode | None, elapsed: float, error: BaseException | None
    ) -> None:
        """Record how a request to ``member`` ended and pool its client again.

        ``error`` None is a success. A node failure (``NodeError``,
        ``ProtocolError``, an ``OSError``) closes the client and counts towards
        ejection; an answer (``ServerError``) counts as an error of a healthy
        node; the caller's own mistakes (``CacheKeyError``, ``SerdeError``)
        are not recorded at all.
        """
        failed = isinstance(error, NodeError | ProtocolError | OSError)
        counted = error is None or failed or not isinstance(error, CacheKeyError | SerdeError)
        now = self._clock() if counted else 0.0
        with self._lock:
            pooled = not failed and not self._closed and len(member.idle) < self._max_idle
            if pooled and client is not None:
                member.idle.append(client)
            if counted:
                counters = member.counters
                counters.observe(elapsed)
                if error is not None:
                    counters.errors += 1
                if failed:
                    member.policy.failed(member.index, now)
                else:
                    member.policy.succeeded(member.index, now)
        if not pooled and client is not None:
            client.close()

    def _release(self, member: Member, client: CacheNode | None) -> None:
        if client is None:
            return
        with self._lock:
            if not self._closed and len(member.idle) < self._max_idle:
                member.idle.append(client)
                return
        client.close()
