from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

import psycopg
import pytest
from psycopg.pq import TransactionStatus

from tiers.db.router import (
    Router,
    describe_dsn,
    format_lsn,
    is_token,
    parse_lsn,
    replica_order,
    replica_qualifies,
)
from tiers.errors import ConfigError, DatabaseError

# -- LSNs and the pure decisions ----------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0/0", 0),
        ("0/1D744C8", 0x1D744C8),
        ("16/B374D848", (0x16 << 32) | 0xB374D848),
        ("ffffffff/ffffffff", 2**64 - 1),
    ],
)
def test_parse_and_format_lsn(text: str, value: int) -> None:
    assert parse_lsn(text) == value
    assert format_lsn(value) == text.upper()


def test_lsn_order_is_numeric_not_textual() -> None:
    # As text "9/0" > "10/0"; as positions it is the other way round.
    assert parse_lsn("9/FFFFFFFF") < parse_lsn("10/0")
    assert parse_lsn("0/A") > parse_lsn("0/9")


@pytest.mark.parametrize(
    "text", ["", "0", "0/", "/0", "1/2/3", "g/0", "0/123456789", " 0/1", "0x1/0"]
)
def test_parse_lsn_rejects_garbage(text: str) -> None:
    with pytest.raises(ValueError):
        parse_lsn(text)
    assert not is_token(text)


def test_format_lsn_range() -> None:
    with pytest.raises(ValueError):
        format_lsn(-1)
    with pytest.raises(ValueError):
        format_lsn(2**64)


def test_is_token() -> None:
    assert is_token("0/16B3748")
    assert not is_token(None)


def test_replica_order_rotates_and_skips_replicas_marked_down() -> None:
    up = [0.0, 0.0, 0.0]
    assert replica_order(3, 0, up, now=10.0) == [0, 1, 2]
    assert replica_order(3, 1, up, now=10.0) == [1, 2, 0]
    assert replica_order(3, 5, up, now=10.0) == [2, 0, 1]
    assert replica_order(3, 0, [0.0, 11.0, 0.0], now=10.0) == [0, 2]
    # The mark expires: the replica is tried again.
    assert replica_order(3, 0, [0.0, 11.0, 0.0], now=11.0) == [0, 1, 2]
    assert replica_order(0, 7, [], now=0.0) == []


def test_replica_qualifies() -> None:
    assert replica_qualifies(None, None)
    assert replica_qualifies(5, None)
    assert replica_qualifies(5, 5)
    assert replica_qualifies(6, 5)
    assert not replica_qualifies(4, 5)
    assert not replica_qualifies(None, 5)


def test_describe_dsn_hides_the_password() -> None:
    text = describe_dsn("postgresql://tiers:secret@127.0.0.1:15432/tiers")
    assert text == "127.0.0.1:15432/tiers"
    assert "secret" not in describe_dsn("host=db port=5433 dbname=app password=secret")
    assert describe_dsn("host=db port=5433 dbname=app password=secret") == "db:5433/app"
    assert describe_dsn("not a = = conninfo '") == "<unparsable conninfo>"


def test_from_env() -> None:
    router = Router.from_env(
        {
            "TIERS_DB_PRIMARY": "postgresql://tiers@127.0.0.1:15432/tiers",
            "TIERS_DB_REPLICAS": " postgresql://tiers@127.0.0.1:15433/tiers,,"
            "postgresql://tiers@127.0.0.1:15434/tiers ",
        }
    )
    assert router.primary_dsn == "postgresql://tiers@127.0.0.1:15432/tiers"
    assert router.replica_dsns == (
        "postgresql://tiers@127.0.0.1:15433/tiers",
        "postgresql://tiers@127.0.0.1:15434/tiers",
    )
    alone = Router.from_env({"TIERS_DB_PRIMARY": "postgresql://127.0.0.1/x"})
    assert alone.replica_dsns == ()


