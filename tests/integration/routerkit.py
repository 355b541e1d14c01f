"""Helpers for the router's integration tests: a replicated cluster, replay pauses, waits."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import psycopg

from tests.conftest import require
from tests.integration.pgcluster import Cluster as PgCluster
from tiers.db import embedded
from tiers.db.health import HealthPolicy
from tiers.db.monitor import HealthMonitor
from tiers.db.postgres import parse_lsn
from tiers.db.router import Cluster
from tiers.errors import DatabaseError

P, R1, R2 = "db-primary", "db-replica1", "db-replica2"
# Generous against a loaded machine: deadlines, not measurements.
DEADLINE = 30.0
# Replicas stay in the read pool whatever their lag, unless a test sets limits.
NO_LAG_LIMITS = HealthPolicy(max_lag_bytes=None, max_lag_seconds=None, fall=2, rise=1)


def unavailable(exc: BaseException) -> NoReturn:
    require(False, f"embedded PostgreSQL cannot run here: {exc}")
    raise AssertionError("unreachable")  # require() skipped or failed already


def started(root: Path, nodes: int = 2) -> Iterator[PgCluster]:
    """A primary and ``nodes - 1`` streaming replicas under ``root``, stopped afterwards."""
    try:
        made = PgCluster(root, nodes=nodes)
        embedded.run_tool(made.layout, made.run_as, "postgres", ["--version"])
    except (DatabaseError, OSError) as exc:
        unavailable(exc)
    try:
        try:
            made.start_replicated()
        except (DatabaseError, OSError, psycopg.OperationalError) as exc:
            unavailable(exc)
        yield made
    finally:
        made.stop()


def module_cluster(prefix: str, nodes: int = 2) -> Iterator[PgCluster]:
    root = Path(tempfile.mkdtemp(prefix=prefix))
    root.chmod(0o755)
    try:
        yield from started(root, nodes)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def node_map(cluster: PgCluster) -> dict[str, str]:
    names = [P, R1, R2][: len(cluster.ports)]
    return {name: cluster.dsn(index) for index, name in enumerate(names)}


def monitored(cluster: PgCluster, policy: HealthPolicy = NO_LAG_LIMITS,
              causal_wait: float = 0.05, name: str = "main") -> Cluster:
    """A router over every node with a fast health monitor (started on first use)."""
    nodes = node_map(cluster)
    monitor = HealthMonitor(nodes, policy, interval=0.05, timeout=2.0, primary=P)
    return Cluster(nodes, P, monitor=monitor, causal_wait=causal_wait, name=name)


def eventually(check: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    until = time.monotonic() + deadline
    while not check():
        assert time.monotonic() < until, f"gave up waiting for {what}"
        time.sleep(0.02)


def in_pool(router: Cluster, name: str) -> Callable[[], bool]:
    return lambda: name in router.read_pool()


def replayed(dsn: str, token: str) -> bool:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute("SELECT pg_last_wal_replay_lsn()::text").fetchone()
    return row is not None and row[0] is not None and parse_lsn(row[0]) >= parse_lsn(token)


@contextmanager
def replay_paused(dsn: str) -> Iterator[None]:
    """Stop the replica at ``dsn`` from replaying WAL (it still receives it) for the block."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("SELECT pg_wal_replay_pause()")
        try:
            def paused() -> bool:
                row = conn.execute("SELECT pg_get_wal_replay_pause_state()").fetchone()
                return row is not None and row[0] == "paused"

            eventually(paused, "replay to pause")
            yield
        finally:
            conn.execute("SELECT pg_wal_replay_resume()")
