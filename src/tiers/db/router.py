"""Read/write routing for application code: :class:`Cluster` hands out connections by intent.

    write()            a transaction on the primary; commits on a clean exit and
                       records the causal token (the primary's WAL position after it)
    read(token, max_staleness=...)
                       a replica that satisfies the consistency asked for, else the primary
    read_primary()     the primary, for reads that must see everything committed
    query(sql, ...)    one read statement, retried once on another node if its node is gone

Consistency of ``read`` (the rules are pure functions in
:mod:`tiers.db.consistency`): with a causal token, a replica that has replayed
it; one is waited for up to ``causal_wait`` seconds by polling
``pg_last_wal_replay_lsn()``, then the primary serves the read. Without a
token argument the current request scope's token *for this cluster* is used
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

Topology. The cluster knows every node by name; the primary given to the
constructor is a first guess. With a health monitor
(:class:`tiers.db.monitor.HealthMonitor`), writes go to the monitor's
current primary and reads to its read pool (healthy replicas within the lag
limits), so a failover needs no restart: once another node is the only
writable one, writes go there. While the monitor knows no primary, writes
raise :class:`~tiers.db.errors.NodeUnavailable` at once. Without a monitor
the topology is fixed: every node but the primary may serve reads.

Failures. A node that fails under the router is handled by what the error
says (:func:`tiers.db.errors.classify`): *gone* drops the connection, marks
the node down for reads (for ``retry_after`` seconds, or until the monitor
sees it answer again) and raises NodeUnavailable; the router's own steps
(connecting, checking a position) send nothing of the caller's work, so
there it tries the next node instead, and ``query`` retries its statement
once. *Not the primary* on a write drops the connection, makes the monitor
check every node at once, and raises NodeUnavailable: a write whose outcome
is unknown is never replayed. A commit that fails because the node is gone
raises NodeUnavailable saying the outcome is unknown. Other errors raised by
the caller's statements propagate unchanged (the app may catch
``psycopg.errors.UniqueViolation``), and the transaction is rolled back.

Processes and threads. Connections are per thread and opened lazily; a
connection found closed by the server while idle is replaced before use.
Nothing connects and no monitor thread starts until first use in a process,
so a cluster built in a gunicorn master before the fork works in every
worker: each starts its own monitor thread on first use. Do not nest read or
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
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, suppress
from types import MappingProxyType, TracebackType
from typing import Any, Final, Protocol

import psycopg
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow

from tiers.db import tokens
from tiers.db.consistency import (
    DownMark,
    ReplicaView,
    plan_read,
    poll_delay,
    replica_qualifies,
)
from tiers.db.errors import Failure, NodeUnavailable, classify, retry_safe
from tiers.db.health import ClusterHealth
from tiers.db.monitor import HealthMonitor
from tiers.db.nodes import (
    CAUSAL_WAIT_ENV,
    DEFAULT_CAUSAL_WAIT,
    MONITOR_INTERVAL_ENV,
    PRIMARY_ENV,
    REPLICAS_ENV,
    Connection,
    Connector,
    connect,
    connection_is_stale,
    describe_dsn,
    node_names,
    one_line,
    settings_from_env,
)
from tiers.db.tokens import format_lsn, is_token, parse_lsn
from tiers.errors import DatabaseError

# Re-exported: tiers.db.health, monitor, failover, promote and migrate import
# these from here, and applications may too.

__all__ = [
    "CAUSAL_WAIT_ENV",
    "FROM_CONTEXT",
    "MONITOR_INTERVAL_ENV",
    "PRIMARY_ENV",
    "REPLICAS_ENV",
    "Cluster",
    "HealthSource",
    "Intent",
    "Router",
    "WriteTransaction",
    "connect",
    "connection_is_stale",
    "describe_dsn",
    "format_lsn",
    "is_token",
    "node_names",
    "parse_lsn",
]

# On a replica how far it has replayed; on a node not in recovery (a
# "replica" that is really the primary) how far it has written, which is what
# a read from it would see.
_POSITION_SQL = (
    "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
    " ELSE pg_current_wal_lsn() END)::text"
)
# NULL on a node in recovery: it is no primary, and pg_current_wal_lsn() would fail there.
_WRITE_POSITION_SQL = (
    "SELECT (CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn() END)::text"
)


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


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.conns: dict[str, Connection] = {}
        self.token: str | None = None
        self.last_node: str | None = None


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
        self.node, self._conn = self._cluster._checkout_primary(Intent.WRITE)
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
    """Route one process's queries over a PostgreSQL primary and its replicas.

    ``nodes`` maps node names to libpq conninfo strings or URIs; ``primary``
    names the node believed to be the primary (required without a monitor).
    ``name`` is the cluster's name (``main`` by default), under which its
    causal tokens are kept in the request scope and the client's cookie
    (see the module docstring); two clusters of one app need two names.
    ``monitor`` supplies health snapshots (see the module docstring); it is
    started on first use in each process. ``causal_wait`` bounds how long a
    causal read waits for a replica before reading from the primary (0: do
    not wait). ``connect_timeout`` bounds each connect (libpq counts whole
    seconds). A node that failed is skipped by reads for ``retry_after``
    seconds unless the monitor sees it answer sooner. ``connector``,
    ``clock``, ``sleep`` and ``is_stale`` are for tests.

    Raises ValueError for no nodes, an unknown ``primary``, no ``primary``
    without a monitor, a negative ``causal_wait``, or a ``name`` that is not
    a lower-case ASCII identifier of at most 63 characters
    (:func:`tiers.db.tokens.is_cluster_name`). Safe to share between threads.
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
        connector: Connector = connect,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        is_stale: Callable[[Connection], bool] = connection_is_stale,
        name: str = tokens.DEFAULT_CLUSTER,
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
        self.primary_hint = primary
        self.monitor = monitor
        self.causal_wait = causal_wait
        self.connect_timeout = connect_timeout
        self.retry_after = retry_after
        self._connector = connector
        self._clock = clock
        self._sleep = sleep
        self._is_stale = is_stale
        # Shared by all threads: a node found dead by one thread is skipped by
        # the others too. Races only cost an extra connect attempt.
        self._down: dict[str, DownMark] = {}
        self._cursor = itertools.count()
        self._local = _ThreadState()
        self._served: Counter[tuple[str, Intent]] = Counter()
        self._served_lock = threading.Lock()
        self._monitor_lock = threading.Lock()
        self._monitor_pid = 0
        # Connections a forked child inherited: never used nor closed there
        # (closing would end the parent's session on the shared socket), only
        # kept referenced so that garbage collection does not close them either.
        self._inherited: list[Connection] = []

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
        :class:`tiers.db.clusters.Databases` builds it). Raises ConfigError
        naming the variable for a missing primary, a value that does not
        parse, or a bad number; ValueError for a bad ``name``.
        """
        settings = settings_from_env(os.environ if environ is None else environ)
        health: HealthSource | None = None
        if monitor:
            health = HealthMonitor(settings.nodes, interval=settings.monitor_interval,
                                   primary=settings.primary)
        return cls(settings.nodes, settings.primary, monitor=health,
                   causal_wait=settings.causal_wait, name=name)

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
        return tuple(view.name for view in self._pool_views())

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
        name, conn = self._choose_read(wanted, max_staleness, Intent.READ)
        return self._using(name, conn)

    def read_primary(self) -> AbstractContextManager[Connection]:
        """A read on the primary (sees every commit); rolled back afterwards."""
        name, conn = self._checkout_primary(Intent.READ_PRIMARY)
        return self._using(name, conn)

    def query(self, sql: str, params: Sequence[Any] | Mapping[str, Any] | None = None, *,
              token: Token = FROM_CONTEXT,
              max_staleness: float | None = None) -> list[TupleRow]:
        """Run one read statement as ``read`` would and return its rows.

        If the node turns out to be gone, the statement runs once more on
        another node (another replica, or the primary): it ran alone in a
        transaction that is always rolled back, so nothing of it can have
        taken effect. A second failure raises NodeUnavailable.
        """
        wanted = self._wanted(token)
        for attempt in range(2):
            name, conn = self._choose_read(wanted, max_staleness, Intent.READ)
            try:
                rows = conn.execute(sql, params).fetchall()
            except BaseException as exc:
                replacement = self._failed(name, conn, exc, writing=False)
                # Rolled back whatever happens: in effect outside a transaction, and read-only.
                if attempt == 0 and retry_safe(classify(exc), in_transaction=False,
                                               statement_sent_is_read_only=True):
                    continue
                if replacement is not None:
                    raise replacement from exc
                raise
            self._finish(name, conn)
            return rows
        raise AssertionError("unreachable")

    def read_node(self, token: Token = FROM_CONTEXT, *,
                  max_staleness: float | None = None) -> str:
        """The node a ``read`` with these arguments would use now, after any causal wait.

        For integrations with connections of their own (tiers.db.sqla): the
        choice is counted as a read served by that node.
        """
        name, _conn = self._choose_read(self._wanted(token), max_staleness, Intent.READ)
        return name

    # -- accounting and hooks for integrations -------------------------------

    def served(self) -> dict[tuple[str, Intent], int]:
        """How many operations each (node, intent) served, since creation or ``reset_served``."""
        with self._served_lock:
            return dict(self._served)

    def reset_served(self) -> None:
        with self._served_lock:
            self._served.clear()

    def record(self, node: str, intent: Intent) -> None:
        """Count one operation served by ``node``; integrations call it for their own."""
        with self._served_lock:
            self._served[(node, intent)] += 1
        self._state().last_node = node

    def note_commit(self, token: str) -> None:
        """Record a commit's token for this thread and, under this cluster's name, in the
        current request scope."""
        tokens.note_write(token, self.name)
        self._state().token = token

    def report_failure(self, node: str, exc: BaseException, *, writing: bool) -> Failure:
        """Act on a failure an integration saw on ``node`` (mark it down, look for the
        primary) as the router does for its own connections; returns the failure kind."""
        failure = classify(exc)
        if failure is Failure.NODE_GONE:
            self._mark_down(node)
        elif failure is Failure.NOT_PRIMARY and writing:
            self._rediscover()
        return failure

    def close(self) -> None:
        """Close the calling thread's connections (they reopen on next use)."""
        state = self._state()
        conns, state.conns = state.conns, {}
        for conn in conns.values():
            with suppress(psycopg.Error):
                conn.close()

    def stop(self) -> None:
        """Close this thread's connections and stop the monitor's thread in this process."""
        self.close()
        if self.monitor is not None:
            self.monitor.stop()
            self._monitor_pid = 0

    # -- internals -----------------------------------------------------------

    def _state(self) -> _ThreadState:
        state = self._local
        if state.pid != os.getpid():
            self._inherited.extend(state.conns.values())
            state.conns = {}
            state.token = None
            state.last_node = None
            state.pid = os.getpid()
        return state

    def _ensure_monitor(self) -> None:
        monitor, pid = self.monitor, os.getpid()
        if monitor is None or self._monitor_pid == pid:
            return
        with self._monitor_lock:
            if self._monitor_pid != pid:
                monitor.start()
                self._monitor_pid = pid

    def _known_primary(self) -> str | None:
        self._ensure_monitor()
        if self.monitor is None:
            return self.primary_hint
        snapshot = self.monitor.snapshot()
        if snapshot.primary is None and snapshot.rounds == 0:
            snapshot = self.monitor.check_now()
        return snapshot.primary

    def _pool_views(self) -> list[ReplicaView]:
        self._ensure_monitor()
        if self.monitor is None:
            return [ReplicaView(name) for name in self.nodes if name != self.primary_hint]
        snapshot = self.monitor.snapshot()
        views = []
        for name in snapshot.read_pool:
            if name not in self.nodes:
                continue
            last = snapshot.node(name).last
            if last is None:
                views.append(ReplicaView(name))
            else:
                views.append(ReplicaView(name, last.position, last.replay_lag_seconds,
                                         last.checked_at))
        return views

    def _wanted(self, token: Token) -> int | None:
        if token is FROM_CONTEXT:
            token = tokens.current_token(self.name)
        return None if token is None else parse_lsn(token)

    def _rediscover(self) -> None:
        if self.monitor is not None:
            self.monitor.check_now()

    def _checkout(self, name: str) -> Connection:
        """This thread's open connection to a node; connects if there is none or it went stale.

        Raises NodeUnavailable (and marks the node down) if the connect fails.
        """
        state = self._state()
        conn = state.conns.get(name)
        if conn is not None:
            if not self._is_stale(conn):
                return conn
            self._discard(name)
        try:
            conn = self._connector(self.nodes[name], self.connect_timeout)
        except psycopg.Error as exc:
            self._mark_down(name)
            raise NodeUnavailable(name, Failure.NODE_GONE,
                                  f"cannot connect: {one_line(exc)}") from exc
        state.conns[name] = conn
        return conn

    def _checkout_primary(self, intent: Intent) -> tuple[str, Connection]:
        name = self.primary()
        try:
            conn = self._checkout(name)
        except NodeUnavailable:
            # Nothing was sent, so if the monitor has meanwhile found another
            # primary, that one may be tried; once, to fail fast.
            again = self._known_primary()
            if again is None or again == name:
                raise
            name, conn = again, self._checkout(again)
        self.record(name, intent)
        return name, conn

    def _discard(self, name: str) -> None:
        conn = self._state().conns.pop(name, None)
        if conn is not None:
            with suppress(psycopg.Error):
                conn.close()

    def _mark_down(self, name: str) -> None:
        self._discard(name)
        now = self._clock()
        self._down[name] = DownMark(since=now, until=now + self.retry_after)

    def _position(self, conn: Connection) -> int | None:
        """A node's replayed WAL position: one query, run outside any transaction."""
        conn.autocommit = True
        try:
            row = conn.execute(_POSITION_SQL).fetchone()
        finally:
            if not conn.closed:
                conn.autocommit = False
        if row is None or row[0] is None:
            return None
        return parse_lsn(str(row[0]))

    def _choose_read(self, wanted: int | None, max_staleness: float | None,
                     intent: Intent) -> tuple[str, Connection]:
        plan = plan_read(self._pool_views(), token=wanted, max_staleness=max_staleness,
                         start=next(self._cursor), now=self._clock(), down=self._down)
        for name in plan.ready:
            try:
                conn = self._checkout(name)
            except NodeUnavailable:
                continue
            self.record(name, intent)
            return name, conn
        if plan.poll:
            found = self._wait_for(plan.poll, wanted)
            if found is not None:
                self.record(found[0], intent)
                return found
        return self._checkout_primary(intent)

    def _wait_for(self, names: Sequence[str], wanted: int | None) -> tuple[str, Connection] | None:
        """Poll the replicas' replayed positions until one has ``wanted``, up to causal_wait."""
        deadline = self._clock() + self.causal_wait
        pending = list(names)
        for attempt in itertools.count():
            for name in list(pending):
                try:
                    conn = self._checkout(name)
                    position = self._position(conn)
                except (NodeUnavailable, psycopg.Error, ValueError):
                    # Nothing of the caller's work was sent: skip it, try the others.
                    self._mark_down(name)
                    pending.remove(name)
                    continue
                if replica_qualifies(position, wanted):
                    return name, conn
            remaining = deadline - self._clock()
            if not pending or remaining <= 0:
                return None
            self._sleep(min(poll_delay(attempt), remaining))
        return None

    @contextmanager
    def _using(self, name: str, conn: Connection) -> Iterator[Connection]:
        try:
            yield conn
        except BaseException as exc:
            replacement = self._failed(name, conn, exc, writing=False)
            if replacement is not None:
                raise replacement from exc
            raise
        self._finish(name, conn)

    def _finish(self, name: str, conn: Connection) -> None:
        """End a block's transaction by rolling back; drop the connection if it broke."""
        if not conn.closed:
            with suppress(psycopg.Error):
                conn.rollback()
        if conn.closed:
            self._discard(name)

    def _failed(self, name: str, conn: Connection, exc: BaseException, *,
                writing: bool) -> NodeUnavailable | None:
        """Clean up after ``exc`` ended a block on ``name``; the error to raise instead, if any."""
        failure = classify(exc)
        if failure is Failure.NODE_GONE:
            self._mark_down(name)
            detail = "the transaction was not committed: " if writing else ""
            return NodeUnavailable(name, failure, detail + one_line(exc))
        if failure is Failure.NOT_PRIMARY and writing:
            self._discard(name)
            self._rediscover()
            return NodeUnavailable(name, failure, "the write was refused; nothing was committed")
        self._finish(name, conn)
        return None

    def _commit(self, name: str, conn: Connection) -> str:
        if conn.info.transaction_status == TransactionStatus.INERROR:
            # A statement failed and the block swallowed the error; COMMIT
            # would silently roll back, so say so instead.
            self._finish(name, conn)
            raise DatabaseError("a statement in the write block failed; transaction rolled back")
        try:
            conn.commit()
        except psycopg.Error as exc:
            if classify(exc) is Failure.NODE_GONE:
                self._mark_down(name)
                raise NodeUnavailable(name, Failure.NODE_GONE,
                                      f"commit outcome unknown: {one_line(exc)}") from exc
            self._finish(name, conn)
            raise DatabaseError(f"commit on {name} failed: {one_line(exc)}") from exc
        try:
            # Outside a transaction, so no BEGIN/ROLLBACK round trips. With
            # synchronous_commit on (the default) the commit record is written
            # before COMMIT returns, so this position is at or after it.
            conn.autocommit = True
            try:
                row = conn.execute(_WRITE_POSITION_SQL).fetchone()
            finally:
                if not conn.closed:
                    conn.autocommit = False
            text = None if row is None else row[0]
            token = None if text is None else format_lsn(parse_lsn(str(text)))
        except (psycopg.Error, ValueError) as exc:
            if classify(exc) is Failure.NODE_GONE:
                self._mark_down(name)
            else:
                self._finish(name, conn)
            raise DatabaseError(
                f"committed, but cannot read the WAL position of {name}: {one_line(exc)}"
            ) from exc
        if token is None:
            # In recovery: a demoted node. Whatever the block sent was refused
            # or was read-only, so nothing was written; find the primary.
            self._discard(name)
            self._rediscover()
            raise NodeUnavailable(name, Failure.NOT_PRIMARY, "it is in recovery")
        self.note_commit(token)
        return token


# The name the demo and earlier code use.
Router = Cluster