def test_from_env_requires_a_primary() -> None:
    with pytest.raises(ConfigError, match="TIERS_DB_PRIMARY: not set"):
        Router.from_env({"TIERS_DB_REPLICAS": "postgresql://127.0.0.1/x"})


def test_from_env_rejects_a_malformed_replica() -> None:
    with pytest.raises(ConfigError, match="TIERS_DB_REPLICAS"):
        Router.from_env(
            {"TIERS_DB_PRIMARY": "postgresql://127.0.0.1/x", "TIERS_DB_REPLICAS": "a = '"}
        )


# -- the router's I/O, over fake nodes -----------------------------------------


class FakeNode:
    """A server: ``position`` is what its position query answers; ``up`` False refuses connects."""

    def __init__(self, name: str, position: int | None = 0) -> None:
        self.name = name
        self.position = position
        self.up = True
        self.connects = 0
        self.commits = 0
        self.rollbacks = 0
        self.statements: list[str] = []


class FakeCursor:
    def __init__(self, row: tuple[Any, ...] | None) -> None:
        self.row = row

    def fetchone(self) -> tuple[Any, ...] | None:
        return self.row


class FakeInfo:
    def __init__(self) -> None:
        self.transaction_status = TransactionStatus.IDLE


class FakeConn:
    def __init__(self, node: FakeNode) -> None:
        self.node = node
        self.closed = False
        self.autocommit = False
        self.info = FakeInfo()

    def _check(self) -> None:
        if self.closed:
            raise psycopg.OperationalError("the connection is closed")
        if not self.node.up:
            self.closed = True
            raise psycopg.OperationalError(f"{self.node.name}: server closed the connection")

    def execute(self, query: str, params: Any = None) -> FakeCursor:
        self._check()
        self.node.statements.append(query)
        if not self.autocommit:
            self.info.transaction_status = TransactionStatus.INTRANS
        if "pg_is_in_recovery" in query or "pg_current_wal_lsn" in query:
            position = self.node.position
            return FakeCursor((None if position is None else format_lsn(position),))
        if query == "FAIL":
            self.info.transaction_status = TransactionStatus.INERROR
            raise psycopg.errors.UniqueViolation("duplicate key")
        return FakeCursor((self.node.name,))

    def commit(self) -> None:
        self._check()
        self.node.commits += 1
        self.info.transaction_status = TransactionStatus.IDLE

    def rollback(self) -> None:
        self._check()
        self.node.rollbacks += 1
        self.info.transaction_status = TransactionStatus.IDLE

    def close(self) -> None:
        self.closed = True


class Cluster:
    def __init__(self, *replica_positions: int | None) -> None:
        self.primary = FakeNode("primary", 100)
        self.replicas = [FakeNode(f"r{i}", p) for i, p in enumerate(replica_positions)]
        self.nodes = {"p": self.primary} | {f"r{i}": n for i, n in enumerate(self.replicas)}
        self.now = 1000.0

    def connect(self, dsn: str, timeout: float) -> FakeConn:
        node = self.nodes[dsn.removeprefix("dbname=")]
        node.connects += 1
        if not node.up:
            raise psycopg.OperationalError(f"connection to {node.name} refused")
        return FakeConn(node)

    def router(self) -> Router:
        return Router(
            "dbname=p",
            [f"dbname=r{i}" for i in range(len(self.replicas))],
            connector=self.connect,  # type: ignore[arg-type]
            clock=lambda: self.now,
            retry_after=5.0,
        )


def served_by(router: Router, token: str | None = None) -> str:
    with router.read(token) as conn:
        row = conn.execute("SELECT who").fetchone()
        assert row is not None
        return str(row[0])


def test_without_replicas_reads_go_to_the_primary() -> None:
    cluster = Cluster()
    router = cluster.router()
    assert served_by(router) == "primary"
    assert served_by(router, "0/1") == "primary"


