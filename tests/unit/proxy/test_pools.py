"""A pool's decisions as plain values: tiers, slow start, passive health, slots and queue.

Time is a number the tests pass in; tickets are plain strings.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from tiers.config.model import Address
from tiers.config.proxy import Balance, Pool, Server
from tiers.proxy.balancer import BUSY, Change, Outcome, outcome_for_status
from tiers.proxy.poolstate import PoolState


def _pool(
    *weights: int,
    backups: int = 0,
    balance: Balance = Balance.ROUND_ROBIN,
    slow_start: float = 0.0,
    max_conns: int = 0,
    queue: int = 128,
    queue_timeout: float = 5.0,
    passive_fall: int = 3,
) -> PoolState[str]:
    servers = [Server(Address("10.0.0.1", 8000 + i), weight=w) for i, w in enumerate(weights)]
    servers += [
        Server(Address("10.0.1.1", 9000 + i), weight=1, backup=True) for i in range(backups)
    ]
    pool = Pool(
        "app",
        tuple(servers),
        balance,
        slow_start=slow_start,
        max_conns=max_conns,
        queue=queue,
        queue_timeout=queue_timeout,
        passive_fall=passive_fall,
    )
    return PoolState(pool, fall=2, rise=2)


def _slot(state: PoolState[str], key: bytes = b"") -> int:
    index = state.acquire(key, (), 0.0)
    assert isinstance(index, int), index
    return index


def _take_down(state: PoolState[str], index: int, now: float = 0.0) -> None:
    assert state.check(index, False, now) is None
    assert state.check(index, False, now) is Change.DOWN


def _bring_back(state: PoolState[str], index: int, now: float) -> None:
    assert state.check(index, True, now) is None
    assert state.check(index, True, now) is Change.UP


def _picks(state: PoolState[str], count: int, now: float = 0.0) -> list[int | None]:
    return [state.choose(b"", (), now) for _ in range(count)]


def test_pool_needs_a_server() -> None:
    with pytest.raises(ValueError, match="pool empty"):
        PoolState(Pool("empty", ()), fall=2, rise=2)


# ---- backups -----------------------------------------------------------------------------


def test_backups_serve_only_while_every_primary_is_down() -> None:
    state = _pool(1, 1, backups=2)
    assert set(_picks(state, 20)) == {0, 1}
    _take_down(state, 0)
    assert set(_picks(state, 20)) == {1}
    _take_down(state, 1)
    assert set(_picks(state, 20)) == {2, 3}
    _take_down(state, 2)
    assert set(_picks(state, 5)) == {3}
    _bring_back(state, 1, 1.0)
    assert set(_picks(state, 10)) == {1}
    assert [s.state for s in state.snapshot(1.0).servers] == ["down", "up", "down", "backup"]


def test_excluded_primaries_do_not_open_the_backup_tier() -> None:
    state = _pool(1, 1, backups=1)
    assert state.choose(b"", {0, 1}, 0.0) is None
    assert state.acquire(b"", {0, 1}, 0.0) is None


def test_a_pool_of_backups_only_uses_them() -> None:
    state = _pool(backups=2)
    assert set(_picks(state, 4)) == {0, 1}


def test_nothing_up_means_none_whatever_the_limit() -> None:
    state = _pool(1, 1, max_conns=1)
    _take_down(state, 0)
    _take_down(state, 1)
    assert state.acquire(b"", (), 0.0) is None
    assert state.choose(b"", (), 0.0) is None


# ---- slow start --------------------------------------------------------------------------


def test_slow_start_ramps_the_weight_linearly_after_a_return() -> None:
    state = _pool(4, 4, slow_start=10.0)
    # Servers up from the start are not ramped.
    assert state.weight_at(0, 0.0) == 4
    _take_down(state, 0, 0.0)
    _bring_back(state, 0, 100.0)
    weights = [state.weight_at(0, 100.0 + t) for t in (0.0, 2.5, 5.0, 7.5, 10.0, 20.0)]
    assert weights[0] == pytest.approx(4 * 0.05)
    assert weights == sorted(weights)
    steps = [b - a for a, b in itertools.pairwise(weights[:5])]
    assert steps == pytest.approx([steps[0]] * 4)  # linear
    assert weights[4:] == [4, 4]
    assert state.weight_at(1, 105.0) == 4
    snapshot = state.snapshot(105.0)
    assert snapshot.servers[0].state == "slow_start"
    assert snapshot.servers[0].effective_weight == pytest.approx(weights[2])
    assert state.snapshot(110.0).servers[0].state == "up"


def test_a_ramping_server_gets_a_growing_share_of_round_robin() -> None:
    state = _pool(1, 1, slow_start=10.0)
    _take_down(state, 0)
    _bring_back(state, 0, 0.0)
    early = Counter(_picks(state, 200, now=0.0))
    middle = Counter(_picks(state, 200, now=5.0))
    late = Counter(_picks(state, 200, now=10.0))
    assert early[0] <= 12  # 0.05 / 1.05 of 200 is about 10
    assert 60 <= middle[0] <= 75  # 0.525 / 1.525 of 200 is about 69
    assert late[0] == 100


def test_a_ramping_server_wins_back_its_hash_keys_progressively() -> None:
    state = _pool(1, 1, 1, 1, balance=Balance.URI_HASH, slow_start=10.0)
    keys = [f"/k/{n}".encode() for n in range(4000)]
    home = {key for key in keys if state.choose(key, (), 0.0) == 2}
    _take_down(state, 2)
    assert all(state.choose(key, (), 1.0) != 2 for key in keys)
    _bring_back(state, 2, 100.0)
    held = []
    for t in (0.0, 5.0, 10.0):
        held.append({key for key in keys if state.choose(key, (), 100.0 + t) == 2})
    assert held[0] <= held[1] <= held[2] == home
    assert len(held[0]) < 0.15 * len(home)
    assert 0.4 * len(home) <= len(held[1]) <= 0.65 * len(home)


def test_no_ramp_without_slow_start() -> None:
    state = _pool(3, 1)
    _take_down(state, 0)
    _bring_back(state, 0, 50.0)
    assert state.weight_at(0, 50.0) == 3
    assert state.snapshot(50.0).servers[0].state == "up"


# ---- passive health ----------------------------------------------------------------------


def test_passive_fall_consecutive_failures_take_a_server_out_at_once() -> None:
    state = _pool(1, 1, passive_fall=3)
    assert state.report(0, Outcome.SERVER_ERROR, 0.0) is None
    assert state.connect_failed(0, 0.0) is None
    assert state.report(0, Outcome.TIMEOUT, 0.0) is Change.DOWN
    assert set(_picks(state, 6)) == {1}
    stats = state.snapshot(0.0).servers[0]
    assert (stats.state, stats.server_errors, stats.connect_errors, stats.timeouts) == (
        "down",
        1,
        1,
        1,
    )
    assert stats.downs == 1
    # Failures while down change nothing more.
    assert state.report(0, Outcome.BROKEN, 0.0) is None


def test_a_success_ends_the_streak_and_neutral_outcomes_do_not_count() -> None:
    state = _pool(1, passive_fall=2)
    for outcome in (Outcome.SERVER_ERROR, Outcome.OK, Outcome.BROKEN, Outcome.NEUTRAL):
        assert state.report(0, outcome, 0.0) is None
    assert state.report(0, Outcome.SERVER_ERROR, 0.0) is Change.DOWN


def test_only_active_checks_bring_a_passively_failed_server_back() -> None:
    state = _pool(1, 1, passive_fall=1)
    assert state.report(0, Outcome.SERVER_ERROR, 0.0) is Change.DOWN
    assert state.report(0, Outcome.OK, 0.5) is None
    assert not state.servers[0].up
    assert state.check(0, True, 1.0) is None
    assert state.check(0, True, 2.0) is Change.UP
    assert state.snapshot(2.0).servers[0].last_check_ok is True


def test_passive_fall_zero_turns_passive_health_off() -> None:
    state = _pool(1, passive_fall=0)
    for _ in range(10):
        assert state.report(0, Outcome.SERVER_ERROR, 0.0) is None
    assert state.servers[0].up


def test_outcome_of_a_status() -> None:
    assert outcome_for_status(200) is Outcome.OK
    assert outcome_for_status(404) is Outcome.OK
    assert outcome_for_status(500) is Outcome.SERVER_ERROR
    assert outcome_for_status(503) is Outcome.SERVER_ERROR


# ---- slots and the queue -----------------------------------------------------------------


def test_in_flight_requests_are_counted_and_limited() -> None:
    state = _pool(1, 1, max_conns=2)
    assert sorted(_slot(state) for _ in range(4)) == [0, 0, 1, 1]
    assert [s.active for s in state.servers] == [2, 2]
    assert state.acquire(b"", (), 0.0) is BUSY
    # Excluding the full servers leaves nothing to wait for.
    assert state.acquire(b"", {0, 1}, 0.0) is None
    state.finish(1, Outcome.OK, 0.0)
    assert state.acquire(b"", (), 0.0) == 1
    snapshot = state.snapshot(0.0)
    assert [s.active for s in snapshot.servers] == [2, 2]
    assert [s.requests for s in snapshot.servers] == [2, 3]


def test_unlimited_pools_never_queue() -> None:
    state = _pool(1, max_conns=0)
    assert [state.acquire(b"", (), 0.0) for _ in range(100)] == [0] * 100
    assert state.servers[0].active == 100


def test_queue_is_fifo_bounded_and_a_freed_slot_goes_to_its_head() -> None:
    state = _pool(1, max_conns=1, queue=2, queue_timeout=5.0)
    assert state.acquire(b"", (), 0.0) == 0
    assert state.acquire(b"", (), 0.0) is BUSY
    assert state.enqueue("first", b"", (), 0.0)
    assert state.enqueue("second", b"", (), 0.1)
    assert not state.enqueue("third", b"", (), 0.2)
    assert state.queued == 2
    assert state.dispatch(1.0) == []  # nothing freed yet
    state.finish(0, Outcome.OK, 1.0)
    assert state.dispatch(1.0) == [("first", 0)]
    assert state.servers[0].active == 1
    state.finish(0, Outcome.OK, 2.0)
    assert state.dispatch(2.0) == [("second", 0)]
    snapshot = state.snapshot(2.0)
    assert (snapshot.queued, snapshot.queue_full, snapshot.queue_timeouts) == (0, 1, 0)


def test_a_waiter_past_its_deadline_fails_instead_of_getting_the_slot() -> None:
    state = _pool(1, max_conns=1, queue=4, queue_timeout=2.0)
    state.acquire(b"", (), 0.0)
    state.enqueue("early", b"", (), 0.0)
    state.enqueue("late", b"", (), 1.5)
    assert state.dispatch(1.9) == []
    assert state.dispatch(2.0) == [("early", None)]
    state.finish(0, Outcome.OK, 2.5)
    assert state.dispatch(2.5) == [("late", 0)]
    assert state.snapshot(2.5).queue_timeouts == 1


def test_withdrawn_waiters_leave_the_queue() -> None:
    state = _pool(1, max_conns=1, queue=4)
    state.acquire(b"", (), 0.0)
    for ticket in ("a", "b", "c"):
        state.enqueue(ticket, b"", (), 0.0)
    assert state.withdraw("b", timed_out=True)
    assert not state.withdraw("b")
    assert state.withdraw("a")
    state.finish(0, Outcome.OK, 1.0)
    assert state.dispatch(1.0) == [("c", 0)]
    assert state.snapshot(1.0).queue_timeouts == 1


def test_a_waiter_that_cannot_use_the_freed_slot_keeps_its_place() -> None:
    state = _pool(1, 1, max_conns=1, queue=4)
    assert {state.acquire(b"", (), 0.0), state.acquire(b"", (), 0.0)} == {0, 1}
    state.enqueue("tried-0", b"", {0}, 0.0)  # a retry: server 0 failed it
    state.enqueue("any", b"", (), 0.0)
    state.enqueue("any-2", b"", (), 0.0)
    state.finish(0, Outcome.OK, 1.0)
    assert state.dispatch(1.0) == [("any", 0)]
    state.finish(1, Outcome.OK, 1.0)
    assert state.dispatch(1.0) == [("tried-0", 1)]
    state.finish(1, Outcome.OK, 1.0)
    assert state.dispatch(1.0) == [("any-2", 1)]


def test_a_server_coming_back_serves_the_queue() -> None:
    state = _pool(1, 1, max_conns=1, queue=4)
    _take_down(state, 1)
    assert state.acquire(b"", (), 0.0) == 0
    state.enqueue("w", b"", (), 0.0)
    _bring_back(state, 1, 1.0)
    assert state.dispatch(1.0) == [("w", 1)]


def test_hash_spills_to_the_next_server_when_its_own_is_full() -> None:
    state = _pool(1, 1, 1, balance=Balance.URI_HASH, max_conns=1)
    home = _slot(state, b"/page")
    spill = _slot(state, b"/page")
    assert spill != home
    _slot(state, b"/page")
    assert state.acquire(b"/page", (), 0.0) is BUSY
    state.finish(home, Outcome.OK, 0.0)
    assert state.acquire(b"/page", (), 0.0) == home


def test_least_conn_sees_the_slots_taken() -> None:
    state = _pool(1, 1, 1, balance=Balance.LEAST_CONN)
    assert sorted(_slot(state) for _ in range(3)) == [0, 1, 2]
    state.finish(1, Outcome.OK, 0.0)
    assert state.acquire(b"", (), 0.0) == 1
    state.finish(2, Outcome.OK, 0.0)
    state.finish(2, Outcome.NEUTRAL, 0.0)  # one release too many is harmless
    assert state.servers[2].active == 0
    assert [state.acquire(b"", (), 0.0) for _ in range(2)] == [2, 2]


def test_clear_queue_returns_every_waiter() -> None:
    state = _pool(1, max_conns=1)
    state.acquire(b"", (), 0.0)
    state.enqueue("a", b"", (), 0.0)
    state.enqueue("b", b"", (), 0.0)
    assert state.clear_queue() == ["a", "b"]
    assert state.queued == 0


# ---- stats -------------------------------------------------------------------------------


def test_snapshot_is_plain_data_on_the_wall_clock_when_asked() -> None:
    state = _pool(2, backups=1, max_conns=3, queue=7)
    assert state.acquire(b"", (), 10.0) == 0
    state.check(0, False, 11.0, "health check answered 503")
    state.finish(0, Outcome.SERVER_ERROR, 12.0)
    snapshot = state.snapshot(12.0, wall=1_000_012.0)
    assert (snapshot.name, snapshot.balance, snapshot.queue_limit) == ("app", "round_robin", 7)
    primary, backup = snapshot.servers
    assert primary.address == "10.0.0.1:8000"
    assert (primary.state, primary.weight, primary.effective_weight) == ("up", 2, 2)
    assert (primary.active, primary.requests, primary.server_errors) == (0, 1, 1)
    assert primary.last_check_ok is False
    assert primary.last_check_at == 1_000_011.0
    assert primary.last_check_error == "health check answered 503"
    assert (backup.state, backup.backup, backup.last_check_at) == ("backup", True, None)
