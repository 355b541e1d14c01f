"""The Cluster's routing and failure handling, over fake nodes and a fake health monitor."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import psycopg.errors
import pytest
from psycopg.pq import TransactionStatus

from tiers.db import links
from tiers.db.errors import Failure, NodeUnavailable
from tiers.db.fake import FakeCursor
from tiers.db.health import (
    Check,
    ClusterHealth,
    NodeHealth,
    NodeObservation,
    Role,
    Standing,
)
from tiers.db.monitor import HealthMonitor
from tiers.db.pinning import PinnedReads
from tiers.db.postgres import connection_is_stale, format_lsn
from tiers.db.router import (
    Cluster,
    Intent,
    Router,
    describe_dsn,
    node_names,
)
from tiers.db.tokens import causal_scope, current_scope
from tiers.errors import ConfigError, DatabaseError

# -- fakes ---------------------------------------------------------------------------


class FakeNode:
    """A server. ``position`` is what position queries answer; ``up`` False refuses connects
    and breaks open connections; ``in_recovery`` True refuses writes as a replica does."""

    def __init__(self, name: str, position: int | None = 0, *, in_recovery: bool = True) -> None:
        self.name = name
        self.position = position
        self.in_recovery = in_recovery
        self.up = True
        self.incarnation = 0  # a restart ends every session of the one before
        self.die_on_commit = False
        self.die_after_commit = False  # gone between COMMIT and the position query
        self.connects = 0
        self.commits = 0
        self.rollbacks = 0
        self.statements: list[str] = []

    def restart(self) -> None:
        """Stop and start again: open connections die, though none has noticed yet."""
        self.incarnation += 1

    @property
    def position_checks(self) -> int:
        return sum(1 for s in self.statements if "pg_last_wal_replay_lsn" in s)

    @property
    def writes(self) -> list[str]:
        return [s for s in self.statements if s.startswith("INSERT")]


class FakeInfo:
    def __init__(self) -> None:
        self.transaction_status = TransactionStatus.IDLE


class FakeConn:
    def __init__(self, node: FakeNode) -> None:
        self.node = node
        self.closed = False
        self.stale = False
        self.autocommit = False
        self.info = FakeInfo()
        self.incarnation = node.incarnation

    def _check(self) -> None:
        if self.closed:
            raise psycopg.OperationalError("the connection is closed")
        if self.incarnation != self.node.incarnation:
            self.closed = True
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        if not self.node.up:
            self.closed = True
            raise psycopg.OperationalError(f"{self.node.name}: server closed the connection")

    def execute(self, query: str, params: Any = None) -> FakeCursor:
        self._check()
        node = self.node
        node.statements.append(query)
        if not self.autocommit:
            self.info.transaction_status = TransactionStatus.INTRANS
        if "THEN NULL ELSE pg_current_wal_lsn()" in query:
            value = None if node.in_recovery or node.position is None \
                else format_lsn(node.position)
            return FakeCursor([(value,)])
        if "pg_last_wal_replay_lsn" in query:
            return FakeCursor([(None if node.position is None else format_lsn(node.position),)])
        if query.startswith("INSERT"):
            if node.in_recovery:
                self.info.transaction_status = TransactionStatus.INERROR
                raise psycopg.errors.ReadOnlySqlTransaction(
                    "cannot execute INSERT in a read-only transaction")
            node.position = (node.position or 0) + 16
        if query == "FAIL":
            self.info.transaction_status = TransactionStatus.INERROR
            raise psycopg.errors.UniqueViolation("duplicate key")
        return FakeCursor([(node.name,)])

    def commit(self) -> None:
        self._check()
        if self.node.die_on_commit:
            self.closed = True
            raise psycopg.OperationalError("server closed the connection unexpectedly")
        self.node.commits += 1
        self.info.transaction_status = TransactionStatus.IDLE
        if self.node.die_after_commit:
            self.node.up = False

    def rollback(self) -> None:
        self._check()
        self.node.rollbacks += 1
        self.info.transaction_status = TransactionStatus.IDLE

    def close(self) -> None:
        self.closed = True


class FakeHealth:
    """A health monitor whose snapshot the test sets: the primary and the replicas in the
    read pool, with their positions and lags as last observed."""

    def __init__(self, clock: Callable[[], float], names: list[str], primary: str | None) -> None:
        self.clock = clock
        self.names = names
        self.primary = primary
        self.pool: dict[str, tuple[int | None, float | None, float]] = {}
        self.starts = 0
        self.checks = 0
        self.on_check: Callable[[], None] | None = None
        self.rounds = 1

    def put(self, name: str, position: int | None = None, lag: float | None = 0.0,
            observed_at: float | None = None) -> None:
        seen = self.clock() if observed_at is None else observed_at
        self.pool[name] = (position, lag, seen)

    def snapshot(self) -> ClusterHealth:
        nodes = []
        for name in self.names:
            if name in self.pool:
                position, lag, seen = self.pool[name]
                obs = NodeObservation(name, name, True, True, position, lag, checked_at=seen)
                nodes.append(NodeHealth(name, Role.REPLICA, Standing.IN, Check.GOOD, True,
                                        last=obs, reason=None))
            else:
                role = Role.PRIMARY if name == self.primary else Role.UNKNOWN
                nodes.append(NodeHealth(name, role))
        return ClusterHealth(tuple(nodes), self.primary, self.rounds)

    def start(self) -> None:
        self.starts += 1

    def stop(self, timeout: float | None = None) -> bool:
        return True

    def check_now(self) -> ClusterHealth:
        self.checks += 1
        if self.on_check is not None:
            self.on_check()
        return self.snapshot()


class Nodes:
    """Fake servers ``p`` (the primary) and ``r0``, ``r1``... with the given positions."""

    def __init__(self, *replica_positions: int | None) -> None:
        self.primary = FakeNode("p", 100, in_recovery=False)
        self.replicas = [FakeNode(f"r{i}", p) for i, p in enumerate(replica_positions)]
        self.by_name = {"p": self.primary} | {f"r{i}": n for i, n in enumerate(self.replicas)}
        self.now = 1000.0
        self.sleeps: list[float] = []
        # Called at every sleep: lets replicas replay while a read waits.
        self.while_sleeping: Callable[[], None] | None = None
        self.conns: list[FakeConn] = []

    def connect(self, dsn: str, timeout: float) -> FakeConn:
        node = self.by_name[dsn.removeprefix("dbname=")]
        node.connects += 1
        if not node.up:
            raise psycopg.OperationalError(f"connection to {node.name} refused")
        conn = FakeConn(node)
        self.conns.append(conn)
        return conn

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        if self.while_sleeping is not None:
            self.while_sleeping()

    def cluster(self, monitor: FakeHealth | None = None, **options: Any) -> Cluster:
        options.setdefault("causal_wait", 0.05)
        return Cluster(
            {name: f"dbname={name}" for name in self.by_name},
            "p",
            monitor=monitor,
            connector=self.connect,  # type: ignore[arg-type]
            clock=lambda: self.now,
            sleep=self.sleep,
            is_stale=lambda conn: conn.closed or conn.stale,  # type: ignore[attr-defined]
            retry_after=5.0,
            **options,
        )

    def health(self, primary: str | None = "p") -> FakeHealth:
        return FakeHealth(lambda: self.now, list(self.by_name), primary)


def simulate_fork(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a fork's hook tells the router in the child, without forking; undone after the
    test. (test_a_real_fork_resets_per_process_state forks for real.)"""
    monkeypatch.setattr(links, "fork_generation", links.fork_generation + 1)