def test_reads_rotate_over_replicas() -> None:
    cluster = Cluster(50, 50)
    router = cluster.router()
    assert [served_by(router) for _ in range(4)] == ["r0", "r1", "r0", "r1"]
    # Connections are reused, not opened per read.
    assert [r.connects for r in cluster.replicas] == [1, 1]
    assert cluster.primary.connects == 0


def test_token_picks_a_replica_that_has_replayed_it() -> None:
    cluster = Cluster(40, 60)
    router = cluster.router()
    token = format_lsn(50)
    assert [served_by(router, token) for _ in range(3)] == ["r1", "r1", "r1"]


def test_token_no_replica_has_reached_goes_to_the_primary() -> None:
    cluster = Cluster(40, 45)
    router = cluster.router()
    assert served_by(router, format_lsn(50)) == "primary"
    cluster.replicas[0].position = 50
    assert served_by(router, format_lsn(50)) == "r0"


def test_a_replica_without_a_position_qualifies_only_without_a_token() -> None:
    cluster = Cluster(None)
    router = cluster.router()
    assert served_by(router) == "r0"
    assert served_by(router, "0/1") == "primary"


def test_the_position_check_runs_outside_a_transaction() -> None:
    cluster = Cluster(50)
    router = cluster.router()
    checks: list[bool] = []
    real_execute = FakeConn.execute

    def spy(self: FakeConn, query: str, params: Any = None) -> FakeCursor:
        if "pg_is_in_recovery" in query:
            checks.append(self.autocommit)
        return real_execute(self, query, params)

    FakeConn.execute = spy  # type: ignore[method-assign]
    try:
        with router.read("0/1") as conn:
            assert conn.autocommit is False
    finally:
        FakeConn.execute = real_execute  # type: ignore[method-assign]
    assert checks == [True]
    # The block's transaction is ended by a rollback.
    assert cluster.replicas[0].rollbacks == 1


def test_a_dead_replica_is_skipped_and_retried_later() -> None:
    cluster = Cluster(50, 50)
    cluster.replicas[0].up = False
    router = cluster.router()
    assert [served_by(router) for _ in range(4)] == ["r1"] * 4
    assert cluster.replicas[0].connects == 1  # marked down after one failed connect
    cluster.replicas[0].up = True
    cluster.now += 5.0
    assert {served_by(router) for _ in range(4)} == {"r0", "r1"}


def test_all_replicas_dead_falls_back_to_the_primary() -> None:
    cluster = Cluster(50, 50)
    for replica in cluster.replicas:
        replica.up = False
    router = cluster.router()
    assert served_by(router) == "primary"
    assert served_by(router, format_lsn(10)) == "primary"


def test_a_replica_that_dies_after_connecting_is_dropped_and_reopened() -> None:
    cluster = Cluster(50)
    router = cluster.router()
    assert served_by(router) == "r0"
    cluster.replicas[0].up = False  # the open connection breaks on the next query
    assert served_by(router) == "primary"
    cluster.replicas[0].up = True
    cluster.now += 5.0
    assert served_by(router) == "r0"
    assert cluster.replicas[0].connects == 2


def test_a_replica_dying_under_a_read_raises_and_is_marked_down() -> None:
    cluster = Cluster(50)
    router = cluster.router()
    with pytest.raises(psycopg.OperationalError), router.read() as conn:
        cluster.replicas[0].up = False
        conn.execute("SELECT who")
    cluster.replicas[0].up = True
    assert served_by(router) == "primary"  # still within retry_after
    cluster.now += 5.0
    assert served_by(router) == "r0"


def test_malformed_token_is_refused() -> None:
    router = Cluster(50).router()
    with pytest.raises(ValueError), router.read("yesterday"):
        pass


def test_write_commits_and_exposes_the_token() -> None:
    cluster = Cluster()
    router = cluster.router()
    assert router.last_write_token is None
    cluster.primary.position = 0x16B3748
    transaction = router.write()
    with transaction as conn:
        conn.execute("INSERT something")
    assert cluster.primary.commits == 1
    assert transaction.token == "0/16B3748"
    assert router.last_write_token == "0/16B3748"
    # The token is read after the commit, outside any transaction.
    assert cluster.primary.statements[-1].startswith("SELECT pg_current_wal_lsn()")


