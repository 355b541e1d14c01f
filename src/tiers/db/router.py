"""Read/write routing for application code: :class:`Cluster` hands out connections by intent.

    write()            a transaction on the primary; commits on a clean exit and
                       records the causal token (the primary's position after it)
    read(token, max_staleness=...)
                       a replica that satisfies the consistency asked for, else the primary
    read_primary()     the primary, for reads that must see everything committed
    query(sql, ...)    one read statement, retried once on another node if its node is gone

Consistency of ``read`` (the rules are pure functions in
:mod:`tiers.db.consistency`): with a causal token, a replica that has replayed
it; one is waited for up to ``causal_wait`` seconds by polling its replayed
position (PostgreSQL: ``pg_last_wal_replay_lsn()``), then the primary serves
the read. A replica the monitor last measured lagging by more than
``causal_wait`` is asked once but not waited for. Without a token argument
the current request scope's token *for this cluster* is used
(:func:`tiers.db.tokens.current_token` with the cluster's :attr:`Cluster.name`,
set by the WSGI middleware :mod:`tiers.app.causal`), or none if the scope has
no entry for it; ``token=None`` asks for no consistency at all, any healthy
replica. A token passed explicitly must be one this cluster made: positions
of different clusters are unrelated numbers. Every commit records its token
under the cluster's name in the scope, leaving other clusters' entries alone
(:func:`tiers.db.tokens.note_write`). ``max_staleness`` asks for a replica
whose replay lag, as the monitor measured it, is under that many seconds.
:mod:`tiers.db.pinning` has the common alternative recipe (after a write,
read from the primary for a fixed time), for comparison.

Engines. Everything engine-specific (connecting, positions and tokens,
error classification, ending a read transaction) goes through the cluster's
:class:`tiers.db.engine.Engine`, chosen from the nodes' DSNs unless given;
PostgreSQL's is :mod:`tiers.db.postgres`. The router binds what it uses on
every read once, when it is built. The texts below name PostgreSQL's
behaviour where an engine decides it.

Topology. The cluster knows every node by name; the primary given to the
constructor is a first guess. With a health monitor
(:class:`tiers.db.monitor.HealthMonitor`), writes go to the monitor's
current primary and reads to its read pool (healthy replicas within the lag
limits), so a failover needs no restart: once another node is the only
writable one, writes go there. While the monitor knows no primary, writes
raise :class:`~tiers.db.errors.NodeUnavailable` at once. Without a monitor
the topology is fixed: every node but the primary may serve reads.

Failures. A node that fails under the router is handled by what the error
says (:func:`tiers.db.errors.classify`, by the engine's table): *gone*
drops the connection, marks the node down for reads (for ``retry_after``
seconds, or until the monitor sees it answer again) and raises
NodeUnavailable; the router's own steps (connecting, checking a position)
send nothing of the caller's work, so there it tries the next node instead,
and ``query`` retries its statement once. *Not the primary* on a write
drops the connection, makes the monitor check every node at once, and raises
NodeUnavailable: a write whose outcome is unknown is never replayed. A
commit that fails because the node is gone, or whose node is gone before its
position could be read, raises NodeUnavailable saying the outcome is
unknown. Other errors raised by the caller's statements propagate unchanged
(the app may catch ``psycopg.errors.UniqueViolation``), and the transaction
is rolled back.

Round trips. A read block is a transaction: psycopg sends BEGIN before its
first statement (a round trip of its own; a block that sends nothing costs
nothing) and the router rolls it back at the end. On a replica it sends
that ROLLBACK itself rather than through ``conn.rollback()``, which would
also drop the statements psycopg prepared on the session: a hot standby's
transaction cannot change the schema, so they stay valid, and repeated
statements are parsed and planned once per connection, as in autocommit.
The transaction is READ COMMITTED, the server's default: each statement of a
block sees the data as of its own start. ``query`` on a replica runs its one
statement in autocommit, a single round trip; on the primary it keeps the
transaction that is rolled back, since there a statement could write.

Remembered positions. Each of a thread's connections to a replica
remembers the highest replay position it reported, so a causal read whose
token is at or below it is served there without asking again. That is safe
because the read then runs on that very session: a server's replayed
history is only ever cut back (pg_rewind, a new base backup) while it is
stopped, which ends every session, so as long as the session lives the
position stays replayed; if it died, the read fails instead of reading
stale data. A connection replaced for any reason starts with nothing
remembered, and a change of the monitor's primary (a failover: the only
time history forks) forgets every position remembered before it.
:meth:`Cluster.read_node`, whose caller reads on a connection of its own,
never relies on a remembered position.

Processes and threads. Connections are per thread and opened lazily; a
connection found closed by the server while idle is replaced before use.
Nothing connects and no monitor thread starts until first use in a process,
so a cluster built in a gunicorn master before the fork works in every
worker: each starts its own monitor thread on first use. A fork is noticed
through ``os.register_at_fork`` (a fork that bypasses Python's hooks, as a
C library calling ``fork()`` itself might, is not). Do not nest read or
write blocks on one thread: a read served by the primary uses the same
connection as a write.

Every operation records the node that served it: :meth:`Cluster.served`
counts per (node, intent) and :attr:`Cluster.last_node` names this thread's
latest, for tests and benchmarks.
"""

