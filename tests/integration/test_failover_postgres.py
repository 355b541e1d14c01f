"""Failover and switchover on real servers: a primary, streaming replicas, planner and executor."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import psycopg
import pytest

from tests.conftest import require
from tests.integration.pgcluster import Cluster, wait_connect
from tiers.db import embedded
from tiers.db.failover import (
    Announce,
    Decision,
    FailoverPolicy,
    Fence,
    Promote,
    Rejoin,
    Repoint,
    plan_failover,
    plan_switchover,
)
from tiers.db.promote import FENCE_MARKER, Executor, FailoverStepError, is_fenced, read_primary
from tiers.errors import DatabaseError

P, R1, R2 = "db-primary", "db-replica1", "db-replica2"
POLICY = FailoverPolicy(failed_checks=3, check_interval=0.5)
WAIT = 20.0


def make_cluster(root: Path, nodes: int) -> Iterator[Cluster]:
    try:
        cluster = Cluster(root, nodes=nodes)
        embedded.run_tool(cluster.layout, cluster.run_as, "postgres", ["--version"])
    except DatabaseError as exc:
        require(False, f"the embedded PostgreSQL server cannot run here: {exc}")
        return
    try:
        cluster.start_replicated()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster3(open_tmp: Path) -> Iterator[Cluster]:
    yield from make_cluster(open_tmp, 3)


@pytest.fixture
def cluster2(open_tmp: Path) -> Iterator[Cluster]:
    yield from make_cluster(open_tmp, 2)


def executor_for(cluster: Cluster) -> Executor:
    return Executor(cluster.layout, cluster.run_as, cluster.node_ports,
                    start=cluster.start_node, timeout=WAIT)


def connect(cluster: Cluster, name: str) -> psycopg.Connection[tuple[object, ...]]:
    return wait_connect(cluster.node_ports[name])


def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def fetch(conn: psycopg.Connection[tuple[object, ...]], query: str) -> object:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def detect_failure(executor: Executor, primary: str) -> Decision:
    """Health checks at the policy's interval until the planner acts, as a monitor would."""
    failures: dict[str, int] = {}
    deadline = time.monotonic() + WAIT
    while True:
        facts = executor.observe(failures)
        failures = {f.name: f.failed_checks for f in facts}
        decision = plan_failover(facts, primary, POLICY)
        if decision.actions or time.monotonic() > deadline:
            return decision
        time.sleep(POLICY.check_interval)


def server_processes(data: Path) -> list[int]:
    target = os.path.realpath(data)
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.cwd() == target and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


def test_failover_promotes_the_most_advanced_replica_and_the_old_primary_rejoins(
        cluster3: Cluster) -> None:
    cluster = cluster3
    executor = executor_for(cluster)
    with connect(cluster, P) as primary:
        primary.execute("CREATE TABLE items (id int PRIMARY KEY, body text)")
    # R1 stops streaming, so R2 ends up ahead of it although R1 comes first by name.
    with connect(cluster, R1) as lagging:
        lagging.execute("ALTER SYSTEM SET primary_conninfo = ''")
        lagging.execute("SELECT pg_reload_conf()")
        eventually(lambda: lagging.execute("SELECT 1 FROM pg_stat_wal_receiver").fetchone()
                   is None, f"{R1} to stop streaming")
    with connect(cluster, P) as primary:
        for i in range(100):
            primary.execute("INSERT INTO items VALUES (%s, 'before')", (i,))
        final = fetch(primary, "SELECT pg_current_wal_lsn()")
    # Replication is asynchronous: wait for R2 so that the count below is deterministic.
    with connect(cluster, R2) as ahead:
        eventually(lambda: fetch(ahead, f"SELECT pg_last_wal_replay_lsn() >= '{final}'")
                   is True, f"{R2} to replay the inserts")

    killed_at = time.monotonic()
    cluster.kill(P)
    decision = detect_failure(executor, P)
    detected_at = time.monotonic()
    assert decision.actions == (Fence(P), Promote(R2), Announce(R2), Repoint(R1, R2))
    executor.execute(decision.actions)
    with connect(cluster, R2) as new_primary:
        assert fetch(new_primary, "SELECT pg_is_in_recovery()") is False
        new_primary.execute("INSERT INTO items VALUES (100, 'after')")
        writable_at = time.monotonic()
        assert fetch(new_primary, "SELECT count(*) FROM items") == 101
    print(f"\nfailover: kill -> detected {detected_at - killed_at:.2f}s, "
          f"-> new primary committed a write {writable_at - killed_at:.2f}s "
          f"(plan executed in {writable_at - detected_at:.2f}s)")

    # The other replica follows the new timeline, catching up on what it missed.
    with connect(cluster, R1) as follower:
        eventually(lambda: fetch(follower, "SELECT count(*) FROM items") == 101,
                   f"{R1} to replicate from {R2}")
    old_dir = cluster.layout.node_dir(P)
    assert (old_dir / FENCE_MARKER).exists()
    assert is_fenced(cluster.layout, P)
    assert server_processes(old_dir) == []
    assert read_primary(cluster.layout, P) == R2

    # The old primary comes back only as a replica.
    facts = executor.observe()
    decision = plan_failover(facts, R2, POLICY)
    assert decision.actions == (Rejoin(P, R2),)
    executor.execute(decision.actions)
    assert not is_fenced(cluster.layout, P)
    with connect(cluster, R2) as new_primary:
        new_primary.execute("INSERT INTO items VALUES (101, 'after the rejoin')")
    with connect(cluster, P) as old:
        assert fetch(old, "SELECT pg_is_in_recovery()") is True
        eventually(lambda: fetch(old, "SELECT count(*) FROM items") == 102,
                   f"{P} to replicate from {R2}")
        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
            old.execute("INSERT INTO items VALUES (999, 'refused')")
    assert plan_failover(executor.observe(), R2, POLICY).actions == ()


