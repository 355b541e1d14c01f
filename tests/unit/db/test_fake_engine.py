"""The generic database modules over an in-memory engine whose positions are not integers.

tiers.db.fake's positions are GTID-like (a sequence number per replication
domain, partly ordered, no byte offsets), so these tests show that the
router, the health monitor, the causal tokens, the clusters, the failover
planner and executor need nothing of an engine beyond tiers.db.engine.Engine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tiers.db import tokens
from tiers.db.clusters import Databases
from tiers.db.embedded import Layout, RunAs
from tiers.db.engine import UnsupportedEngine
from tiers.db.errors import Failure, NodeUnavailable, classify
from tiers.db.failover import (
    FailoverPolicy,
    Fence,
    Promote,
    Rejoin,
    Repoint,
    most_advanced,
    plan_failover,
    plan_switchover,
)
from tiers.db.fake import FakeEngine, FakeGone, FakeReadOnly, FakeStatementError, GtidPosition
from tiers.db.health import HealthPolicy
from tiers.db.ids import decode_id
from tiers.db.monitor import HealthMonitor
from tiers.db.promote import FENCE_MARKER, Executor, is_fenced, read_primary
from tiers.db.router import Cluster, Intent
from tiers.db.sqla import node_engines, read_write_position
from tiers.errors import DatabaseError

P, R1, R2 = "p", "r1", "r2"
PORTS = {P: 6001, R1: 6002, R2: 6003}


@pytest.fixture
def fake() -> Iterator[FakeEngine]:
    engine = FakeEngine()
    engine.add(P, PORTS[P])
    engine.add(R1, PORTS[R1], upstream=PORTS[P])
    engine.add(R2, PORTS[R2], upstream=PORTS[P])
    with engine.registered():
        yield engine


def nodes(fake: FakeEngine) -> dict[str, str]:
    return {name: fake.dsn(name) for name in PORTS}


def cluster(fake: FakeEngine, **options: Any) -> Cluster:
    options.setdefault("causal_wait", 0.0)
    return Cluster(nodes(fake), P, engine=fake, **options)


def put(db: Cluster, key: str, value: str) -> str:
    transaction = db.write()
    with transaction as conn:
        conn.execute(f"PUT {key} {value}")
    assert transaction.token is not None
    return transaction.token


def get(db: Cluster, key: str, *args: Any) -> tuple[str | None, str | None]:
    """The value a read sees, and the node that served it."""
    with db.read(*args) as conn:
        row = conn.execute(f"GET {key}").fetchone()
    return (None if row is None else row[0]), db.last_node


# -- positions and tokens ------------------------------------------------------------------


def test_gtid_positions_are_compared_domain_by_domain() -> None:
    a = GtidPosition.parse("0-5_1-2")
    assert a.text == "0-5_1-2" and GtidPosition.parse(a.text) == a
    assert a >= GtidPosition.parse("0-5") and a >= GtidPosition.parse("1-2_0-3")
    b = GtidPosition.parse("0-4_1-3")
    assert not a >= b and not b >= a  # neither holds all the other holds
    assert GtidPosition().text == "0-0" and GtidPosition.parse("0-0") == GtidPosition()
    for bad in ("", "0", "0/5", "0-5,1-2", "0-5_0-6", "main:0-5"):
        with pytest.raises(ValueError):
            GtidPosition.parse(bad)


def test_tokens_of_a_registered_engine_are_known_to_the_token_functions(
        fake: FakeEngine) -> None:
    assert tokens.is_token("0-5_1-2") and tokens.is_token("0/5")
    assert tokens.later("0-5", "0-7") == "0-7" and tokens.reached("0-7_1-1", "0-7")
    assert not tokens.reached("0-7", "0-7_1-1")
    with tokens.causal_scope({"main": "0-5", "social": "0/16"}) as scope:
        assert scope.tokens == {"main": "0-5", "social": "0/16"}
    with pytest.raises(ValueError):
        tokens.note_write("0/16", "main", fake)  # not this engine's token


def test_outside_its_registration_the_fake_is_unknown() -> None:
    assert not tokens.is_token("0-5")
    with pytest.raises(ValueError), tokens.causal_scope({"main": "0-5"}):
        pass
    with pytest.raises(UnsupportedEngine):
        Cluster({P: "fake://127.0.0.1:1/app"}, P)


# -- the router ----------------------------------------------------------------------------


def test_the_cluster_finds_the_engine_by_the_scheme(fake: FakeEngine) -> None:
    db = Cluster(nodes(fake), P)
    assert db.engine is fake
    token = put(db, "k", "v")
    assert token == "0-1" and GtidPosition.parse(token) == fake.server(P).position


def test_causal_reads_see_the_write_while_naive_reads_see_the_lagging_replica(
        fake: FakeEngine) -> None:
    db = cluster(fake)
    put(db, "k", "old")
    fake.replicate()
    for name in (R1, R2):
        fake.server(name).paused = True  # replay paused: they receive but do not apply
    with tokens.causal_scope() as scope:
        token = put(db, "k", "new")
        assert scope.tokens == {"main": token} and token == "0-2"
        fake.replicate()
        assert get(db, "k") == ("new", P)  # no replica has the write: the primary reads
        assert get(db, "k", None)[0] == "old"  # no token asked for: a stale replica read
    fake.server(R2).paused = False
    fake.replicate()
    with tokens.causal_scope({"main": token}):
        assert get(db, "k") == ("new", R2)


def test_a_causal_read_waits_for_a_replica_that_catches_up(fake: FakeEngine) -> None:
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        fake.replicate()  # the replicas replay meanwhile

    db = cluster(fake, causal_wait=1.0, sleep=sleep)
    token = put(db, "k", "v")
    assert get(db, "k", token) == ("v", R1)
    assert slept and db.served().get((P, Intent.READ), 0) == 0
    assert get(db, "k", token) == ("v", R1)  # a position remembered on the session


def test_node_failures_are_translated_by_the_engines_table(fake: FakeEngine) -> None:
    db = cluster(fake)
    put(db, "k", "v")
    fake.replicate()
    assert get(db, "k", None)[1] in (R1, R2)
    fake.server(R1).up = fake.server(R2).up = False
    # Its connection found stale, the dead replica is skipped; so is the other one.
    assert db.query("GET k", token=None) == [("v",)] and db.last_node == P
    assert classify(FakeGone("gone")) is Failure.NODE_GONE
    assert classify(FakeReadOnly("read-only"), fake) is Failure.NOT_PRIMARY
    fake.server(P).primary = False  # demoted under the router
    with pytest.raises(NodeUnavailable, match="p: node is not the primary") as caught, \
            db.write() as conn:
        conn.execute("PUT k w")
    assert caught.value.failure is Failure.NOT_PRIMARY


def test_a_swallowed_failed_statement_does_not_commit(fake: FakeEngine) -> None:
    db = cluster(fake)
    with pytest.raises(DatabaseError, match="rolled back"), db.write() as conn:
        conn.execute("PUT k v")
        with contextlib.suppress(FakeStatementError):
            conn.execute("FAIL")
    assert fake.server(P).data() == {}


# -- health -----------------------------------------------------------------------------------


def test_the_monitor_keeps_the_read_pool_without_byte_lag(fake: FakeEngine) -> None:
    policy = HealthPolicy(max_lag_bytes=1, max_lag_seconds=1.0, fall=1, rise=1)
    monitor = HealthMonitor(nodes(fake), policy, interval=3600, primary=P)
    assert monitor.engine is fake
    db = Cluster(nodes(fake), P, monitor=monitor, engine=fake, causal_wait=0.0)
    try:
        put(db, "k", "v")  # not replicated: replicas lag, but no byte lag can be measured
        health = monitor.check_now()
        assert health.primary == P and health.read_pool == (R1, R2)
        assert all(n.last is not None and n.last.lag_bytes is None for n in health.nodes)
        fake.server(R1).lag_seconds = 5.0
        fake.server(R2).up = False
        health = monitor.check_now()
        assert health.read_pool == ()
        assert health.node(R1).reason == "lag 5.0 s > 1.0 s"
        assert health.node(R2).reason == "unreachable"
        assert get(db, "k", None) == ("v", P)
    finally:
        db.stop()


# -- failover ---------------------------------------------------------------------------------


@pytest.fixture
def executor(fake: FakeEngine, tmp_path: Path) -> Executor:
    for name in PORTS:
        (tmp_path / name).mkdir()
    return Executor(Layout(root=tmp_path, bin_dir=tmp_path), RunAs(), PORTS, engine=fake,
                    start=fake.start, timeout=2.0)


def test_a_failover_promotes_the_most_advanced_replica_and_the_old_primary_rejoins(
        fake: FakeEngine, executor: Executor) -> None:
    policy = HealthPolicy(max_lag_bytes=None, max_lag_seconds=None, fall=1, rise=1)
    monitor = HealthMonitor(nodes(fake), policy, interval=3600, primary=P)
    db = Cluster(nodes(fake), P, monitor=monitor, engine=fake)
    try:
        failover_and_rejoin(fake, executor, monitor, db)
    finally:
        db.stop()


def failover_and_rejoin(fake: FakeEngine, executor: Executor, monitor: HealthMonitor,
                        db: Cluster) -> None:
    put(db, "a", "1")
    fake.replicate()
    fake.server(R1).up = False  # r1 misses the next write
    put(db, "b", "2")
    fake.replicate()
    fake.server(R1).up = True
    fake.server(P).up = False  # the primary dies, with a write nobody received
    lost = put_directly(fake, P, "c", "3")

    facts = executor.observe({P: 2})
    decision = plan_failover(facts, P, FailoverPolicy(failed_checks=3), engine=fake)
    assert decision.actions[:2] == (Fence(P), Promote(R2))
    assert Repoint(R1, R2) in decision.actions
    assert "with the most WAL (0-2)" in decision.reason
    executor.execute(decision.actions)
    assert read_primary(executor.layout, P) == R2 and is_fenced(executor.layout, P)
    assert not fake.server(R2).in_recovery and fake.server(R1).upstream_port == PORTS[R2]

    monitor.check_now()  # p is out after this check (fall=1) ...
    monitor.check_now()  # ... so r2, the only node not in recovery, is the primary
    assert db.primary() == R2
    token = put(db, "d", "4")
    assert db.last_node == R2 and token == "0-3"

    # The old primary comes back: the next plan rejoins it, discarding what diverged.
    tidy = plan_failover(executor.observe(), R2, engine=fake)
    assert tidy.actions == (Rejoin(P, R2),)
    executor.execute(tidy.actions)
    old = fake.server(P)
    assert old.up and old.in_recovery and old.upstream_port == PORTS[R2]
    assert not is_fenced(executor.layout, P)
    assert not (executor.layout.node_dir(P) / FENCE_MARKER).exists()
    assert old.data() == {"a": "1", "b": "2", "d": "4"} and lost not in old.data().values()
    assert [s.name for s in fake.servers.values() if not s.in_recovery] == [R2]


def put_directly(fake: FakeEngine, name: str, key: str, value: str) -> str:
    """A commit on a server the router can no longer reach (e.g. just before it died)."""
    server = fake.server(name)
    server.history.append((server.received.advanced(server.domain), key, value))
    server.applied = len(server.history)
    return value


def test_a_switchover_loses_no_commit(fake: FakeEngine, executor: Executor) -> None:
    db = cluster(fake)
    put(db, "a", "1")
    fake.replicate()
    fake.server(R1).paused = True
    put(db, "b", "2")  # r1 has not replayed it when the switchover begins
    decision = plan_switchover(executor.observe(), P, R1)
    fake.server(R1).paused = False  # (replay resumes; the executor waits for it)
    executor.execute(decision.actions)
    assert read_primary(executor.layout, P) == R1
    assert fake.server(R1).data() == {"a": "1", "b": "2"} and not fake.server(R1).in_recovery
    assert fake.server(P).in_recovery and fake.server(P).up
    assert fake.server(R2).upstream_port == PORTS[R1]


def test_replicas_that_each_lack_the_others_commits_are_not_promoted(
        fake: FakeEngine, executor: Executor) -> None:
    for name, domain in ((R1, 1), (R2, 2)):
        server = fake.server(name)
        server.history.append((server.received.advanced(domain), "x", name))
    fake.server(P).up = False
    facts = executor.observe({P: 3})
    assert most_advanced(f for f in facts if f.name != P) is None
    decision = plan_failover(facts, P, engine=fake)
    assert decision.actions == ()
    assert "no replica holds everything the others hold" in decision.reason


# -- clusters and SQLAlchemy ------------------------------------------------------------------


def test_ids_are_made_by_the_keys_cluster_through_its_engine(fake: FakeEngine) -> None:
    databases = Databases({"main": cluster(fake)})
    made = databases.next_id("alice")
    assert decode_id(made).shard == databases.shard_for("alice")


def test_the_sqlalchemy_integration_reads_the_position_through_the_engine(
        fake: FakeEngine) -> None:
    conn = fake.connect(fake.dsn(P), 1.0)
    conn.execute("PUT k v")
    conn.commit()
    assert read_write_position(conn, fake) == "0-1" and conn.autocommit is False
    replica = fake.connect(fake.dsn(R1), 1.0)
    assert read_write_position(replica, fake) is None  # in recovery: no primary
    with pytest.raises(DatabaseError, match="no SQLAlchemy dialect"):
        node_engines(cluster(fake))