from __future__ import annotations

import enum
import itertools
import os
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, suppress
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any, Final, Protocol

from tiers.db import tokens
from tiers.db.consistency import (
    DownMark,
    ReplicaView,
    plan_read,
    poll_delay,
    replica_qualifies,
)
from tiers.db.engine import Connection, ConnectionWatch, Engine, Position, engine_for_dsns
from tiers.db.errors import Failure, NodeUnavailable, classify, retry_safe
from tiers.db.health import ClusterHealth
from tiers.db.monitor import HealthMonitor
from tiers.db.nodes import (
    CAUSAL_WAIT_ENV,
    DEFAULT_CAUSAL_WAIT,
    MONITOR_INTERVAL_ENV,
    PRIMARY_ENV,
    REPLICAS_ENV,
    Connector,
    describe_dsn,
    node_names,
    one_line,
    settings_from_env,
)
from tiers.db.tokens import is_token
from tiers.errors import DatabaseError

# Re-exported: applications may import these from here.

__all__ = [
    "CAUSAL_WAIT_ENV",
    "FROM_CONTEXT",
    "MONITOR_INTERVAL_ENV",
    "PRIMARY_ENV",
    "REPLICAS_ENV",
    "Cluster",
    "Connection",
    "HealthSource",
    "Intent",
    "Router",
    "WriteTransaction",
    "describe_dsn",
    "is_token",
    "node_names",
]


class Intent(enum.StrEnum):
    """What an operation asked for; the second half of the keys of :meth:`Cluster.served`."""

    WRITE = "write"
    READ = "read"
    READ_PRIMARY = "read_primary"


class _FromContext(enum.Enum):
    TOKEN = "the token of the current request scope"


FROM_CONTEXT: Final = _FromContext.TOKEN
"""The default ``token`` of reads: the request scope's token for the reading cluster."""

Token = str | None | _FromContext


class HealthSource(Protocol):
    """What the cluster needs of a health monitor (:class:`tiers.db.monitor.HealthMonitor`)."""

    def snapshot(self) -> ClusterHealth: ...

    def start(self) -> None: ...

    def stop(self, timeout: float | None = None) -> bool: ...

    def check_now(self) -> ClusterHealth: ...


# Bumped in a forked child before any of its code runs: per-process state
# (connections, the monitor's thread) compares its generation with this one
# instead of asking os.getpid() on every operation.
_fork_generation = 0
_clusters: weakref.WeakSet[Cluster] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _fork_generation  # noqa: PLW0603  (read on every operation: a plain global is cheapest)
    _fork_generation += 1
    # A thread of the parent may have held these locks at the moment of the
    # fork; in the child nobody would ever release them.
    for cluster in list(_clusters):
        cluster._renew_locks()


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


