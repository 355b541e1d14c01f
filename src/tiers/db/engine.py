"""The database engine interface: what tiers' generic database code needs of an engine.

The router (:mod:`tiers.db.router`), the health probe and monitor
(:mod:`tiers.db.health`, :mod:`tiers.db.monitor`), the causal tokens
(:mod:`tiers.db.tokens`), the SQLAlchemy integration (:mod:`tiers.db.sqla`),
the clusters (:mod:`tiers.db.clusters`) and the failover executor
(:mod:`tiers.db.promote`) speak to a database only through an
:class:`Engine`. PostgreSQL's is :mod:`tiers.db.postgres`, the only adapter so
far; :mod:`tiers.db.fake` is an in-memory one for tests. Everything else
(routing decisions, consistency rules, hysteresis, failover planning,
fencing, sharding) is the same for every engine.

Choosing the engine. :func:`engine_for_dsn` goes by the DSN's scheme
(``postgresql://`` and ``postgres://``; a DSN without a scheme is libpq's
``key=value`` conninfo, so PostgreSQL), :func:`engine_named` by the name the
topology gives (``[db] engine``). A scheme or name of an engine tiers knows
but has no adapter for (``mariadb``, ``mysql``) or does not know at all
raises :class:`UnsupportedEngine` (a ValueError) saying which are
supported; configuration readers turn it into a ConfigError naming the key.
All nodes of one cluster use one engine.

Positions. A :class:`Position` is a point in one cluster's history of
commits, in whatever form the engine has it: PostgreSQL's is an ``int`` (a
WAL byte offset), MariaDB's would be a GTID position (one sequence number
per replication domain), MySQL's a GTID set. Generic code never does
arithmetic on positions and never assumes a total order: it only asks
``a >= b``, meaning "a history at ``a`` holds every commit of one at
``b``", and only of two positions of the same cluster (positions of
different clusters are unrelated). Byte lag, where an engine can measure
it, is the engine's :meth:`Engine.lag_bytes`. A causal token is a position
as text (:meth:`Engine.format_token`), carried in a cookie: it must be
cookie-safe without quoting and contain neither ``.`` nor ``:`` (the
cookie's separators, :mod:`tiers.app.causal`), and the token syntaxes of
different engines must not overlap, since :mod:`tiers.db.tokens` checks a
client's token before it knows the cluster's engine
(:func:`engine_for_token`).

Connections. The router hands out the engine's connection objects as they
are, so application code uses its driver's API (and its SQL dialect). What
generic code itself does with a connection is in :class:`Connection`: the
psycopg 3 shape, ``conn.execute(sql, params)`` returning a cursor, an
``autocommit`` attribute, ``commit``/``rollback``/``close`` and ``closed``.

A MariaDB/MySQL adapter (not written yet) would implement each member as
follows:

* ``name``, ``errors``: ``"mariadb"``; the driver's base error
  (``mariadb.Error`` of MariaDB Connector/Python, or ``pymysql.err.Error``).
* ``address``: parse ``mariadb://user:pw@host:3306/db`` (default port 3306);
  ``local_dsn``: ``mariadb://root@127.0.0.1:PORT/DB`` (``mysql`` as the
  administrative database).
* ``connect``: the driver's connect with ``connect_timeout`` and autocommit
  off, returning a connection subclass that adds ``execute(sql, params)``
  (a new cursor, executed, returned), since neither driver has one.
* ``watch``/``is_stale``: as PostgreSQL's, poll the socket for input (a
  server shutting down sends error 1053 or closes); ``end_read`` is a plain
  ``ROLLBACK``, which keeps server-side prepared statements anyway.
* ``transaction_failed``: MariaDB does not abort a transaction on a failed
  statement, except for a deadlock (1213) or a lock wait timeout with
  ``innodb_rollback_on_timeout``, which roll it back: the adapter records
  such an error on the connection and answers True until the rollback.
* ``needs_new_session``: False (ER_NEED_REPREPARE is handled by the server).
* ``commit_position``: ``SELECT IF(@@read_only, NULL, @@gtid_binlog_pos)``
  after the commit (MySQL: ``@@global.gtid_executed``);
  ``replayed_position``: ``@@gtid_current_pos`` (MySQL:
  ``@@global.gtid_executed``), which on a replica is what its SQL thread
  applied.
* Positions: a frozen mapping of replication domain to sequence number
  whose ``__ge__`` compares domain by domain (MySQL: a GTID set, ``>=``
  being set inclusion, what ``GTID_SUBSET`` computes). A causal read checks
  the replayed position against the token as for PostgreSQL; a single
  check could instead be ``MASTER_GTID_WAIT(pos, 0)`` (MySQL:
  ``WAIT_FOR_EXECUTED_GTID_SET(set, 0)``), but the router polls several
  replicas in turn and keeps the comparison in Python. The new primary of a
  failover goes on counting in the same domain, so tokens stay comparable
  across it.
* ``parse_token``/``format_token``: GTID text with ``_`` instead of ``,``
  between domains (a comma needs quoting in a cookie), e.g. ``0-1-4711_1-2-9``;
  the cookie's length limit in :mod:`tiers.app.causal` counts 17 characters
  per token and would have to grow for long GTID lists.
* ``lag_bytes``: None: GTIDs carry no byte offsets, so only the lag in
  seconds limits the read pool.
* ``probe``: one round trip, ``SELECT @@read_only, @@gtid_current_pos`` and
  the lag in seconds: ``Seconds_Behind_Master`` of ``SHOW SLAVE STATUS`` (a
  second statement, as a multi-statement query; ``Seconds_Behind_Source``
  of ``SHOW REPLICA STATUS`` on MySQL 8), or on MySQL 8
  ``now() - LAST_APPLIED_TRANSACTION_ORIGINAL_COMMIT_TIMESTAMP`` from
  ``performance_schema.replication_applier_status_by_worker``; received
  position ``Gtid_IO_Pos``. In recovery means ``read_only`` (tiers keeps
  every replica read-only). One deadline for connect and answer, as the
  PostgreSQL probe keeps it.
* ``classify_error``: by error number: 2002, 2003, 2006, 2013, 1053, 1927,
  1040 and the aborted-connection errors are *gone*; 1290 and 1836 (the
  server runs with ``--read-only``) *not the primary*; the rest *other*.
* ``sqlalchemy_engine``: ``create_engine("mariadb+mariadbconnector://",
  creator=...)``; ``next_id``: a stored function ``tiers_next_id`` over a
  SEQUENCE (MariaDB 10.3+), error 1305 meaning it is not installed.
* ``server_facts``: ``@@read_only``, ``Gtid_IO_Pos`` (received) or
  ``@@gtid_slave_pos``, and ``Master_Port`` of ``SHOW SLAVE STATUS``;
  ``streaming_from``: that port while ``Slave_IO_Running`` is ``Yes``.
* ``promote``: wait until the SQL thread has applied what was received
  (``MASTER_GTID_WAIT(Gtid_IO_Pos)``), then ``STOP SLAVE; RESET SLAVE ALL;
  SET GLOBAL read_only = OFF``.
* ``running``/``stop``: the server's processes in its data directory;
  clean: ``SHUTDOWN WAIT FOR ALL SLAVES`` (MariaDB 10.4+), which, like
  PostgreSQL's fast shutdown, sends every binlog event to the connected
  replicas first; otherwise SIGKILL.
* ``end_of_history``: the GTID state a cleanly stopped server saved
  (``gtid_binlog_state``, from its binlog index and state file).
* ``follow``: ``CHANGE MASTER TO MASTER_HOST='127.0.0.1', MASTER_PORT=...,
  MASTER_USE_GTID=slave_pos; START SLAVE`` (for a stopped server, in an init
  file read at its next start).
* ``resync``: MariaDB has no ``pg_rewind``: what diverged goes with a new copy
  of the primary (``mariadb-backup --backup`` and ``--prepare``, with
  ``gtid_slave_pos`` set from the copy's binlog position).

Outside this interface, a MariaDB stack would also need its own counterparts
of what is PostgreSQL's alone: the embedded servers (:mod:`tiers.db.embedded`:
binaries, first data directory, base backups, server command line), the
migration lock (:mod:`tiers.db.migrate` takes a PostgreSQL advisory lock)
and the DDL of ``tiers_next_id`` (:func:`tiers.db.ids.next_id_ddl`, PL/pgSQL).

Errors: :class:`UnsupportedEngine` (ValueError) for an engine without an
adapter; every member documents its own.
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

from tiers.db.embedded import Layout, RunAs

if TYPE_CHECKING:
    import sqlalchemy

    from tiers.db.errors import Failure

__all__ = [
    "DEFAULT_ENGINE",
    "Connection",
    "ConnectionWatch",
    "Cursor",
    "Engine",
    "LocalServer",
    "NodeObservation",
    "Position",
    "ServerFacts",
    "UnsupportedEngine",
    "default_engine",
    "driver_errors",
    "engine_for_dsn",
    "engine_for_dsns",
    "engine_for_token",
    "engine_named",
    "known_engines",
    "register_engine",
    "unregister_engine",
]

DEFAULT_ENGINE: Final = "postgresql"
"""The engine of a DSN without a scheme, and of code that names none."""


class Position(Protocol):
    """A point in one cluster's history; ``a >= b``: ``a`` holds every commit ``b`` holds.

    Only ever compared with a position of the same cluster. PostgreSQL's is
    an ``int``; see the module docstring for others.
    """

    def __ge__(self, other: Any, /) -> bool: ...


class Cursor(Protocol):
    """What generic code reads from the result of :meth:`Connection.execute`."""

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """What generic code does with an engine's connection (psycopg 3's shape).

    ``autocommit`` is off as :meth:`Engine.connect` hands a connection out;
    the router turns it on for statements that run alone.
    """

    autocommit: bool

    @property
    def closed(self) -> bool: ...

    def execute(self, query: Any, params: Any = None, /) -> Cursor: ...

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    def close(self) -> None: ...


class ConnectionWatch(Protocol):
    """Per-connection helpers the router keeps next to a connection of the engine's driver.

    Made once per connection (:meth:`Engine.watch`), so that what the router
    does before and after every read costs no set-up each time.
    """

    def stale(self) -> bool:
        """True if the idle connection may be unusable; sends nothing (see Engine.is_stale)."""
        ...

    def end_read(self) -> None:
        """End a read block's transaction on a replica, keeping what the session prepared.

        Nothing to do on an idle session; a failed transaction is rolled
        back as usual. Raises the driver's error (and closes the
        connection) if the session cannot be brought back to idle.
        """
        ...


@dataclass(frozen=True, slots=True)
class NodeObservation:
    """What one probe of one node saw (:meth:`Engine.probe`).

    ``reachable`` means the node accepted a connection and answered the probe
    query; when it is false only ``name``, ``target`` (``host:port/dbname``),
    ``error`` and ``checked_at`` are set. ``position`` is how far the node's
    history goes: the replayed position on a replica, the written one on a
    primary; ``received_position`` is a replica's last received position
    (None on a primary, or before streaming starts). ``lag_bytes`` is filled
    in by :func:`tiers.db.health.update` from the primary's position in the
    same round, where the engine can measure bytes. ``checked_at`` is
    ``time.monotonic()`` when the probe finished.
    """

    name: str
    target: str
    reachable: bool
    in_recovery: bool | None = None
    position: Position | None = None
    replay_lag_seconds: float | None = None
    lag_bytes: int | None = None
    error: str | None = None
    checked_at: float = 0.0
    received_position: Position | None = None


@dataclass(frozen=True, slots=True)
class ServerFacts:
    """What the failover executor asks of a running node (:meth:`Engine.server_facts`).

    ``position`` is the furthest the node's history goes: on a replica the
    further of received and replayed (a promotion replays all it received),
    on a primary its written position; None when unknown. ``upstream_port``
    is the port of the server a replica is configured to stream from (None:
    none configured, or not a replica).
    """

    in_recovery: bool
    position: Position | None = None
    upstream_port: int | None = None


@dataclass(frozen=True, slots=True)
class LocalServer:
    """A server of this stack that the failover executor manages on this machine.

    ``layout`` places its data directory (``layout.node_dir(name)``) and the
    engine's programs; ``run_as`` is the system user they run as; ``port``
    is where it listens on 127.0.0.1.
    """

    layout: Layout
    run_as: RunAs
    name: str
    port: int

    @property
    def data_dir(self) -> Path:
        return self.layout.node_dir(self.name)


class Engine(Protocol):
    """Everything engine-specific that tiers' generic database code uses.

    Members are grouped as the module docstring's MariaDB notes are. Unless
    a member says otherwise, a driver error (an instance of one of
    :attr:`errors`) propagates unchanged, and callers classify it with
    :meth:`classify_error`.
    """

    name: str
    """The engine's canonical name, as the topology's ``[db] engine`` gives it."""

    errors: tuple[type[BaseException], ...]
    """The base classes of every error the engine's driver raises."""

    # -- nodes and connections ----------------------------------------------

    def address(self, dsn: str) -> str:
        """``host:port/database`` of ``dsn``, without credentials; ValueError if it does
        not parse."""
        ...

    def local_dsn(self, port: int, database: str | None = None) -> str:
        """The DSN of ``database`` on this stack's server at 127.0.0.1:``port`` (None: the
        engine's administrative database), as the stack's own superuser."""
        ...

    def connect(self, dsn: str, timeout: float, *, autocommit: bool = False) -> Connection:
        """A new connection to ``dsn``; the driver's error if it fails.

        ``timeout`` bounds the connect in seconds, as finely as the driver can.
        """
        ...

    def watch(self, conn: Any) -> ConnectionWatch | None:
        """Helpers for ``conn`` if it is a connection of this engine's driver, else None
        (a stand-in some test or integration connected)."""
        ...

    def is_stale(self, conn: Any) -> bool:
        """True if an idle connection may be unusable, found out without sending anything
        (the server closed it, or sent something unasked, which an idle router session
        only gets when the server goes away)."""
        ...

    def transaction_failed(self, conn: Any) -> bool:
        """True if a statement failed in ``conn``'s open transaction, so that COMMIT would
        not commit what the block sent."""
        ...

    def needs_new_session(self, exc: BaseException) -> bool:
        """True if ``exc`` says this session cannot run the statement again although the
        node is fine (PostgreSQL: a prepared statement whose result type changed)."""
        ...

    # -- positions and tokens -------------------------------------------------

    def commit_position(self, conn: Any) -> Position | None:
        """The primary's position right after a commit on ``conn``, in autocommit.

        It is at or past the commit, so any node that has reached it has the
        commit. None if the node is in recovery (it is no primary: nothing
        was written). ValueError for an answer the engine cannot read.
        """
        ...

    def replayed_position(self, conn: Any) -> Position | None:
        """How far the node of ``conn`` has replayed (on a primary: written), in autocommit.

        A read on this node sees every commit at or before it. None if the
        node reports none; ValueError for an answer the engine cannot read.
        """
        ...

    def parse_token(self, text: str) -> Position:
        """The position a causal token stands for; ValueError for malformed text."""
        ...

    def format_token(self, position: Position) -> str:
        """The causal token of ``position``; :meth:`parse_token` reads it back.

        ValueError for a value that is no position of this engine.
        """
        ...

    def lag_bytes(self, primary: Position, replica: Position) -> int | None:
        """How many bytes of history ``replica`` lacks compared with ``primary``; 0 when
        none, None when the engine cannot measure bytes."""
        ...

    # -- health ---------------------------------------------------------------

    def probe(self, dsn: str, timeout: float = 0.5, *,
              name: str | None = None) -> NodeObservation:
        """One node's role, position and replay lag, from a fresh connection.

        Connect and answer together take at most ``timeout`` seconds. Never
        raises for a dead, refusing or misbehaving node: returns
        ``reachable=False`` with the reason in ``error``. ``name`` defaults to
        :meth:`address` of ``dsn``.
        """
        ...

    # -- errors ---------------------------------------------------------------

    def classify_error(self, exc: BaseException) -> Failure:
        """What one error of this engine's driver says about the node; ``OTHER`` for any
        other exception (see :mod:`tiers.db.errors`)."""
        ...

    # -- integrations -----------------------------------------------------------

    def sqlalchemy_engine(self, dsn: str, options: Mapping[str, Any]) -> sqlalchemy.Engine:
        """An SQLAlchemy Engine connecting to ``dsn`` with the engine's dialect and driver;
        ``options`` go to ``create_engine``."""
        ...

    def next_id(self, conn: Any, shard: int) -> int:
        """A new shard-carrying id from ``tiers_next_id(shard)`` on ``conn``
        (:mod:`tiers.db.ids`); DatabaseError if the function is missing or answers
        nothing."""
        ...

    # -- failover: servers this stack manages -------------------------------------

    def server_facts(self, conn: Any) -> ServerFacts:
        """Role, furthest position and configured upstream of the node of ``conn``."""
        ...

    def promote(self, conn: Any, timeout: float) -> None:
        """End recovery on the node of ``conn``; returns once it accepts writes.

        Does nothing to a node that is not in recovery. DatabaseError if it
        is still in recovery after ``timeout`` seconds.
        """
        ...

    def running(self, server: LocalServer) -> bool:
        """Whether any process of ``server`` is alive (a server, or what it left behind)."""
        ...

    def stop(self, server: LocalServer, *, clean: bool, timeout: float) -> None:
        """Stop ``server``; returns once none of its processes is left.

        ``clean``: a shutdown that first sends all of its history to the
        connected replicas, failing (DatabaseError) rather than killing;
        otherwise as fast as possible, killing whatever does not exit.
        """
        ...

    def end_of_history(self, server: LocalServer) -> Position:
        """The position a replica must reach to hold everything the cleanly stopped
        ``server`` wrote; DatabaseError if it was not stopped cleanly."""
        ...

    def follow(self, server: LocalServer, primary_port: int) -> None:
        """Configure ``server`` as a replica of the server at ``primary_port``; a running
        server is made to apply it (and follows the primary's new history)."""
        ...

    def streaming_from(self, conn: Any) -> int | None:
        """The port of the server the node of ``conn`` streams from now, None while it does
        not stream; DatabaseError if the node is not a replica."""
        ...

    def resync(self, server: LocalServer, primary_port: int, timeout: float) -> None:
        """Make the stopped ``server``'s data a copy of the running primary's history,
        discarding whatever it has that the primary lacks, ready to start as its
        replica (after :meth:`follow`). DatabaseError if it cannot."""
        ...