def served_by(cluster: Cluster, *args: Any, **kwargs: Any) -> str:
    with cluster.read(*args, **kwargs) as conn:
        row = conn.execute("SELECT who").fetchone()
        assert row is not None
        return str(row[0])


def write(cluster: Cluster | PinnedReads, statement: str = "INSERT 1") -> str | None:
    transaction = cluster.write()
    with transaction as conn:
        conn.execute(statement)
    return transaction.token


# -- names and the environment --------------------------------------------------------


def test_describe_dsn_hides_the_password() -> None:
    text = describe_dsn("postgresql://tiers:secret@127.0.0.1:15432/tiers")
    assert text == "127.0.0.1:15432/tiers"
    assert "secret" not in describe_dsn("host=db port=5433 dbname=app password=secret")
    assert describe_dsn("host=db port=5433 dbname=app password=secret") == "db:5433/app"
    assert describe_dsn("not a = = conninfo '") == "<unparsable conninfo>"


def test_node_names_are_addresses_made_unique() -> None:
    dsn = "postgresql://u@127.0.0.1:1/x"
    assert node_names([dsn, "postgresql://u@127.0.0.1:2/x", dsn, dsn]) == [
        "127.0.0.1:1/x", "127.0.0.1:2/x", "127.0.0.1:1/x#2", "127.0.0.1:1/x#3"]


