"""Read/write routing for application code: writes to the primary, reads to replicas.

A write runs in a transaction on the primary. After it commits, the router
records the primary's WAL position as a *causal token* (an LSN in PostgreSQL's
``X/Y`` text form). A later read that presents the token is served by a
replica only if that replica has replayed at least that far; otherwise it
goes to the primary. That is read-your-writes: a client that carries its last
token (the demo keeps it in a cookie) never sees a page older than its write.

Choosing a replica is split in two, so the decision is testable without a
database: :func:`replica_order` (round-robin, skipping replicas that failed
recently) and :func:`replica_qualifies` (LSN comparison) are plain functions;
:class:`Router` does the I/O around them with one cheap query per replica tried.

Connections are per thread and opened lazily, so a router built before
gunicorn forks opens nothing until a worker thread first uses it. A broken
connection is dropped and reopened on next use. Failures of the router's own
steps (connect, check, commit) raise :class:`tiers.errors.DatabaseError`;
errors raised by the caller's statements inside a ``with`` block propagate
unchanged (the app may want to catch ``psycopg.errors.UniqueViolation``).
"""

from __future__ import annotations

import itertools
import os
import re
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from types import TracebackType

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.pq import TransactionStatus
from psycopg.rows import TupleRow

from tiers.errors import ConfigError, DatabaseError

Connection = psycopg.Connection[TupleRow]
# (dsn, connect timeout in seconds) -> an open connection with autocommit off.
Connector = Callable[[str, float], Connection]

PRIMARY_ENV = "TIERS_DB_PRIMARY"
REPLICAS_ENV = "TIERS_DB_REPLICAS"

# Index of the primary in the per-thread connection table; replicas are 0..n-1.
_PRIMARY = -1

_LSN_RE = re.compile(r"\A([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})\Z")

# On a replica, how far it has replayed; on a server that is not in recovery
# (a promoted node, or a "replica" that is really the primary), how far it has
# written, which is what a read from it would see.
_POSITION_SQL = (
    "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
    " ELSE pg_current_wal_lsn() END)::text"
)
_WRITE_POSITION_SQL = "SELECT pg_current_wal_lsn()::text"


def parse_lsn(text: str) -> int:
    """Parse PostgreSQL's ``X/Y`` LSN text (two hex numbers of up to 32 bits) into an int.

    Raises ValueError for anything else.
    """
    match = _LSN_RE.match(text)
    if match is None:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(value: int) -> str:
    """The ``X/Y`` text form of an LSN, as PostgreSQL prints it."""
    if not 0 <= value < 1 << 64:
        raise ValueError(f"LSN out of range: {value}")
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def is_token(text: str | None) -> bool:
    """True if ``text`` is a well-formed causal token (so it may be passed to ``read``)."""
    if text is None:
        return False
    try:
        parse_lsn(text)
    except ValueError:
        return False
    return True


def replica_order(count: int, start: int, down_until: Sequence[float], now: float) -> list[int]:
    """The replicas to try for one read, in order.

    Round-robin: begins at ``start`` modulo ``count`` and wraps around. A
    replica whose ``down_until`` lies after ``now`` failed recently and is
    left out, so a dead replica costs one failed connect per retry period
    rather than one per read.
    """
    if count <= 0:
        return []
    first = start % count
    order = [(first + step) % count for step in range(count)]
    return [index for index in order if down_until[index] <= now]


def replica_qualifies(position: int | None, token: int | None) -> bool:
    """True if a replica that has replayed up to ``position`` may serve a read needing ``token``.

    Without a token any reachable replica will do. A replica that reports no
    position cannot prove it has the write, so it does not qualify.
    """
    if token is None:
        return True
    return position is not None and position >= token


def describe_dsn(dsn: str) -> str:
    """``host:port/dbname`` of a conninfo string or URI, without the password, for messages."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        return "<unparsable conninfo>"
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port") or "5432"
    dbname = params.get("dbname") or params.get("user") or ""
    return f"{host}:{port}/{dbname}"


def connect(dsn: str, timeout: float) -> Connection:
    """Open a connection with autocommit off; libpq's connect_timeout is whole seconds."""
    return psycopg.connect(dsn, autocommit=False, connect_timeout=max(1, round(timeout)))


