from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tiers.db.embedded import Layout, RunAs
from tiers.db.failover import (
    Announce,
    Decision,
    FailoverPolicy,
    Fence,
    NodeFacts,
    Promote,
    Rejoin,
    Repoint,
    WaitForReplay,
    plan_failover,
    plan_switchover,
)
from tiers.db.promote import (
    FENCE_MARKER,
    Executor,
    FailoverStepError,
    is_fenced,
    read_primary,
    write_primary,
)
from tiers.errors import DatabaseError

P, R1, R2 = "db-primary", "db-replica1", "db-replica2"
POLICY = FailoverPolicy(failed_checks=3, check_interval=0.5)


def primary(name: str = P, position: int = 1000) -> NodeFacts:
    return NodeFacts(name, reachable=True, in_recovery=False, position=position)


def down(name: str = P, failed: int = 3, *, fenced: bool = False) -> NodeFacts:
    return NodeFacts(name, reachable=False, failed_checks=failed, fenced=fenced)


def replica(name: str, position: int | None = 900, upstream: str | None = P,
            *, fenced: bool = False) -> NodeFacts:
    return NodeFacts(name, reachable=True, in_recovery=True, position=position,
                     upstream=upstream, fenced=fenced)


def failover(*nodes: NodeFacts, believed: str = P) -> Decision:
    return plan_failover(nodes, believed, POLICY)


# -- no failover --------------------------------------------------------------


def test_a_reachable_primary_is_never_failed_over() -> None:
    decision = failover(primary(), replica(R1), replica(R2))
    assert decision.actions == ()
    assert "healthy" in decision.reason


def test_a_reachable_primary_in_recovery_is_not_failed_over_either() -> None:
    odd = NodeFacts(P, reachable=True, in_recovery=True, position=5)
    decision = failover(odd, replica(R1, 10), down(R2))
    assert decision.actions == ()
    assert "in recovery" in decision.reason


@pytest.mark.parametrize("failed", [0, 1, 2])
def test_fewer_failed_checks_than_the_policy_wait(failed: int) -> None:
    decision = failover(down(failed=failed), replica(R1), replica(R2))
    assert decision.actions == ()
    assert f"{failed} of 3" in decision.reason


def test_the_threshold_comes_from_the_policy() -> None:
    nodes = (down(failed=1), replica(R1))
    assert plan_failover(nodes, P, FailoverPolicy(failed_checks=2)).actions == ()
    assert plan_failover(nodes, P, FailoverPolicy(failed_checks=1)).actions != ()


@pytest.mark.parametrize("kwargs", [{"failed_checks": 0}, {"check_interval": 0.0}])
def test_a_policy_that_makes_no_sense_is_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        FailoverPolicy(**kwargs)  # type: ignore[arg-type]


def test_no_reachable_replica_means_nothing_and_says_why() -> None:
    decision = failover(down(), down(R1, 5), replica(R2, fenced=True))
    assert decision.actions == ()
    assert f"{R1} is unreachable" in decision.reason
    assert f"{R2} is fenced" in decision.reason


def test_no_replicas_at_all_means_nothing() -> None:
    decision = failover(down())
    assert decision.actions == ()
    assert "no replicas" in decision.reason


def test_a_replica_without_a_position_is_not_promoted() -> None:
    decision = failover(down(), replica(R1, None))
    assert decision.actions == ()
    assert "no WAL position" in decision.reason


def test_two_writable_nodes_are_left_to_a_human() -> None:
    decision = failover(down(), primary(R1), primary(R2))
    assert decision.actions == ()
    assert "by hand" in decision.reason


# -- failover -----------------------------------------------------------------


def test_failover_fences_then_promotes_then_announces_then_repoints() -> None:
    decision = failover(down(), replica(R1, 900), replica(R2, 800))
    assert decision.actions == (Fence(P), Promote(R1), Announce(R1), Repoint(R2, R1))
    assert R1 in decision.reason


