"""Health transitions, the balancing policies and the idle pool, as plain values."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest

from tiers.proxy.balancer import (
    ConsistentHash,
    Health,
    LeastConnections,
    ServerState,
    SmoothWeighted,
    mark_unreachable,
    observe_check,
)
from tiers.proxy.idlepool import IdlePool


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


def _servers(*weights: int, prefix: str = "10.0.0") -> list[ServerState]:
    return [ServerState(i, f"{prefix}.{i + 1}:80", w) for i, w in enumerate(weights)]


def _picks(policy: SmoothWeighted | LeastConnections, count: int) -> list[int]:
    out = []
    for _ in range(count):
        index = policy.choose(b"", (), False, 0, 0.0)
        assert index is not None
        out.append(index)
    return out


# ---- smooth weighted round robin ---------------------------------------------------------


def test_smooth_round_robin_interleaves_like_nginx() -> None:
    policy = SmoothWeighted(_servers(5, 1, 1))
    assert "".join("abc"[i] for i in _picks(policy, 14)) == "aabacaa" * 2


def test_smooth_round_robin_follows_weights_exactly_over_each_cycle() -> None:
    policy = SmoothWeighted(_servers(3, 2, 1))
    assert Counter(_picks(policy, 600)) == {0: 300, 1: 200, 2: 100}
    equal = SmoothWeighted(_servers(1, 1, 1))
    assert _picks(equal, 6) == [0, 1, 2, 0, 1, 2]


def test_smooth_round_robin_skips_down_excluded_and_other_tier() -> None:
    servers = _servers(1, 1, 1)
    policy = SmoothWeighted(servers)
    servers[1].up = False
    assert _picks(policy, 4) == [0, 2, 0, 2]
    assert policy.choose(b"", {0, 2}, False, 0, 0.0) is None
    assert policy.choose(b"", {0}, False, 0, 0.0) == 2
    # Every server is a primary: none qualifies for the backup tier.
    assert policy.choose(b"", (), True, 0, 0.0) is None
    servers[0].up = servers[2].up = False
    assert policy.choose(b"", (), False, 0, 0.0) is None


def test_smooth_round_robin_skips_servers_at_the_limit() -> None:
    servers = _servers(1, 1)
    policy = SmoothWeighted(servers)
    servers[0].active = 2
    assert [policy.choose(b"", (), False, 2, 0.0) for _ in range(3)] == [1, 1, 1]
    servers[1].active = 2
    assert policy.choose(b"", (), False, 2, 0.0) is None
    # Without a limit, in-flight counts do not matter to round robin.
    assert policy.choose(b"", (), False, 0, 0.0) is not None


# ---- least connections -------------------------------------------------------------------


def test_least_conn_picks_the_least_loaded_relative_to_weight() -> None:
    servers = _servers(1, 1, 1)
    policy = LeastConnections(servers)
    for server, active in zip(servers, (3, 1, 2), strict=True):
        server.active = active
    assert policy.choose(b"", (), False, 0, 0.0) == 1
    heavy = _servers(2, 1)
    policy = LeastConnections(heavy)
    heavy[0].active, heavy[1].active = 3, 2  # 3/2 per unit of weight against 2/1
    assert policy.choose(b"", (), False, 0, 0.0) == 0
    heavy[0].active = 5  # 5/2 against 2/1
    assert policy.choose(b"", (), False, 0, 0.0) == 1


def test_least_conn_ties_rotate_so_an_idle_pool_spreads_by_weight() -> None:
    assert _picks(LeastConnections(_servers(1, 1, 1)), 6) == [0, 1, 2, 0, 1, 2]
    assert Counter(_picks(LeastConnections(_servers(2, 1)), 300)) == {0: 200, 1: 100}
    servers = _servers(1, 1, 1)
    servers[0].active = 1
    # 1 and 2 are tied below 0: they take turns.
    assert _picks(LeastConnections(servers), 4) == [1, 2, 1, 2]


def test_least_conn_sends_less_to_a_slow_server_under_load() -> None:
    # Server 0 holds each request ten ticks, server 1 one tick; two requests
    # arrive per tick. Round robin would split them evenly.
    servers = _servers(1, 1)
    policy = LeastConnections(servers)
    ends: list[tuple[int, int]] = []
    sent = Counter[int]()
    for tick in range(200):
        for ending in [e for e in ends if e[0] == tick]:
            servers[ending[1]].active -= 1
            ends.remove(ending)
        for _ in range(2):
            index = policy.choose(b"", (), False, 0, float(tick))
            assert index is not None
            servers[index].active += 1
            sent[index] += 1
            ends.append((tick + (10 if index == 0 else 1), index))
    assert sent[1] > 3 * sent[0]


# ---- consistent hashing ------------------------------------------------------------------

_KEYS = [f"/entry/{n}?page={n % 7}".encode() for n in range(10_000)]


def _map(policy: ConsistentHash, servers: list[ServerState] | None = None) -> list[str | None]:
    labels = {s.index: s.label for s in (servers or [])}
    out = []
    for key in _KEYS:
        index = policy.choose(key, (), False, 0, 0.0)
        out.append(None if index is None else labels.get(index, str(index)))
    return out


def test_hash_is_stable_and_independent_of_server_order() -> None:
    servers = _servers(1, 1, 1, 1)
    first = _map(ConsistentHash(servers), servers)
    assert first == _map(ConsistentHash(servers), servers)
    shuffled = [ServerState(i, s.label) for i, s in enumerate(reversed(servers))]
    assert _map(ConsistentHash(shuffled), shuffled) == first


def test_hash_spreads_keys_evenly_and_by_weight() -> None:
    servers = _servers(*([1] * 10))
    counts = Counter(_map(ConsistentHash(servers), servers))
    assert len(counts) == 10
    assert all(700 <= count <= 1300 for count in counts.values()), counts
    weighted = _servers(2, 1, 1)
    shares = Counter(_map(ConsistentHash(weighted), weighted))
    assert 0.42 <= shares[weighted[0].label] / len(_KEYS) <= 0.58, shares


@pytest.mark.parametrize("count", [5, 10])
def test_adding_or_removing_one_of_n_servers_moves_about_one_nth_of_keys(count: int) -> None:
    servers = _servers(*([1] * count))
    before = _map(ConsistentHash(servers), servers)
    grown = _servers(*([1] * (count + 1)))
    after = _map(ConsistentHash(grown), grown)
    moved = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    expected = len(_KEYS) / (count + 1)
    assert 0.6 * expected <= len(moved) <= 1.4 * expected
    # Only keys that the new server takes move.
    assert {after[i] for i in moved} == {grown[-1].label}

    shrunk = servers[:-1]
    after = _map(ConsistentHash(shrunk), shrunk)
    moved = [i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b]
    assert 0.6 * len(_KEYS) / count <= len(moved) <= 1.4 * len(_KEYS) / count
    # Exactly the removed server's keys move, each to some other server.
    assert {before[i] for i in moved} == {servers[-1].label}
    assert moved == [i for i, label in enumerate(before) if label == servers[-1].label]


def test_a_down_servers_keys_go_to_the_next_server_and_come_back() -> None:
    servers = _servers(*([1] * 8))
    policy = ConsistentHash(servers)
    before = _map(policy, servers)
    servers[3].up = False
    during = _map(policy, servers)
    lost = servers[3].label
    assert lost not in during
    for old, new in zip(before, during, strict=True):
        if old != lost:
            assert new == old
    # The orphaned keys spread over several servers, not one neighbour.
    assert len({new for old, new in zip(before, during, strict=True) if old == lost}) >= 3
    servers[3].up = True
    assert _map(policy, servers) == before


def test_hash_respects_exclude_limit_and_all_down() -> None:
    servers = _servers(1, 1, 1)
    policy = ConsistentHash(servers)
    key = b"/some/page"
    first = policy.choose(key, (), False, 0, 0.0)
    assert first is not None
    second = policy.choose(key, {first}, False, 0, 0.0)
    assert second is not None and second != first
    servers[first].active = 1
    assert policy.choose(key, (), False, 1, 0.0) == second
    for server in servers:
        server.up = False
    assert policy.choose(key, (), False, 0, 0.0) is None


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