def test_from_env_names_every_node_and_builds_a_monitor() -> None:
    cluster = Cluster.from_env(
        {
            "TIERS_DB_PRIMARY": "postgresql://tiers@127.0.0.1:15432/tiers",
            "TIERS_DB_REPLICAS": " postgresql://tiers@127.0.0.1:15433/tiers,,"
            "postgresql://tiers@127.0.0.1:15434/tiers ,postgresql://tiers@127.0.0.1:15432/tiers",
            "TIERS_DB_CAUSAL_WAIT": "0.2",
            "TIERS_DB_MONITOR_INTERVAL": "0.5",
        }
    )
    assert dict(cluster.nodes) == {
        "127.0.0.1:15432/tiers": "postgresql://tiers@127.0.0.1:15432/tiers",
        "127.0.0.1:15433/tiers": "postgresql://tiers@127.0.0.1:15433/tiers",
        "127.0.0.1:15434/tiers": "postgresql://tiers@127.0.0.1:15434/tiers",
    }
    assert cluster.primary_hint == "127.0.0.1:15432/tiers"
    assert cluster.causal_wait == 0.2
    monitor = cluster.monitor
    assert isinstance(monitor, HealthMonitor)
    assert monitor.interval == 0.5
    assert dict(monitor.nodes) == dict(cluster.nodes)
    assert not monitor.running  # nothing starts before first use
    alone = Cluster.from_env({"TIERS_DB_PRIMARY": "postgresql://127.0.0.1/x"}, monitor=False)
    assert list(alone.nodes) == ["127.0.0.1:5432/x"]
    assert alone.monitor is None
    assert alone.causal_wait == 0.05
    assert (cluster.name, alone.name) == ("main", "main")
    named = Cluster.from_env({"TIERS_DB_PRIMARY": "postgresql://127.0.0.1/x"}, monitor=False,
                             name="social")
    assert named.name == "social"
    assert Router is Cluster


def test_from_env_requires_a_primary() -> None:
    with pytest.raises(ConfigError, match="TIERS_DB_PRIMARY: not set"):
        Cluster.from_env({"TIERS_DB_REPLICAS": "postgresql://127.0.0.1/x"})


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("TIERS_DB_REPLICAS", "a = '"),
        ("TIERS_DB_CAUSAL_WAIT", "soon"),
        ("TIERS_DB_CAUSAL_WAIT", "-1"),
        ("TIERS_DB_MONITOR_INTERVAL", "0"),
        ("TIERS_DB_MONITOR_INTERVAL", "nan"),
    ],
)
def test_from_env_rejects_bad_values_naming_the_variable(key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=key):
        Cluster.from_env({"TIERS_DB_PRIMARY": "postgresql://127.0.0.1/x", key: value})


def test_the_constructor_checks_its_nodes() -> None:
    with pytest.raises(ValueError):
        Cluster({}, None, monitor=None)
    with pytest.raises(ValueError):
        Cluster({"a": "dbname=a"}, "b")
    with pytest.raises(ValueError, match="primary must be named"):
        Cluster({"a": "dbname=a"})
    with pytest.raises(ValueError):
        Cluster({"a": "dbname=a"}, "a", causal_wait=-1)


@pytest.mark.parametrize("name", ["", "Social", "so-cial", "a.b", "x" * 64, "\u00e9t\u00e9"])
def test_the_constructor_checks_the_clusters_name(name: str) -> None:
    with pytest.raises(ValueError, match="lower-case ASCII identifier"):
        Cluster({"a": "dbname=a"}, "a", name=name)


def test_a_cluster_is_main_unless_named() -> None:
    assert Cluster({"a": "dbname=a"}, "a").name == "main"
    assert Cluster.from_dsns("dbname=a", ["dbname=b"]).name == "main"
    assert Cluster.from_dsns("dbname=a", name="social_2").name == "social_2"