# ---- choosing an engine -----------------------------------------------------------


class UnsupportedEngine(ValueError):
    """A DSN scheme or engine name names no engine tiers has an adapter for."""


@dataclass(frozen=True)
class _Adapter:
    name: str
    title: str
    schemes: tuple[str, ...]
    module: str | None  # defines ENGINE; None while tiers has no adapter


_ADAPTERS: Final = (
    _Adapter("postgresql", "PostgreSQL", ("postgresql", "postgres"), "tiers.db.postgres"),
    _Adapter("mariadb", "MariaDB/MySQL", ("mariadb", "mysql"), None),
)
_SCHEME_RE = re.compile(r"\A([A-Za-z][A-Za-z0-9+.-]*)://")

_lock = threading.Lock()
_loaded: dict[str, Engine] = {}
# Engines added at run time (fakes in tests, adapters from outside tiers): name -> engine,
# and their schemes -> name.
_registered: dict[str, Engine] = {}
_registered_schemes: dict[str, str] = {}


def _supported() -> str:
    names = [a.name for a in _ADAPTERS if a.module is not None] + sorted(_registered)
    return ", ".join(dict.fromkeys(names))


def _load(adapter: _Adapter) -> Engine:
    engine = _loaded.get(adapter.name)
    if engine is None:
        if adapter.module is None:
            raise UnsupportedEngine(
                f"{adapter.title} ({adapter.name}) has no adapter in tiers yet; "
                f"supported: {_supported()}")
        engine = importlib.import_module(adapter.module).ENGINE
        with _lock:
            engine = _loaded.setdefault(adapter.name, engine)
    return engine


