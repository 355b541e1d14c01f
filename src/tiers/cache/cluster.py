"""A memcached cluster: keys placed on a ketama ring, failures routed around, copies kept.

``CacheCluster`` sends each key to its node (``tiers.cache.ring``), asks the
failure policy (``tiers.cache.policy``) before every request and tells it
every outcome, and talks to nodes through the narrow ``CacheNode`` protocol:
the blocking one-node client of ``tiers.cache.client`` in service, the
in-memory ``tiers.cache.fake`` in tests. It is safe to share between threads.

This module is the cluster's API: what reads and writes do with the answers,
what they return and raise. Where each request goes (owner, failover,
gutter, copies) is decided in ``tiers.cache.routing``; running requests on
pooled connections, recording their outcomes and the per-node counters are
``tiers.cache.nodes``.

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
connections; ``tiers.cache.rounds``), so a multi-get costs one round trip
of latency whatever the number of nodes, in the calling thread and without
helper threads. Each node's reply is bounded by the per-socket ``timeout``:
a node that sends nothing for that long fails alone, its keys are misses
(by default), the failure counts towards its ejection, and its connection,
whatever half reply it held, is closed, never pooled. A write to several
copies is one such round too. Replicated keys read ``"first"`` that
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

import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from tiers.cache.errors import (
    CacheError,
    NodeError,
    ProtocolError,
    SerdeError,
    ServerError,
)
from tiers.cache.nodes import (
    MISSING,
    CacheNode,
    Dispatcher,
    Member,
    NodeFactory,
    Pool,
    get_one,
    memcached_factory,
    method_call,
)
from tiers.cache.policy import (
    CopyRule,
    FailureSettings,
    Hot,
    Quorum,
    ReadMode,
    ReadPlan,
    Replicated,
    hot,
    replicated,
    required_copies,
)
from tiers.cache.ring import NodeSpec, PointNames
from tiers.cache.routing import Admitted, Router, Target, cap_ttl

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

# What a read survives (a node's failure or error answer, a value that will not decode)
# and what a write does; anything else (an invalid key, a bug) reaches the caller.
_READ_ERRORS: tuple[type[CacheError], ...] = (NodeError, ProtocolError, ServerError, SerdeError)
_WRITE_ERRORS: tuple[type[CacheError], ...] = (NodeError, ProtocolError, ServerError)


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
        settings = failure or FailureSettings()
        self.read_errors_as_misses = read_errors_as_misses
        self.write_quorum = write_quorum
        self._main = Pool(nodes, settings, names, gutter=False)
        self._gutter = Pool(gutter, settings, names, gutter=True) if gutter else None
        self._clock = clock
        # One lock for routing and dispatching: the failure policies, idle pools and
        # counters they share are behind it.
        self._lock = threading.Lock()
        self._router = Router(
            self._main,
            self._gutter,
            rules,
            gutter_ttl=gutter_ttl,
            lock=self._lock,
            clock=clock,
            rng=rng or random.Random(),
        )
        self._dispatch = Dispatcher(
            client_factory, settings, max_idle=max_idle, lock=self._lock, clock=clock
        )

    # ---- lifecycle ---------------------------------------------------------------

    def close(self) -> None:
        """Close idle connections; connections in use are closed when their calls end."""
        self._dispatch.close(self._members())

    def __enter__(self) -> CacheCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _members(self) -> list[Member]:
        gutter = self._gutter.members if self._gutter else []
        return [*self._main.members, *gutter]

    @property
    def nodes(self) -> tuple[NodeSpec, ...]:
        """The main nodes, in ring order of indices."""
        return self._main.ring.nodes

    @property
    def settings(self) -> FailureSettings:
        """The failure handling and timeouts the cluster was made with."""
        return self._dispatch.settings

    @property
    def gutter_ttl(self) -> int:
        """The longest TTL, in seconds, of a key stored on the gutter pool."""
        return self._router.gutter_ttl

    def rule_for(self, key: str) -> CopyRule | None:
        """The copy rule of ``key``'s longest matching prefix, if any."""
        return self._router.rule_for(key)

    def _read_failed(self, errors: Sequence[CacheError]) -> None:
        """Raise the last read error unless errors are misses."""
        if errors and not self.read_errors_as_misses:
            raise errors[-1]

    # ---- reads ---------------------------------------------------------------------

    def get(self, key: str, *, copies: CopyRule | None = None) -> object | None:
        """The value of ``key``, or None on a miss (and, by default, on a node error)."""
        router = self._router
        if (copies is not None or router.rules) and not router.plain(key, copies):
            return self.get_many([key], copies=copies).get(key)
        # get_many's plain path, for one key.
        main = self._main
        owner = main.ring.index_for(key)
        member = main.members[owner]
        if not main.policy.up(owner):
            now = self._clock()
            with self._lock:
                routed = router.route_locked(key, owner, now, {})
            if routed is None:
                if not self.read_errors_as_misses:
                    raise router.unroutable(key)
                return None
            member = routed
        try:
            value = self._dispatch.call(member, lambda client: get_one(client, key))
        except _READ_ERRORS:
            if self.read_errors_as_misses:
                return None
            raise
        hit = value is not MISSING
        self._dispatch.count_hit(member, hit)
        return value if hit else None

    def get_many(self, keys: Iterable[str], *, copies: CopyRule | None = None) -> dict[str, object]:
        """The values of the keys that hit; one request per node, all in one round trip.

        ``copies`` applies to every key; without it each key's prefix rule does.
        """
        unique = list(dict.fromkeys(keys))
        router = self._router
        if copies is None and not router.rules:
            return self._get_plain(unique)
        if copies is not None and copies.copies == 1:
            return self._get_plain(unique)
        if copies is None and all(router.plain(key, None) for key in unique):
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
        batches: dict[Member, list[str]] = {}
        unroutable: list[str] = []
        up = main.policy.up
        if all(up(index) for index, group in enumerate(groups) if group):
            # Every owner is up, the common case: each node gets its own keys.
            for member, group in zip(members, groups, strict=True):
                if group:
                    batches[member] = group
        else:
            now = self._clock()
            seen: Admitted = {}
            with self._lock:
                for key, owner in zip(keys, owners, strict=True):
                    routed = self._router.route_locked(key, owner, now, seen)
                    if routed is None:
                        unroutable.append(key)
                    else:
                        batches.setdefault(routed, []).append(key)
        values: dict[str, object] = {}
        errors: list[CacheError] = []
        if batches:
            asked = list(batches.items())
            jobs = [(member, "get_many", (wire_keys,)) for member, wire_keys in asked]
            results = self._dispatch.each(jobs, _READ_ERRORS)
            counts: list[tuple[Member, int, int]] = []
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
            self._dispatch.count(counts)
        if unroutable and not self.read_errors_as_misses:
            raise self._router.unroutable(unroutable[0])
        if len(values) < len(keys):
            self._read_failed(errors)
        if len(batches) == 1:
            return values  # one node's keys, in the order asked
        return {key: values[key] for key in keys if key in values}

    def _get_planned(self, keys: list[str], copies: CopyRule | None) -> dict[str, object]:
        """``get_many`` where some key has copies: a read plan per key, rounds until settled."""
        router = self._router
        plans: dict[str, ReadPlan[Target]] = {}
        for key in keys:
            plans[key] = router.read_plan(key, copies or router.rule_for(key))
        found: dict[str, object] = {}
        errors: list[CacheError] = []
        while True:
            batches: dict[Member, dict[str, str]] = {}
            for key, plan in plans.items():
                for target in plan.asking():
                    batches.setdefault(target.member, {})[target.key] = key
            if not batches:
                break
            members = list(batches)
            jobs = [(member, "get_many", (list(batches[member]),)) for member in members]
            results = self._dispatch.each(jobs, _READ_ERRORS)
            counts: list[tuple[Member, int, int]] = []
            for member, result in zip(members, results, strict=True):
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
                counts.append((member, hits, len(asked) - hits))
            self._dispatch.count(counts)
        for key, plan in plans.items():
            if plan.found:
                found[key] = plan.value
            elif plan.unroutable and not self.read_errors_as_misses:
                raise router.unroutable(key)
        if len(found) < len(plans):
            self._read_failed(errors)
        return found

    # ---- writes ----------------------------------------------------------------------

    def _targets(self, key: str, copies: CopyRule | None) -> tuple[list[Target], int]:
        """The live copies a write of ``key`` goes to, and how many must answer."""
        router = self._router
        rule = router.rule(key, copies)
        if rule is None or rule.copies == 1:
            target = router.route(key)
            return ([target] if target else []), 1
        required = required_copies(rule, len(self._main.members), self.write_quorum)
        return router.copies(key, rule), required

    def _write(
        self,
        operation: str,
        key: str,
        copies: CopyRule | None,
        confirm: bool,
        args: Callable[[Target], tuple[Any, ...]],
    ) -> tuple[list[Any], int]:
        """``operation`` (a ``CacheNode`` method) on every live copy, with ``args(copy)``.

        The answers and the copies required; raises ``UnconfirmedWrite`` if
        ``confirm`` and fewer than required answered. Several copies are
        written in one round (``Dispatcher.each``).
        """
        targets, required = self._targets(key, copies)
        if len(targets) == 1:
            # One copy, the common case: without the round's lists.
            target = targets[0]
            try:
                call = method_call(operation, args(target))
                answers = [self._dispatch.call(target.member, call)]
            except _WRITE_ERRORS as exc:
                if confirm and required:
                    raise UnconfirmedWrite(operation, key, 0, required) from exc
                return [], required
            if confirm and required > 1:
                raise UnconfirmedWrite(operation, key, 1, required)
            return answers, required
        jobs = [(target.member, operation, args(target)) for target in targets]
        results = self._dispatch.each(jobs, _WRITE_ERRORS) if jobs else []
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
        if copies is None and not self._router.rules:
            main = self._main
            owner = main.ring.index_for(key)
            if main.policy.up(owner):
                # A key without copies on a node that is up, the common case: _write's
                # single-copy path without its routing and lists.
                try:
                    stored: bool = self._dispatch.call(
                        main.members[owner], lambda client: client.set(key, value, ttl)
                    )
                except _WRITE_ERRORS as exc:
                    if confirm:
                        raise UnconfirmedWrite("set", key, 0, 1) from exc
                    return False
                return stored
        answers, required = self._write(
            "set", key, copies, confirm, lambda t: (t.key, value, cap_ttl(ttl, t.ttl_cap))
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
            "add", key, copies, confirm, lambda t: (t.key, value, cap_ttl(ttl, t.ttl_cap))
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
            "touch", key, copies, confirm, lambda t: (t.key, cap_ttl(ttl, t.ttl_cap))
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
            out: dict[str, object] = {"unrouted": self._router.unrouted}
            for name, members in pools.items():
                out[name] = {m.spec.address: m.stats(now) for m in members}
        return out
