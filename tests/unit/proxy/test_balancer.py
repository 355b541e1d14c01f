"""Health transitions, round-robin choice and the idle pool, as plain values."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from tiers.proxy.balancer import Health, IdlePool, RoundRobin, mark_unreachable, observe_check


def _run(health: Health, results: str, fall: int = 2, rise: int = 2) -> list[bool]:
    """Apply checks written as a string of '+' (pass) and '-' (fail); return ``up`` after each."""
    states = []
    for result in results:
        health = observe_check(health, result == "+", fall=fall, rise=rise)
        states.append(health.up)
    return states


def test_up_backend_goes_down_after_fall_consecutive_failures() -> None:
    assert _run(Health(), "--") == [True, False]
    assert _run(Health(), "-+-+-+") == [True] * 6
    assert _run(Health(), "---", fall=3) == [True, True, False]


def test_down_backend_comes_back_after_rise_consecutive_successes() -> None:
    down = Health(up=False)
    assert _run(down, "++") == [False, True]
    assert _run(down, "+-+-+") == [False] * 5
    assert _run(down, "+++", rise=3) == [False, False, True]


def test_streaks_restart_after_each_transition() -> None:
    assert _run(Health(), "--++--++") == [True, False, False, True, True, False, False, True]


def test_fall_and_rise_of_one() -> None:
    assert _run(Health(), "-+-", fall=1, rise=1) == [False, True, False]


def test_unreachable_goes_down_at_once_and_needs_rise_checks() -> None:
    health = mark_unreachable(Health())
    assert not health.up
    assert _run(health, "++") == [False, True]


def test_round_robin_alternates() -> None:
    rr = RoundRobin()
    assert [rr.pick([True, True, True]) for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_round_robin_skips_down_and_excluded() -> None:
    rr = RoundRobin()
    assert [rr.pick([True, False, True]) for _ in range(4)] == [0, 2, 0, 2]
    assert rr.pick([True, True, True], exclude={0, 1}) == 2
    assert rr.pick([True, True, True], exclude={0, 1, 2}) is None
    assert rr.pick([False, False]) is None
    assert rr.pick([]) is None


def test_round_robin_spreads_evenly_when_one_backend_returns() -> None:
    rr = RoundRobin()
    picks = [rr.pick([True, False]) for _ in range(3)]
    picks += [rr.pick([True, True]) for _ in range(4)]
    assert picks == [0, 0, 0, 1, 0, 1, 0]


@dataclass
class FakeConn:
    name: str
    idle_since: float
    usable: bool = True


def test_pool_reuses_newest_first() -> None:
    pool: IdlePool[FakeConn] = IdlePool(max_idle=4, max_idle_time=2.0)
    a, b = FakeConn("a", 0.0), FakeConn("b", 0.5)
    assert pool.put(a) == [] and pool.put(b) == []
    assert pool.take(1.0) == (b, [])
    assert pool.take(1.0) == (a, [])
    assert pool.take(1.0) == (None, [])


def test_pool_discards_closed_and_expired() -> None:
    pool: IdlePool[FakeConn] = IdlePool(max_idle=4, max_idle_time=2.0)
    old, closed = FakeConn("old", 0.0), FakeConn("closed", 9.0)
    closed.usable = False
    pool.put(old)
    pool.put(closed)
    assert pool.take(10.0) == (None, [closed, old])
    assert len(pool) == 0


def test_pool_take_skips_unusable_newest() -> None:
    pool: IdlePool[FakeConn] = IdlePool(max_idle=4, max_idle_time=2.0)
    good, expired, closed = FakeConn("good", 9.0), FakeConn("expired", 1.0), FakeConn("closed", 9.5)
    closed.usable = False
    for idle in (good, expired, closed):
        pool.put(idle)
    conn, discard = pool.take(10.0)
    assert conn is good
    assert discard == [closed, expired]
    assert len(pool) == 0


def test_pool_caps_idle_connections_dropping_the_oldest() -> None:
    pool: IdlePool[FakeConn] = IdlePool(max_idle=2, max_idle_time=10.0)
    conns = [FakeConn(str(i), float(i)) for i in range(4)]
    assert pool.put(conns[0]) == []
    assert pool.put(conns[1]) == []
    assert pool.put(conns[2]) == [conns[0]]
    assert pool.put(conns[3]) == [conns[1]]
    assert len(pool) == 2


def test_pool_sweep_and_drain() -> None:
    pool: IdlePool[FakeConn] = IdlePool(max_idle=8, max_idle_time=2.0)
    keep, expire, closed = FakeConn("k", 9.0), FakeConn("e", 1.0), FakeConn("c", 9.0)
    closed.usable = False
    for conn in (keep, expire, closed):
        pool.put(conn)
    assert pool.sweep(10.0) == [expire, closed]
    assert len(pool) == 1
    assert pool.drain() == [keep]
    assert len(pool) == 0


@pytest.mark.parametrize(("fall", "rise"), [(2, 2), (3, 5)])
def test_health_never_flaps_on_alternating_results(fall: int, rise: int) -> None:
    assert set(_run(Health(), "+-" * 10, fall=fall, rise=rise)) == {True}
    assert set(_run(Health(up=False), "+-" * 10, fall=fall, rise=rise)) == {False}
