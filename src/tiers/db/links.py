"""A cluster's connections to its nodes, kept per thread, and the router's bookkeeping of them.

:class:`NodeLinks` is the lowest layer of :class:`tiers.db.router.Cluster`
(the layers above it: :mod:`tiers.db.topology`, :mod:`tiers.db.reads`,
:mod:`tiers.db.transactions`). It keeps

- each thread's *links*: its connection to each node it has used
  (:class:`Link`), opened lazily and replaced before use when the server
  closed it while idle; a link also remembers the node's replayed position
  as reported on that very session (what :mod:`tiers.db.reads` may rely on);
- the *down marks*, shared by all threads: a node found dead by one thread
  is skipped by the others' reads too, for ``retry_after`` seconds (races
  only cost an extra connect attempt);
- the *served counters*: operations per (node, :class:`Intent`), each thread
  counting in a dict of its own, without a lock.

Processes. Per-process state (the links here, the monitor's thread in
:mod:`tiers.db.topology`) compares its generation with
:data:`fork_generation`, which ``os.register_at_fork`` bumps in a forked
child before any of its code runs, rather than asking ``os.getpid()`` on
every operation. A child starts with no links and no token; the connections
it inherited are never used nor closed there (closing would end the parent's
session on the shared socket), only kept referenced so that garbage
collection does not close them either.
"""

from __future__ import annotations

import enum
import os
import threading
import weakref
from collections import Counter
from collections.abc import Callable, Mapping
from contextlib import suppress

from tiers.db.consistency import DownMark
from tiers.db.engine import Connection, ConnectionWatch, Engine, Position
from tiers.db.errors import Failure, NodeUnavailable
from tiers.db.nodes import Connector, one_line

__all__ = ["Intent", "Link", "NodeLinks", "ThreadState", "fork_generation"]


class Intent(enum.StrEnum):
    """What an operation asked for; the second half of the keys of
    :meth:`tiers.db.router.Cluster.served`."""

    WRITE = "write"
    READ = "read"
    READ_PRIMARY = "read_primary"


fork_generation = 0
"""How many forks this process is away from the one that imported tiers (see the module
docstring); read on every operation, so a plain module global."""

_links_in_process: weakref.WeakSet[NodeLinks] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global fork_generation  # noqa: PLW0603  (read on every operation: a plain global is cheapest)
    fork_generation += 1
    # A thread of the parent may have held these locks at the moment of the
    # fork; in the child nobody would ever release them.
    for links in list(_links_in_process):
        links._renew_locks()


os.register_at_fork(after_in_child=_after_fork_in_child)

_Key = tuple[str, Intent]


