"""The read/write router against a real primary and streaming replica, without a monitor."""

from __future__ import annotations

import shutil
import signal
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.pgcluster import Cluster as PgCluster
from tiers.db.router import Cluster


def started(root: Path) -> Iterator[PgCluster]:
    made = PgCluster(root, nodes=2)
    try:
        made.start_replicated()
        yield made
    finally:
        made.stop()


@pytest.fixture(scope="module")
def cluster() -> Iterator[PgCluster]:
    root = Path(tempfile.mkdtemp(prefix="tiers-router-"))
    root.chmod(0o755)
    try:
        yield from started(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def own_cluster(open_tmp: Path) -> Iterator[PgCluster]:
    """For a test that breaks its cluster."""
    yield from started(open_tmp)


def in_recovery(router: Cluster, token: str | None) -> bool:
    with router.read(token) as conn:
        row = conn.execute("SELECT pg_is_in_recovery()").fetchone()
    assert row is not None
    return bool(row[0])


def test_reads_see_the_clients_own_writes_every_time(cluster: PgCluster) -> None:
    router = Cluster.from_dsns(cluster.dsn(0), [cluster.dsn(1)])
    with router.write() as conn:
        conn.execute("CREATE TABLE notes (id serial PRIMARY KEY, body text)")
    for attempt in range(200):
        with router.write() as conn:
            conn.execute("INSERT INTO notes (body) VALUES (%s)", (f"note {attempt}",))
        token = router.last_write_token
        assert token is not None
        with router.read(token) as conn:
            row = conn.execute("SELECT count(*) FROM notes").fetchone()
        assert row == (attempt + 1,)


def test_reads_without_a_token_go_to_the_replica(cluster: PgCluster) -> None:
    router = Cluster.from_dsns(cluster.dsn(0), [cluster.dsn(1)])
    assert in_recovery(router, None) is True


def test_a_token_from_the_future_is_served_by_the_primary(cluster: PgCluster) -> None:
    router = Cluster.from_dsns(cluster.dsn(0), [cluster.dsn(1)])
    assert in_recovery(router, "FF/0") is False


def test_a_dead_replica_falls_back_to_the_primary(own_cluster: PgCluster) -> None:
    cluster = own_cluster
    router = Cluster.from_dsns(cluster.dsn(0), [cluster.dsn(1)])
    assert in_recovery(router, None) is True  # an open connection to the replica
    replica = cluster.procs[1]
    replica.send_signal(signal.SIGQUIT)  # immediate shutdown, like a crash
    replica.wait(30)
    for _ in range(3):
        assert in_recovery(router, None) is False
