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

Topology (:mod:`tiers.db.topology`). With a health monitor
(:class:`tiers.db.monitor.HealthMonitor`), writes go to the monitor's
current primary and reads to its read pool (healthy replicas within the lag
limits), so a failover needs no restart; while the monitor knows no
primary, writes raise :class:`~tiers.db.errors.NodeUnavailable` at once.
Without a monitor the topology is fixed: every node but the primary given
to the constructor may serve reads.

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
token is at or below it is served there without asking again: safe because
the read runs on that very session (see :mod:`tiers.db.reads`).
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

Layers. :class:`Cluster` is built of one class per concern, each a
subclass of the one before, so that a read runs through plain method calls
on one object: :class:`tiers.db.links.NodeLinks` keeps the per-thread
connections, the down marks and the served counters;
:class:`tiers.db.topology.Topology` follows the monitor (the primary, the
read pool); :class:`tiers.db.reads.ReadChoice` chooses the node for a read
(consistency, causal waits, remembered positions);
:class:`tiers.db.transactions.Transactions` ends read blocks and write
transactions and handles their failures. This module adds the constructor
and the intents.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from types import MappingProxyType
from typing import Any

from tiers.db import tokens
from tiers.db.engine import Connection, Engine, engine_for_dsns
from tiers.db.errors import classify, retry_safe
from tiers.db.links import Intent
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
    settings_from_env,
)
from tiers.db.reads import FROM_CONTEXT, Token
from tiers.db.tokens import is_token
from tiers.db.topology import HealthSource
from tiers.db.transactions import ReadBlock, Transactions, WriteTransaction

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


class Cluster(Transactions):
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

    The methods not defined here come from its layers (see the module
    docstring): ``health``, ``primary``, ``read_pool`` and ``stop`` from
    :class:`tiers.db.topology.Topology`; ``served``, ``reset_served``,
    ``record``, ``last_node`` and ``close`` from
    :class:`tiers.db.links.NodeLinks`; ``last_write_token``, ``note_commit``
    and ``report_failure`` from :class:`tiers.db.transactions.Transactions`.
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
        frozen: Mapping[str, str] = MappingProxyType(dict(nodes))
        self._init_links(
            frozen, engine if engine is not None else engine_for_dsns(frozen.values()),
            connect_timeout=connect_timeout, retry_after=retry_after, connector=connector,
            clock=clock, is_stale=is_stale)
        self._init_topology(primary, monitor)
        self._init_reads(name, causal_wait, sleep)

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

    # -- intents -------------------------------------------------------------

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
        return ReadBlock(self, name, link, replica)

    def read_primary(self) -> AbstractContextManager[Connection]:
        """A read on the primary (sees every commit); rolled back afterwards."""
        name, link = self._checkout_primary(Intent.READ_PRIMARY)
        return ReadBlock(self, name, link, False)

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


# The name the demo and earlier code use.
Router = Cluster
