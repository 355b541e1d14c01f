from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterable, Iterator

import pytest

from tests.e2e.stackctl import free_ports
from tiers.db.health import (
    Check,
    ClusterHealth,
    HealthPolicy,
    NodeHealth,
    NodeObservation,
    Role,
    Standing,
    next_standing,
    probe,
    update,
)

POLICY = HealthPolicy(max_lag_bytes=1024, max_lag_seconds=1.0, fall=3, rise=2)
TOP = 1_000_000


def primary(name: str = "p", position: int = TOP) -> NodeObservation:
    return NodeObservation(name, f"{name}:5432/app", reachable=True, in_recovery=False,
                           position=position)


def replica(name: str = "r1", behind: int = 0, lag: float | None = 0.0) -> NodeObservation:
    return NodeObservation(name, f"{name}:5432/app", reachable=True, in_recovery=True,
                           position=TOP - behind, replay_lag_seconds=lag)


def dead(name: str) -> NodeObservation:
    return NodeObservation(name, f"{name}:5432/app", reachable=False,
                           error="connection refused")


def run(*rounds: Iterable[NodeObservation], state: ClusterHealth | None = None,
        policy: HealthPolicy = POLICY) -> ClusterHealth:
    current = state if state is not None else ClusterHealth()
    for observations in rounds:
        current = update(current, observations, policy)
    return current


def steady(state: ClusterHealth | None = None) -> ClusterHealth:
    """Primary p, replicas r1 and r2, all healthy and in the pool."""
    return run([primary(), replica("r1"), replica("r2")], state=state)


# -- first round and roles --------------------------------------------------------------


def test_first_round_sorts_roles_and_fills_the_read_pool() -> None:
    state = steady()
    assert state.primary == "p"
    assert state.read_pool == ("r1", "r2")
    assert state.rounds == 1
    p = state.node("p")
    assert (p.role, p.in_read_pool, p.standing, p.reason) == (
        Role.PRIMARY, False, Standing.IN, None)
    r1 = state.node("r1")
    assert (r1.role, r1.check, r1.ok_streak, r1.bad_streak) == (Role.REPLICA, Check.GOOD, 1, 0)
    assert r1.last is not None and r1.last.lag_bytes == 0


def test_initial_state_has_no_read_pool_until_checked() -> None:
    state = ClusterHealth.initial(["p", "r1"], primary="p")
    assert state.read_pool == ()
    assert state.primary == "p"
    assert all(n.standing is Standing.NEW and n.reason == "not checked yet"
               for n in state.nodes)
    with pytest.raises(KeyError):
        state.node("nope")


def test_a_bad_first_observation_keeps_a_node_out_at_once() -> None:
    state = run([primary(), dead("r1")])
    r1 = state.node("r1")
    assert (r1.standing, r1.in_read_pool, r1.reason, r1.role) == (
        Standing.OUT, False, "unreachable", Role.UNKNOWN)


def test_lag_bytes_is_filled_in_against_the_primary_of_the_same_round() -> None:
    state = run([primary(), replica("r1", behind=700)])
    observed = state.node("r1").last
    assert observed is not None and observed.lag_bytes == 700
    # A replica probed a moment after the primary may be ahead of it: no negative lag.
    state = run([primary(position=TOP - 10), replica("r1")])
    observed = state.node("r1").last
    assert observed is not None and observed.lag_bytes == 0


def test_no_lag_bytes_while_the_primary_is_unreachable() -> None:
    state = run([dead("p"), replica("r1", behind=10 * 1024)], state=steady())
    r1 = state.node("r1")
    assert r1.last is not None and r1.last.lag_bytes is None
    assert r1.check is Check.GOOD and r1.in_read_pool
    assert state.primary == "p" and state.node("p").role is Role.PRIMARY
    assert state.node("p").reason == "unreachable"


# -- fall and rise ------------------------------------------------------------------------


def test_a_dead_replica_leaves_after_fall_checks_and_stays_a_replica() -> None:
    state = steady()
    for bad in (1, 2):
        state = run([primary(), dead("r1"), replica("r2")], state=state)
        r1 = state.node("r1")
        assert r1.in_read_pool, f"left after {bad} bad checks"
        assert (r1.check, r1.bad_streak) == (Check.UNREACHABLE, bad)
    state = run([primary(), dead("r1"), replica("r2")], state=state)
    r1 = state.node("r1")
    assert (r1.in_read_pool, r1.standing, r1.reason, r1.role) == (
        False, Standing.OUT, "unreachable", Role.REPLICA)
    assert state.read_pool == ("r2",)


