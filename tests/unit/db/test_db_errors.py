from __future__ import annotations

import psycopg
import psycopg.errors
import pytest

from tiers.db.errors import Failure, NodeUnavailable, classify, retry_safe
from tiers.errors import DatabaseError, TiersError

# Instances built the way psycopg lets an application build them: the class
# carries its SQLSTATE, the message is free text.
GONE = [
    psycopg.OperationalError("connection to server at 127.0.0.1 failed: Connection refused"),
    psycopg.OperationalError("the connection is closed"),
    psycopg.OperationalError("consuming input failed: server closed the connection unexpectedly"),
    psycopg.errors.ConnectionTimeout("connection timeout expired"),
    psycopg.errors.AdminShutdown("terminating connection due to administrator command"),
    psycopg.errors.CrashShutdown("terminating connection because of crash of another process"),
    psycopg.errors.CannotConnectNow("the database system is starting up"),
    psycopg.errors.TooManyConnections("sorry, too many clients already"),
    ConnectionRefusedError(111, "Connection refused"),
    ConnectionResetError(104, "Connection reset by peer"),
    BrokenPipeError(32, "Broken pipe"),
]
OTHER = [
    psycopg.errors.UniqueViolation("duplicate key value violates unique constraint"),
    psycopg.errors.SyntaxError('syntax error at or near "SELEC"'),
    psycopg.errors.UndefinedTable('relation "nope" does not exist'),
    psycopg.errors.QueryCanceled("canceling statement due to statement timeout"),
    psycopg.errors.SerializationFailure("could not serialize access"),
    psycopg.errors.DeadlockDetected("deadlock detected"),
    psycopg.errors.PipelineAborted("pipeline aborted"),
    psycopg.InterfaceError("cannot use a cursor after close"),
    psycopg.DataError("invalid input"),
    ValueError("not a database error"),
    TimeoutError("some unrelated timeout"),
    KeyboardInterrupt(),
]


@pytest.mark.parametrize("exc", GONE, ids=lambda e: type(e).__name__)
def test_node_gone(exc: BaseException) -> None:
    assert classify(exc) is Failure.NODE_GONE


@pytest.mark.parametrize("exc", OTHER, ids=lambda e: type(e).__name__)
def test_other(exc: BaseException) -> None:
    assert classify(exc) is Failure.OTHER


def test_a_write_on_a_replica_is_not_primary() -> None:
    exc = psycopg.errors.ReadOnlySqlTransaction(
        "cannot execute INSERT in a read-only transaction")
    assert exc.sqlstate == "25006"
    assert classify(exc) is Failure.NOT_PRIMARY


@pytest.mark.parametrize("sqlstate", ["08000", "08001", "08003", "08004", "08006", "08007",
                                      "08P01"])
def test_every_connection_exception_state_is_node_gone(sqlstate: str) -> None:
    exc = psycopg.errors.lookup(sqlstate)("boom")
    assert exc.sqlstate == sqlstate
    assert classify(exc) is Failure.NODE_GONE


def test_translated_errors_are_classified_by_their_cause() -> None:
    try:
        try:
            raise psycopg.errors.AdminShutdown("terminating connection")
        except psycopg.Error as exc:
            raise DatabaseError("cannot check replica 0") from exc
    except DatabaseError as translated:
        assert classify(translated) is Failure.NODE_GONE
    assert classify(DatabaseError("no cause")) is Failure.OTHER


def test_node_unavailable_carries_node_and_failure() -> None:
    cause = psycopg.errors.ReadOnlySqlTransaction("read-only")
    with pytest.raises(NodeUnavailable) as caught:
        try:
            raise cause
        except psycopg.Error as exc:
            raise NodeUnavailable("db-replica1", classify(exc), str(exc)) from exc
    err = caught.value
    assert isinstance(err, DatabaseError) and isinstance(err, TiersError)
    assert (err.node, err.failure, err.__cause__) == ("db-replica1", Failure.NOT_PRIMARY, cause)
    assert str(err) == "db-replica1: node is not the primary: read-only"
    assert str(NodeUnavailable("db-primary", Failure.NODE_GONE)) == "db-primary: node is gone"
    # Its own failure wins over whatever it was raised from.
    assert classify(err) is Failure.NOT_PRIMARY


def test_a_cause_cycle_does_not_hang() -> None:
    first = DatabaseError("a")
    second = DatabaseError("b")
    first.__cause__ = second
    second.__cause__ = first
    assert classify(first) is Failure.OTHER


@pytest.mark.parametrize(
    ("failure", "in_transaction", "read_only", "nothing_sent", "expected"),
    [
        # Nothing reached the server: always safe for a gone node.
        (Failure.NODE_GONE, False, False, True, True),
        (Failure.NODE_GONE, True, False, True, True),
        # A lone read-only statement outside a transaction.
        (Failure.NODE_GONE, False, True, False, True),
        # Inside a transaction the earlier statements are lost with the connection.
        (Failure.NODE_GONE, True, True, False, False),
        # A write may have committed before the connection broke.
        (Failure.NODE_GONE, False, False, False, False),
        (Failure.NODE_GONE, True, False, False, False),
        # Not a gone node: never retried here.
        (Failure.NOT_PRIMARY, False, True, True, False),
        (Failure.NOT_PRIMARY, False, False, False, False),
        (Failure.OTHER, False, True, True, False),
        (Failure.OTHER, False, True, False, False),
    ],
)
def test_retry_safe(failure: Failure, in_transaction: bool, read_only: bool,
                    nothing_sent: bool, expected: bool) -> None:
    assert retry_safe(failure, in_transaction=in_transaction,
                      statement_sent_is_read_only=read_only,
                      nothing_sent=nothing_sent) is expected