class _ThreadState(threading.local):
    def __init__(self) -> None:
        self.pid = os.getpid()
        self.conns: dict[int, Connection] = {}
        self.token: str | None = None


class WriteTransaction:
    """A transaction on the primary; use as ``with router.write() as conn:``.

    On a clean exit it commits and sets :attr:`token` to the primary's WAL
    position after the commit (the router's ``last_write_token`` for this
    thread too). On an exception it rolls back and lets the exception through.
    """

    def __init__(self, router: Router) -> None:
        self._router = router
        self._conn: Connection | None = None
        self.token: str | None = None

    def __enter__(self) -> Connection:
        if self._conn is not None:
            raise RuntimeError("a WriteTransaction can be entered only once")
        self._conn = self._router._connection(_PRIMARY)
        return self._conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn = self._conn
        assert conn is not None
        if exc_type is not None:
            self._router._finish(_PRIMARY, conn, failed=True)
            return
        self.token = self._router._commit(conn)


class Router:
    """Route one process's queries: writes to the primary, reads to a replica that has caught up.

    ``primary_dsn`` and each of ``replica_dsns`` are libpq conninfo strings
    or URIs. Safe to share between threads: each thread has its own
    connections. Do not nest ``read`` or ``write`` blocks on one thread: a
    read served by the primary uses the same connection as a write.

    ``connect_timeout`` bounds each connect (libpq counts whole seconds, at
    least 2). A replica that fails to connect or answer is skipped by reads
    for ``retry_after`` seconds, so an unreachable one costs a failed
    connect once per period rather than on every read. ``connector`` and
    ``clock`` are for tests.
    """

    def __init__(
        self,
        primary_dsn: str,
        replica_dsns: Sequence[str] = (),
        *,
        connect_timeout: float = 2.0,
        retry_after: float = 5.0,
        connector: Connector = connect,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.primary_dsn = primary_dsn
        self.replica_dsns = tuple(replica_dsns)
        self.connect_timeout = connect_timeout
        self.retry_after = retry_after
        self._connector = connector
        self._clock = clock
        # Shared by all threads: a replica found dead by one thread is skipped
        # by the others too. Races only cost an extra connect attempt.
        self._down_until = [0.0] * len(self.replica_dsns)
        self._cursor = itertools.count()
        self._local = _ThreadState()
        # Connections a forked child inherited: never used nor closed there
        # (closing would end the parent's session on the shared socket), only
        # kept referenced so that garbage collection does not close them either.
        self._inherited: list[Connection] = []

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Router:
        """Build a router from ``TIERS_DB_PRIMARY`` and ``TIERS_DB_REPLICAS``.

        ``TIERS_DB_REPLICAS`` is a comma-separated list and may be empty or
        unset. Raises ConfigError if the primary is missing or a value does
        not parse as a conninfo.
        """
        env = os.environ if environ is None else environ
        primary = env.get(PRIMARY_ENV, "").strip()
        if not primary:
            raise ConfigError("environment", PRIMARY_ENV, "not set")
        replicas = [part.strip() for part in env.get(REPLICAS_ENV, "").split(",")]
        replicas = [part for part in replicas if part]
        for key, dsn in [(PRIMARY_ENV, primary)] + [(REPLICAS_ENV, r) for r in replicas]:
            try:
                conninfo_to_dict(dsn)
            except psycopg.Error as exc:
                reason = f"not a conninfo string or URI: {exc}"
                raise ConfigError("environment", key, reason) from exc
        return cls(primary, replicas)

    @property
    def last_write_token(self) -> str | None:
        """The causal token of this thread's last committed ``write``, if any."""
        return self._state().token

    def write(self) -> WriteTransaction:
        """A transaction on the primary that commits on a clean exit; see WriteTransaction."""
        return WriteTransaction(self)

    @contextmanager
    def read(self, token: str | None = None) -> Iterator[Connection]:
        """A read-only use of a node that has seen ``token``; the transaction is rolled back after.

        Tries replicas round-robin and takes the first that answers and has
        replayed at least ``token`` (any answering replica without a token).
        If none does, or there are no replicas, reads from the primary. A
        malformed token raises ValueError (check cookies with ``is_token``).
        Raises DatabaseError only if the primary is needed and cannot be reached.
        """
        wanted = None if token is None else parse_lsn(token)
        index, conn = self._pick_for_read(wanted)
        try:
            yield conn
        except BaseException:
            self._finish(index, conn, failed=True)
            raise
        self._finish(index, conn, failed=False)

    def close(self) -> None:
        """Close the calling thread's connections (they reopen on next use)."""
        state = self._state()
        conns, state.conns = state.conns, {}
        for conn in conns.values():
            conn.close()

    # -- internals -------------------------------------------------------

    def _state(self) -> _ThreadState:
        state = self._local
        if state.pid != os.getpid():
            self._inherited.extend(state.conns.values())
            state.conns = {}
            state.token = None
            state.pid = os.getpid()
        return state

    def _dsn(self, index: int) -> str:
        return self.primary_dsn if index == _PRIMARY else self.replica_dsns[index]

    def _role(self, index: int) -> str:
        role = "primary" if index == _PRIMARY else f"replica {index}"
        return f"{role} {describe_dsn(self._dsn(index))}"

    def _connection(self, index: int) -> Connection:
        """This thread's open connection to a node, connecting if there is none or it broke."""
        state = self._state()
        conn = state.conns.get(index)
        if conn is not None and not conn.closed:
            return conn
        state.conns.pop(index, None)
        try:
            conn = self._connector(self._dsn(index), self.connect_timeout)
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot connect to {self._role(index)}: {exc}") from exc
        state.conns[index] = conn
        return conn

    def _discard(self, index: int) -> None:
        conn = self._state().conns.pop(index, None)
        if conn is not None:
            conn.close()

    def _mark_down(self, index: int) -> None:
        self._discard(index)
        self._down_until[index] = self._clock() + self.retry_after

    def _position(self, index: int) -> int | None:
        """The replica's replayed WAL position: one query, run outside any transaction."""
        conn = self._connection(index)
        try:
            conn.autocommit = True
            try:
                row = conn.execute(_POSITION_SQL).fetchone()
            finally:
                if not conn.closed:
                    conn.autocommit = False
        except psycopg.Error as exc:
            raise DatabaseError(f"cannot check {self._role(index)}: {exc}") from exc
        if row is None or row[0] is None:
            return None
        try:
            return parse_lsn(str(row[0]))
        except ValueError as exc:
            raise DatabaseError(f"{self._role(index)} reported {row[0]!r}") from exc

    def _pick_for_read(self, wanted: int | None) -> tuple[int, Connection]:
        order = replica_order(
            len(self.replica_dsns), next(self._cursor), self._down_until, self._clock()
        )
        for index in order:
            try:
                position = self._position(index)
            except DatabaseError:
                self._mark_down(index)
                continue
            if replica_qualifies(position, wanted):
                return index, self._connection(index)
        return _PRIMARY, self._connection(_PRIMARY)

    def _finish(self, index: int, conn: Connection, *, failed: bool) -> None:
        """End a block's transaction by rolling back; drop the connection if it broke."""
        if not conn.closed:
            with suppress(psycopg.Error):
                conn.rollback()
        if conn.closed:
            if index == _PRIMARY or not failed:
                self._discard(index)
            else:
                # The replica died under a read: skip it for a while.
                self._mark_down(index)

    def _commit(self, conn: Connection) -> str:
        state = self._state()
        if conn.info.transaction_status == TransactionStatus.INERROR:
            # A statement failed and the block swallowed the error; COMMIT
            # would silently roll back, so say so instead.
            self._finish(_PRIMARY, conn, failed=True)
            raise DatabaseError("a statement in the write block failed; transaction rolled back")
        try:
            conn.commit()
        except psycopg.Error as exc:
            self._finish(_PRIMARY, conn, failed=True)
            raise DatabaseError(
                f"commit on {self._role(_PRIMARY)} failed (outcome unknown if the connection "
                f"was lost): {exc}"
            ) from exc
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
            if row is None or row[0] is None:
                raise DatabaseError(f"{self._role(_PRIMARY)} reported no WAL position")
            token = format_lsn(parse_lsn(str(row[0])))
        except (psycopg.Error, ValueError) as exc:
            self._finish(_PRIMARY, conn, failed=True)
            raise DatabaseError(
                f"committed, but cannot read the WAL position of {self._role(_PRIMARY)}: {exc}"
            ) from exc
        state.token = token
        return token