def test_the_replica_with_the_most_wal_wins() -> None:
    decision = failover(down(), replica(R1, 800), replica(R2, 900), replica("db-replica3", 10))
    assert decision.actions[:3] == (Fence(P), Promote(R2), Announce(R2))
    assert set(decision.actions[3:]) == {Repoint(R1, R2), Repoint("db-replica3", R2)}


def test_equal_positions_go_to_the_first_name_whatever_the_order() -> None:
    nodes = [replica(R2, 900), replica(R1, 900)]
    assert failover(down(), *nodes).actions[1] == Promote(R1)
    assert failover(down(), *reversed(nodes)).actions[1] == Promote(R1)


def test_position_is_compared_as_a_number() -> None:
    # 0x1_00000000 is "1/0" as text, which sorts below "0/FFFFFFFF".
    decision = failover(down(), replica(R1, 0xFFFFFFFF), replica(R2, 0x1_00000000))
    assert decision.actions[1] == Promote(R2)


def test_unreachable_and_fenced_replicas_are_not_candidates() -> None:
    decision = failover(down(), down(R1, 9), replica(R2, 100),
                        replica("db-replica3", 999, fenced=True))
    assert decision.actions[:2] == (Fence(P), Promote(R2))
    # An unreachable replica still gets the new setting; a fenced one waits for a rejoin.
    assert decision.actions[3:] == (Repoint(R1, R2),)


def test_the_fence_always_comes_before_any_promotion_or_announcement() -> None:
    decision = failover(down(), replica(R1), replica(R2))
    kinds = [type(a) for a in decision.actions]
    assert kinds.index(Fence) < kinds.index(Promote) < kinds.index(Announce)


def test_a_failover_interrupted_after_promotion_is_finished_without_a_second_promotion() -> None:
    decision = failover(down(fenced=True), primary(R1, 950), replica(R2, 900))
    assert decision.actions == (Fence(P), Announce(R1), Repoint(R2, R1))
    assert not any(isinstance(a, Promote) for a in decision.actions)


def test_the_believed_primary_must_be_a_node() -> None:
    with pytest.raises(ValueError):
        failover(replica(R1), believed=P)
    with pytest.raises(ValueError):
        failover(primary(), replica(R1), replica(R1))


# -- after a failover: the old primary comes back -----------------------------


def test_a_fenced_old_primary_is_rejoined_never_promoted() -> None:
    decision = failover(down(P, 40, fenced=True), primary(R1), replica(R2, upstream=R1),
                        believed=R1)
    assert decision.actions == (Rejoin(P, R1),)


def test_an_old_primary_that_came_back_writable_is_fenced_then_rejoined() -> None:
    decision = failover(primary(P), primary(R1), replica(R2, upstream=R1), believed=R1)
    assert decision.actions == (Fence(P), Rejoin(P, R1))
    assert not any(isinstance(a, Promote) for a in decision.actions)


def test_a_fenced_node_that_runs_anyway_is_stopped_before_its_rejoin() -> None:
    decision = failover(replica(P, fenced=True), primary(R1), believed=R1)
    assert decision.actions == (Fence(P), Rejoin(P, R1))


def test_a_replica_streaming_from_the_old_primary_is_repointed() -> None:
    decision = failover(down(P, 40, fenced=True), primary(R1), replica(R2, upstream=P),
                        believed=R1)
    assert decision.actions == (Rejoin(P, R1), Repoint(R2, R1))


def test_a_replica_streaming_from_no_known_node_is_repointed() -> None:
    assert failover(primary(), replica(R1, upstream="")).actions == (Repoint(R1, P),)


def test_a_replica_with_an_unknown_upstream_is_left_alone() -> None:
    assert failover(primary(), replica(R1, upstream=None)).actions == ()


# -- switchover ---------------------------------------------------------------


def test_switchover_steps_in_order() -> None:
    decision = plan_switchover([primary(), replica(R1), replica(R2), down("db-replica3")],
                               P, R1)
    assert decision.actions == (
        Fence(P, clean=True),
        WaitForReplay(R1, P),
        Promote(R1),
        Announce(R1),
        Rejoin(P, R1),
        Repoint(R2, R1),
        Repoint("db-replica3", R1),
    )


