"""In-memory database nodes behind :class:`tiers.db.engine.Engine`, for tests.

``FakeEngine`` runs servers that live in memory (``add`` one per port) and
answers every member of the interface from them, so the router, the health
monitor, the causal tokens, the clusters and the failover executor can be
tested without PostgreSQL. Its DSNs are ``fake://127.0.0.1:PORT/DB``; make
the scheme and the token syntax known with :meth:`FakeEngine.registered`
where a test goes through code that picks engines by themselves (a request
scope checking tokens, ``Cluster`` without ``engine=``).

Positions are deliberately unlike PostgreSQL's: a :class:`GtidPosition` is,
per replication domain, the sequence number of the last commit (the shape
of MariaDB's GTID positions), compared domain by domain, so two positions
may be incomparable, and the engine measures no bytes (``lag_bytes`` is
None). A test through this engine shows that generic code asks no more of
positions than ``>=``. Tokens are ``DOMAIN-SEQNO`` pairs joined by ``_``
(``0-12_1-3``).

A server keeps its history of commits (each ``PUT key value``) and how
much of it it has applied. The primary applies each commit at once;
:meth:`FakeEngine.replicate` ships history to every running replica from
its upstream and applies it unless the replica is ``paused`` (replay
paused: it receives but does not apply). A replica whose history has
diverged from its upstream's receives nothing until it is resynchronised.

Connections understand three statements: ``PUT key value`` (a write;
refused by a replica with :class:`FakeReadOnly`, buffered until commit
unless in autocommit), ``GET key`` (one row with the value the server has
applied, or none; the connection's own buffered writes first) and ``WHO``
(the server's name). ``FAIL`` raises :class:`FakeStatementError` and spoils
the transaction. A stopped or restarted server makes every connection to it
fail with :class:`FakeGone` (and look stale). Everything is guarded by one
lock, so threads may share the engine.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tiers.db.engine import (
    LocalServer,
    NodeObservation,
    Position,
    ServerFacts,
    register_engine,
)
from tiers.db.errors import Failure
from tiers.db.ids import compose_id
from tiers.errors import DatabaseError

if TYPE_CHECKING:
    import sqlalchemy

    from tiers.db.engine import Engine

__all__ = [
    "FakeConnection",
    "FakeDriverError",
    "FakeEngine",
    "FakeGone",
    "FakeReadOnly",
    "FakeServer",
    "FakeStatementError",
    "GtidPosition",
]

_TOKEN_RE = re.compile(r"\A\d{1,9}-\d{1,18}(?:_\d{1,9}-\d{1,18})*\Z")
_DSN_RE = re.compile(r"\Afake://([^:/]+):(\d+)/(\w*)\Z")


@dataclass(frozen=True, slots=True)
class GtidPosition:
    """Per replication domain, the sequence number of the last commit; ``a >= b`` when
    ``a`` has reached ``b`` in every domain of ``b``."""

    seqnos: tuple[tuple[int, int], ...] = ()

    def __ge__(self, other: Any, /) -> bool:
        if not isinstance(other, GtidPosition):
            return NotImplemented
        mine = dict(self.seqnos)
        return all(mine.get(domain, 0) >= seqno for domain, seqno in other.seqnos)

    def advanced(self, domain: int) -> GtidPosition:
        """The position one commit later in ``domain``."""
        seqnos = dict(self.seqnos)
        seqnos[domain] = seqnos.get(domain, 0) + 1
        return GtidPosition(tuple(sorted(seqnos.items())))

    @property
    def text(self) -> str:
        return "_".join(f"{d}-{s}" for d, s in self.seqnos) or "0-0"

    @classmethod
    def parse(cls, text: str) -> GtidPosition:
        if not _TOKEN_RE.match(text):
            raise ValueError(f"not a fake GTID position: {text!r}")
        seqnos: dict[int, int] = {}
        for pair in text.split("_"):
            domain, seqno = (int(part) for part in pair.split("-"))
            if domain in seqnos:
                raise ValueError(f"domain {domain} twice in {text!r}")
            if seqno:
                seqnos[domain] = seqno
        return cls(tuple(sorted(seqnos.items())))


def _parts(dsn: str) -> tuple[str, int, str]:
    """Host, port and database of a fake DSN; ValueError for anything else."""
    match = _DSN_RE.match(dsn)
    if match is None:
        raise ValueError(f"not a fake DSN: {dsn!r}")
    return match.group(1), int(match.group(2)), match.group(3)


class FakeDriverError(Exception):
    """The base of every error a fake connection raises."""


class FakeGone(FakeDriverError):
    """The server is down, restarted, or the connection is closed."""


class FakeReadOnly(FakeDriverError):
    """A write reached a server in recovery."""


class FakeStatementError(FakeDriverError):
    """The statement failed (``FAIL``, or one the fake does not know)."""


@dataclass
class FakeServer:
    """One in-memory server; tests may change ``up``, ``paused`` and ``lag_seconds``."""

    name: str
    port: int
    primary: bool
    domain: int = 0
    upstream_port: int | None = None
    up: bool = True
    paused: bool = False
    lag_seconds: float = 0.0
    incarnation: int = 0
    cleanly_stopped: bool = False
    history: list[tuple[GtidPosition, str, str]] = field(default_factory=list)
    applied: int = 0
    ids: int = 0

    @property
    def in_recovery(self) -> bool:
        return not self.primary

    @property
    def position(self) -> GtidPosition:
        """How far it has applied."""
        return self.history[self.applied - 1][0] if self.applied else GtidPosition()

    @property
    def received(self) -> GtidPosition:
        return self.history[-1][0] if self.history else GtidPosition()

    def data(self) -> dict[str, str]:
        return {key: value for _, key, value in self.history[: self.applied]}


class FakeCursor:
    def __init__(self, rows: list[tuple[Any, ...]]) -> None:
        self.rows = rows

    def fetchone(self) -> tuple[Any, ...] | None:
        return self.rows[0] if self.rows else None

    def fetchall(self) -> list[tuple[Any, ...]]:
        return list(self.rows)


class FakeConnection:
    """A session with one :class:`FakeServer` (see the module docstring for statements)."""

    def __init__(self, engine: FakeEngine, server: FakeServer, autocommit: bool) -> None:
        self.engine = engine
        self.server = server
        self.incarnation = server.incarnation
        self.autocommit = autocommit
        self._closed = False
        self.failed = False
        self.pending: list[tuple[str, str]] = []
        self.statements: list[str] = []

    @property
    def closed(self) -> bool:
        return self._closed

    def check(self) -> None:
        """FakeGone (closing it) if the session cannot be used."""
        if self._closed:
            raise FakeGone("the connection is closed")
        if not self.server.up or self.server.incarnation != self.incarnation:
            self._closed = True
            raise FakeGone(f"{self.server.name}: server closed the connection")

    def execute(self, query: Any, params: Any = None, /) -> FakeCursor:
        with self.engine.lock:
            self.check()
            text = str(query) if params is None else str(query) % tuple(params)
            self.statements.append(text)
            verb, *args = text.split()
            server = self.server
            if verb == "PUT" and len(args) == 2:
                if server.in_recovery:
                    self.failed = not self.autocommit
                    raise FakeReadOnly(f"cannot PUT on {server.name}: it is in recovery")
                self.pending.append((args[0], args[1]))
                if self.autocommit:
                    self._apply()
                return FakeCursor([])
            if verb == "GET" and len(args) == 1:
                mine = dict(self.pending)
                value = mine.get(args[0], server.data().get(args[0]))
                return FakeCursor([] if value is None else [(value,)])
            if verb == "WHO" and not args:
                return FakeCursor([(server.name,)])
            self.failed = not self.autocommit
            raise FakeStatementError(f"cannot run {text!r}")

    def _apply(self) -> None:
        server = self.server
        for key, value in self.pending:
            server.history.append((server.received.advanced(server.domain), key, value))
            server.applied = len(server.history)
        self.pending.clear()

    def commit(self) -> None:
        with self.engine.lock:
            self.check()
            if not self.failed:  # as PostgreSQL: COMMIT of a failed transaction rolls back
                self._apply()
            self.pending.clear()
            self.failed = False

    def rollback(self) -> None:
        with self.engine.lock:
            self.check()
            self.pending.clear()
            self.failed = False

    def close(self) -> None:
        self._closed = True


class FakeEngine:
    """An :class:`~tiers.db.engine.Engine` over in-memory servers (see the module docstring).

    ``clock`` stamps probe observations (``time.monotonic`` unless given).
    """

    errors: tuple[type[BaseException], ...] = (FakeDriverError,)

    def __init__(self, name: str = "fake", clock: Callable[[], float] = time.monotonic) -> None:
        self.name = name
        self.clock = clock
        self.lock = threading.RLock()
        self.servers: dict[int, FakeServer] = {}

    # -- the test's side ----------------------------------------------------------------

    def add(self, name: str, port: int, *, upstream: int | None = None,
            domain: int = 0) -> FakeServer:
        """A running server on ``port``: the primary without ``upstream``, else a replica
        of the server on that port, with a copy of its history."""
        with self.lock:
            server = FakeServer(name, port, primary=upstream is None, domain=domain,
                                upstream_port=upstream)
            if upstream is not None:
                source = self.servers[upstream]
                server.history = list(source.history)
                server.applied = len(server.history)
            self.servers[port] = server
            return server

    def server(self, name: str) -> FakeServer:
        """The server called ``name``; KeyError if there is none."""
        for server in self.servers.values():
            if server.name == name:
                return server
        raise KeyError(name)

    def dsn(self, name: str, database: str = "app") -> str:
        return self.local_dsn(self.server(name).port, database)

    def start(self, name: str) -> None:
        """Start a stopped server (a new incarnation: old sessions stay dead)."""
        with self.lock:
            server = self.server(name)
            server.up, server.cleanly_stopped = True, False
            server.incarnation += 1

    def replicate(self) -> None:
        """Ship history from each running upstream to its running replicas, and apply it
        where replay is not paused."""
        with self.lock:
            for server in self.servers.values():
                source = self.servers.get(server.upstream_port or -1)
                if not server.up or server.primary or source is None or not source.up:
                    continue
                mine, theirs = server.history, source.history
                if len(theirs) >= len(mine) and theirs[: len(mine)] == mine:
                    server.history = list(theirs)
                if not server.paused:
                    server.applied = len(server.history)

    @contextmanager
    def registered(self) -> Iterator[FakeEngine]:
        """Known as ``self.name`` with the scheme ``fake``, for the block."""
        undo = register_engine(self, ["fake"])
        try:
            yield self
        finally:
            undo()

    def _server_of(self, conn: Any) -> FakeServer:
        if not isinstance(conn, FakeConnection):
            raise TypeError(f"not a fake connection: {conn!r}")
        conn.check()
        return conn.server

    # -- nodes and connections ------------------------------------------------------------

    def address(self, dsn: str) -> str:
        host, port, database = _parts(dsn)
        return f"{host}:{port}/{database}"

    def local_dsn(self, port: int, database: str | None = None) -> str:
        return f"fake://127.0.0.1:{port}/{database or 'admin'}"

    def connect(self, dsn: str, timeout: float, *, autocommit: bool = False) -> FakeConnection:
        _host, port, _database = _parts(dsn)
        with self.lock:
            server = self.servers.get(port)
            if server is None or not server.up:
                raise FakeGone(f"connection to {dsn} refused")
            return FakeConnection(self, server, autocommit)

    def watch(self, conn: Any) -> None:
        return None  # no socket to watch: is_stale does the work

    def is_stale(self, conn: Any) -> bool:
        if not isinstance(conn, FakeConnection):
            return True
        server = conn.server
        return conn.closed or not server.up or server.incarnation != conn.incarnation

    def transaction_failed(self, conn: Any) -> bool:
        return isinstance(conn, FakeConnection) and conn.failed

    def needs_new_session(self, exc: BaseException) -> bool:
        return False

    # -- positions and tokens -------------------------------------------------------------

    def commit_position(self, conn: Any) -> GtidPosition | None:
        with self.lock:
            server = self._server_of(conn)
            return None if server.in_recovery else server.position

    def replayed_position(self, conn: Any) -> GtidPosition | None:
        with self.lock:
            return self._server_of(conn).position

    def parse_token(self, text: str) -> GtidPosition:
        return GtidPosition.parse(text)

    def format_token(self, position: Position) -> str:
        if not isinstance(position, GtidPosition):
            raise ValueError(f"not a fake GTID position: {position!r}")
        return position.text

    def lag_bytes(self, primary: Position, replica: Position) -> int | None:
        return None  # GTIDs carry no byte offsets

    # -- health and errors ----------------------------------------------------------------

    def probe(self, dsn: str, timeout: float = 0.5, *,
              name: str | None = None) -> NodeObservation:
        try:
            host, port, database = _parts(dsn)
        except ValueError as exc:
            return NodeObservation(name or dsn, dsn, reachable=False, error=str(exc),
                                   checked_at=self.clock())
        target = f"{host}:{port}/{database}"
        label = name if name is not None else target
        with self.lock:
            server = self.servers.get(port)
            if server is None or not server.up:
                return NodeObservation(label, target, reachable=False,
                                       error="cannot connect: connection refused",
                                       checked_at=self.clock())
            replica = server.in_recovery
            return NodeObservation(
                label, target, reachable=True, in_recovery=replica, position=server.position,
                replay_lag_seconds=server.lag_seconds if replica else None,
                checked_at=self.clock(),
                received_position=server.received if replica else None)

    def classify_error(self, exc: BaseException) -> Failure:
        if isinstance(exc, FakeGone):
            return Failure.NODE_GONE
        if isinstance(exc, FakeReadOnly):
            return Failure.NOT_PRIMARY
        return Failure.OTHER

    # -- integrations ---------------------------------------------------------------------

    def sqlalchemy_engine(self, dsn: str, options: Mapping[str, Any]) -> sqlalchemy.Engine:
        raise DatabaseError("the fake engine has no SQLAlchemy dialect")

    def next_id(self, conn: Any, shard: int) -> int:
        with self.lock:
            server = self._server_of(conn)
            server.ids += 1
            return compose_id(1, shard, server.ids % 1024)

    # -- failover -------------------------------------------------------------------------

    def server_facts(self, conn: Any) -> ServerFacts:
        with self.lock:
            server = self._server_of(conn)
            if server.primary:
                return ServerFacts(False, server.position, None)
            return ServerFacts(True, server.received, server.upstream_port)

    def promote(self, conn: Any, timeout: float) -> None:
        with self.lock:
            server = self._server_of(conn)
            server.applied = len(server.history)
            server.primary, server.upstream_port = True, None

    def _local(self, server: LocalServer) -> FakeServer:
        try:
            return self.servers[server.port]
        except KeyError:
            raise DatabaseError(f"no fake server on port {server.port}") from None

    def running(self, server: LocalServer) -> bool:
        with self.lock:
            return self._local(server).up

    def stop(self, server: LocalServer, *, clean: bool, timeout: float) -> None:
        with self.lock:
            fake = self._local(server)
            if not fake.up:
                return
            if clean:
                self.replicate()  # as a clean PostgreSQL shutdown sends all its WAL first
            fake.up, fake.cleanly_stopped = False, clean
            fake.incarnation += 1

    def end_of_history(self, server: LocalServer) -> GtidPosition:
        with self.lock:
            fake = self._local(server)
            if fake.up or not fake.cleanly_stopped:
                raise DatabaseError(f"{server.name} is not cleanly shut down")
            return fake.received

    def follow(self, server: LocalServer, primary_port: int) -> None:
        with self.lock:
            fake = self._local(server)
            fake.primary, fake.upstream_port = False, primary_port

    def streaming_from(self, conn: Any) -> int | None:
        with self.lock:
            server = self._server_of(conn)
            if server.primary:
                raise DatabaseError("it is not a replica")
            source = self.servers.get(server.upstream_port or -1)
            return server.upstream_port if source is not None and source.up else None

    def resync(self, server: LocalServer, primary_port: int, timeout: float) -> None:
        with self.lock:
            fake, source = self._local(server), self.servers.get(primary_port)
            if source is None or not source.up:
                raise DatabaseError(f"no running primary on port {primary_port}")
            # Whatever it has that the primary lacks is discarded, as pg_rewind does.
            fake.history = list(source.history)
            fake.applied = len(fake.history)


if TYPE_CHECKING:
    _CONFORMS: Engine = FakeEngine()  # mypy checks the fake against the interface here