def engine_named(name: str) -> Engine:
    """The engine called ``name`` (or one of its schemes: ``postgres`` is
    ``postgresql``), loaded; UnsupportedEngine for one without an adapter or unknown."""
    wanted = name.strip().lower()
    registered = _registered.get(wanted) or _registered.get(_registered_schemes.get(wanted, ""))
    if registered is not None:
        return registered
    for adapter in _ADAPTERS:
        if wanted == adapter.name or wanted in adapter.schemes:
            return _load(adapter)
    known = [a.name for a in _ADAPTERS] + sorted(_registered)
    raise UnsupportedEngine(f"unknown database engine {name!r} (known: {', '.join(known)}; "
                            f"supported: {_supported()})")


def engine_for_dsn(dsn: str) -> Engine:
    """The engine of a DSN, by its scheme; a DSN without one is libpq's conninfo.

    Looks at the scheme only (``mariadb://`` is refused even if the rest is
    garbage). UnsupportedEngine for a scheme of an engine without an
    adapter, or an unknown one.
    """
    match = _SCHEME_RE.match(dsn.strip())
    if match is None:
        return engine_named(DEFAULT_ENGINE)
    scheme = match.group(1).lower()
    name = _registered_schemes.get(scheme)
    if name is not None:
        return _registered[name]
    for adapter in _ADAPTERS:
        if scheme in adapter.schemes:
            return _load(adapter)
    schemes = [s for a in _ADAPTERS for s in a.schemes if a.module is not None]
    raise UnsupportedEngine(f"unknown database scheme {scheme + '://'!r} "
                            f"(supported: {', '.join(schemes + sorted(_registered_schemes))})")