def test_switchover_loses_no_committed_write(cluster3: Cluster) -> None:
    cluster = cluster3
    executor = executor_for(cluster)
    with connect(cluster, P) as primary:
        primary.execute("CREATE TABLE items (id int PRIMARY KEY)")

    committed: list[int] = []
    stop = threading.Event()
    ended: list[BaseException] = []

    def write_loop() -> None:
        try:
            with connect(cluster, P) as conn:
                for i in range(1_000_000):
                    if stop.is_set():
                        return
                    conn.execute("INSERT INTO items VALUES (%s)", (i,))
                    committed.append(i)  # autocommit: the commit has returned
        except psycopg.Error as exc:
            ended.append(exc)  # the shutdown ended the session

    writer = threading.Thread(target=write_loop, daemon=True)
    writer.start()
    try:
        eventually(lambda: len(committed) >= 200, "the writer to commit")
        began = time.monotonic()
        decision = plan_switchover(executor.observe(), P, R1)
        executor.execute(decision.actions)
        print(f"\nswitchover: {time.monotonic() - began:.2f}s from the plan to every node "
              f"following {R1}, {len(committed)} writes committed before it")
    finally:
        stop.set()
        writer.join(WAIT)
    assert not writer.is_alive()
    assert ended, "the writer kept committing to the old primary"

    with connect(cluster, R1) as new_primary:
        assert fetch(new_primary, "SELECT pg_is_in_recovery()") is False
        present = {row[0] for row in new_primary.execute("SELECT id FROM items")}
        assert set(committed) <= present
        new_primary.execute("INSERT INTO items VALUES (-1)")
    assert read_primary(cluster.layout, P) == R1
    for name in (P, R2):
        with connect(cluster, name) as follower:
            assert fetch(follower, "SELECT pg_is_in_recovery()") is True

            def replicated(conn: psycopg.Connection[tuple[object, ...]] = follower) -> bool:
                return fetch(conn, "SELECT count(*) FROM items WHERE id = -1") == 1

            eventually(replicated, f"{name} to replicate from {R1}")
    assert plan_failover(executor.observe(), R1, POLICY).actions == ()


def test_a_rejoin_that_cannot_rewind_takes_a_fresh_base_backup(cluster2: Cluster) -> None:
    cluster = cluster2
    executor = executor_for(cluster)
    with connect(cluster, P) as primary:
        primary.execute("CREATE TABLE items (id int PRIMARY KEY)")
    cluster.kill(P)
    # After a crash the old primary's last position is unknown: no zero-loss wait.
    with pytest.raises(FailoverStepError, match="not cleanly shut down"):
        executor.wait_for_replay(R1, P)
    executor.execute([Fence(P), Promote(R1), Announce(R1)])
    # Without its control file the old data directory cannot be rewound.
    old_dir = cluster.layout.node_dir(P)
    (old_dir / "global" / "pg_control").unlink()
    before = old_dir.stat().st_ino
    executor.execute([Rejoin(P, R1)])
    assert old_dir.stat().st_ino != before  # a new directory took its place
    with connect(cluster, R1) as new_primary:
        new_primary.execute("INSERT INTO items VALUES (1)")
    with connect(cluster, P) as old:
        assert fetch(old, "SELECT pg_is_in_recovery()") is True
        eventually(lambda: fetch(old, "SELECT count(*) FROM items") == 1,
                   f"{P} to replicate from {R1}")
    assert not old_dir.with_name(P + ".discarded").exists()
