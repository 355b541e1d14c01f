"""PostgreSQL behind :class:`tiers.db.engine.Engine`: psycopg 3, WAL positions, libpq probes.

:data:`ENGINE` is the adapter the rest of tiers uses (through
:func:`tiers.db.engine.engine_for_dsn` and friends); the functions below are
its parts, usable on their own.

Positions are WAL positions (LSNs) as ints: byte offsets into the one WAL
stream of a server history, so ``a >= b`` and byte lag are plain integer
arithmetic. A causal token is the LSN in PostgreSQL's own ``X/Y`` text form
(two hex numbers of up to 32 bits, :func:`parse_lsn`, :func:`format_lsn`).
After a commit the router reads ``pg_current_wal_lsn()`` on the primary
(with ``synchronous_commit`` on, the default, the commit record is written
before COMMIT returns, so the position is at or after it); a replica's
position is ``pg_last_wal_replay_lsn()``. PostgreSQL 18 has no ``WAIT FOR
LSN``, so causal reads poll it.

Connections are psycopg connections. A router's idle connection is stale
when its socket has input (:class:`InputWatch`): an idle session gets
nothing unless the server ends it (a shutdown, a crash or a restart sends an
error, then closes) or sends something unasked (a notice, a parameter
change, a notification); the first is by far the likelier, and the others
cost only a reconnect. A read block on a replica is ended by a ROLLBACK the
watch sends itself (:func:`end_read_transaction`), keeping the statements
psycopg prepared.

Errors (:func:`classify_error`):

* *gone*: a ``psycopg.OperationalError`` with no SQLSTATE (libpq's own
  connection failures, "the connection is closed", connect timeouts);
  SQLSTATE class 08 (connection exception); 57P01 admin_shutdown, 57P02
  crash_shutdown, 57P03 cannot_connect_now (starting up, shutting down, or
  in recovery without hot standby); 53300 too_many_connections.
* *not the primary*: 25006 read_only_sql_transaction.
* *other*: everything else, an aborted pipeline included (psycopg raises it
  without SQLSTATE, and the connection stays usable).

The probe (:func:`probe`) opens a fresh connection and runs one SELECT that
returns ``pg_is_in_recovery()``, the position (replay LSN on a replica,
current WAL LSN on a primary), the replay lag in seconds and the received
LSN. Connect and answer share one deadline, enforced through libpq's
non-blocking API, so a node that is dead, unroutable or frozen (SIGSTOP)
costs at most the timeout. Seconds lag is ``now() -
pg_last_xact_replay_timestamp()``, reported as 0 when the replica has
replayed all WAL it received, because on an idle primary that timestamp
grows old while nothing is behind.

Failover steps work on the embedded servers (:mod:`tiers.db.embedded`):
``pg_ctl stop`` (fast for a clean stop, which sends all WAL to the connected
standbys before the server exits; immediate and SIGKILL otherwise),
``pg_controldata`` for where a cleanly stopped server's WAL ends,
``pg_promote()``, ``primary_conninfo`` and a reload to follow another
primary, and ``pg_rewind`` (or a new base backup) to bring an old primary
back onto the new primary's history.
"""

from __future__ import annotations

import re
import select
import selectors
import time
from collections.abc import Callable, Mapping
from contextlib import closing, suppress
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any, Final

import psycopg
import psycopg.errors
import psycopg.sql
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow

from tiers.db import embedded
from tiers.db.engine import LocalServer, NodeObservation, Position, ServerFacts
from tiers.db.errors import Failure
from tiers.errors import DatabaseError

if TYPE_CHECKING:
    import sqlalchemy

    from tiers.db.engine import Engine

__all__ = [
    "ENGINE",
    "InputWatch",
    "PostgresEngine",
    "classify_error",
    "connect",
    "connection_is_stale",
    "end_read_transaction",
    "ensure_database",
    "format_lsn",
    "parse_lsn",
    "probe",
]

PgConnection = psycopg.Connection[TupleRow]

