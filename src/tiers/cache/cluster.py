"""A memcached cluster: keys placed on a ketama ring, failures routed around, copies kept.

``CacheCluster`` sends each key to its node (``tiers.cache.ring``), asks the
failure policy (``tiers.cache.policy``) before every request and tells it
every outcome, and talks to nodes through the narrow ``CacheNode`` protocol:
the blocking one-node client of ``tiers.cache.client`` in service, the
in-memory ``tiers.cache.fake`` in tests. It is safe to share between threads.

Routing. A key goes to its ring owner. While the owner is ejected the key
goes to the next live node clockwise, or, with a gutter pool configured, to
the gutter node its own ring picks, with TTLs capped at ``gutter_ttl``
seconds (Facebook's gutter: a short life bounds the stale data an outage can
leave behind). Keys sent elsewhere during an outage are not moved back: the
owner rejoins with whatever it held before, and a value changed meanwhile
is stale there until its TTL ends. The gutter pool avoids that.

Copies. A rule (per call, or by longest key prefix) can give a key copies:

* ``replicated(R, read=...)``: the same key on the first R distinct nodes
  clockwise. Reads either ask all of them and take the value a majority of
  R holds (``"majority"``; no majority is a miss) or take the first copy
  that hits, in ring order (``"first"``).
* ``hot(D)``: D copies on the first D distinct nodes clockwise, under
  distinct keys (``key``, ``key#1``, ... ``key#D-1``, as IronPlate does);
  a read asks one copy at random, which spreads a hot key's load.

Copies live where the ring puts them whatever the nodes' health: an ejected
copy is skipped, not moved, and counts as not stored.

Errors. Reads (``get``, ``get_many``) turn node errors into misses when
``read_errors_as_misses`` (the default), else raise them. Writes return
whether they took effect; with ``confirm=True`` they raise
``UnconfirmedWrite`` when fewer copies than required answered (all of them,
or a majority with ``write_quorum=Quorum.MAJORITY``; one for a key without
copies), so a write the caller wants confirmed never fails silently.
Without ``confirm`` node errors are swallowed and counted. Invalid keys
(``CacheKeyError``) and values that cannot be encoded (``SerdeError``) are
the caller's mistakes and always raise. ``NodeError`` and ``ProtocolError``
(and an ``OSError`` a client failed to translate) count towards ejection;
``ServerError`` is an answer from a healthy node and only counts as an error.

Batching. ``get_many`` asks each node once for all of its keys, in one
pipelined round as libmemcached does: every node's request is written before
any reply is read, then the replies are read as they arrive (``poll`` on the
connections; ``tiers.cache.client.exchange_all``), so a multi-get costs one
round trip of latency whatever the number of nodes, in the calling thread
and without helper threads. Each node's reply is bounded by the per-socket
``timeout``: a node that sends nothing for that long fails alone, its keys
are misses (by default), the failure counts towards its ejection, and its
connection, whatever half reply it held, is closed, never pooled. A write to
several copies is one such round too. Replicated keys read ``"first"`` that
miss take one more round per copy. Nodes that are not tiers' own ``Client``
(the in-memory ``tiers.cache.fake`` ones) are called one after another.

Threads. Each call takes its connections from the node's idle pool (at most
``max_idle`` kept per node) and gives them back when done, so threads never
share a connection; the pool, counters and failure policy are behind one
lock, held only between requests.

Metrics. ``stats()`` gives per-node hits, misses, errors, ejections, state
and latency (count, sum, histogram) as plain data for ``/metrics``.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol, TypeVar

from tiers.cache.client import Client, Exchange, exchange_all
from tiers.cache.errors import (
    CacheError,
    CacheKeyError,
    NodeError,
    ProtocolError,
    SerdeError,
    ServerError,
)
from tiers.cache.policy import (
    Admission,
    CopyRule,
    FailurePolicy,
    FailureSettings,
    Hot,
    Quorum,
    ReadMode,
    ReadPlan,
    ReadShape,
    Replicated,
    hot,
    replicated,
    required_copies,
)
from tiers.cache.ring import KetamaRing, NodeSpec, PointNames

R = TypeVar("R")

__all__ = [
    "CacheCluster",
    "CacheNode",
    "CopyRule",
    "Hot",
    "NodeFactory",
    "Quorum",
    "ReadMode",
    "Replicated",
    "UnconfirmedWrite",
    "hot",
    "memcached_factory",
    "replicated",
]

# Upper bounds (seconds) of the latency histogram's buckets; the last is +Inf.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
HOT_SEPARATOR = "#"
# What a read survives (a node's failure or error answer, a value that will not decode)
# and what a write does; anything else (an invalid key, a bug) reaches the caller.
_READ_ERRORS: tuple[type[CacheError], ...] = (NodeError, ProtocolError, ServerError, SerdeError)
_WRITE_ERRORS: tuple[type[CacheError], ...] = (NodeError, ProtocolError, ServerError)


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


_MISSING: Any = object()


def _get_one(client: CacheNode, key: str) -> Any:
    """``key``'s value on ``client``, or ``_MISSING``."""
    if type(client) is Client:
        # tiers' own client reads one key without get_many's dict of keys and values.
        return client.get(key, _MISSING)
    return client.get_many([key]).get(key, _MISSING)