class _Link:
    """A thread's connection to one node, with what the router remembers of it.

    ``replayed`` is the highest position the node reported on this very
    session, valid while ``epoch`` is the current one (see the module
    docstring). ``watch`` is set for a connection of the engine's own driver
    (:meth:`tiers.db.engine.Engine.watch`), whose read transactions the
    router ends through it; ``stale`` is its staleness check when the router
    uses its own (None: ask the cluster's ``is_stale``).
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


@dataclass(frozen=True, slots=True)
class _Pool:
    """The read pool as one health snapshot shows it, built once per snapshot.

    ``epoch`` counts the changes of the monitor's primary seen so far:
    positions remembered under an older epoch may belong to another history.
    """

    snapshot: ClusterHealth | None
    views: tuple[ReplicaView, ...]
    names: tuple[str, ...]
    primary: str | None
    epoch: int


class _ThreadState(threading.local):
    def __init__(self, tallies: _Tallies) -> None:
        self.generation = _fork_generation
        self.links: dict[str, _Link] = {}
        self.token: str | None = None
        self.last_node: str | None = None
        self.served = tallies.register()


class _ReadBlock:
    """The context manager of a read: hands out the connection, ends its transaction."""

    __slots__ = ("_cluster", "_link", "_name", "_replica")

    def __init__(self, cluster: Cluster, name: str, link: _Link, replica: bool) -> None:
        self._cluster = cluster
        self._name = name
        self._link = link
        self._replica = replica

    def __enter__(self) -> Connection:
        return self._link.conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self._cluster._finish(self._name, self._link, replica=self._replica)
            return
        replacement = self._cluster._failed(self._name, self._link.conn, exc, writing=False)
        if replacement is not None:
            raise replacement from exc


class WriteTransaction:
    """A transaction on the primary; use as ``with cluster.write() as conn:``.

    On a clean exit it commits and sets :attr:`token` to the primary's WAL
    position after the commit (also this thread's ``last_write_token`` and
    the current request scope's token for this cluster); :attr:`node` names
    the node that took the write. On an exception it rolls back and lets the exception
    through, translated to NodeUnavailable when it says the node is gone or
    not the primary (see the module docstring). ``on_commit`` is called with
    the token after a successful commit.
    """

    def __init__(self, cluster: Cluster,
                 on_commit: Callable[[str], None] | None = None) -> None:
        self._cluster = cluster
        self._on_commit = on_commit
        self._conn: Connection | None = None
        self.node: str | None = None
        self.token: str | None = None

    def __enter__(self) -> Connection:
        if self._conn is not None:
            raise RuntimeError("a WriteTransaction can be entered only once")
        self.node, link = self._cluster._checkout_primary(Intent.WRITE)
        self._conn = link.conn
        return self._conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, node = self._conn, self.node
        assert conn is not None and node is not None
        if exc is not None:
            replacement = self._cluster._failed(node, conn, exc, writing=True)
            if replacement is not None:
                raise replacement from exc
            return
        self.token = self._cluster._commit(node, conn)
        if self._on_commit is not None:
            self._on_commit(self.token)


class Cluster:
    """Route one process's queries over a primary and its replicas.

    ``nodes`` maps node names to DSNs (for PostgreSQL libpq conninfo strings
    or URIs); ``primary`` names the node believed to be the primary
    (required without a monitor). ``engine`` is the nodes' engine (default:
    by the DSNs' scheme, :func:`tiers.db.engine.engine_for_dsns`).
    ``name`` is the cluster's name (``main`` by default), under which its
    causal tokens are kept in the request scope and the client's cookie
    (see the module docstring); two clusters of one app need two names.
    ``monitor`` supplies health snapshots (see the module docstring); it is
    started on first use in each process. ``causal_wait`` bounds how long a
    causal read waits for a replica before reading from the primary (0: do
    not wait). ``connect_timeout`` bounds each connect (libpq counts whole
    seconds). A node that failed is skipped by reads for ``retry_after``
    seconds unless the monitor sees it answer sooner. ``connector`` (default:
    the engine's ``connect``), ``clock``, ``sleep`` and ``is_stale``
    (default: the engine's) are for tests.

    Raises ValueError for no nodes, an unknown ``primary``, no ``primary``
    without a monitor, a negative ``causal_wait``, a ``name`` that is not
    a lower-case ASCII identifier of at most 63 characters
    (:func:`tiers.db.tokens.is_cluster_name`), or DSNs of an engine tiers has
    no adapter for or of several engines (UnsupportedEngine). Safe to share
    between threads.
    """

    def __init__(
        self,
        nodes: Mapping[str, str],
        primary: str | None = None,
        *,
        monitor: HealthSource | None = None,
        causal_wait: float = DEFAULT_CAUSAL_WAIT,
        connect_timeout: float = 2.0,
        retry_after: float = 5.0,
        connector: Connector | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        is_stale: Callable[[Connection], bool] | None = None,
        name: str = tokens.DEFAULT_CLUSTER,
        engine: Engine | None = None,
    ) -> None:
        tokens.check_cluster_name(name)
        if not nodes:
            raise ValueError("a cluster needs at least one node")
        if primary is not None and primary not in nodes:
            raise ValueError(f"primary {primary!r} is not one of the nodes")
        if primary is None and monitor is None:
            raise ValueError("without a monitor the primary must be named")
        if causal_wait < 0:
            raise ValueError("causal_wait must not be negative")
        self.name = name
        self.nodes: Mapping[str, str] = MappingProxyType(dict(nodes))
        self.engine = engine if engine is not None else engine_for_dsns(self.nodes.values())
        self.primary_hint = primary
        self.monitor = monitor
        self.causal_wait = causal_wait
        self.connect_timeout = connect_timeout
        self.retry_after = retry_after
        db = self.engine
        self._connector: Connector = connector if connector is not None else db.connect
        self._clock = clock
        self._sleep = sleep
        self._is_stale: Callable[[Connection], bool] = (
            is_stale if is_stale is not None else db.is_stale)
        self._own_stale_check = is_stale is None
        # What reads and commits use, bound once (an attribute lookup per use, no more).
        self._parse_token = db.parse_token
        self._watch = db.watch
        self._errors = db.errors
        self._position_errors: tuple[type[BaseException], ...] = (
            NodeUnavailable, *db.errors, ValueError)
        self._answer_errors: tuple[type[BaseException], ...] = (*db.errors, ValueError)
        self._last_token: tuple[str | None, Position | None] = (None, None)
        # Shared by all threads: a node found dead by one thread is skipped by
        # the others too. Races only cost an extra connect attempt.
        self._down: dict[str, DownMark] = {}
        self._cursor = itertools.count()
        self._tallies = _Tallies()
        self._local = _ThreadState(self._tallies)
        self._monitor_lock = threading.Lock()
        self._monitor_generation = -1
        self._pool_lock = threading.Lock()
        # Without a monitor the pool never changes; with one, rebuilt per snapshot.
        self._pool_cache = _Pool(
            None, tuple(ReplicaView(name) for name in self.nodes if name != primary),
            tuple(name for name in self.nodes if name != primary), primary, 0)
        # Connections a forked child inherited: never used nor closed there
        # (closing would end the parent's session on the shared socket), only
        # kept referenced so that garbage collection does not close them either.
        self._inherited: list[Connection] = []
        _clusters.add(self)

    @classmethod
    def from_dsns(cls, primary_dsn: str, replica_dsns: Sequence[str] = (),
                  **options: Any) -> Cluster:
        """A cluster of a primary and replicas given as DSNs, named by :func:`node_names`."""
        dsns = [primary_dsn, *replica_dsns]
        names = node_names(dsns)
        return cls(dict(zip(names, dsns, strict=True)), names[0], **options)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *,
                 monitor: bool = True, name: str = tokens.DEFAULT_CLUSTER) -> Cluster:
        """Build a cluster the way app servers run: from the environment.

        ``TIERS_DB_PRIMARY`` (required) is the DSN of the node believed to be
        the primary; ``TIERS_DB_REPLICAS`` a comma-separated list of the
        others (may be empty or unset). Nodes are named by their
        ``host:port/dbname``. ``TIERS_DB_CAUSAL_WAIT`` (seconds, default
        0.05) and ``TIERS_DB_MONITOR_INTERVAL`` (seconds between health
        rounds, default 0.25) are optional. With ``monitor`` (the default) a
        HealthMonitor watches every node, so the primary is found again
        after a failover. ``name`` is the cluster's (``main`` unless
        :class:`tiers.db.clusters.Databases` builds it). The DSNs' scheme
        chooses the engine. Raises ConfigError naming the variable for a
        missing primary, a value that does not parse, a DSN of an engine
        tiers has no adapter for, or a bad number; ValueError for a bad
        ``name``.
        """
        settings = settings_from_env(os.environ if environ is None else environ)
        health: HealthSource | None = None
        if monitor:
            health = HealthMonitor(settings.nodes, interval=settings.monitor_interval,
                                   primary=settings.primary, engine=settings.engine)
        return cls(settings.nodes, settings.primary, monitor=health,
                   causal_wait=settings.causal_wait, name=name, engine=settings.engine)

    # -- topology ------------------------------------------------------------

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

    # -- intents -------------------------------------------------------------

    @property
    def last_write_token(self) -> str | None:
        """The causal token of this thread's last committed write, if any."""
        return self._state().token

    @property
    def last_node(self) -> str | None:
        """The node that served this thread's latest operation, if any."""
        return self._state().last_node

    def write(self) -> WriteTransaction:
        """A transaction on the primary that commits on a clean exit; see WriteTransaction."""
        return WriteTransaction(self)

    def read(self, token: Token = FROM_CONTEXT, *,
             max_staleness: float | None = None) -> AbstractContextManager[Connection]:
        """A read-only use of a node that satisfies the consistency asked for.

        ``token`` defaults to the current request scope's token for this
        cluster (none if it has no entry); pass None for any healthy
        replica, or a token of this cluster for read-your-writes. The block's
        transaction is rolled back afterwards. A malformed token raises
        ValueError (check client input with ``is_token``). Raises
        NodeUnavailable if the primary is needed and cannot be reached, or
        if the node dies under the block (the block is not rerun).
        """
        wanted = self._wanted(token)
        if wanted is None and max_staleness is None:
            name, link, replica = self._choose_any()
        else:
            name, link, replica = self._choose_read(wanted, max_staleness, Intent.READ)
        if link.autocommit:
            link.use_autocommit(False)
        return _ReadBlock(self, name, link, replica)

    def read_primary(self) -> AbstractContextManager[Connection]:
        """A read on the primary (sees every commit); rolled back afterwards."""
        name, link = self._checkout_primary(Intent.READ_PRIMARY)
        return _ReadBlock(self, name, link, False)

    def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None, *,
              token: Token = FROM_CONTEXT,
              max_staleness: float | None = None) -> list[Any]:
        """Run one read statement as ``read`` would and return its rows.

        On a replica the statement runs in autocommit (one round trip; a hot
        standby refuses writes, though a replica promoted a moment ago that
        the monitor has not seen yet would not: pass reads only), on the
        primary in a transaction that is rolled back. If the node turns out
        to be gone, the statement runs once more on another node (another
        replica, or the primary): it ran alone and read-only, so nothing of
        it can have taken effect. A second failure raises NodeUnavailable.
        """
        wanted = self._wanted(token)
        for attempt in range(2):
            if wanted is None and max_staleness is None:
                name, link, replica = self._choose_any()
            else:
                name, link, replica = self._choose_read(wanted, max_staleness, Intent.READ)
            conn = link.conn
            try:
                if replica:
                    link.use_autocommit(True)
                rows = conn.execute(sql, params).fetchall()
            except BaseException as exc:
                replacement = self._failed(name, conn, exc, writing=False)
                if attempt == 0 and retry_safe(classify(exc, self.engine), in_transaction=False,
                                               statement_sent_is_read_only=True):
                    continue
                if replacement is not None:
                    raise replacement from exc
                raise
            if not replica:
                self._finish(name, link, replica=False)
            elif conn.closed:
                self._discard(name)
            return rows
        raise AssertionError("unreachable")

    def read_node(self, token: Token = FROM_CONTEXT, *,
                  max_staleness: float | None = None) -> str:
        """The node a ``read`` with these arguments would use now, after any causal wait.

        For integrations with connections of their own (tiers.db.sqla): the
        choice is counted as a read served by that node. A replica is chosen
        for a token only on what the monitor or a fresh position query
        says, never on a position remembered from this router's own session.
        """
        name, _link, _replica = self._choose_read(self._wanted(token), max_staleness,
                                                  Intent.READ, use_memory=False)
        return name

    # -- accounting and hooks for integrations -------------------------------

    def served(self) -> dict[tuple[str, Intent], int]:
        """How many operations each (node, intent) served, since creation or ``reset_served``."""
        return self._tallies.served()

    def reset_served(self) -> None:
        self._tallies.reset()

    def record(self, node: str, intent: Intent) -> None:
        """Count one operation served by ``node``; integrations call it for their own."""
        state = self._state()
        key = (node, intent)
        counts = state.served
        counts[key] = counts.get(key, 0) + 1
        state.last_node = node

    def note_commit(self, token: str) -> None:
        """Record a commit's token for this thread and, under this cluster's name, in the
        current request scope."""
        tokens.note_write(token, self.name, self.engine)
        self._state().token = token

    def report_failure(self, node: str, exc: BaseException, *, writing: bool) -> Failure:
        """Act on a failure an integration saw on ``node`` (mark it down, look for the
        primary) as the router does for its own connections; returns the failure kind."""
        failure = classify(exc, self.engine)
        if failure is Failure.NODE_GONE:
            self._mark_down(node)
        elif failure is Failure.NOT_PRIMARY and writing:
            self._rediscover()
        return failure

    def close(self) -> None:
        """Close the calling thread's connections (they reopen on next use)."""
        state = self._state()
        links, state.links = state.links, {}
        for link in links.values():
            with suppress(*self._errors):
                link.conn.close()

    def stop(self) -> None:
        """Close this thread's connections and stop the monitor's thread in this process."""
        self.close()
        if self.monitor is not None:
            self.monitor.stop()
            self._monitor_generation = -1

    # -- internals -----------------------------------------------------------

    def _renew_locks(self) -> None:
        self._monitor_lock = threading.Lock()
        self._pool_lock = threading.Lock()
        self._tallies.lock = threading.Lock()

    def _state(self) -> _ThreadState:
        state = self._local
        if state.generation != _fork_generation:
            self._inherited.extend(link.conn for link in state.links.values())
            state.links = {}
            state.token = None
            state.last_node = None
            state.generation = _fork_generation
        return state

    def _ensure_monitor(self) -> None:
        if self.monitor is not None and self._monitor_generation != _fork_generation:
            self._start_monitor()

    def _start_monitor(self) -> None:
        monitor = self.monitor
        assert monitor is not None
        with self._monitor_lock:
            generation = _fork_generation
            if self._monitor_generation != generation:
                monitor.start()
                self._monitor_generation = generation

    def _known_primary(self) -> str | None:
        monitor = self.monitor
        if monitor is None:
            return self.primary_hint
        if self._monitor_generation != _fork_generation:
            self._start_monitor()
        snapshot = monitor.snapshot()
        if snapshot.primary is None and snapshot.rounds == 0:
            snapshot = monitor.check_now()
        return snapshot.primary

    def _pool(self) -> _Pool:
        """The read pool of the monitor's latest snapshot (the fixed one without a monitor)."""
        monitor = self.monitor
        if monitor is None:
            return self._pool_cache
        if self._monitor_generation != _fork_generation:
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

    def _rebuild_pool(self, snapshot: ClusterHealth, before: _Pool) -> _Pool:
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
        return _Pool(snapshot, tuple(views), tuple(view.name for view in views),
                     snapshot.primary, before.epoch + moved)

    def _wanted(self, token: Token) -> Position | None:
        if token is FROM_CONTEXT:
            token = tokens.current_token(self.name)
        if token is None:
            return None
        # A request reads with the same token again and again: parse it once.
        last = self._last_token
        if last[0] == token:
            return last[1]
        wanted = self._parse_token(token)
        self._last_token = (token, wanted)
        return wanted

    def _rediscover(self) -> None:
        if self.monitor is not None:
            self.monitor.check_now()

    def _checkout(self, state: _ThreadState, name: str) -> _Link:
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
        link = _Link(conn, watch,
                     watch.stale if watch is not None and self._own_stale_check else None)
        state.links[name] = link
        return link

    def _checkout_primary(self, intent: Intent) -> tuple[str, _Link]:
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

    def _count(self, state: _ThreadState, name: str, intent: Intent) -> None:
        key = (name, intent)
        counts = state.served
        counts[key] = counts.get(key, 0) + 1
        state.last_node = name

    def _discard(self, name: str) -> None:
        link = self._state().links.pop(name, None)
        if link is not None:
            with suppress(*self._errors):
                link.conn.close()

    def _mark_down(self, name: str) -> None:
        self._discard(name)
        now = self._clock()
        self._down[name] = DownMark(since=now, until=now + self.retry_after)

    def _forget_expired_marks(self, now: float) -> None:
        # Reads take the quick path only while no mark is left; an expired one is no mark.
        for name, mark in list(self._down.items()):
            if now >= mark.until and self._down.get(name) is mark:
                self._down.pop(name, None)

    def _position(self, link: _Link) -> Position | None:
        """A node's replayed position: one query, run outside any transaction."""
        link.use_autocommit(True)
        return self.engine.replayed_position(link.conn)

    def _choose_any(self) -> tuple[str, _Link, bool]:
        """A read without a token or a bound: the next replica in turn, else the primary."""
        names = self._pool().names
        if names and not self._down:
            count = len(names)
            name = names[0] if count == 1 else names[next(self._cursor) % count]
            state = self._state()
            try:
                link = self._checkout(state, name)
            except NodeUnavailable:
                pass  # marked down now: the full plan tries the others
            else:
                self._count(state, name, Intent.READ)
                return name, link, True
        return self._choose_read(None, None, Intent.READ)

    def _choose_read(self, wanted: Position | None, max_staleness: float | None, intent: Intent,
                     *, use_memory: bool = True) -> tuple[str, _Link, bool]:
        """The node for a read, its connection, and whether it is a replica of the pool."""
        pool = self._pool()
        state = self._state()
        now = self._clock()
        start = next(self._cursor)
        wait_lag = self.causal_wait if self.monitor is not None else None
        plan = plan_read(pool.views, token=wanted, max_staleness=max_staleness, start=start,
                         now=now, down=self._down, wait_lag=wait_lag)
        if not plan.ready and wanted is not None and use_memory:
            # Only now, with no replica known good from the monitor, look at what this
            # thread's connections remember.
            remembered = {name: link.replayed for name, link in state.links.items()
                          if link.replayed is not None and link.epoch == pool.epoch}
            if remembered:
                plan = plan_read(pool.views, token=wanted, max_staleness=max_staleness,
                                 start=start, now=now, down=self._down, wait_lag=wait_lag,
                                 remembered=remembered)
        if self._down:
            self._forget_expired_marks(now)
        for name in plan.ready:
            try:
                link = self._checkout(state, name)
            except NodeUnavailable:
                continue
            self._count(state, name, intent)
            return name, link, True
        if plan.poll:
            assert wanted is not None
            found = self._wait_for(state, pool.epoch, plan.poll, wanted,
                                   use_memory=use_memory,
                                   patience=self.causal_wait if plan.wait else 0.0)
            if found is not None:
                self._count(state, found[0], intent)
                return found[0], found[1], True
        name, link = self._checkout_primary(intent)
        return name, link, False

    def _wait_for(self, state: _ThreadState, epoch: int, names: Sequence[str], wanted: Position,
                  *, use_memory: bool, patience: float) -> tuple[str, _Link] | None:
        """Poll the replicas' replayed positions until one has ``wanted``, up to ``patience``
        seconds (0: ask each once)."""
        deadline = self._clock() + patience
        pending = list(names)
        for attempt in itertools.count():
            for name in list(pending):
                try:
                    link = self._checkout(state, name)
                    if use_memory and link.has_replayed(wanted, epoch):
                        return name, link
                    position = self._position(link)
                except self._position_errors:
                    # Nothing of the caller's work was sent: skip it, try the others.
                    self._mark_down(name)
                    pending.remove(name)
                    continue
                link.remember(position, epoch)
                if replica_qualifies(position, wanted):
                    return name, link
            remaining = deadline - self._clock()
            if not pending or remaining <= 0:
                return None
            self._sleep(min(poll_delay(attempt), remaining))
        return None

    def _finish(self, name: str, link: _Link, *, replica: bool) -> None:
        """End a block's transaction by rolling back; drop the connection if it broke.

        On a replica's connection of the engine's driver the watch ends it,
        keeping the session's prepared statements (PostgreSQL: the router
        sends the ROLLBACK itself, see the module docstring); on the primary,
        where the block could have changed the schema, ``conn.rollback()``
        resets them as the driver means to.
        """
        conn, watch = link.conn, link.watch
        try:
            if replica and watch is not None:
                watch.end_read()
            elif not conn.closed:
                conn.rollback()
        except self._errors:
            pass
        if conn.closed:
            self._discard(name)

    def _failed(self, name: str, conn: Connection, exc: BaseException, *,
                writing: bool) -> NodeUnavailable | None:
        """Clean up after ``exc`` ended a block on ``name``; the error to raise instead, if any."""
        failure = classify(exc, self.engine)
        if failure is Failure.NODE_GONE:
            self._mark_down(name)
            detail = "the transaction was not committed: " if writing else ""
            return NodeUnavailable(name, failure, detail + one_line(exc))
        if failure is Failure.NOT_PRIMARY and writing:
            self._discard(name)
            self._rediscover()
            return NodeUnavailable(name, failure, "the write was refused; nothing was committed")
        if not conn.closed:
            with suppress(*self._errors):
                conn.rollback()
        if conn.closed or self.engine.needs_new_session(exc):
            # E.g. a statement prepared before a schema change that altered its
            # result fails on every use of this session: start a new one.
            self._discard(name)
        return None

    def _commit(self, name: str, conn: Connection) -> str:
        engine = self.engine
        if engine.transaction_failed(conn):
            # A statement failed and the block swallowed the error; COMMIT
            # would silently roll back, so say so instead.
            self._rollback(name, conn)
            raise DatabaseError("a statement in the write block failed; transaction rolled back")
        try:
            conn.commit()
        except self._errors as exc:
            if classify(exc, engine) is Failure.NODE_GONE:
                self._mark_down(name)
                raise NodeUnavailable(name, Failure.NODE_GONE,
                                      f"commit outcome unknown: {one_line(exc)}") from exc
            self._rollback(name, conn)
            raise DatabaseError(f"commit on {name} failed: {one_line(exc)}") from exc
        try:
            # Outside a transaction, so no BEGIN/ROLLBACK round trips; the
            # position is at or after the commit (Engine.commit_position).
            conn.autocommit = True
            try:
                position = engine.commit_position(conn)
            finally:
                if not conn.closed:
                    conn.autocommit = False
            token = None if position is None else engine.format_token(position)
        except self._answer_errors as exc:
            if classify(exc, engine) is Failure.NODE_GONE:
                # Gone right after the commit (fenced, say): whether the write
                # survives depends on whether it reached a replica before, so
                # its outcome is as unknown as that of a commit that failed.
                self._mark_down(name)
                raise NodeUnavailable(
                    name, Failure.NODE_GONE,
                    f"committed, then gone before its position was read; outcome unknown: "
                    f"{one_line(exc)}") from exc
            self._rollback(name, conn)
            raise DatabaseError(
                f"committed, but cannot read the commit position of {name}: {one_line(exc)}"
            ) from exc
        if token is None:
            # In recovery: a demoted node. Whatever the block sent was refused
            # or was read-only, so nothing was written; find the primary.
            self._discard(name)
            self._rediscover()
            raise NodeUnavailable(name, Failure.NOT_PRIMARY, "it is in recovery")
        self.note_commit(token)
        return token

    def _rollback(self, name: str, conn: Connection) -> None:
        if not conn.closed:
            with suppress(*self._errors):
                conn.rollback()
        if conn.closed:
            self._discard(name)


# The name the demo and earlier code use.
Router = Cluster
