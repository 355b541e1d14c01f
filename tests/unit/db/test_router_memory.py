"""What the Cluster keeps between operations: the read pool per health snapshot, per-process
state across a fork, replayed positions per connection, counts per thread, and how it ends
read transactions (the last part against a real PostgreSQL server)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from typing import Any

import psycopg
import psycopg.errors
import pytest

from tests.unit.db.test_router import FakeConn, FakeCursor, Nodes, served_by, write
from tiers.db.health import ClusterHealth, HealthPolicy, NodeObservation
from tiers.db.monitor import HealthMonitor
from tiers.db.postgres import InputWatch, end_read_transaction, format_lsn
from tiers.db.router import Cluster, Intent

# -- the read pool, built once per health snapshot ---------------------------------------------


class QuietMonitor:
    """A real HealthMonitor whose rounds run only when the test calls ``check_now``."""

    def __init__(self, names: list[str], primary: str) -> None:
        self.seen: dict[str, NodeObservation] = {}
        self.monitor = HealthMonitor({name: name for name in names}, primary=primary,
                                     policy=HealthPolicy(fall=1, rise=1), probe=self._probe)
        self.starts = 0

    def _probe(self, dsn: str, _timeout: float) -> NodeObservation:
        seen = self.seen.get(dsn, NodeObservation(dsn, dsn, reachable=False))
        return NodeObservation("", "", seen.reachable, seen.in_recovery, seen.position,
                               seen.replay_lag_seconds, checked_at=time.monotonic())

    def set(self, name: str, *, up: bool = True, replica: bool = True,
            position: int = 50) -> None:
        self.seen[name] = NodeObservation(name, name, up, replica, position,
                                          0.0 if replica else None)

    def snapshot(self) -> ClusterHealth:
        return self.monitor.snapshot()

    def start(self) -> None:
        self.starts += 1

    def stop(self, timeout: float | None = None) -> bool:
        return True

    def check_now(self) -> ClusterHealth:
        return self.monitor.check_now()


def test_the_pool_is_built_once_per_snapshot_and_anew_for_each_new_one() -> None:
    nodes = Nodes(50, 50)
    quiet = QuietMonitor(["p", "r0", "r1"], "p")
    quiet.set("p", replica=False, position=100)
    quiet.set("r0")
    quiet.set("r1")
    quiet.check_now()
    cluster = nodes.cluster(quiet)  # type: ignore[arg-type]
    first = cluster._pool()
    assert cluster._pool() is first  # the same snapshot: nothing rebuilt
    assert cluster.read_pool() == ("r0", "r1")
    assert {served_by(cluster, None) for _ in range(4)} == {"r0", "r1"}
    quiet.set("r1", up=False)
    quiet.check_now()  # a new snapshot without r1
    assert cluster._pool() is not first
    assert cluster.read_pool() == ("r0",)
    assert {served_by(cluster, None) for _ in range(4)} == {"r0"}
    quiet.set("r0", up=False)
    quiet.check_now()
    assert cluster.read_pool() == ()
    assert served_by(cluster, None) == "p"
    quiet.set("r0")
    quiet.set("r1")
    quiet.check_now()
    assert {served_by(cluster, None) for _ in range(4)} == {"r0", "r1"}


def test_a_read_without_a_token_skips_a_replica_marked_down() -> None:
    nodes = Nodes(50, 50)
    cluster = nodes.cluster()
    assert {served_by(cluster, None) for _ in range(4)} == {"r0", "r1"}
    nodes.replicas[0].up = False
    nodes.replicas[0].restart()  # its open connection dies with it
    seen = set()
    for _ in range(4):
        try:
            seen.add(served_by(cluster, None))
        except Exception:  # the read that finds r0 dead under it
            continue
    assert seen == {"r1"}
    nodes.replicas[0].up = True
    nodes.now += 5.0  # the mark expires
    assert {served_by(cluster, None) for _ in range(4)} == {"r0", "r1"}


# -- a fork: per-process state starts afresh ----------------------------------------------------


def test_a_real_fork_resets_per_process_state() -> None:
    nodes = Nodes(50)
    health = nodes.health()
    health.put("r0")
    cluster = nodes.cluster(health)
    with cluster.read(None) as parent_conn:
        pass
    write(cluster)
    assert (health.starts, cluster.last_write_token is not None) == (1, True)
    # A thread of the parent holds the counters' lock at the moment of the fork.
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with cluster._tallies.lock:
            held.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert held.wait(10)
    readable, writable = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report, then leave without running any of pytest's code
        code = 1
        try:
            os.close(readable)
            with cluster.read(None) as child_conn:
                pass
            report = {
                "token": cluster.last_write_token,
                "same_connection": child_conn is parent_conn,
                "parent_conn_closed": parent_conn.closed,
                "connects": nodes.replicas[0].connects,
                "monitor_starts": health.starts,
                "reads_on_r0": cluster.served().get(("r0", Intent.READ)),
            }
            os.write(writable, json.dumps(report).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(writable)
    release.set()
    holder.join()
    with os.fdopen(readable, "rb") as pipe:
        deadline = time.monotonic() + 20
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the forked child hung (a lock inherited held?)")
            time.sleep(0.01)
        text = pipe.read()
    assert os.waitstatus_to_exitcode(done[1]) == 0
    assert json.loads(text) == {
        "token": None,  # the parent's thread state stays with the parent
        "same_connection": False,  # a connection of its own ...
        "parent_conn_closed": False,  # ... and the parent's left alone
        "connects": 2,
        "monitor_starts": 2,  # its own monitor thread
        "reads_on_r0": 2,  # the counts so far carry over, as they did before the fork
    }
    # And the parent goes on as it was.
    with cluster.read(None) as again:
        assert again is parent_conn
    assert health.starts == 1


# -- replayed positions remembered per connection -----------------------------------------------


def test_a_remembered_position_serves_later_reads_without_asking() -> None:
    nodes = Nodes(60)
    replica = nodes.replicas[0]
    cluster = nodes.cluster(causal_wait=0.05)
    assert served_by(cluster, format_lsn(50)) == "r0"
    assert replica.position_checks == 1
    assert served_by(cluster, format_lsn(50)) == "r0"
    assert served_by(cluster, format_lsn(60)) == "r0"
    assert replica.position_checks == 1  # 60 was reported: both known without asking
    assert served_by(cluster, format_lsn(70)) == "p"  # beyond it: asked, waited, gave up
    assert replica.position_checks > 1
    replica.position = 80
    checks = replica.position_checks
    assert served_by(cluster, format_lsn(70)) == "r0"
    assert replica.position_checks == checks + 1
    assert served_by(cluster, format_lsn(80)) == "r0"
    assert replica.position_checks == checks + 1


def test_remembered_positions_are_per_thread() -> None:
    nodes = Nodes(60)
    cluster = nodes.cluster()
    assert served_by(cluster, format_lsn(50)) == "r0"
    thread = threading.Thread(target=lambda: served_by(cluster, format_lsn(50)))
    thread.start()
    thread.join()
    assert nodes.replicas[0].position_checks == 2  # the other thread's connection asked


def test_a_replaced_connection_remembers_nothing() -> None:
    nodes = Nodes(60)
    replica = nodes.replicas[0]
    cluster = nodes.cluster(causal_wait=0.0)
    assert served_by(cluster, format_lsn(50)) == "r0"
    # The replica was stopped, rewound to an earlier point of its history and started
    # again; the router's connection has been seen closed by the server.
    replica.restart()
    replica.position = 40
    for conn in nodes.conns:
        conn.stale = True
    assert served_by(cluster, format_lsn(50)) == "p"
    assert replica.position_checks == 2  # the new session was asked, and said 40


def test_a_remembered_position_never_serves_a_read_from_a_restarted_replica() -> None:
    nodes = Nodes(60)
    replica = nodes.replicas[0]
    cluster = nodes.cluster(causal_wait=0.0)
    assert served_by(cluster, format_lsn(50)) == "r0"
    # Restarted and rewound, and the router has not noticed: its connection looks idle.
    replica.restart()
    replica.position = 40
    with pytest.raises(Exception, match="server closed the connection") as caught, \
            cluster.read(format_lsn(50)) as conn:
        conn.execute("SELECT who")  # the session that reported 60 is gone: no stale read
    assert "node is gone" in str(caught.value)
    assert served_by(cluster, format_lsn(50)) == "p"  # marked down, and asked anew later
    nodes.now += 5.0
    assert served_by(cluster, format_lsn(50)) == "p"
    assert replica.position_checks == 2
    replica.position = 60
    assert served_by(cluster, format_lsn(50)) == "r0"


def test_a_new_primary_forgets_every_remembered_position() -> None:
    nodes = Nodes(60, 60)
    health = nodes.health()
    health.put("r0", position=None)  # in the pool, its position not known to the monitor
    cluster = nodes.cluster(health, causal_wait=0.0)
    assert served_by(cluster, format_lsn(50)) == "r0"
    assert served_by(cluster, format_lsn(50)) == "r0"
    assert nodes.replicas[0].position_checks == 1
    # Failover: r1 is promoted, and the history forks. Whatever r0 reported before belongs
    # to the old history; its connection survived (here), so only the epoch can tell.
    nodes.primary.up = False
    nodes.replicas[1].in_recovery = False
    health.primary = "r1"
    nodes.replicas[0].position = 40
    assert served_by(cluster, format_lsn(50)) == "r1"  # asked again: 40, so the primary
    assert nodes.replicas[0].position_checks == 2
    nodes.replicas[0].position = 56
    assert served_by(cluster, format_lsn(50)) == "r0"
    assert served_by(cluster, format_lsn(50)) == "r0"
    assert nodes.replicas[0].position_checks == 3


def test_read_node_never_relies_on_a_remembered_position() -> None:
    nodes = Nodes(60)
    cluster = nodes.cluster()
    assert served_by(cluster, format_lsn(50)) == "r0"
    assert cluster.read_node(format_lsn(50)) == "r0"
    assert cluster.read_node(format_lsn(50)) == "r0"
    assert nodes.replicas[0].position_checks == 3


def test_a_replica_lagging_beyond_the_causal_wait_is_asked_once_not_waited_for() -> None:
    nodes = Nodes(40)
    replica = nodes.replicas[0]
    health = nodes.health()
    health.put("r0", position=40, lag=1.0)
    cluster = nodes.cluster(health, causal_wait=0.05)
    assert served_by(cluster, format_lsn(50)) == "p"  # asked once: 40; no wait
    assert (replica.position_checks, nodes.sleeps) == (1, [])
    replica.position = 60  # replayed by now, though the monitor has not seen it yet
    assert served_by(cluster, format_lsn(50)) == "r0"
    assert (replica.position_checks, nodes.sleeps) == (2, [])
    assert served_by(cluster, format_lsn(50)) == "r0"  # remembered: not even asked
    assert replica.position_checks == 2
    assert served_by(cluster, None) == "r0"
    # Close enough to wait for: polled until it has the token, or the wait is over.
    health.put("r0", position=40, lag=0.01)
    assert served_by(cluster, format_lsn(70)) == "p"
    assert replica.position_checks > 3 and sum(nodes.sleeps) == pytest.approx(0.05)


# -- counting per thread ------------------------------------------------------------------------


def test_served_counts_the_reads_of_threads_that_have_ended() -> None:
    nodes = Nodes(50)
    cluster = nodes.cluster()
    for _ in range(3):
        threads = [threading.Thread(target=lambda: [served_by(cluster) for _ in range(3)])
                   for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    served_by(cluster)
    assert cluster.served() == {("r0", Intent.READ): 37}
    assert len(cluster._tallies.live) <= 5  # ended threads are folded in, not kept
    cluster.reset_served()
    assert cluster.served() == {}
    write(cluster)
    thread = threading.Thread(target=lambda: served_by(cluster))
    thread.start()
    thread.join()
    assert cluster.served() == {("p", Intent.WRITE): 1, ("r0", Intent.READ): 1}


# -- query and the ends of read blocks ----------------------------------------------------------


def test_query_runs_in_autocommit_on_a_replica_and_in_a_transaction_on_the_primary() -> None:
    nodes = Nodes(50)
    cluster = nodes.cluster(causal_wait=0.0)
    modes: list[tuple[str, bool]] = []
    real_execute = FakeConn.execute

    def spy(self: FakeConn, query: str, params: Any = None) -> FakeCursor:
        if query == "SELECT who":
            modes.append((self.node.name, self.autocommit))
        return real_execute(self, query, params)

    FakeConn.execute = spy  # type: ignore[method-assign]
    try:
        assert cluster.query("SELECT who") == [("r0",)]
        assert cluster.query("SELECT who", token=format_lsn(60)) == [("p",)]
    finally:
        FakeConn.execute = real_execute  # type: ignore[method-assign]
    assert modes == [("r0", True), ("p", False)]
    assert (nodes.replicas[0].rollbacks, nodes.primary.rollbacks) == (0, 1)
    # The replica's connection stays in autocommit until a block needs a transaction.
    assert nodes.conns[0].autocommit is True
    with cluster.read(None) as conn:
        assert conn.node.name == "r0" and conn.autocommit is False  # type: ignore[attr-defined]
    with cluster.write() as conn:
        assert conn.autocommit is False


def test_a_statement_whose_plan_went_stale_gets_a_new_connection() -> None:
    nodes = Nodes(50)
    cluster = nodes.cluster()
    real_execute = FakeConn.execute

    def execute(self: FakeConn, query: str, params: Any = None) -> FakeCursor:
        if query == "SELECT *":
            raise psycopg.errors.FeatureNotSupported("cached plan must not change result type")
        return real_execute(self, query, params)

    FakeConn.execute = execute  # type: ignore[method-assign]
    try:
        with pytest.raises(psycopg.errors.FeatureNotSupported), \
                cluster.read(None) as conn:
            conn.execute("SELECT *")
    finally:
        FakeConn.execute = real_execute  # type: ignore[method-assign]
    assert served_by(cluster, None) == "r0"
    assert nodes.replicas[0].connects == 2


# Against a real server: "p" and "r" are the same server, so reads served by "r" take the
# replica's path (the router cannot tell) while the data is the primary's.


@pytest.fixture
def real(fresh_database: str) -> Any:
    cluster = Cluster({"p": fresh_database, "r": fresh_database}, "p")
    with psycopg.connect(fresh_database, autocommit=True) as conn:
        conn.execute("CREATE TABLE kv (id int PRIMARY KEY, v int)")
        conn.execute("INSERT INTO kv SELECT g, g * 7 FROM generate_series(1, 10) g")
    yield cluster, fresh_database
    cluster.stop()


def test_a_read_block_keeps_psycopgs_prepared_statements_and_ends_its_transaction(
        real: tuple[Cluster, str]) -> None:
    cluster, dsn = real
    for key in range(1, 9):
        with cluster.read(None) as conn:
            assert conn.execute("SELECT v FROM kv WHERE id = %s", (key,)).fetchone() == (key * 7,)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert cluster.last_node == "r"
    with cluster.read(None) as conn:
        row = conn.execute("SELECT count(*) FROM pg_prepared_statements").fetchone()
        pid = conn.info.backend_pid
    assert row is not None and row[0] >= 1  # prepared once, used by the later blocks
    # The block's transaction is over: its lock on kv is gone, and the session is idle.
    with psycopg.connect(dsn, autocommit=True) as other:
        other.execute("SET lock_timeout = '5s'")
        with other.transaction():
            other.execute("LOCK TABLE kv IN ACCESS EXCLUSIVE MODE")
        state = other.execute("SELECT state FROM pg_stat_activity WHERE pid = %s",
                              (pid,)).fetchone()
    assert state == ("idle",)
    with cluster.read(None):
        pass  # nothing sent, nothing to end
    assert cluster.served()[("r", Intent.READ)] == 10


def test_query_on_a_replica_is_one_statement_outside_a_transaction(
        real: tuple[Cluster, str]) -> None:
    cluster, _dsn = real
    # now() is the start of the transaction: the statement's own start only outside BEGIN.
    assert cluster.query("SELECT now() = statement_timestamp()") == [(True,)]
    with cluster.read(None) as conn:
        assert conn.execute("SELECT now() = statement_timestamp()").fetchone() == (False,)
    with cluster.read_primary() as conn:
        assert conn.execute("SELECT now() = statement_timestamp()").fetchone() == (False,)


def test_a_read_block_whose_session_ended_is_replaced(real: tuple[Cluster, str]) -> None:
    cluster, dsn = real
    with cluster.read(None) as conn:
        conn.execute("SELECT 1")
        with psycopg.connect(dsn, autocommit=True) as other:
            other.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        # The ROLLBACK at the end of the block finds the session gone.
    assert conn.closed
    with cluster.read(None) as again:
        assert again is not conn
        assert again.execute("SELECT v FROM kv WHERE id = 2").fetchone() == (14,)


def test_end_read_transaction_closes_a_connection_it_cannot_end(fresh_database: str) -> None:
    with psycopg.connect(fresh_database) as conn, \
            psycopg.connect(fresh_database, autocommit=True) as other:
        conn.execute("SELECT 1")
        end_read_transaction(conn, InputWatch(conn))
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        conn.execute("SELECT 1")
        other.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
        with pytest.raises(psycopg.OperationalError):
            end_read_transaction(conn, InputWatch(conn))
        assert conn.closed
