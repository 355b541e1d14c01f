"""Replica health against a real primary and streaming replica: probe, lag, death, errors."""

from __future__ import annotations

import re
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NoReturn

import psycopg
import pytest

from tests.conftest import require
from tests.integration.pgcluster import Cluster
from tiers.db.errors import Failure, classify
from tiers.db.health import Check, ClusterHealth, HealthPolicy, NodeObservation, probe, update
from tiers.db.monitor import HealthMonitor
from tiers.errors import DatabaseError

PRIMARY, REPLICA = "db-primary", "db-replica1"
# Generous against a loaded machine: these are deadlines, not measurements.
PROBE_TIMEOUT = 2.0
DEADLINE = 20.0


def unavailable(exc: BaseException) -> NoReturn:
    require(False, f"embedded PostgreSQL cannot run here: {exc}")
    raise AssertionError("unreachable")  # require() skipped or failed already


def started(root: Path) -> Iterator[Cluster]:
    try:
        made = Cluster(root, nodes=2)
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


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    root = Path(tempfile.mkdtemp(prefix="tiers-health-"))
    root.chmod(0o755)
    try:
        yield from started(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def own_cluster(open_tmp: Path) -> Iterator[Cluster]:
    """For a test that stops a node."""
    yield from started(open_tmp)


def monitor_for(cluster: Cluster, policy: HealthPolicy) -> HealthMonitor:
    return HealthMonitor({PRIMARY: cluster.dsn(0), REPLICA: cluster.dsn(1)}, policy,
                         interval=0.05, timeout=PROBE_TIMEOUT, primary=PRIMARY)


def check_until(monitor: HealthMonitor, wanted: str,
                predicate: Callable[[ClusterHealth], bool]) -> list[ClusterHealth]:
    """Rounds by check_now until ``predicate`` holds; every snapshot on the way."""
    seen: list[ClusterHealth] = []
    deadline = time.monotonic() + DEADLINE
    while True:
        seen.append(monitor.check_now())
        if predicate(seen[-1]):
            return seen
        assert time.monotonic() < deadline, f"never {wanted}: {seen[-1]}"
        time.sleep(0.02)


def in_pool(snap: ClusterHealth) -> bool:
    return REPLICA in snap.read_pool


# -- (a) the probe ---------------------------------------------------------------------------


def test_probe_tells_the_primary_from_a_caught_up_replica(cluster: Cluster) -> None:
    deadline = time.monotonic() + DEADLINE
    while True:
        primary = probe(cluster.dsn(0), PROBE_TIMEOUT, name=PRIMARY)
        replica = probe(cluster.dsn(1), PROBE_TIMEOUT, name=REPLICA)
        assert primary.reachable and replica.reachable, (primary.error, replica.error)
        assert primary.in_recovery is False and replica.in_recovery is True
        assert primary.position is not None and replica.position is not None
        if primary.position - replica.position < 1024 * 1024 and replica.replay_lag_seconds == 0:
            break
        assert time.monotonic() < deadline, f"replica never caught up: {primary} {replica}"
        time.sleep(0.05)
    assert primary.replay_lag_seconds is None and primary.received_position is None
    assert replica.received_position is not None
    assert replica.received_position >= replica.position
    assert primary.error is None and replica.error is None

    state = update(ClusterHealth(), [primary, replica], HealthPolicy())
    assert state.primary == PRIMARY
    assert state.read_pool == (REPLICA,)
    last = state.node(REPLICA).last
    assert last is not None and last.lag_bytes is not None and last.lag_bytes < 1024 * 1024


def test_probe_of_a_stopped_server_returns_instead_of_raising(own_cluster: Cluster) -> None:
    replica = own_cluster.procs[1]
    replica.send_signal(signal.SIGINT)
    replica.wait(30)
    observed = probe(own_cluster.dsn(1), PROBE_TIMEOUT, name=REPLICA)
    assert observed.reachable is False
    assert observed.error is not None and observed.error.startswith("cannot connect: ")


# -- (b) lag in bytes while replay is paused -------------------------------------------------


def test_a_paused_replica_leaves_for_lag_in_bytes_and_returns_after_rise(
        cluster: Cluster) -> None:
    policy = HealthPolicy(max_lag_bytes=256 * 1024, max_lag_seconds=None, fall=2, rise=2)
    monitor = monitor_for(cluster, policy)
    check_until(monitor, "in the pool", in_pool)

    with psycopg.connect(cluster.dsn(1), autocommit=True) as replica:
        replica.execute("SELECT pg_wal_replay_pause()")
        try:
            with psycopg.connect(cluster.dsn(0), autocommit=True) as primary:
                primary.execute("CREATE TABLE burst (id int, pad text)")
                # About 5 MB of WAL: values this short are stored uncompressed.
                primary.execute("INSERT INTO burst SELECT g, repeat(md5(g::text), 32)"
                                " FROM generate_series(1, 5000) AS g")
            out = check_until(monitor, "out for lag", lambda s: not in_pool(s))[-1]
            node = out.node(REPLICA)
            assert node.check is Check.LAGGING
            assert node.reason is not None
            assert re.fullmatch(r"lag \d+ bytes > 262144", node.reason), node.reason
            assert node.bad_streak >= policy.fall
            assert node.last is not None and node.last.reachable
        finally:
            replica.execute("SELECT pg_wal_replay_resume()")

    back = check_until(monitor, "back in the pool", in_pool)
    first_good = next(i for i, s in enumerate(back) if s.node(REPLICA).check is Check.GOOD)
    # Hysteresis: the first good check alone does not bring it back.
    assert not in_pool(back[first_good])
    assert back[first_good].node(REPLICA).reason == "rising: 1 of 2 good checks"
    assert back[-1].node(REPLICA).ok_streak == policy.rise
    with psycopg.connect(cluster.dsn(0), autocommit=True) as primary:
        primary.execute("DROP TABLE burst")


# -- (c) a stopped replica -------------------------------------------------------------------


def test_a_stopped_replica_leaves_as_unreachable_within_fall_checks(
        own_cluster: Cluster) -> None:
    policy = HealthPolicy(fall=3, rise=2)
    monitor = monitor_for(own_cluster, policy)
    check_until(monitor, "in the pool", in_pool)

    replica = own_cluster.procs[1]
    replica.send_signal(signal.SIGINT)  # fast shutdown
    replica.wait(30)

    for bad in range(1, policy.fall):
        snap = monitor.check_now()
        node = snap.node(REPLICA)
        assert (node.check, node.bad_streak, node.in_read_pool) == (
            Check.UNREACHABLE, bad, True)
    snap = monitor.check_now()
    node = snap.node(REPLICA)
    assert (node.in_read_pool, node.reason) == (False, "unreachable")
    assert snap.read_pool == ()  # reads fall back to the primary
    assert snap.primary == PRIMARY and snap.node(PRIMARY).check is Check.GOOD
    last = node.last
    assert isinstance(last, NodeObservation) and last.reachable is False and last.error


def test_the_running_monitor_notices_a_stopped_replica(own_cluster: Cluster) -> None:
    with monitor_for(own_cluster, HealthPolicy()) as monitor:
        assert monitor.wait_for(in_pool, DEADLINE) is not None
        replica = own_cluster.procs[1]
        replica.send_signal(signal.SIGINT)
        replica.wait(30)
        snap = monitor.wait_for(lambda s: not in_pool(s), DEADLINE)
        assert snap is not None
        assert snap.node(REPLICA).reason == "unreachable"
        assert monitor.running


# -- (d) classifying real errors -------------------------------------------------------------


def test_a_write_on_the_replica_is_not_primary(cluster: Cluster) -> None:
    with psycopg.connect(cluster.dsn(1)) as replica, pytest.raises(psycopg.Error) as caught:
        replica.execute("CREATE TABLE refused (id int)")
    assert caught.value.sqlstate == "25006"
    assert classify(caught.value) is Failure.NOT_PRIMARY


def test_the_callers_own_errors_are_other(cluster: Cluster) -> None:
    with psycopg.connect(cluster.dsn(0), autocommit=True) as primary:
        with pytest.raises(psycopg.Error) as syntax:
            primary.execute("SELEC 1")
        primary.execute("CREATE TEMP TABLE once (id int PRIMARY KEY)")
        primary.execute("INSERT INTO once VALUES (1)")
        with pytest.raises(psycopg.Error) as duplicate:
            primary.execute("INSERT INTO once VALUES (1)")
    assert classify(syntax.value) is Failure.OTHER
    assert classify(duplicate.value) is Failure.OTHER


def test_a_connection_to_a_stopped_server_is_node_gone(own_cluster: Cluster) -> None:
    conn = psycopg.connect(own_cluster.dsn(1), autocommit=True)
    try:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        replica = own_cluster.procs[1]
        replica.send_signal(signal.SIGINT)
        replica.wait(30)
        with pytest.raises(psycopg.Error) as in_session:
            conn.execute("SELECT 1")
        assert classify(in_session.value) is Failure.NODE_GONE, repr(in_session.value)
        with pytest.raises(psycopg.Error) as closed:
            conn.execute("SELECT 1")
        assert classify(closed.value) is Failure.NODE_GONE, repr(closed.value)
    finally:
        conn.close()
    with pytest.raises(psycopg.Error) as connecting:
        psycopg.connect(own_cluster.dsn(1), connect_timeout=2)
    assert classify(connecting.value) is Failure.NODE_GONE, repr(connecting.value)