def engine_for_dsns(dsns: Iterable[str]) -> Engine:
    """The one engine of every DSN in ``dsns`` (the nodes of one cluster).

    UnsupportedEngine as :func:`engine_for_dsn` raises it, or if the DSNs
    name different engines; the default engine for none.
    """
    found: Engine | None = None
    for dsn in dsns:
        engine = engine_for_dsn(dsn)
        if found is not None and engine is not found:
            raise UnsupportedEngine(f"the nodes of one cluster use one engine, not both "
                                    f"{found.name} and {engine.name}")
        found = engine
    return found if found is not None else default_engine()


def default_engine() -> Engine:
    """The engine of code that names none: PostgreSQL's."""
    return engine_named(DEFAULT_ENGINE)


def known_engines() -> tuple[Engine, ...]:
    """Every engine tiers can use now: those with an adapter, then those registered."""
    adapters = tuple(_load(a) for a in _ADAPTERS if a.module is not None)
    return adapters + tuple(e for e in _registered.values() if e not in adapters)


def engine_for_token(text: str) -> Engine | None:
    """The known engine whose token syntax ``text`` has, or None (see the module notes)."""
    for engine in known_engines():
        try:
            engine.parse_token(text)
        except ValueError:
            continue
        return engine
    return None


def driver_errors() -> tuple[type[BaseException], ...]:
    """The error base classes of every known engine's driver."""
    return tuple(dict.fromkeys(cls for engine in known_engines() for cls in engine.errors))


def register_engine(engine: Engine, schemes: Iterable[str] = ()) -> Callable[[], None]:
    """Make ``engine`` known by its name and ``schemes``; returns what undoes it.

    For engines that are not part of tiers: in-memory fakes in tests, or an
    adapter shipped elsewhere. ValueError if the name or a scheme is taken.
    """
    names = {engine.name, *schemes}
    with _lock:
        taken = sorted(n for n in names if n in _registered or n in _registered_schemes
                       or any(n == a.name or n in a.schemes for a in _ADAPTERS))
        if taken:
            raise ValueError(f"engine name or scheme already taken: {', '.join(taken)}")
        _registered[engine.name] = engine
        for scheme in schemes:
            _registered_schemes[scheme] = engine.name

    def undo() -> None:
        unregister_engine(engine)

    return undo


def unregister_engine(engine: Engine) -> None:
    """Forget an engine :func:`register_engine` added (nothing if it is not there)."""
    with _lock:
        if _registered.get(engine.name) is engine:
            del _registered[engine.name]
            for scheme in [s for s, n in _registered_schemes.items() if n == engine.name]:
                del _registered_schemes[scheme]