class UnconfirmedWrite(CacheError):
    """A write asked to be confirmed reached fewer copies than required.

    ``answered`` copies answered out of ``required``; the cause, when a node
    failed, is the last node error.
    """

    def __init__(self, operation: str, key: str, answered: int, required: int) -> None:
        self.operation = operation
        self.key = key
        self.answered = answered
        self.required = required
        super().__init__(f"{operation} {key!r}: {answered} of {required} required copies answered")


class _Counters:
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


class _Member:
    """One node of a pool: its spec, idle clients and counters."""

    __slots__ = ("counters", "gutter", "idle", "index", "policy", "spec")

    def __init__(self, spec: NodeSpec, index: int, policy: FailurePolicy, gutter: bool) -> None:
        self.spec = spec
        self.index = index
        self.policy = policy
        self.gutter = gutter
        self.idle: deque[CacheNode] = deque()
        self.counters = _Counters()


class _Pool:
    """Nodes on one ring with one failure policy: the main nodes, or the gutter."""

    def __init__(
        self, specs: Sequence[NodeSpec], settings: FailureSettings, names: PointNames, gutter: bool
    ) -> None:
        self.ring = KetamaRing(specs, names)
        self.policy = FailurePolicy(len(specs), settings)
        self.members = [_Member(s, i, self.policy, gutter) for i, s in enumerate(specs)]


class _Target(NamedTuple):
    """One request to make: which node, under which key, with which TTL cap."""

    member: _Member
    key: str
    ttl_cap: int | None = None


# Which members a routing pass found up (True) or must skip (False); see ``_admitted``.
_Admitted = dict[_Member, bool]
# One request of a round (``_each``): the member, the ``CacheNode`` method, its arguments.
_Job = tuple[_Member, str, tuple[Any, ...]]


def _method(operation: str, args: tuple[Any, ...]) -> Callable[[CacheNode], Any]:
    """A call of the ``CacheNode`` method ``operation`` with ``args``."""
    return lambda client: getattr(client, operation)(*args)


def _cap(ttl: int, cap: int | None) -> int:
    if cap is None:
        return ttl
    return cap if ttl <= 0 or ttl > cap else ttl