def test_switchover_stops_writes_and_waits_before_any_promotion() -> None:
    actions = plan_switchover([primary(), replica(R1)], P, R1).actions
    kinds = [type(a) for a in actions]
    assert kinds.index(Fence) < kinds.index(WaitForReplay) < kinds.index(Promote)
    assert kinds.index(Promote) < kinds.index(Announce) < kinds.index(Rejoin)
    fence = actions[0]
    assert isinstance(fence, Fence) and fence.clean


@pytest.mark.parametrize(
    ("nodes", "target", "reason"),
    [
        ([primary(), replica(R1)], P, "already the primary"),
        ([primary(), replica(R1)], "nope", "not a database node"),
        ([down(), replica(R1)], R1, "a failover does not"),
        ([primary(), down(R1)], R1, "not a reachable replica"),
        ([primary(), primary(R1)], R1, "not a reachable replica"),
        ([primary(), replica(R1, fenced=True)], R1, "fenced"),
    ],
)
def test_switchover_refusals_say_why(nodes: list[NodeFacts], target: str, reason: str) -> None:
    decision = plan_switchover(nodes, P, target)
    assert decision.actions == ()
    assert reason in decision.reason


def test_actions_are_frozen_values() -> None:
    action = Promote(R1)
    with pytest.raises(AttributeError):
        action.node = R2  # type: ignore[misc]
    assert Promote(R1) == action and hash(Promote(R1)) == hash(action)


# -- the executor's bookkeeping, without servers ------------------------------


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    for name in (P, R1):
        (tmp_path / name).mkdir()
    return Layout(root=tmp_path, bin_dir=tmp_path / "bin")


@pytest.fixture
def executor(layout: Layout) -> Iterator[Executor]:
    with socket.socket() as sock:  # bound but not listening: connects are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        yield Executor(layout, RunAs(), {P: port, R1: port}, timeout=1.0)


def test_the_primary_record_round_trips(layout: Layout) -> None:
    assert read_primary(layout, P) == P
    write_primary(layout, R1)
    assert read_primary(layout, P) == R1


def test_a_node_is_fenced_by_its_marker_or_by_a_rejoin_in_progress(layout: Layout) -> None:
    assert not is_fenced(layout, P)
    (layout.node_dir(P) / FENCE_MARKER).touch()
    assert is_fenced(layout, P)
    (layout.node_dir(P) / FENCE_MARKER).unlink()
    (layout.root / f"{P}.rejoining").touch()  # pg_rewind may have removed the marker
    assert is_fenced(layout, P)


def test_an_unreachable_node_counts_one_more_failed_check(executor: Executor) -> None:
    facts = executor.observe({P: 2})
    assert [(f.name, f.reachable, f.failed_checks) for f in facts] == [(P, False, 3),
                                                                       (R1, False, 1)]


def test_a_fenced_node_is_never_promoted(executor: Executor, layout: Layout) -> None:
    (layout.node_dir(R1) / FENCE_MARKER).touch()
    with pytest.raises(FailoverStepError) as caught:
        executor.promote(R1)
    assert (caught.value.step, caught.value.node) == ("promote", R1)
    assert "fenced" in str(caught.value)
    assert isinstance(caught.value, DatabaseError)


def test_a_failed_step_ends_the_plan_and_names_the_step(
        executor: Executor, monkeypatch: pytest.MonkeyPatch) -> None:
    promoted: list[str] = []
    monkeypatch.setattr(executor, "promote", promoted.append)
    with pytest.raises(FailoverStepError) as caught:
        executor.execute([Fence("db-unknown"), Promote(R1)])
    assert str(caught.value).startswith("fence db-unknown: ")
    assert isinstance(caught.value.__cause__, DatabaseError)
    assert promoted == []


def test_a_node_cannot_rejoin_under_itself(executor: Executor) -> None:
    with pytest.raises(FailoverStepError, match=r"rejoin db-primary: .*itself"):
        executor.rejoin(P, P)
