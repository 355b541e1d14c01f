"""After a failover the same router object writes to the new primary, without a restart."""

from __future__ import annotations

import threading
import time
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
    monitored,
    replayed,
    started,
)
from tiers.db.errors import Failure, NodeUnavailable
from tiers.db.failover import Announce, Fence, Promote
from tiers.db.health import HealthPolicy
from tiers.db.promote import Executor
from tiers.db.router import Cluster, Intent


@pytest.fixture
def pg(open_tmp: Path) -> Iterator[PgCluster]:
    yield from started(open_tmp)


def rows_on(pg: PgCluster, index: int) -> set[str]:
    with psycopg.connect(pg.dsn(index), autocommit=True) as conn:
        return {str(row[0]) for row in conn.execute("SELECT body FROM items")}


def created_on_replica(router: Cluster, pg: PgCluster) -> None:
    """Wait for the replica to replay the router's last write and join its read pool.

    Replication is asynchronous: a primary fenced before the replica has the
    table takes the table with it, and the test would fail for that instead.
    """
    token = router.last_write_token
    assert token is not None
    eventually(lambda: replayed(pg.dsn(1), token), "the replica to replay the table")
    eventually(in_pool(router, R1), "the replica to join the read pool")


def try_write(router: Cluster, body: str) -> bool:
    try:
        with router.write() as conn:
            conn.execute("INSERT INTO items (body) VALUES (%s)", (body,))
    except NodeUnavailable:
        return False
    return True


def test_the_same_router_writes_to_the_new_primary_and_never_to_the_old(pg: PgCluster) -> None:
    router = monitored(pg, HealthPolicy(fall=2, rise=1))
    try:
        with router.write() as conn:
            conn.execute("CREATE TABLE items (id serial PRIMARY KEY, body text)")
            conn.execute("INSERT INTO items (body) VALUES ('before')")
        created_on_replica(router, pg)
        assert router.primary() == P

        # A writer keeps writing through the failover, as an app server's thread would.
        stop, fenced = threading.Event(), threading.Event()
        failures: list[NodeUnavailable] = []
        # (body, node that took it, whether the write began after the fence)
        written: list[tuple[str, str | None, bool]] = []

        def writer() -> None:
            n = 0
            while not stop.is_set():
                n += 1
                after = fenced.is_set()
                try:
                    with router.write() as conn:
                        conn.execute("INSERT INTO items (body) VALUES (%s)", (f"w{n}",))
                except NodeUnavailable as exc:
                    failures.append(exc)
                    time.sleep(0.02)
                else:
                    written.append((f"w{n}", router.last_node, after))

        thread = threading.Thread(target=writer, daemon=True)
        thread.start()
        try:
            eventually(lambda: len(written) >= 10, "writes before the failover")
            executor = Executor(pg.layout, pg.run_as, pg.node_ports, timeout=DEADLINE)
            executor.execute([Fence(P)])
            fenced.set()
            executor.execute([Promote(R1), Announce(R1)])
            eventually(lambda: sum(1 for w in written if w[2]) >= 10,
                       "writes after the failover")
        finally:
            stop.set()
            thread.join(DEADLINE)
        assert not thread.is_alive()

        assert router.primary() == R1
        before = [node for _, node, after in written if not after]
        after = [node for _, node, after in written if after]
        assert set(before) == {P}
        assert set(after) == {R1}  # not one write went to the old primary
        # Meanwhile writes failed with the one tiers error, and did not hang.
        assert failures
        assert all(f.failure in (Failure.NODE_GONE, Failure.NOT_PRIMARY) for f in failures)
        stored = rows_on(pg, 1)
        assert {body for body, _, after in written if after} <= stored

        # Reads follow: no replica is left, so the new primary serves them.
        assert router.query("SELECT pg_is_in_recovery()", token=None) == [(False,)]
        assert router.last_node == R1
        with router.read(router.last_write_token) as conn:
            row = conn.execute("SELECT count(*) FROM items").fetchone()
        assert row == (len(stored),)
        assert router.served().get((P, Intent.READ), 0) == 0
    finally:
        router.stop()


def test_writes_fail_fast_until_the_new_primary_is_up(pg: PgCluster) -> None:
    router = monitored(pg, HealthPolicy(fall=2, rise=1))
    try:
        with router.write() as conn:
            conn.execute("CREATE TABLE items (id serial PRIMARY KEY, body text)")
        created_on_replica(router, pg)
        executor = Executor(pg.layout, pg.run_as, pg.node_ports, timeout=DEADLINE)
        executor.execute([Fence(P)])
        for _ in range(3):
            with pytest.raises(NodeUnavailable) as caught, router.write() as conn:
                conn.execute("INSERT INTO items (body) VALUES ('refused')")
            assert caught.value.node == P
            assert caught.value.failure is Failure.NODE_GONE
        executor.execute([Promote(R1), Announce(R1)])
        eventually(lambda: try_write(router, "on the new primary"),
                   "the router to find the new primary")
        assert router.last_node == R1
        assert rows_on(pg, 1) == {"on the new primary"}
    finally:
        router.stop()