# ---- LSNs ---------------------------------------------------------------------------

_LSN_RE = re.compile(r"\A([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})\Z")


def parse_lsn(text: str) -> int:
    """Parse PostgreSQL's ``X/Y`` LSN text (two hex numbers of up to 32 bits) into an int.

    Raises ValueError for anything else.
    """
    match = _LSN_RE.match(text)
    if match is None:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(value: int) -> str:
    """The ``X/Y`` text form of an LSN, as PostgreSQL prints it; ValueError outside 64 bits."""
    if not 0 <= value < 1 << 64:
        raise ValueError(f"LSN out of range: {value}")
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


# On a replica how far it has replayed; on a node not in recovery (a
# "replica" that is really the primary) how far it has written, which is what
# a read from it would see.
_POSITION_SQL: Final = (
    "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()"
    " ELSE pg_current_wal_lsn() END)::text"
)
# NULL on a node in recovery: it is no primary, and pg_current_wal_lsn() would fail there.
_WRITE_POSITION_SQL: Final = (
    "SELECT (CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_lsn() END)::text"
)
_FACTS_SQL: Final = (
    "SELECT pg_is_in_recovery(),"
    " (CASE WHEN pg_is_in_recovery()"
    "  THEN greatest(pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn())"
    "  ELSE pg_current_wal_lsn() END)::text,"
    " current_setting('primary_conninfo')"
)
_NEXT_ID_SQL: Final = "SELECT tiers_next_id(%s)"


def _position(row: Any) -> int | None:
    if row is None or row[0] is None:
        return None
    return parse_lsn(str(row[0]))


# ---- connections -----------------------------------------------------------------------