def test_an_out_replica_comes_back_after_rise_good_checks() -> None:
    state = run(*[[primary(), dead("r1")]] * 3, state=steady())
    state = run([primary(), replica("r1")], state=state)
    r1 = state.node("r1")
    assert not r1.in_read_pool
    assert r1.reason == "rising: 1 of 2 good checks"
    state = run([primary(), replica("r1")], state=state)
    r1 = state.node("r1")
    assert r1.in_read_pool and r1.standing is Standing.IN and r1.reason is None


def test_alternating_checks_neither_take_out_nor_bring_back() -> None:
    state = steady()
    for _ in range(5):
        state = run([primary(), dead("r1")], [primary(), replica("r1")], state=state)
        assert state.node("r1").in_read_pool
    state = run(*[[primary(), dead("r1")]] * 3, state=state)
    for _ in range(5):
        state = run([primary(), replica("r1")], [primary(), dead("r1")], state=state)
        assert not state.node("r1").in_read_pool


# -- lag ------------------------------------------------------------------------------------


def test_lag_in_bytes_takes_a_replica_out() -> None:
    state = run(*[[primary(), replica("r1", behind=5000)]] * 3, state=steady())
    r1 = state.node("r1")
    assert (r1.check, r1.in_read_pool, r1.reason) == (
        Check.LAGGING, False, "lag 5000 bytes > 1024")


def test_lag_in_seconds_takes_a_replica_out() -> None:
    state = run(*[[primary(), replica("r1", lag=3.24)]] * 3, state=steady())
    r1 = state.node("r1")
    assert (r1.check, r1.in_read_pool, r1.reason) == (
        Check.LAGGING, False, "lag 3.2 s > 1.0 s")


def test_lag_at_the_limit_is_still_good() -> None:
    state = run([primary(), replica("r1", behind=1024, lag=1.0)])
    assert state.node("r1").check is Check.GOOD


def test_a_limit_of_none_is_not_checked() -> None:
    lenient = HealthPolicy(max_lag_bytes=None, max_lag_seconds=None, fall=1, rise=1)
    state = run([primary(), replica("r1", behind=10**9, lag=10**6)], policy=lenient)
    assert state.read_pool == ("r1",)


def test_a_replica_without_replay_position_is_not_used() -> None:
    blank = dataclasses.replace(replica("r1"), position=None)
    state = run([primary(), blank])
    assert state.node("r1").reason == "no replay position yet"
    assert state.read_pool == ()


def test_a_replica_back_from_lag_needs_rise_checks() -> None:
    state = run(*[[primary(), replica("r1", behind=5000)]] * 3, state=steady())
    state = run([primary(), replica("r1")], state=state)
    assert not state.node("r1").in_read_pool
    state = run([primary(), replica("r1")], state=state)
    assert state.node("r1").in_read_pool


# -- primaries --------------------------------------------------------------------------------


def test_a_second_primary_is_flagged_and_leaves_at_once() -> None:
    state = run([primary(), primary("r1"), replica("r2")], state=steady())
    r1 = state.node("r1")
    assert (r1.check, r1.role, r1.in_read_pool, r1.standing) == (
        Check.SECOND_PRIMARY, Role.UNKNOWN, False, Standing.OUT)
    assert r1.reason == "not in recovery: a second primary?"
    assert state.primary == "p"
    assert state.second_primaries == ("r1",)
    assert state.read_pool == ("r2",)


def test_two_claimants_and_no_known_primary_are_both_flagged() -> None:
    state = run([primary("a"), primary("b"), replica("r1")])
    assert state.primary is None
    assert state.second_primaries == ("a", "b")
    assert state.read_pool == ("r1",)


def test_the_expected_primary_settles_a_double_claim() -> None:
    state = run([primary("a"), primary("b")], state=ClusterHealth.initial(["a", "b"], "b"))
    assert state.primary == "b"
    assert state.second_primaries == ("a",)


def test_a_promoted_replica_is_believed_only_after_the_old_primary_is_out() -> None:
    state = steady()
    # The old primary misses checks while r1 claims the role: not believed yet.
    for _ in range(POLICY.fall - 1):
        state = run([dead("p"), primary("r1"), replica("r2")], state=state)
        assert state.primary == "p"
        assert state.second_primaries == ("r1",)
    state = run([dead("p"), primary("r1"), replica("r2")], state=state)
    assert state.node("p").standing is Standing.OUT
    state = run([dead("p"), primary("r1"), replica("r2")], state=state)
    assert state.primary == "r1"
    assert state.node("r1").role is Role.PRIMARY and state.second_primaries == ()
    assert state.node("p").role is Role.UNKNOWN
    # The old primary coming back writable is now the second primary.
    state = run([primary("p"), primary("r1"), replica("r2")], state=state)
    assert state.primary == "r1"
    assert state.second_primaries == ("p",)
    assert state.read_pool == ("r2",)