def test_last_write_token_is_per_thread() -> None:
    cluster = Cluster()
    router = cluster.router()
    with router.write() as conn:
        conn.execute("INSERT something")
    seen: list[str | None] = []
    thread = threading.Thread(target=lambda: seen.append(router.last_write_token))
    thread.start()
    thread.join()
    assert seen == [None]
    assert router.last_write_token == "0/64"


def test_write_rolls_back_on_an_exception() -> None:
    cluster = Cluster()
    router = cluster.router()
    transaction = router.write()
    with pytest.raises(KeyError), transaction as conn:
        conn.execute("INSERT something")
        raise KeyError("app error")
    assert (cluster.primary.commits, cluster.primary.rollbacks) == (0, 1)
    assert transaction.token is None
    assert router.last_write_token is None


def test_a_swallowed_statement_error_does_not_commit_silently() -> None:
    cluster = Cluster()
    router = cluster.router()
    with (
        pytest.raises(DatabaseError, match="rolled back"),
        router.write() as conn,
        contextlib.suppress(psycopg.errors.UniqueViolation),
    ):
        conn.execute("FAIL")
    assert (cluster.primary.commits, cluster.primary.rollbacks) == (0, 1)


def test_statement_errors_in_the_block_propagate_unchanged() -> None:
    router = Cluster().router()
    with pytest.raises(psycopg.errors.UniqueViolation), router.write() as conn:
        conn.execute("FAIL")


def test_an_unreachable_primary_raises_database_error() -> None:
    cluster = Cluster()
    cluster.primary.up = False
    router = cluster.router()
    with pytest.raises(DatabaseError, match="cannot connect to primary"), router.write():
        pass
    with pytest.raises(DatabaseError, match="cannot connect to primary"), router.read():
        pass


def test_a_broken_primary_connection_is_reopened_on_next_use() -> None:
    cluster = Cluster()
    router = cluster.router()
    with router.write() as conn:
        conn.execute("INSERT 1")
    cluster.primary.up = False
    with pytest.raises(psycopg.OperationalError), router.write() as conn:
        conn.execute("INSERT 2")
    cluster.primary.up = True
    with router.write() as conn:
        conn.execute("INSERT 3")
    assert cluster.primary.connects == 2
    assert cluster.primary.commits == 2


def test_failed_commit_raises_database_error() -> None:
    cluster = Cluster()
    router = cluster.router()
    with pytest.raises(DatabaseError, match="commit"), router.write() as conn:
        conn.execute("INSERT 1")
        cluster.primary.up = False


def test_connections_are_per_thread() -> None:
    cluster = Cluster(50)
    router = cluster.router()
    served_by(router)
    thread = threading.Thread(target=lambda: served_by(router))
    thread.start()
    thread.join()
    assert cluster.replicas[0].connects == 2


def test_nothing_connects_before_first_use() -> None:
    cluster = Cluster(50)
    cluster.router()
    assert cluster.primary.connects == 0
    assert cluster.replicas[0].connects == 0


def test_close_closes_this_threads_connections() -> None:
    cluster = Cluster(50)
    router = cluster.router()
    served_by(router)
    router.close()
    served_by(router)
    assert cluster.replicas[0].connects == 2


def test_a_forked_child_neither_uses_nor_closes_the_parents_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cluster = Cluster(50)
    router = cluster.router()
    with router.read() as parent_conn:
        pass
    child_pid = os.getpid() + 1
    monkeypatch.setattr(os, "getpid", lambda: child_pid)
    with router.read() as child_conn:
        pass
    assert child_conn is not parent_conn
    assert not parent_conn.closed  # closing it would end the parent's session
    assert cluster.replicas[0].connects == 2