def describe(dsn: str) -> str:
    """``host:port/dbname`` of a conninfo string or URI, without the password; ValueError if
    it does not parse."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error as exc:
        raise ValueError(f"not a conninfo string or URI: {exc}") from exc
    host = params.get("host") or params.get("hostaddr") or "localhost"
    port = params.get("port") or "5432"
    dbname = params.get("dbname") or params.get("user") or ""
    return f"{host}:{port}/{dbname}"


def connect(dsn: str, timeout: float, *, autocommit: bool = False) -> PgConnection:
    """Open a connection (autocommit off unless asked); libpq's connect_timeout is whole
    seconds."""
    return psycopg.connect(dsn, autocommit=autocommit, connect_timeout=max(1, round(timeout)))


def connection_is_stale(conn: PgConnection) -> bool:
    """True if an idle connection may be unusable, found out without sending anything
    (see the module docstring)."""
    return InputWatch(conn).stale()


_INTRANS: Final = pq.TransactionStatus.INTRANS
_IDLE: Final = pq.TransactionStatus.IDLE


class InputWatch:
    """:func:`connection_is_stale` for one connection, with its poll object made once.

    A router checks every connection before each use; building and
    registering a poll object each time cost more than the check itself.
    Also waits for input, for :func:`end_read_transaction`, and ends read
    blocks (:meth:`end_read`). The connection's socket never changes while
    it is open, and the watch is dropped with it.
    """

    __slots__ = ("_conn", "_poll")

    def __init__(self, conn: PgConnection) -> None:
        self._conn = conn
        self._poll: Callable[[float], list[tuple[int, int]]] | None
        try:
            poller = select.poll()
            poller.register(conn.fileno(), select.POLLIN)
        except (OSError, ValueError, psycopg.Error):
            self._poll = None
        else:
            self._poll = poller.poll

    def stale(self) -> bool:
        """True if the connection is closed or has input waiting (see connection_is_stale)."""
        conn, poll = self._conn, self._poll
        if poll is None or conn.closed or conn.broken:
            return True
        try:
            return bool(poll(0))
        except (OSError, ValueError):
            return True

    def wait_readable(self) -> None:
        """Block until the socket has input (or an error to report); interruptible by signals."""
        if self._poll is None:
            raise psycopg.OperationalError("the connection has no socket to wait on")
        self._poll(-1)

    def end_read(self) -> None:
        """End a read block on a replica: an open transaction by :func:`end_read_transaction`,
        a failed one by ``rollback()``; nothing on an idle session."""
        conn = self._conn
        status = conn.pgconn.transaction_status
        if status == _INTRANS:
            end_read_transaction(conn, self)
        elif status != _IDLE:
            conn.rollback()


def end_read_transaction(conn: PgConnection, watch: InputWatch) -> None:
    """Roll back ``conn``'s open, unfailed transaction, keeping what psycopg prepared.

    ``conn.rollback()`` also makes psycopg forget (and deallocate) every
    statement it prepared on the session, since a rolled-back transaction
    may have dropped or created what they refer to. A read block ended that
    way never reaches psycopg's prepare threshold, so the server parses and
    plans every statement again. This sends the same ROLLBACK without that
    reset, so it is only for a transaction that could not change the schema:
    one on a hot standby, with no failed statement in it (status INTRANS).
    On any failure the connection is closed, its state being unknown, and
    ``psycopg.OperationalError`` is raised.
    """
    pgconn = conn.pgconn
    try:
        pgconn.send_query(b"ROLLBACK")
        # psycopg runs libpq non-blocking: flush and wait here as it would.
        while pgconn.flush():
            writable = select.poll()
            writable.register(pgconn.socket, select.POLLOUT)
            writable.poll(-1)
        failed: str | None = None
        while True:
            while pgconn.is_busy():
                watch.wait_readable()
                pgconn.consume_input()
            result = pgconn.get_result()
            if result is None:
                break
            if result.status != pq.ExecStatus.COMMAND_OK:
                failed = (result.error_message or b"").decode(errors="replace")
    except BaseException:
        conn.close()
        raise
    if failed is not None or pgconn.transaction_status != _IDLE:
        conn.close()
        raise psycopg.OperationalError(f"ROLLBACK failed: {failed or 'still in a transaction'}")


# ---- errors ---------------------------------------------------------------------------------

_NOT_PRIMARY_STATES = frozenset({"25006"})
_GONE_STATES = frozenset({"57P01", "57P02", "57P03", "53300"})
# Raised without SQLSTATE by psycopg for reasons that leave the connection usable.
_NOT_GONE_WITHOUT_STATE = (psycopg.errors.PipelineAborted,)


def classify_error(exc: BaseException) -> Failure:
    """What a psycopg error says about the node (the module docstring's table); ``OTHER``
    for anything that is not a psycopg error."""
    if not isinstance(exc, psycopg.Error):
        return Failure.OTHER
    state = exc.sqlstate
    if state is None:
        if isinstance(exc, psycopg.OperationalError) and not isinstance(
                exc, _NOT_GONE_WITHOUT_STATE):
            return Failure.NODE_GONE
        return Failure.OTHER
    if state in _NOT_PRIMARY_STATES:
        return Failure.NOT_PRIMARY
    if state in _GONE_STATES or state.startswith("08"):
        return Failure.NODE_GONE
    return Failure.OTHER


# ---- the probe ------------------------------------------------------------------------------

# One round trip. "r" is evaluated once; the CASEs keep pg_current_wal_lsn(),
# which fails during recovery, away from replicas.
_PROBE_SQL: Final = b"""\
SELECT r,
  (CASE WHEN r THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END)::text,
  CASE WHEN NOT r THEN NULL
       WHEN pg_last_wal_receive_lsn() <= pg_last_wal_replay_lsn() THEN 0::float8
       ELSE extract(epoch FROM now() - pg_last_xact_replay_timestamp())::float8
  END,
  (CASE WHEN r THEN pg_last_wal_receive_lsn() END)::text
FROM pg_is_in_recovery() AS r"""


class _ProbeFailed(Exception):
    pass


def _target(dsn: str) -> str:
    try:
        return describe(dsn)
    except ValueError:
        return "<unparsable conninfo>"


def probe(dsn: str, timeout: float = 0.5, *, name: str | None = None) -> NodeObservation:
    """Probe one node within ``timeout`` seconds (connect and answer together).

    Opens a new connection each time, so it also proves that the node accepts
    connections, which is what a read needs. Never raises for a dead or
    misbehaving node: returns ``reachable=False`` with the reason in ``error``.
    ``name`` defaults to the ``host:port/dbname`` of ``dsn``. A
    ``connect_timeout`` in ``dsn`` is ignored in favour of ``timeout``; a host
    *name* is resolved by libpq before the deadline applies, so give addresses.
    """
    target = _target(dsn)
    label = name if name is not None else target
    deadline = time.monotonic() + timeout
    pgconn: pq.abc.PGconn | None = None
    stage = "cannot connect"
    try:
        pgconn = pq.PGconn.connect_start(dsn.encode())
        _connect(pgconn, deadline, timeout)
        stage = "probe query failed"
        return replace(_ask(pgconn, deadline, timeout), name=label, target=target,
                       checked_at=time.monotonic())
    except _ProbeFailed as exc:
        error = f"{stage}: {exc}"
    except (psycopg.Error, OSError, ValueError) as exc:
        error = f"{stage}: {_one_line(str(exc))}"
    finally:
        if pgconn is not None:
            pgconn.finish()
    return NodeObservation(label, target, reachable=False, error=error,
                           checked_at=time.monotonic())


def _one_line(text: str) -> str:
    return "; ".join(part.strip() for part in text.splitlines() if part.strip()) or "no detail"


def _wait(fd: int, events: int, deadline: float, timeout: float) -> None:
    remaining = deadline - time.monotonic()
    if remaining > 0:
        with selectors.DefaultSelector() as selector:
            selector.register(fd, events)
            if selector.select(remaining):
                return
    raise _ProbeFailed(f"timed out after {timeout:g} s")


def _connect(pgconn: pq.abc.PGconn, deadline: float, timeout: float) -> None:
    # libpq's contract for PQconnectStart: poll as if the first answer were WRITING.
    status = pq.PollingStatus.FAILED if pgconn.status == pq.ConnStatus.BAD \
        else pq.PollingStatus.WRITING
    while status != pq.PollingStatus.OK:
        if status == pq.PollingStatus.FAILED:
            raise _ProbeFailed(_one_line(pq.error_message(pgconn)))
        events = selectors.EVENT_READ if status == pq.PollingStatus.READING \
            else selectors.EVENT_WRITE
        # The socket may change between polls (another address, SSL fallback).
        _wait(pgconn.socket, events, deadline, timeout)
        status = pq.PollingStatus(pgconn.connect_poll())


def _ask(pgconn: pq.abc.PGconn, deadline: float, timeout: float) -> NodeObservation:
    pgconn.nonblocking = 1
    pgconn.send_query(_PROBE_SQL)
    while pgconn.flush() != 0:
        _wait(pgconn.socket, selectors.EVENT_WRITE, deadline, timeout)
    while pgconn.is_busy():
        _wait(pgconn.socket, selectors.EVENT_READ, deadline, timeout)
        pgconn.consume_input()
    result = pgconn.get_result()
    if result is None or result.status != pq.ExecStatus.TUPLES_OK or result.ntuples != 1:
        raise _ProbeFailed(_one_line(pq.error_message(result if result is not None else pgconn)))
    recovery, position, lag, received = (result.get_value(0, col) for col in range(4))
    try:
        return NodeObservation(
            "", "", reachable=True, in_recovery=recovery == b"t",
            position=None if position is None else parse_lsn(position.decode()),
            replay_lag_seconds=None if lag is None else max(0.0, float(lag.decode())),
            received_position=None if received is None else parse_lsn(received.decode()))
    except ValueError as exc:
        raise _ProbeFailed(f"unexpected answer: {exc}") from exc


# ---- the failover executor's steps ----------------------------------------------------------


def _in_recovery(conn: PgConnection) -> bool:
    row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    return row is not None and bool(row[0])


def _upstream_port(primary_conninfo: str) -> int | None:
    """The port a replica's primary_conninfo names; None for none, or one that does not
    parse."""
    if not primary_conninfo:
        return None
    try:
        port = conninfo_to_dict(primary_conninfo).get("port")
    except psycopg.Error:
        return None
    try:
        return None if port is None else int(port)
    except ValueError:
        return None


def _until(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() >= deadline:
            raise DatabaseError(f"gave up waiting {timeout:g}s for {what}")
        time.sleep(0.05)


def ensure_database(dsn: str, database: str) -> None:
    """Create ``database`` on the server of ``dsn`` (a superuser's connection) unless it
    exists; the driver's error if that fails."""
    with closing(connect(dsn, 2.0, autocommit=True)) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s",
                              (database,)).fetchone()
        if exists is None:
            conn.execute(psycopg.sql.SQL("CREATE DATABASE {}").format(
                psycopg.sql.Identifier(database)))


# ---- the engine -----------------------------------------------------------------------------


class PostgresEngine:
    """PostgreSQL through psycopg 3; see the module docstring and
    :class:`tiers.db.engine.Engine` for what each member promises."""

    name = "postgresql"
    errors: tuple[type[BaseException], ...] = (psycopg.Error,)

    # -- nodes and connections
    address = staticmethod(describe)
    connect = staticmethod(connect)
    is_stale = staticmethod(connection_is_stale)

    def local_dsn(self, port: int, database: str | None = None) -> str:
        return embedded.conninfo(port, database or "postgres")

    def watch(self, conn: Any) -> InputWatch | None:
        return InputWatch(conn) if isinstance(conn, psycopg.Connection) else None

    def transaction_failed(self, conn: Any) -> bool:
        return bool(conn.info.transaction_status == pq.TransactionStatus.INERROR)

    def needs_new_session(self, exc: BaseException) -> bool:
        # A statement prepared before a schema change that altered its result
        # fails on every use of this session.
        return (isinstance(exc, psycopg.errors.FeatureNotSupported)
                and "cached plan must not change result type" in str(exc))

    # -- positions and tokens
    def commit_position(self, conn: Any) -> int | None:
        return _position(conn.execute(_WRITE_POSITION_SQL).fetchone())

    def replayed_position(self, conn: Any) -> int | None:
        return _position(conn.execute(_POSITION_SQL).fetchone())

    parse_token = staticmethod(parse_lsn)

    def format_token(self, position: Position) -> str:
        if not isinstance(position, int):
            raise ValueError(f"not a PostgreSQL WAL position: {position!r}")
        return format_lsn(position)

    def lag_bytes(self, primary: Position, replica: Position) -> int | None:
        if not isinstance(primary, int) or not isinstance(replica, int):
            return None
        return max(0, primary - replica)

    # -- health and errors
    probe = staticmethod(probe)
    classify_error = staticmethod(classify_error)

    # -- integrations
    def sqlalchemy_engine(self, dsn: str, options: Mapping[str, Any]) -> sqlalchemy.Engine:
        from sqlalchemy import create_engine

        return create_engine("postgresql+psycopg://", creator=partial(psycopg.connect, dsn),
                             **options)

    def next_id(self, conn: Any, shard: int) -> int:
        try:
            row = conn.execute(_NEXT_ID_SQL, (shard,)).fetchone()
        except psycopg.errors.UndefinedFunction as exc:
            raise DatabaseError("tiers_next_id(shard) is not installed on this cluster: apply "
                                "tiers.db.ids.next_id_ddl() there (e.g. as a migration)") from exc
        if row is None or not isinstance(row[0], int):
            raise DatabaseError(f"tiers_next_id({shard}) returned no id")
        return row[0]

    # -- failover
    def server_facts(self, conn: Any) -> ServerFacts:
        row = conn.execute(_FACTS_SQL).fetchone()
        if row is None:
            raise DatabaseError("no answer to the facts query")
        in_recovery, position, primary_conninfo = bool(row[0]), row[1], str(row[2] or "")
        return ServerFacts(in_recovery, None if position is None else parse_lsn(str(position)),
                           _upstream_port(primary_conninfo) if in_recovery else None)

    def promote(self, conn: Any, timeout: float) -> None:
        if _in_recovery(conn):
            row = conn.execute("SELECT pg_promote(true, %s)",
                               (max(1, int(timeout)),)).fetchone()
            if row is None or not row[0]:
                raise DatabaseError(f"not promoted within {timeout:g}s")
        if _in_recovery(conn):
            raise DatabaseError("still in recovery after promotion")

    def running(self, server: LocalServer) -> bool:
        return bool(embedded.server_processes(server.data_dir))

    def stop(self, server: LocalServer, *, clean: bool, timeout: float) -> None:
        data = server.data_dir
        if not embedded.server_processes(data):
            return
        if clean:
            embedded.pg_ctl(server.layout, server.run_as, server.name, "stop", "-m", "fast",
                            timeout=timeout)
            return
        # A dead postmaster cannot be signalled; its orphans are killed below.
        with suppress(DatabaseError):
            embedded.pg_ctl(server.layout, server.run_as, server.name, "stop", "-m",
                            "immediate", timeout=timeout)
        _until(lambda: embedded.kill_all(embedded.server_processes(data)), timeout,
               "its processes to exit")

    def end_of_history(self, server: LocalServer) -> int:
        # The final record of a clean shutdown is its checkpoint; a replica has
        # it once its replay position lies past the checkpoint's start.
        control = embedded.control_data(server.layout, server.run_as, server.name)
        state = control.get("Database cluster state", "")
        if state != "shut down":
            raise DatabaseError(f"{server.name} is not cleanly shut down "
                                f"({state or 'unknown'})")
        try:
            return parse_lsn(control["Latest checkpoint location"]) + 1
        except (KeyError, ValueError) as exc:
            raise DatabaseError(f"pg_controldata shows no checkpoint location: {exc}") from exc

    def follow(self, server: LocalServer, primary_port: int) -> None:
        # PostgreSQL restarts its WAL receiver when primary_conninfo changes on a
        # reload, and follows the new timeline (recovery_target_timeline is latest).
        embedded.point_replica_at(server.layout, server.run_as, server.name, primary_port)
        if embedded.server_processes(server.data_dir):
            embedded.pg_ctl(server.layout, server.run_as, server.name, "reload")

    def streaming_from(self, conn: Any) -> int | None:
        if not _in_recovery(conn):
            raise DatabaseError("it is not a replica")
        row = conn.execute("SELECT status, sender_port FROM pg_stat_wal_receiver").fetchone()
        if row is None or row[0] != "streaming" or row[1] is None:
            return None
        return int(row[1])

    def resync(self, server: LocalServer, primary_port: int, timeout: float) -> None:
        # pg_rewind first (cheap: only what diverged is copied back); if it fails,
        # a fresh base backup replaces the data directory.
        with closing(connect(self.local_dsn(primary_port), timeout, autocommit=True)) as conn:
            # A freshly promoted server's control file shows its new timeline
            # only after a checkpoint, and pg_rewind reads the timeline there.
            conn.execute("CHECKPOINT")
        try:
            embedded.run_tool(server.layout, server.run_as, "pg_rewind", [
                "--target-pgdata", str(server.data_dir),
                "--source-server", self.local_dsn(primary_port),
            ], timeout=timeout)
        except DatabaseError as rewind_failed:
            embedded.rebuild_replica(server.layout, server.run_as, server.name, primary_port,
                                     rewind_failed)


ENGINE: Final = PostgresEngine()
"""The PostgreSQL adapter (what ``engine_named("postgresql")`` returns)."""

if TYPE_CHECKING:
    _CONFORMS: Engine = ENGINE  # mypy checks the adapter against the interface here
