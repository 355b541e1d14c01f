"""Database nodes as the router sees them: names, connections, and the app servers' environment.

A node is a name and a libpq conninfo string or URI. Names are stable
identities, not roles: after a failover the node called ``db-primary`` may be
a replica. Where only DSNs are known (the environment of an app server),
:func:`node_names` names each node by its ``host:port/dbname``.

App servers learn about the databases from the environment the stack gives
them (:func:`settings_from_env`):

    TIERS_DB_PRIMARY           DSN of the node believed to be the primary (required)
    TIERS_DB_REPLICAS          comma-separated DSNs of the other nodes (optional)
    TIERS_DB_CAUSAL_WAIT       seconds a causal read waits for a replica (default 0.05)
    TIERS_DB_MONITOR_INTERVAL  seconds between health rounds (default 0.25)

A bad value raises :class:`tiers.errors.ConfigError` naming the variable.
"""

from __future__ import annotations

import select
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import psycopg
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import TupleRow

from tiers.errors import ConfigError

Connection = psycopg.Connection[TupleRow]
# (dsn, connect timeout in seconds) -> an open connection with autocommit off.
Connector = Callable[[str, float], Connection]

PRIMARY_ENV = "TIERS_DB_PRIMARY"
REPLICAS_ENV = "TIERS_DB_REPLICAS"
CAUSAL_WAIT_ENV = "TIERS_DB_CAUSAL_WAIT"
MONITOR_INTERVAL_ENV = "TIERS_DB_MONITOR_INTERVAL"

DEFAULT_CAUSAL_WAIT = 0.05
DEFAULT_MONITOR_INTERVAL = 0.25
_MAX_SECONDS = 3600.0


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


def node_names(dsns: Sequence[str]) -> list[str]:
    """A name per DSN: its ``host:port/dbname``, with ``#2``, ``#3`` ... on repeats."""
    names: list[str] = []
    for dsn in dsns:
        base = name = describe_dsn(dsn)
        count = 1
        while name in names:
            count += 1
            name = f"{base}#{count}"
        names.append(name)
    return names


def connect(dsn: str, timeout: float) -> Connection:
    """Open a connection with autocommit off; libpq's connect_timeout is whole seconds."""
    return psycopg.connect(dsn, autocommit=False, connect_timeout=max(1, round(timeout)))


def connection_is_stale(conn: Connection) -> bool:
    """True if an idle connection may be unusable, found out without sending anything.

    An idle session has nothing to read unless the server ended it (a
    shutdown, a crash or a restart sends an error, then closes) or sent
    something unasked (a notice, a parameter change, a notification). The
    first is by far the likelier on a router's connections and the others
    cost only a reconnect, so input waiting on the socket counts as stale.
    """
    return InputWatch(conn).stale()


class InputWatch:
    """:func:`connection_is_stale` for one connection, with its poll object made once.

    A router checks every connection before each use; building and
    registering a poll object each time cost more than the check itself.
    Also waits for input, for :func:`end_read_transaction`. The connection's
    socket never changes while it is open, and the watch is dropped with it.
    """

    __slots__ = ("_conn", "_poll")

    def __init__(self, conn: Connection) -> None:
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


def end_read_transaction(conn: Connection, watch: InputWatch) -> None:
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
    if failed is not None or pgconn.transaction_status != pq.TransactionStatus.IDLE:
        conn.close()
        raise psycopg.OperationalError(f"ROLLBACK failed: {failed or 'still in a transaction'}")


def one_line(exc: BaseException) -> str:
    """An error's message on one line, for messages that wrap it."""
    text = "; ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    return text or type(exc).__name__


@dataclass(frozen=True)
class EnvSettings:
    """What the environment says: nodes by name (the believed primary first) and timings."""

    nodes: dict[str, str]
    primary: str
    causal_wait: float
    monitor_interval: float


def settings_from_env(env: Mapping[str, str]) -> EnvSettings:
    """Read the variables in the module docstring; ConfigError names a missing or bad one.

    A DSN listed twice (or the primary among the replicas) is one node.
    """
    primary = env.get(PRIMARY_ENV, "").strip()
    if not primary:
        raise ConfigError("environment", PRIMARY_ENV, "not set")
    replicas = [part.strip() for part in env.get(REPLICAS_ENV, "").split(",")]
    replicas = [part for part in dict.fromkeys(replicas) if part and part != primary]
    for key, dsn in [(PRIMARY_ENV, primary)] + [(REPLICAS_ENV, r) for r in replicas]:
        try:
            conninfo_to_dict(dsn)
        except psycopg.Error as exc:
            reason = f"not a conninfo string or URI: {exc}"
            raise ConfigError("environment", key, reason) from exc
    dsns = [primary, *replicas]
    names = node_names(dsns)
    return EnvSettings(
        nodes=dict(zip(names, dsns, strict=True)),
        primary=names[0],
        causal_wait=_seconds(env, CAUSAL_WAIT_ENV, DEFAULT_CAUSAL_WAIT, zero_ok=True),
        monitor_interval=_seconds(env, MONITOR_INTERVAL_ENV, DEFAULT_MONITOR_INTERVAL,
                                  zero_ok=False),
    )


def _seconds(env: Mapping[str, str], key: str, default: float, *, zero_ok: bool) -> float:
    text = env.get(key, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ConfigError("environment", key, f"not a number of seconds: {text!r}") from None
    if not (0 <= value < _MAX_SECONDS) or (value == 0 and not zero_ok):
        bound = "at least 0" if zero_ok else "above 0"
        raise ConfigError("environment", key,
                          f"must be {bound} and below {_MAX_SECONDS:g} seconds")
    return value