class CacheCluster:
    """The cache tier as one object: see the module notes for routing, copies and errors."""

    def __init__(
        self,
        nodes: Sequence[NodeSpec],
        client_factory: NodeFactory = memcached_factory,
        *,
        failure: FailureSettings | None = None,
        read_errors_as_misses: bool = True,
        gutter: Sequence[NodeSpec] = (),
        gutter_ttl: int = 10,
        rules: Iterable[tuple[str, CopyRule]] = (),
        write_quorum: Quorum = Quorum.ALL,
        max_idle: int = 8,
        names: PointNames = PointNames.LIBMEMCACHED,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if not nodes:
            raise ValueError("a cache cluster needs at least one node")
        if gutter_ttl < 1:
            raise ValueError("gutter_ttl must be at least one second")
        self.settings = failure or FailureSettings()
        self.read_errors_as_misses = read_errors_as_misses
        self.gutter_ttl = gutter_ttl
        self.write_quorum = write_quorum
        self._factory = client_factory
        self._main = _Pool(nodes, self.settings, names, gutter=False)
        self._gutter = _Pool(gutter, self.settings, names, gutter=True) if gutter else None
        # Longest prefix first, so the most specific rule wins.
        self._rules = sorted(rules, key=lambda rule: len(rule[0]), reverse=True)
        self._max_idle = max_idle
        self._clock = clock
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._unrouted = 0  # requests no live node could take
        self._closed = False

    # ---- lifecycle ---------------------------------------------------------------

    def close(self) -> None:
        """Close idle connections; connections in use are closed when their calls end."""
        with self._lock:
            self._closed = True
            clients = [c for m in self._members() for c in m.idle]
            for m in self._members():
                m.idle.clear()
        for client in clients:
            client.close()

    def __enter__(self) -> CacheCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _members(self) -> list[_Member]:
        gutter = self._gutter.members if self._gutter else []
        return [*self._main.members, *gutter]

    @property
    def nodes(self) -> tuple[NodeSpec, ...]:
        """The main nodes, in ring order of indices."""
        return self._main.ring.nodes

    # ---- deciding where requests go ----------------------------------------------

    def rule_for(self, key: str) -> CopyRule | None:
        """The copy rule of ``key``'s longest matching prefix, if any."""
        for prefix, rule in self._rules:
            if key.startswith(prefix):
                return rule
        return None

    def _admit(self, member: _Member, now: float) -> bool:
        return member.policy.admit(member.index, now) is not Admission.SKIP

    @staticmethod
    def _admitted(member: _Member, now: float, seen: _Admitted) -> bool:
        """``_admit`` once per member and routing pass (under the lock, one ``now``).

        Within a pass the policy's answer for a member cannot change but for
        the probe: an up node stays up, an ejected one is skipped, and the one
        request given a probe is followed by requests that skip the node. So
        the first answer, with a probe remembered as a skip, holds for every
        later key of the pass, and a batch of keys costs one ``admit`` per node.
        """
        known = seen.get(member)
        if known is not None:
            return known
        admission = member.policy.admit(member.index, now)
        seen[member] = admission is Admission.USE
        return admission is not Admission.SKIP

    def _route(self, key: str) -> _Target | None:
        """Where a key without copies goes now: owner, next live node, or the gutter."""
        main = self._main
        owner = main.ring.index_for(key)
        if main.policy.up(owner):
            return _Target(main.members[owner], key)
        now = self._clock()
        with self._lock:
            member = self._route_locked(key, owner, now, {})
        if member is None:
            return None
        return _Target(member, key, self.gutter_ttl if member.gutter else None)

    def _route_locked(self, key: str, owner: int, now: float, seen: _Admitted) -> _Member | None:
        """``_route`` for a key whose ring owner is ``owner``; the caller holds the lock."""
        main = self._main
        member = main.members[owner]
        if self._admitted(member, now, seen):
            return member
        if self._gutter is not None:
            return self._route_gutter(key, now, seen)
        for index in main.ring.walk(key):
            if index != owner:
                member = main.members[index]
                if self._admitted(member, now, seen):
                    return member
        self._unrouted += 1
        return None

    def _route_gutter(self, key: str, now: float, seen: _Admitted) -> _Member | None:
        gutter = self._gutter
        assert gutter is not None
        for index in gutter.ring.walk(key):
            member = gutter.members[index]
            if self._admitted(member, now, seen):
                return member
        self._unrouted += 1
        return None

    def _unroutable(self, key: str) -> NodeError:
        owner = self._main.ring.node_for(key).address
        return NodeError(owner, "ejected, and no live node can take its keys", sent=False)

    def _copies(self, key: str, rule: CopyRule) -> list[_Target]:
        """The live copies of ``key`` under ``rule``, in ring order (ejected ones left out)."""
        now = self._clock()
        main = self._main
        hot_key = isinstance(rule, Hot)
        out: list[_Target] = []
        with self._lock:
            for position, index in enumerate(main.ring.indices_for(key, rule.copies)):
                member = main.members[index]
                if self._admit(member, now):
                    wire = f"{key}{HOT_SEPARATOR}{position}" if hot_key and position else key
                    out.append(_Target(member, wire))
            if not out:
                self._unrouted += 1
        return out

    def _required(self, rule: CopyRule | None) -> int:
        return required_copies(rule, len(self._main.members), self.write_quorum)

    # ---- doing requests ------------------------------------------------------------

    def _call(self, member: _Member, op: Callable[[CacheNode], R]) -> R:
        """Run ``op`` on a pooled client of ``member``, recording outcome and latency."""
        with self._lock:
            client = member.idle.pop() if member.idle else None
        return self._run(member, client, op)

    def _run(self, member: _Member, client: CacheNode | None, op: Callable[[CacheNode], R]) -> R:
        """``_call`` with the client already taken from the pool (None: make one)."""
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

    def _new_client(self, member: _Member) -> CacheNode:
        return self._factory(
            member.spec,
            connect_timeout=self.settings.connect_timeout,
            timeout=self.settings.timeout,
        )

    def _settle(
        self, member: _Member, client: CacheNode | None, elapsed: float, error: BaseException | None
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

    def _release(self, member: _Member, client: CacheNode | None) -> None:
        if client is None:
            return
        with self._lock:
            if not self._closed and len(member.idle) < self._max_idle:
                member.idle.append(client)
                return
        client.close()

    def _count(self, member: _Member, hits: int, misses: int) -> None:
        with self._lock:
            member.counters.hits += hits
            member.counters.misses += misses

    def _each(self, jobs: Sequence[_Job], captured: tuple[type[CacheError], ...]) -> list[Any]:
        """Run one request on each of several members (one job per member).

        The results in order, or for a job that failed its ``captured`` error.
        Jobs on tiers ``Client`` nodes make one pipelined round
        (``tiers.cache.client.exchange_all``): every request is sent before any
        reply is read, so the round costs one round trip of latency across the
        nodes, in this thread. Jobs on other nodes (the in-memory fakes) run
        one after another. Invalid keys and values that cannot be encoded are
        raised before any request of the round is sent; any other exception
        (a bug) is raised once the round is over.
        """
        if len(jobs) == 1:
            member, operation, args = jobs[0]
            try:
                return [self._call(member, _method(operation, args))]
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
                results[position] = self._run(member, clients[position], _method(operation, args))
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

    def _read_failed(self, errors: Sequence[CacheError]) -> None:
        """Raise the last read error unless errors are misses."""
        if errors and not self.read_errors_as_misses:
            raise errors[-1]

    # ---- reads ---------------------------------------------------------------------

    def _plain(self, key: str, copies: CopyRule | None) -> bool:
        """Whether ``key`` has a single copy (no rule, or a rule of one copy)."""
        rule = copies or (self.rule_for(key) if self._rules else None)
        return rule is None or rule.copies == 1

    def get(self, key: str, *, copies: CopyRule | None = None) -> object | None:
        """The value of ``key``, or None on a miss (and, by default, on a node error)."""
        if (copies is not None or self._rules) and not self._plain(key, copies):
            return self.get_many([key], copies=copies).get(key)
        # get_many's plain path, for one key.
        main = self._main
        owner = main.ring.index_for(key)
        member = main.members[owner]
        if not main.policy.up(owner):
            now = self._clock()
            with self._lock:
                routed = self._route_locked(key, owner, now, {})
            if routed is None:
                if not self.read_errors_as_misses:
                    raise self._unroutable(key)
                return None
            member = routed
        try:
            value = self._call(member, lambda client: _get_one(client, key))
        except _READ_ERRORS:
            if self.read_errors_as_misses:
                return None
            raise
        hit = value is not _MISSING
        with self._lock:
            if hit:
                member.counters.hits += 1
            else:
                member.counters.misses += 1
        return value if hit else None

    def get_many(self, keys: Iterable[str], *, copies: CopyRule | None = None) -> dict[str, object]:
        """The values of the keys that hit; one request per node, all in one round trip.

        ``copies`` applies to every key; without it each key's prefix rule does.
        """
        unique = list(dict.fromkeys(keys))
        if copies is None and not self._rules:
            return self._get_plain(unique)
        if copies is not None and copies.copies == 1:
            return self._get_plain(unique)
        if copies is None and all(self._plain(key, None) for key in unique):
            return self._get_plain(unique)
        return self._get_planned(unique, copies)

    def _get_plain(self, keys: list[str]) -> dict[str, object]:
        """``get_many`` of distinct keys that have one copy each: one round, no plans."""
        if not keys:
            return {}
        main = self._main
        members = main.members
        owners = main.ring.indices_for_keys(keys)
        groups: list[list[str]] = [[] for _ in members]
        for key, owner in zip(keys, owners, strict=True):
            groups[owner].append(key)
        batches: dict[_Member, list[str]] = {}
        unroutable: list[str] = []
        up = main.policy.up
        if all(up(index) for index, group in enumerate(groups) if group):
            # Every owner is up, the common case: each node gets its own keys.
            for member, group in zip(members, groups, strict=True):
                if group:
                    batches[member] = group
        else:
            now = self._clock()
            seen: _Admitted = {}
            with self._lock:
                for key, owner in zip(keys, owners, strict=True):
                    routed = self._route_locked(key, owner, now, seen)
                    if routed is None:
                        unroutable.append(key)
                    else:
                        batches.setdefault(routed, []).append(key)
        values: dict[str, object] = {}
        errors: list[CacheError] = []
        if batches:
            asked = list(batches.items())
            jobs = [(member, "get_many", (wire_keys,)) for member, wire_keys in asked]
            results = self._each(jobs, _READ_ERRORS)
            counts: list[tuple[_Member, int, int]] = []
            for (member, wire_keys), result in zip(asked, results, strict=True):
                if isinstance(result, CacheError):
                    errors.append(result)
                    continue
                hits = 0
                for key in wire_keys:
                    if key in result:
                        values[key] = result[key]
                        hits += 1
                counts.append((member, hits, len(wire_keys) - hits))
            with self._lock:
                for member, hits, misses in counts:
                    member.counters.hits += hits
                    member.counters.misses += misses
        if unroutable and not self.read_errors_as_misses:
            raise self._unroutable(unroutable[0])
        if len(values) < len(keys):
            self._read_failed(errors)
        if len(batches) == 1:
            return values  # one node's keys, in the order asked
        return {key: values[key] for key in keys if key in values}

    def _get_planned(self, keys: list[str], copies: CopyRule | None) -> dict[str, object]:
        """``get_many`` where some key has copies: a read plan per key, rounds until settled."""
        plans: dict[str, ReadPlan[_Target]] = {}
        for key in keys:
            plans[key] = self._read_plan(key, copies or self.rule_for(key))
        found: dict[str, object] = {}
        errors: list[CacheError] = []
        while True:
            batches: dict[_Member, dict[str, str]] = {}
            for key, plan in plans.items():
                for target in plan.asking():
                    batches.setdefault(target.member, {})[target.key] = key
            if not batches:
                break
            members = list(batches)
            jobs = [(member, "get_many", (list(batches[member]),)) for member in members]
            for member, result in zip(members, self._each(jobs, _READ_ERRORS), strict=True):
                asked = batches[member]
                if isinstance(result, CacheError):
                    errors.append(result)
                    for key in asked.values():
                        plans[key].failed(member)
                    continue
                hits = 0
                for wire, key in asked.items():
                    if wire in result:
                        hits += 1
                        plans[key].hit(member, result[wire])
                    else:
                        plans[key].missed(member)
                self._count(member, hits, len(asked) - hits)
        for key, plan in plans.items():
            if plan.found:
                found[key] = plan.value
            elif plan.unroutable and not self.read_errors_as_misses:
                raise self._unroutable(key)
        if len(found) < len(plans):
            self._read_failed(errors)
        return found

    def _read_plan(self, key: str, rule: CopyRule | None) -> ReadPlan[_Target]:
        if rule is None or rule.copies == 1:
            target = self._route(key)
            return ReadPlan(ReadShape.ONE, [target] if target else [])
        targets = self._copies(key, rule)
        if isinstance(rule, Hot):
            self._rng.shuffle(targets)
        return ReadPlan.for_rule(rule, targets, len(self._main.members))

    # ---- writes ----------------------------------------------------------------------

    def _targets(self, key: str, copies: CopyRule | None) -> tuple[list[_Target], int]:
        rule = copies or (self.rule_for(key) if self._rules else None)
        if rule is None or rule.copies == 1:
            target = self._route(key)
            return ([target] if target else []), 1
        return self._copies(key, rule), self._required(rule)

    def _write(
        self,
        operation: str,
        key: str,
        copies: CopyRule | None,
        confirm: bool,
        args: Callable[[_Target], tuple[Any, ...]],
    ) -> tuple[list[Any], int]:
        """``operation`` (a ``CacheNode`` method) on every live copy, with ``args(copy)``.

        The answers and the copies required; raises ``UnconfirmedWrite`` if
        ``confirm`` and fewer than required answered. Several copies are
        written in one round (``_each``).
        """
        targets, required = self._targets(key, copies)
        if len(targets) == 1:
            # One copy, the common case: without the round's lists.
            target = targets[0]
            try:
                answers = [self._call(target.member, _method(operation, args(target)))]
            except _WRITE_ERRORS as exc:
                if confirm and required:
                    raise UnconfirmedWrite(operation, key, 0, required) from exc
                return [], required
            if confirm and required > 1:
                raise UnconfirmedWrite(operation, key, 1, required)
            return answers, required
        jobs = [(target.member, operation, args(target)) for target in targets]
        results = self._each(jobs, _WRITE_ERRORS) if jobs else []
        answers = [r for r in results if not isinstance(r, CacheError)]
        failures = [r for r in results if isinstance(r, CacheError)]
        if confirm and len(answers) < required:
            raise UnconfirmedWrite(operation, key, len(answers), required) from (
                failures[-1] if failures else None
            )
        return answers, required

    def set(
        self,
        key: str,
        value: object,
        ttl: int = 0,
        *,
        confirm: bool = False,
        copies: CopyRule | None = None,
    ) -> bool:
        """Store ``value`` under ``key`` for ``ttl`` seconds (0: no expiry) on every copy.

        True when at least the required copies stored it.
        """
        if copies is None and not self._rules:
            main = self._main
            owner = main.ring.index_for(key)
            if main.policy.up(owner):
                # A key without copies on a node that is up, the common case: _write's
                # single-copy path without its routing and lists.
                try:
                    stored: bool = self._call(
                        main.members[owner], lambda client: client.set(key, value, ttl)
                    )
                except _WRITE_ERRORS as exc:
                    if confirm:
                        raise UnconfirmedWrite("set", key, 0, 1) from exc
                    return False
                return stored
        answers, required = self._write(
            "set", key, copies, confirm, lambda t: (t.key, value, _cap(ttl, t.ttl_cap))
        )
        return bool(sum(answers) >= required)

    def add(
        self,
        key: str,
        value: object,
        ttl: int = 0,
        *,
        confirm: bool = False,
        copies: CopyRule | None = None,
    ) -> bool:
        """Store ``value`` only where ``key`` is absent; True when the required copies stored it.

        False when the key exists (or, without ``confirm``, when nodes failed).
        """
        answers, required = self._write(
            "add", key, copies, confirm, lambda t: (t.key, value, _cap(ttl, t.ttl_cap))
        )
        return bool(sum(answers) >= required)

    def delete(self, key: str, *, confirm: bool = False, copies: CopyRule | None = None) -> bool:
        """Remove ``key`` from every live copy; True when some copy held it."""
        answers, _ = self._write("delete", key, copies, confirm, lambda t: (t.key,))
        return any(answers)

    def incr(
        self, key: str, delta: int = 1, *, confirm: bool = False, copies: CopyRule | None = None
    ) -> int | None:
        """Add ``delta`` on every live copy; the first copy's new value, None when absent.

        Copies of a counter may drift apart after an outage: each counts on its own.
        """
        answers, _ = self._write("incr", key, copies, confirm, lambda t: (t.key, delta))
        return next((value for value in answers if value is not None), None)

    def touch(
        self, key: str, ttl: int, *, confirm: bool = False, copies: CopyRule | None = None
    ) -> bool:
        """Give ``key`` a new TTL on every live copy; True when some copy held it."""
        answers, _ = self._write(
            "touch", key, copies, confirm, lambda t: (t.key, _cap(ttl, t.ttl_cap))
        )
        return any(answers)

    # ---- observing ---------------------------------------------------------------------

    def stats(self) -> dict[str, object]:
        """Per-node counters and state as plain data (JSON-ready), for ``/metrics``."""
        now = self._clock()
        with self._lock:
            pools = {"nodes": self._main.members}
            if self._gutter is not None:
                pools["gutter"] = self._gutter.members
            out: dict[str, object] = {"unrouted": self._unrouted}
            for name, members in pools.items():
                out[name] = {m.spec.address: _member_stats(m, now) for m in members}
        return out


def _member_stats(member: _Member, now: float) -> dict[str, object]:
    status = member.policy.status(member.index, now)
    c = member.counters
    cumulative = 0
    buckets: list[tuple[str, int]] = []
    for bound, count in zip((*map(str, LATENCY_BUCKETS), "+Inf"), c.buckets, strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    return {
        "state": status.health.value,
        "weight": member.spec.weight,
        "hits": c.hits,
        "misses": c.misses,
        "errors": c.errors,
        "ejections": status.ejections,
        "failures": status.failures,
        "retry_in": status.retry_in,
        "latency": {"count": c.latency_count, "sum": c.latency_sum, "buckets": buckets},
    }
