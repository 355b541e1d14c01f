"""Read-your-writes, bounded staleness and the read pool, on a real primary and replica.

The replica's replay is paused (``pg_wal_replay_pause()``) so that it lags
for certain: causal reads must still see every write, naive reads must not.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.integration.pgcluster import Cluster as PgCluster
from tests.integration.routerkit import (
    DEADLINE,
    R1,
    P,
    eventually,
    in_pool,
    module_cluster,
    monitored,
    replay_paused,
    replayed,
    started,
)
from tiers.db.health import HealthPolicy
from tiers.db.router import Cluster, Intent


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    yield from module_cluster("tiers-router-causal-")


@pytest.fixture
def router(pg: PgCluster) -> Iterator[Cluster]:
    made = monitored(pg, causal_wait=0.02)
    yield made
    made.stop()


def count(conn: psycopg.Connection[tuple[object, ...]], table: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    assert row is not None
    return int(str(row[0]))


def fresh_table(router: Cluster, pg: PgCluster, table: str) -> None:
    """Create ``table`` and wait until the replica has it and is in the read pool."""
    with router.write() as conn:
        conn.execute(f"DROP TABLE IF EXISTS {table}")
        conn.execute(f"CREATE TABLE {table} (id serial PRIMARY KEY, body text)")
    token = router.last_write_token
    assert token is not None
    eventually(lambda: replayed(pg.dsn(1), token), "the replica to replay the CREATE")
    eventually(in_pool(router, R1), "the replica to join the read pool")


def test_causal_reads_see_every_write_through_a_paused_replica(
        router: Cluster, pg: PgCluster) -> None:
    fresh_table(router, pg, "causal_notes")
    router.reset_served()
    with replay_paused(pg.dsn(1)):
        for attempt in range(100):
            with router.write() as conn:
                conn.execute("INSERT INTO causal_notes (body) VALUES (%s)", (f"n{attempt}",))
            token = router.last_write_token
            assert token is not None
            with router.read(token) as conn:
                assert count(conn, "causal_notes") == attempt + 1
            # Read-your-writes is not luck: the paused replica never had the row.
            assert router.last_node == P
            with router.read(None) as conn:
                naive = count(conn, "causal_notes")
            assert router.last_node == R1
            assert naive == 0  # stale: served by the replica, which has none of them
        served = router.served()
        assert served[(P, Intent.WRITE)] == 100
        assert served[(P, Intent.READ)] == 100
        assert served[(R1, Intent.READ)] == 100

    # Replaying again: causal reads are served by the replica once it has the write.
    router.reset_served()
    router.causal_wait = DEADLINE
    for attempt in range(10):
        with router.write() as conn:
            conn.execute("INSERT INTO causal_notes (body) VALUES (%s)", (f"after {attempt}",))
        with router.read(router.last_write_token) as conn:
            assert count(conn, "causal_notes") == 101 + attempt
        assert router.last_node == R1
    assert router.served().get((P, Intent.READ), 0) == 0


def test_a_lagging_replica_leaves_the_read_pool_and_rejoins(pg: PgCluster) -> None:
    policy = HealthPolicy(max_lag_bytes=256 * 1024, max_lag_seconds=None, fall=2, rise=2)
    router = monitored(pg, policy)
    try:
        fresh_table(router, pg, "lag_burst")
        with replay_paused(pg.dsn(1)):
            with router.write() as conn:
                # About 5 MB of WAL: values this short are stored uncompressed.
                conn.execute("INSERT INTO lag_burst (body) SELECT repeat(md5(g::text), 32)"
                             " FROM generate_series(1, 5000) AS g")
            eventually(lambda: R1 not in router.read_pool(), "the replica to leave the pool")
            health = router.health()
            assert health is not None
            reason = health.node(R1).reason
            assert reason is not None and reason.startswith("lag ")
            # No usable replica: reads fall back to the primary, none fails.
            for _ in range(5):
                assert router.query("SELECT pg_is_in_recovery()", token=None) == [(False,)]
                assert router.last_node == P
        eventually(in_pool(router, R1), "the replica to rejoin the pool")
        assert router.query("SELECT pg_is_in_recovery()", token=None) == [(True,)]
        assert router.last_node == R1
    finally:
        router.stop()


def test_bounded_staleness_reads_a_replica_only_while_its_lag_is_under_the_bound(
        router: Cluster, pg: PgCluster) -> None:
    fresh_table(router, pg, "stale_notes")
    monitor = router.monitor
    assert monitor is not None

    def lag(name: str) -> float | None:
        last = monitor.snapshot().node(name).last
        return None if last is None else last.replay_lag_seconds

    eventually(lambda: lag(R1) == 0.0, "the replica to report no lag")
    with router.read(None, max_staleness=DEADLINE):
        pass
    assert router.last_node == R1
    with replay_paused(pg.dsn(1)):
        with router.write() as conn:
            conn.execute("INSERT INTO stale_notes (body) VALUES ('late')")
        eventually(lambda: (lag(R1) or 0.0) > 0.5, "the replica's lag to pass 0.5 s")
        with router.read(None, max_staleness=0.5) as conn:
            assert count(conn, "stale_notes") == 1
        assert router.last_node == P
        with router.read(None, max_staleness=3600.0) as conn:
            assert count(conn, "stale_notes") == 0
        assert router.last_node == R1


@pytest.fixture
def own_pg(open_tmp: Path) -> Iterator[PgCluster]:
    """A cluster of its own, for a test that kills a node."""
    yield from started(open_tmp)


def test_a_dead_replica_costs_no_read(own_pg: PgCluster) -> None:
    router = monitored(own_pg)
    try:
        with router.write() as conn:
            conn.execute("CREATE TABLE t (id int)")
        eventually(in_pool(router, R1), "the replica to join the read pool")
        assert router.query("SELECT pg_is_in_recovery()", token=None) == [(True,)]
        own_pg.kill(R1)  # a crash: its open connection breaks, the pool still lists it

        def answered_by_the_primary() -> bool:
            rows = router.query("SELECT pg_is_in_recovery()", token=None)  # never raises
            return rows == [(False,)] and router.last_node == P

        eventually(answered_by_the_primary, "reads to move to the primary")
        eventually(lambda: R1 not in router.read_pool(), "the monitor to drop the replica")
        for _ in range(5):
            assert router.query("SELECT 1", token=None) == [(1,)]
            assert router.last_node == P
    finally:
        router.stop()