class _Tallies:
    """Counts of served operations: each thread counts in a dict of its own, without a lock.

    The lock only guards the list of those dicts. A thread that has ended
    has its counts folded into ``retired`` when a new thread registers, so
    the list stays as long as the live threads. ``reset`` takes the totals
    as a baseline rather than clearing dicts other threads are writing to.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.retired: Counter[_Key] = Counter()
        self.baseline: Counter[_Key] = Counter()
        self.live: list[tuple[threading.Thread, dict[_Key, int]]] = []

    def register(self) -> dict[_Key, int]:
        counts: dict[_Key, int] = {}
        current = threading.current_thread()
        with self.lock:
            keep = []
            for thread, other in self.live:
                if thread.is_alive():
                    keep.append((thread, other))
                else:
                    self.retired.update(other)
            keep.append((current, counts))
            self.live = keep
        return counts

    def totals(self) -> Counter[_Key]:
        with self.lock:
            total = Counter(self.retired)
            for _thread, counts in self.live:
                # dict() copies in one step under the GIL, while the owner goes on counting.
                total.update(dict(counts))
        return total

    def served(self) -> dict[_Key, int]:
        total = self.totals()
        total.subtract(self.baseline)
        return {key: n for key, n in total.items() if n > 0}

    def reset(self) -> None:
        self.baseline = self.totals()


class Link:
    """A thread's connection to one node, with what the router remembers of it.

    ``replayed`` is the highest position the node reported on this very
    session, valid while ``epoch`` is the current one (see
    :mod:`tiers.db.reads`). ``watch`` is set for a connection of the
    engine's own driver (:meth:`tiers.db.engine.Engine.watch`), whose read
    transactions the router ends through it; ``stale`` is its staleness
    check when the router uses its own (None: ask the cluster's ``is_stale``).
    ``autocommit`` mirrors the connection's mode as the router last set it:
    statements that run alone (``query`` on a replica, position checks)
    leave it on, and whatever needs a transaction turns it off again, so a
    run of either kind switches nothing (each switch costs psycopg a few
    microseconds).
    """

    __slots__ = ("autocommit", "conn", "epoch", "replayed", "stale", "watch")

    def __init__(self, conn: Connection, watch: ConnectionWatch | None,
                 stale: Callable[[], bool] | None) -> None:
        self.conn = conn
        self.watch = watch
        self.stale = stale
        self.replayed: Position | None = None
        self.epoch = -1
        self.autocommit = False  # as every Connector hands connections out

    def use_autocommit(self, on: bool) -> None:
        if self.autocommit is not on:
            self.conn.autocommit = on
            self.autocommit = on

    def remember(self, position: Position | None, epoch: int) -> None:
        if position is None:
            return
        if self.epoch != epoch or self.replayed is None or not self.replayed >= position:
            self.replayed = position
            self.epoch = epoch

    def has_replayed(self, wanted: Position, epoch: int) -> bool:
        return self.epoch == epoch and self.replayed is not None and self.replayed >= wanted


class ThreadState(threading.local):
    """One thread's links by node name, its last write token and latest node, its counters."""

    def __init__(self, tallies: _Tallies) -> None:
        self.generation = fork_generation
        self.links: dict[str, Link] = {}
        self.token: str | None = None
        self.last_node: str | None = None
        self.served = tallies.register()


class NodeLinks:
    """The part of a Cluster that connects to its nodes and keeps count (see the module
    docstring); :meth:`_init_links` sets it up."""

    nodes: Mapping[str, str]
    engine: Engine
    connect_timeout: float
    retry_after: float

    def _init_links(self, nodes: Mapping[str, str], engine: Engine, *,
                    connect_timeout: float, retry_after: float, connector: Connector | None,
                    clock: Callable[[], float],
                    is_stale: Callable[[Connection], bool] | None) -> None:
        self.nodes = nodes
        self.engine = engine
        self.connect_timeout = connect_timeout
        self.retry_after = retry_after
        self._connector: Connector = connector if connector is not None else engine.connect
        self._clock = clock
        self._is_stale: Callable[[Connection], bool] = (
            is_stale if is_stale is not None else engine.is_stale)
        self._own_stale_check = is_stale is None
        # What every operation uses, bound once (an attribute lookup per use, no more).
        self._watch = engine.watch
        self._errors = engine.errors
        # What a node's answer may raise: the driver's errors, or a value that does not parse.
        self._answer_errors: tuple[type[BaseException], ...] = (*engine.errors, ValueError)
        self._down: dict[str, DownMark] = {}
        self._tallies = _Tallies()
        self._local = ThreadState(self._tallies)
        self._inherited: list[Connection] = []
        _links_in_process.add(self)

    def _renew_locks(self) -> None:
        """Replace every lock, in a forked child (layers above add theirs)."""
        self._tallies.lock = threading.Lock()

    # -- accounting ----------------------------------------------------------

    @property
    def last_node(self) -> str | None:
        """The node that served this thread's latest operation, if any."""
        return self._state().last_node

    def served(self) -> dict[tuple[str, Intent], int]:
        """How many operations each (node, intent) served, since creation or ``reset_served``."""
        return self._tallies.served()

    def reset_served(self) -> None:
        self._tallies.reset()

    def record(self, node: str, intent: Intent) -> None:
        """Count one operation served by ``node``; integrations call it for their own."""
        self._count(self._state(), node, intent)

    def close(self) -> None:
        """Close the calling thread's connections (they reopen on next use)."""
        state = self._state()
        links, state.links = state.links, {}
        for link in links.values():
            with suppress(*self._errors):
                link.conn.close()

    # -- links ---------------------------------------------------------------

    def _state(self) -> ThreadState:
        state = self._local
        if state.generation != fork_generation:
            self._inherited.extend(link.conn for link in state.links.values())
            state.links = {}
            state.token = None
            state.last_node = None
            state.generation = fork_generation
        return state

    def _checkout(self, state: ThreadState, name: str) -> Link:
        """This thread's open connection to a node; connects if there is none or it went stale.

        Raises NodeUnavailable (and marks the node down) if the connect fails.
        """
        link = state.links.get(name)
        if link is not None:
            check = link.stale
            if not (check() if check is not None else self._is_stale(link.conn)):
                return link
            self._discard(name)
        try:
            conn = self._connector(self.nodes[name], self.connect_timeout)
        except self._errors as exc:
            self._mark_down(name)
            raise NodeUnavailable(name, Failure.NODE_GONE,
                                  f"cannot connect: {one_line(exc)}") from exc
        watch = self._watch(conn)
        link = Link(conn, watch,
                    watch.stale if watch is not None and self._own_stale_check else None)
        state.links[name] = link
        return link

    def _count(self, state: ThreadState, name: str, intent: Intent) -> None:
        key = (name, intent)
        counts = state.served
        counts[key] = counts.get(key, 0) + 1
        state.last_node = name

    def _discard(self, name: str) -> None:
        link = self._state().links.pop(name, None)
        if link is not None:
            with suppress(*self._errors):
                link.conn.close()

    # -- down marks ----------------------------------------------------------

    def _mark_down(self, name: str) -> None:
        self._discard(name)
        now = self._clock()
        self._down[name] = DownMark(since=now, until=now + self.retry_after)

    def _forget_expired_marks(self, now: float) -> None:
        # Reads take the quick path only while no mark is left; an expired one is no mark.
        for name, mark in list(self._down.items()):
            if now >= mark.until and self._down.get(name) is mark:
                self._down.pop(name, None)