class SocketConn:
    """Just what connection_is_stale looks at, over a real socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.closed = False
        self.broken = False

    def fileno(self) -> int:
        return self.sock.fileno()


def test_an_idle_connection_with_input_waiting_is_stale() -> None:
    ours, server = socket.socketpair()
    conn = SocketConn(ours)
    with ours, server:
        assert not connection_is_stale(conn)  # type: ignore[arg-type]
        server.sendall(b"E")  # what a shutting-down server sends before it closes
        assert connection_is_stale(conn)  # type: ignore[arg-type]
    assert connection_is_stale(conn)  # type: ignore[arg-type]  # no socket any more
    other, peer = socket.socketpair()
    with other, peer:
        for flag in ("closed", "broken"):
            flagged = SocketConn(other)
            setattr(flagged, flag, True)
            assert connection_is_stale(flagged)  # type: ignore[arg-type]


# -- reads without a monitor -------------------------------------------------------------


def test_without_replicas_reads_go_to_the_primary() -> None:
    cluster = Nodes().cluster()
    assert served_by(cluster) == "p"
    assert served_by(cluster, "0/1") == "p"


def test_reads_rotate_over_replicas_and_reuse_connections() -> None:
    nodes = Nodes(50, 50)
    cluster = nodes.cluster()
    assert [served_by(cluster) for _ in range(4)] == ["r0", "r1", "r0", "r1"]
    assert [r.connects for r in nodes.replicas] == [1, 1]
    assert nodes.primary.connects == 0
    # A read without a token asks nothing before the caller's statement.
    assert [r.position_checks for r in nodes.replicas] == [0, 0]


def test_a_token_picks_a_replica_that_has_replayed_it() -> None:
    nodes = Nodes(40, 60)
    cluster = nodes.cluster()
    assert [served_by(cluster, format_lsn(50)) for _ in range(3)] == ["r1", "r1", "r1"]


def test_a_causal_read_waits_for_a_replica_to_catch_up() -> None:
    nodes = Nodes(40)
    cluster = nodes.cluster(causal_wait=1.0)

    def replay() -> None:
        if nodes.now >= 1000.01:
            nodes.replicas[0].position = 50

    nodes.while_sleeping = replay
    assert served_by(cluster, format_lsn(50)) == "r0"
    assert nodes.sleeps and sum(nodes.sleeps) < 1.0
    assert nodes.primary.connects == 0


def test_a_causal_read_gives_up_waiting_after_causal_wait_and_reads_the_primary() -> None:
    nodes = Nodes(40)
    cluster = nodes.cluster(causal_wait=0.05)
    assert served_by(cluster, format_lsn(50)) == "p"
    assert sum(nodes.sleeps) == pytest.approx(0.05)
    assert nodes.replicas[0].position_checks > 1


def test_causal_wait_zero_checks_once_and_does_not_wait() -> None:
    nodes = Nodes(40)
    cluster = nodes.cluster(causal_wait=0.0)
    assert served_by(cluster, format_lsn(50)) == "p"
    assert nodes.sleeps == []
    assert nodes.replicas[0].position_checks == 1


def test_a_replica_without_a_position_qualifies_only_without_a_token() -> None:
    nodes = Nodes(None)
    cluster = nodes.cluster(causal_wait=0.0)
    assert served_by(cluster, None) == "r0"
    assert served_by(cluster, "0/1") == "p"


def test_the_position_check_runs_outside_a_transaction() -> None:
    nodes = Nodes(50)
    cluster = nodes.cluster()
    checks: list[bool] = []
    real_execute = FakeConn.execute

    def spy(self: FakeConn, query: str, params: Any = None) -> FakeCursor:
        if "pg_last_wal_replay_lsn" in query:
            checks.append(self.autocommit)
        return real_execute(self, query, params)

    FakeConn.execute = spy  # type: ignore[method-assign]
    try:
        with cluster.read("0/1") as conn:
            assert conn.autocommit is False
    finally:
        FakeConn.execute = real_execute  # type: ignore[method-assign]
    assert checks == [True]
    assert nodes.replicas[0].rollbacks == 1  # the block's transaction is ended by a rollback


def test_a_malformed_token_is_refused() -> None:
    cluster = Nodes(50).cluster()
    with pytest.raises(ValueError), cluster.read("yesterday"):
        pass


def test_reads_use_the_request_scopes_token_unless_given_one() -> None:
    nodes = Nodes(40, 60)
    cluster = nodes.cluster(causal_wait=0.0)
    with causal_scope(format_lsn(50)):
        assert {served_by(cluster) for _ in range(4)} == {"r1"}
        # None asks for no consistency: any replica, the scope notwithstanding.
        assert {served_by(cluster, None) for _ in range(4)} == {"r0", "r1"}
        assert served_by(cluster, format_lsn(70)) == "p"
    assert {served_by(cluster) for _ in range(4)} == {"r0", "r1"}


def test_reads_use_only_their_own_clusters_entry_of_the_scope() -> None:
    main_nodes, social_nodes = Nodes(40, 60), Nodes(40, 60)
    main = main_nodes.cluster(causal_wait=0.0)
    social = social_nodes.cluster(causal_wait=0.05, name="social")

    def checks(nodes: Nodes) -> int:
        return sum(replica.position_checks for replica in nodes.replicas)

    with causal_scope({"main": format_lsn(50)}):
        assert {served_by(main) for _ in range(4)} == {"r1"}
        # No entry for social: any replica at once, main's position never asked about.
        assert {served_by(social) for _ in range(4)} == {"r0", "r1"}
        assert checks(social_nodes) == 0 and social_nodes.sleeps == []
    with causal_scope({"main": format_lsn(1000), "social": format_lsn(50)}):
        # Main's token is past every node of social; social reads with its own.
        assert {served_by(social) for _ in range(4)} == {"r1"}
        assert social_nodes.sleeps == []
        assert served_by(main) == "p"
    with causal_scope({"social": format_lsn(70)}):
        assert {served_by(main) for _ in range(4)} == {"r0", "r1"}
        assert served_by(social) == "p"


def test_writes_on_two_clusters_keep_both_tokens_and_each_read_uses_its_own() -> None:
    main_nodes, social_nodes = Nodes(40, 60), Nodes(20, 40)
    social_nodes.primary.position = 16
    main = main_nodes.cluster(causal_wait=0.0)
    social = social_nodes.cluster(causal_wait=0.0, name="social")
    with causal_scope({"archive": "7/0"}) as scope:
        on_main = write(main)
        on_social = write(social)  # the latest write, at a lower position than main's
        assert (on_main, on_social) == (format_lsn(116), format_lsn(32))
        assert scope.tokens == {"archive": "7/0", "main": on_main, "social": on_social}
        assert scope.written == {"main", "social"}
        # Main's replicas (40, 60) have social's position but not main's write.
        assert {served_by(main) for _ in range(4)} == {"p"}
        # Social's r1 (40) has social's write; main's position would have sent it to p.
        assert {served_by(social) for _ in range(4)} == {"r1"}
        assert main.last_write_token == on_main and social.last_write_token == on_social


def test_without_a_monitor_bounded_staleness_reads_the_primary() -> None:
    cluster = Nodes(50).cluster()
    assert served_by(cluster, max_staleness=10.0) == "p"


# -- writes ---------------------------------------------------------------------------------


def test_a_write_commits_and_records_the_token_for_the_thread_and_the_scope() -> None:
    nodes = Nodes()
    cluster = nodes.cluster()
    assert cluster.last_write_token is None
    with causal_scope("0/1") as scope:
        transaction = cluster.write()
        with transaction as conn:
            conn.execute("INSERT something")
        assert current_scope() is scope
    assert nodes.primary.commits == 1
    assert transaction.token == format_lsn(116) and transaction.node == "p"
    assert cluster.last_write_token == transaction.token
    assert (scope.received, scope.tokens, scope.wrote) == (
        {"main": "0/1"}, {"main": transaction.token}, True)
    # The token is read after the commit, outside any transaction.
    assert "pg_current_wal_lsn" in nodes.primary.statements[-1]


def test_the_last_write_token_is_per_thread() -> None:
    cluster = Nodes().cluster()
    token = write(cluster)
    seen: list[str | None] = []
    thread = threading.Thread(target=lambda: seen.append(cluster.last_write_token))
    thread.start()
    thread.join()
    assert seen == [None]
    assert cluster.last_write_token == token


def test_a_write_rolls_back_on_an_exception() -> None:
    nodes = Nodes()
    cluster = nodes.cluster()
    transaction = cluster.write()
    with pytest.raises(KeyError), transaction as conn:
        conn.execute("INSERT something")
        raise KeyError("app error")
    assert (nodes.primary.commits, nodes.primary.rollbacks) == (0, 1)
    assert transaction.token is None and cluster.last_write_token is None


def test_a_swallowed_statement_error_does_not_commit_silently() -> None:
    nodes = Nodes()
    cluster = nodes.cluster()
    with (
        pytest.raises(DatabaseError, match="rolled back"),
        cluster.write() as conn,
        contextlib.suppress(psycopg.errors.UniqueViolation),
    ):
        conn.execute("FAIL")
    assert (nodes.primary.commits, nodes.primary.rollbacks) == (0, 1)


def test_the_callers_own_errors_propagate_unchanged() -> None:
    cluster = Nodes(50).cluster()
    with pytest.raises(psycopg.errors.UniqueViolation), cluster.write() as conn:
        conn.execute("FAIL")
    with pytest.raises(psycopg.errors.UniqueViolation), cluster.read() as conn:
        conn.execute("FAIL")


def test_an_unreachable_primary_raises_node_unavailable() -> None:
    nodes = Nodes()
    nodes.primary.up = False
    cluster = nodes.cluster()
    with pytest.raises(NodeUnavailable, match="p: node is gone: cannot connect") as caught, \
            cluster.write():
        pass
    assert caught.value.failure is Failure.NODE_GONE
    with pytest.raises(NodeUnavailable, match="cannot connect"), cluster.read():
        pass


def test_a_primary_that_dies_under_a_write_is_not_retried() -> None:
    nodes = Nodes()
    cluster = nodes.cluster()
    write(cluster)
    nodes.primary.up = False
    with pytest.raises(NodeUnavailable, match="not committed") as caught, \
            cluster.write() as conn:
        conn.execute("INSERT 2")
    assert caught.value.failure is Failure.NODE_GONE
    assert isinstance(caught.value.__cause__, psycopg.OperationalError)
    nodes.primary.up = True
    write(cluster, "INSERT 3")
    assert nodes.primary.connects == 2  # the broken connection was dropped
    assert nodes.primary.writes == ["INSERT 1", "INSERT 3"]


def test_a_commit_that_loses_the_node_says_the_outcome_is_unknown() -> None:
    nodes = Nodes()
    cluster = nodes.cluster()
    nodes.primary.die_on_commit = True
    with pytest.raises(NodeUnavailable, match="commit outcome unknown"), \
            cluster.write() as conn:
        conn.execute("INSERT 1")
    assert nodes.primary.writes == ["INSERT 1"]


def test_a_node_gone_right_after_its_commit_leaves_the_outcome_unknown() -> None:
    # Fenced between COMMIT and the position query: the commit may not have
    # reached a replica, so it is reported like a commit that failed.
    nodes = Nodes()
    cluster = nodes.cluster()
    nodes.primary.die_after_commit = True
    with pytest.raises(NodeUnavailable, match="outcome unknown") as caught, \
            cluster.write() as conn:
        conn.execute("INSERT 1")
    assert caught.value.failure is Failure.NODE_GONE
    assert nodes.primary.commits == 1
    assert cluster.last_write_token is None


# -- failure handling on reads ---------------------------------------------------------------


def test_a_dead_replica_is_skipped_and_tried_again_later() -> None:
    nodes = Nodes(50, 50)
    nodes.replicas[0].up = False
    cluster = nodes.cluster()
    assert [served_by(cluster) for _ in range(4)] == ["r1"] * 4
    assert nodes.replicas[0].connects == 1  # marked down after one failed connect
    nodes.replicas[0].up = True
    nodes.now += 5.0
    assert {served_by(cluster) for _ in range(4)} == {"r0", "r1"}


def test_all_replicas_dead_falls_back_to_the_primary() -> None:
    nodes = Nodes(50, 50)
    for replica in nodes.replicas:
        replica.up = False
    cluster = nodes.cluster()
    assert served_by(cluster) == "p"
    assert served_by(cluster, format_lsn(10)) == "p"


def test_a_stale_idle_connection_is_replaced_before_use() -> None:
    nodes = Nodes(50)
    cluster = nodes.cluster()
    assert served_by(cluster) == "r0"
    nodes.conns[-1].stale = True  # the server ended the session while it sat idle
    assert served_by(cluster) == "r0"
    assert nodes.replicas[0].connects == 2


def test_a_replica_dying_under_a_read_raises_node_unavailable_and_is_marked_down() -> None:
    nodes = Nodes(50)
    cluster = nodes.cluster()
    with pytest.raises(NodeUnavailable, match="r0: node is gone") as caught, \
            cluster.read() as conn:
        nodes.replicas[0].up = False
        conn.execute("SELECT who")
    assert caught.value.failure is Failure.NODE_GONE
    nodes.replicas[0].up = True
    assert served_by(cluster) == "p"  # still within retry_after
    nodes.now += 5.0
    assert served_by(cluster) == "r0"


def test_a_replica_that_dies_while_idle_is_skipped_by_a_causal_read() -> None:
    nodes = Nodes(50)
    cluster = nodes.cluster()
    assert served_by(cluster) == "r0"
    nodes.replicas[0].up = False  # the position check finds out; nothing of the read is sent
    assert served_by(cluster, "0/1") == "p"


def test_query_retries_once_on_another_node_when_its_node_is_gone() -> None:
    nodes = Nodes(50, 50)
    cluster = nodes.cluster()
    assert [served_by(cluster, None) for _ in range(2)] == ["r0", "r1"]  # both connected
    cluster.reset_served()
    nodes.replicas[0].up = False  # its open connection breaks under the statement
    assert cluster.query("SELECT who", token=None) == [("r1",)]
    assert nodes.replicas[0].statements.count("SELECT who") == 1
    assert cluster.served() == {("r0", Intent.READ): 1, ("r1", Intent.READ): 1}


def test_query_gives_up_after_one_retry() -> None:
    nodes = Nodes(50)
    cluster = nodes.cluster()
    assert served_by(cluster) == "r0"
    with cluster.write() as conn:  # open a primary connection too
        conn.execute("INSERT 1")
    nodes.replicas[0].up = False
    nodes.primary.up = False
    with pytest.raises(NodeUnavailable):
        cluster.query("SELECT who")


def test_query_does_not_retry_the_callers_own_errors() -> None:
    nodes = Nodes(50)
    cluster = nodes.cluster()
    with pytest.raises(psycopg.errors.UniqueViolation):
        cluster.query("FAIL")
    assert sum(1 for s in nodes.replicas[0].statements if s == "FAIL") == 1


# -- with a health monitor ---------------------------------------------------------------------


def test_the_monitor_starts_on_first_use_once_per_process(
        monkeypatch: pytest.MonkeyPatch) -> None:
    nodes = Nodes(50)
    health = nodes.health()
    cluster = nodes.cluster(health)
    assert health.starts == 0  # building the cluster starts nothing
    served_by(cluster)
    write(cluster)
    assert health.starts == 1
    simulate_fork(monkeypatch)  # as in a forked gunicorn worker
    served_by(cluster)
    assert health.starts == 2


def test_reads_use_the_monitors_read_pool() -> None:
    nodes = Nodes(50, 50)
    health = nodes.health()
    cluster = nodes.cluster(health)
    assert served_by(cluster) == "p"  # an empty pool: nothing healthy yet
    health.put("r1")
    assert {served_by(cluster) for _ in range(4)} == {"r1"}
    health.put("r0")
    assert {served_by(cluster) for _ in range(4)} == {"r0", "r1"}
    assert cluster.read_pool() == ("r0", "r1")
    del health.pool["r1"]  # lagging or dead: out of the pool
    assert {served_by(cluster) for _ in range(4)} == {"r0"}


def test_a_replica_the_monitor_saw_past_the_token_is_used_without_asking() -> None:
    nodes = Nodes(60, 60)
    health = nodes.health()
    health.put("r0", position=40)
    health.put("r1", position=60)
    cluster = nodes.cluster(health)
    assert {served_by(cluster, format_lsn(50)) for _ in range(3)} == {"r1"}
    assert nodes.replicas[1].position_checks == 0
    # Behind the token as last seen: asked, and used once it shows the position.
    health.put("r1", position=40)
    assert served_by(cluster, format_lsn(50)) in ("r0", "r1")
    assert nodes.replicas[0].position_checks + nodes.replicas[1].position_checks >= 1


def test_bounded_staleness_counts_the_lag_and_the_age_of_its_measurement() -> None:
    nodes = Nodes(50, 50)
    health = nodes.health()
    health.put("r0", lag=2.0)
    health.put("r1", lag=0.1, observed_at=nodes.now - 0.2)
    cluster = nodes.cluster(health)
    assert {served_by(cluster, max_staleness=1.0) for _ in range(4)} == {"r1"}
    assert {served_by(cluster, max_staleness=5.0) for _ in range(4)} == {"r0", "r1"}
    assert served_by(cluster, max_staleness=0.25) == "p"
    health.put("r1", lag=None)  # never measured
    assert served_by(cluster, max_staleness=1.0) == "p"


def test_writes_follow_the_monitors_primary_without_a_restart() -> None:
    nodes = Nodes(50)
    health = nodes.health()
    cluster = nodes.cluster(health)
    write(cluster, "INSERT 1")
    # Failover: r0 is promoted, p is fenced (stopped).
    nodes.primary.up = False
    replica = nodes.replicas[0]
    replica.in_recovery = False
    health.primary = "r0"
    token = write(cluster, "INSERT 2")
    assert token is not None and cluster.last_node == "r0"
    assert nodes.primary.writes == ["INSERT 1"]
    assert replica.writes == ["INSERT 2"]
    assert cluster.served()[("r0", Intent.WRITE)] == 1
    assert cluster.primary() == "r0"
    with cluster.read_primary() as conn:
        assert conn.execute("SELECT who").fetchone() == ("r0",)


def test_with_no_primary_known_writes_fail_at_once() -> None:
    nodes = Nodes(50)
    health = nodes.health(primary=None)
    cluster = nodes.cluster(health)
    with pytest.raises(NodeUnavailable, match="no node is known to be the primary"), \
            cluster.write():
        pass
    assert nodes.primary.connects == 0
    health.put("r0")
    assert served_by(cluster) == "r0"  # reads from replicas go on


def test_a_primary_that_refuses_to_connect_is_retried_once_if_the_monitor_moved_on() -> None:
    nodes = Nodes(50)
    health = nodes.health()
    nodes.primary.up = False
    nodes.replicas[0].in_recovery = False
    real_connect = nodes.connect

    def connect(dsn: str, timeout: float) -> FakeConn:
        try:
            return real_connect(dsn, timeout)
        finally:
            # The monitor's thread publishes the new primary while this write connects.
            health.primary = "r0"

    nodes.connect = connect  # type: ignore[method-assign]
    cluster = nodes.cluster(health)
    write(cluster, "INSERT 1")
    assert nodes.replicas[0].writes == ["INSERT 1"]


def test_a_write_on_a_demoted_node_asks_for_a_new_round_and_is_not_replayed() -> None:
    nodes = Nodes(50)
    health = nodes.health()
    cluster = nodes.cluster(health)
    write(cluster, "INSERT 1")
    # Switchover: p is a replica now, r0 the primary; this router has not heard yet.
    nodes.primary.in_recovery = True
    nodes.replicas[0].in_recovery = False
    health.on_check = lambda: setattr(health, "primary", "r0")
    with pytest.raises(NodeUnavailable, match="p: node is not the primary") as caught, \
            cluster.write() as conn:
        conn.execute("INSERT 2")
    assert caught.value.failure is Failure.NOT_PRIMARY
    assert health.checks == 1
    assert nodes.primary.statements.count("INSERT 2") == 1
    assert nodes.replicas[0].writes == []  # never replayed elsewhere
    write(cluster, "INSERT 3")
    assert nodes.replicas[0].writes == ["INSERT 3"]


def test_a_write_block_that_only_reads_on_a_demoted_node_gets_no_token() -> None:
    nodes = Nodes(50)
    health = nodes.health()
    cluster = nodes.cluster(health)
    nodes.primary.in_recovery = True
    with pytest.raises(NodeUnavailable, match="in recovery"), cluster.write() as conn:
        conn.execute("SELECT who")
    assert health.checks == 1
    assert cluster.last_write_token is None


def test_a_down_mark_ends_when_the_monitor_sees_the_node_answer_again() -> None:
    nodes = Nodes(50)
    health = nodes.health()
    health.put("r0")
    cluster = nodes.cluster(health)
    assert served_by(cluster) == "r0"
    nodes.replicas[0].up = False
    with pytest.raises(NodeUnavailable), cluster.read() as conn:
        conn.execute("SELECT who")
    nodes.replicas[0].up = True
    nodes.now += 0.5
    assert served_by(cluster) == "p"  # the monitor's last look predates the failure
    health.put("r0")  # a newer good check
    assert served_by(cluster) == "r0"


# -- accounting, pinning, threads and processes ------------------------------------------------


def test_served_counts_per_node_and_intent() -> None:
    nodes = Nodes(50)
    cluster = nodes.cluster()
    served_by(cluster)
    served_by(cluster, "FF/0")
    write(cluster)
    with cluster.read_primary():
        pass
    assert cluster.served() == {
        ("r0", Intent.READ): 1, ("p", Intent.READ): 1,
        ("p", Intent.WRITE): 1, ("p", Intent.READ_PRIMARY): 1,
    }
    assert str(Intent.READ) == "read"  # benchmarks may count by plain names
    assert cluster.last_node == "p"
    cluster.reset_served()
    assert cluster.served() == {}


def test_pinned_reads_go_to_the_primary_for_the_window_after_a_write() -> None:
    nodes = Nodes(50)
    cluster = nodes.cluster()
    pinned = PinnedReads(cluster, window=2.0, clock=lambda: nodes.now)
    with pinned.read() as conn:
        assert conn.execute("SELECT who").fetchone() == ("r0",)
    write(pinned)
    assert pinned.pinned
    for _ in range(3):
        with pinned.read() as conn:
            assert conn.execute("SELECT who").fetchone() == ("p",)
    nodes.now += 2.0
    assert not pinned.pinned
    with pinned.read() as conn:
        assert conn.execute("SELECT who").fetchone() == ("r0",)
    assert cluster.served()[("p", Intent.READ_PRIMARY)] == 3
    assert cluster.served()[("r0", Intent.READ)] == 2
    seen: list[bool] = []
    thread = threading.Thread(target=lambda: seen.append(pinned.pinned))
    nodes.now -= 1.0
    thread.start()
    thread.join()
    assert seen == [False] and pinned.pinned  # the pin is this thread's


def test_connections_are_per_thread() -> None:
    nodes = Nodes(50)
    cluster = nodes.cluster()
    served_by(cluster)
    thread = threading.Thread(target=lambda: served_by(cluster))
    thread.start()
    thread.join()
    assert nodes.replicas[0].connects == 2


def test_nothing_connects_before_first_use() -> None:
    nodes = Nodes(50)
    nodes.cluster(nodes.health())
    assert nodes.primary.connects == 0
    assert nodes.replicas[0].connects == 0


def test_close_closes_this_threads_connections() -> None:
    nodes = Nodes(50)
    cluster = nodes.cluster()
    served_by(cluster)
    cluster.close()
    served_by(cluster)
    assert nodes.replicas[0].connects == 2


def test_a_forked_child_neither_uses_nor_closes_the_parents_connections(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    nodes = Nodes(50)
    cluster = nodes.cluster()
    with cluster.read() as parent_conn:
        pass
    write(cluster)
    simulate_fork(monkeypatch)
    assert cluster.last_write_token is None
    with cluster.read() as child_conn:
        pass
    assert child_conn is not parent_conn
    assert not parent_conn.closed  # closing it would end the parent's session
    assert nodes.replicas[0].connects == 2