def test_a_demoted_primary_hands_over_at_once_and_serves_reads() -> None:
    state = run([replica("p"), primary("r1"), replica("r2")], state=steady())
    assert state.primary == "r1"
    assert state.node("p").role is Role.REPLICA
    assert state.read_pool == ("p", "r2")


def test_a_demoted_primary_without_successor_leaves_no_primary() -> None:
    state = run([replica("p"), replica("r1")], state=steady())
    assert state.primary is None
    assert state.node("p").role is Role.REPLICA


def test_all_replicas_out_leaves_an_empty_read_pool() -> None:
    bad = [primary(), dead("r1"), replica("r2", behind=10**6)]
    state = run(*[bad] * 3, state=steady())
    assert state.read_pool == ()
    assert state.node("p").in_read_pool is False


def test_a_node_missing_from_a_round_keeps_its_health() -> None:
    before = steady()
    after = run([primary(), replica("r2")], state=before)
    assert after.node("r1") == before.node("r1")
    assert after.rounds == before.rounds + 1


# -- the transition table and the log lines -------------------------------------------------


@pytest.mark.parametrize(
    ("standing", "check", "streak", "expected"),
    [
        (Standing.NEW, Check.GOOD, 1, Standing.IN),
        (Standing.NEW, Check.UNREACHABLE, 1, Standing.OUT),
        (Standing.IN, Check.GOOD, 9, Standing.IN),
        (Standing.IN, Check.LAGGING, 2, Standing.IN),
        (Standing.IN, Check.LAGGING, 3, Standing.OUT),
        (Standing.OUT, Check.GOOD, 1, Standing.OUT),
        (Standing.OUT, Check.GOOD, 2, Standing.IN),
        (Standing.OUT, Check.UNREACHABLE, 9, Standing.OUT),
        (Standing.IN, Check.SECOND_PRIMARY, 1, Standing.OUT),
        (Standing.NEW, Check.SECOND_PRIMARY, 1, Standing.OUT),
    ],
)
def test_next_standing(standing: Standing, check: Check, streak: int,
                       expected: Standing) -> None:
    assert next_standing(standing, check, streak, POLICY) is expected


def test_next_standing_refuses_no_check() -> None:
    with pytest.raises(ValueError):
        next_standing(Standing.IN, Check.NONE, 1, POLICY)


def test_policy_validation_and_defaults() -> None:
    with pytest.raises(ValueError):
        HealthPolicy(fall=0)
    with pytest.raises(ValueError):
        HealthPolicy(rise=0)
    default = HealthPolicy()
    # At the monitor's default interval of 0.25 s: out within about a second, back after 2.
    assert default.fall * 0.25 <= 1.0
    assert default.rise == 2


def test_health_values_are_immutable() -> None:
    state = steady()
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.primary = "r1"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.nodes[0].in_read_pool = True  # type: ignore[misc]
    assert isinstance(state.nodes, tuple) and isinstance(state.nodes[0], NodeHealth)


# -- the probe, against nodes that are not PostgreSQL ----------------------------------------


def test_probe_of_a_refusing_port_reports_unreachable() -> None:
    (port,) = free_ports(1)
    observed = probe(f"postgresql://tiers@127.0.0.1:{port}/postgres", 2.0)
    assert observed.reachable is False
    assert observed.name == observed.target == f"127.0.0.1:{port}/postgres"
    assert observed.error is not None and "refused" in observed.error.lower()
    assert observed.in_recovery is None and observed.position is None


def test_probe_of_a_bad_dsn_reports_unreachable() -> None:
    observed = probe("nonsense=1", 1.0, name="db-replica1")
    assert observed.reachable is False and observed.name == "db-replica1"
    assert observed.error is not None and "nonsense" in observed.error


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections (in the kernel's backlog) and never answers."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def test_probe_of_a_silent_server_gives_up_at_its_deadline(silent_port: int) -> None:
    observed = probe(f"postgresql://tiers@127.0.0.1:{silent_port}/postgres", 0.2, name="x")
    assert observed.reachable is False
    assert observed.error == "cannot connect: timed out after 0.2 s"
