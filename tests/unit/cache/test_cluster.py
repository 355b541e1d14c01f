"""The cluster over in-memory nodes: routing, batching, failover, gutter, copies, errors."""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator

import pytest

from tests.integration.cachekit import node_state
from tiers.cache.cluster import (
    CacheCluster,
    CopyRule,
    Quorum,
    UnconfirmedWrite,
    hot,
    replicated,
)
from tiers.cache.errors import CacheKeyError, NodeError
from tiers.cache.fake import FakeNodes
from tiers.cache.policy import FailureSettings
from tiers.cache.ring import KetamaRing, NodeSpec

FAILURE = FailureSettings(failure_limit=2, dead_timeout=5.0)


class Clock:
    """A clock that moves only when told."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def specs(count: int) -> list[NodeSpec]:
    return [NodeSpec("127.0.0.1", 21001 + i) for i in range(count)]


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def fake(clock: Clock) -> FakeNodes:
    return FakeNodes(clock)


@pytest.fixture
def cluster(fake: FakeNodes, clock: Clock) -> Iterator[CacheCluster]:
    with CacheCluster(specs(3), fake, failure=FAILURE, clock=clock) as c:
        yield c


def owner(key: str, count: int = 3) -> NodeSpec:
    return KetamaRing(specs(count)).node_for(key)


def successors(key: str, count: int = 3) -> list[NodeSpec]:
    return KetamaRing(specs(count)).nodes_for(key, count)


# ---- routing and batching ------------------------------------------------------------


def test_keys_live_on_their_ring_owner(cluster: CacheCluster, fake: FakeNodes) -> None:
    for i in range(50):
        key = f"user:{i}"
        assert cluster.set(key, i)
        assert fake.holders(key) == [owner(key).address]
        assert cluster.get(key) == i
    assert cluster.get("absent") is None


def test_get_many_asks_each_node_once_for_its_keys(cluster: CacheCluster, fake: FakeNodes) -> None:
    keys = [f"k:{i}" for i in range(120)]
    for key in keys:
        cluster.set(key, key.upper())
    before = {s.address: fake.server(s).count("get_many") for s in specs(3)}
    found = cluster.get_many([*keys, "missing:1", "missing:2"])
    assert found == {k: k.upper() for k in keys}
    for spec in specs(3):
        server = fake.server(spec)
        assert server.count("get_many") == before[spec.address] + 1
        asked = set(server.calls[-1][1])
        wanted = {k for k in [*keys, "missing:1", "missing:2"] if owner(k) == spec}
        assert asked == wanted


def test_nodes_that_are_not_tiers_clients_are_asked_in_turn_in_this_thread(
    cluster: CacheCluster, fake: FakeNodes
) -> None:
    # Only tiers' socket client takes part in a pipelined round; other nodes
    # (these in-memory ones) are called one after another, and no thread is used.
    keys = [f"p:{i}" for i in range(60)]
    assert {owner(k) for k in keys} == set(specs(3))
    seen: list[tuple[threading.Thread, str]] = []
    for spec in specs(3):
        fake.server(spec).hook = lambda op, _keys, a=spec.address: seen.append(
            (threading.current_thread(), a)
        )
    cluster.read_errors_as_misses = False
    for key in keys:
        cluster.set(key, 1)
    seen.clear()
    assert len(cluster.get_many(keys)) == len(keys)
    assert sorted(address for _, address in seen) == sorted(s.address for s in specs(3))
    assert all(thread is threading.current_thread() for thread, _ in seen)


def test_one_node_runs_in_the_calling_thread(fake: FakeNodes) -> None:
    seen: list[threading.Thread] = []
    only = specs(1)[0]
    fake.server(only).hook = lambda op, keys: seen.append(threading.current_thread())
    with CacheCluster([only], fake) as cluster:
        cluster.set("a", 1)
        assert cluster.get_many(["a", "b", "c"]) == {"a": 1}
    assert seen and all(t is threading.current_thread() for t in seen)


def test_connections_are_reused(cluster: CacheCluster, fake: FakeNodes) -> None:
    for i in range(100):
        cluster.set(f"r:{i}", i)
        cluster.get(f"r:{i}")
    assert fake.opened == 3


def test_invalid_keys_always_raise(cluster: CacheCluster) -> None:
    with pytest.raises(CacheKeyError):
        cluster.get("has space")
    with pytest.raises(CacheKeyError):
        cluster.set("has space", 1)
    with pytest.raises(CacheKeyError):
        cluster.get_many(["fine", "x" * 251, "also-fine"])


def test_write_operations(cluster: CacheCluster) -> None:
    assert cluster.add("a", 1)
    assert not cluster.add("a", 2)
    assert cluster.incr("a", 5) == 6
    assert cluster.incr("nothing") is None
    assert cluster.touch("a", 100)
    assert not cluster.touch("nothing", 100)
    assert cluster.delete("a")
    assert not cluster.delete("a")
    assert cluster.get("a") is None


# ---- failures --------------------------------------------------------------------------


def test_dead_node_reads_miss_then_its_keys_go_to_the_next_node_and_it_rejoins(
    cluster: CacheCluster, fake: FakeNodes, clock: Clock
) -> None:
    key = "session:1"
    first, second, _ = successors(key)
    cluster.set(key, "on-owner")
    fake.kill(first)
    # Failures turn into misses; the second one ejects the node.
    assert cluster.get(key) is None
    assert node_state(cluster, first)["state"] == "up"
    assert cluster.get(key) is None
    stats = node_state(cluster, first)
    assert (stats["state"], stats["ejections"], stats["errors"]) == ("ejected", 1, 2)
    # Ejected: the key's traffic goes to the next node on the ring, without errors.
    calls = len(fake.server(first).calls)
    assert cluster.set(key, "on-next")
    assert fake.server(second).items() == {key: "on-next"}
    assert cluster.get(key) == "on-next"
    assert len(fake.server(first).calls) == calls
    # Back after the dead timeout: one probe, and the node rejoins.
    fake.revive(first)
    clock.now += FAILURE.dead_timeout
    assert cluster.get(key) == "on-owner"  # what the owner held before (see module notes)
    assert node_state(cluster, first)["state"] == "up"
    assert node_state(cluster, first)["ejections"] == 1


def test_a_still_dead_node_is_probed_and_ejected_again(
    cluster: CacheCluster, fake: FakeNodes, clock: Clock
) -> None:
    key = "probe:1"
    first = owner(key)
    fake.kill(first)
    cluster.get(key)
    cluster.get(key)
    clock.now += FAILURE.dead_timeout
    assert cluster.get(key) is None  # the probe failed: a miss, not an error
    assert node_state(cluster, first)["state"] == "ejected"
    assert cluster.set(key, 1)  # goes to the next node again
    assert cluster.get(key) == 1


def test_errors_raise_on_reads_when_not_misses(fake: FakeNodes, clock: Clock) -> None:
    with CacheCluster(
        specs(3), fake, failure=FAILURE, clock=clock, read_errors_as_misses=False
    ) as cluster:
        key = "strict:1"
        fake.kill(owner(key))
        with pytest.raises(NodeError):
            cluster.get(key)
        with pytest.raises(NodeError):
            cluster.get_many([key, "other"])


def test_writes_confirm_or_count(cluster: CacheCluster, fake: FakeNodes) -> None:
    key = "write:1"
    fake.kill(owner(key))
    assert cluster.set(key, 1) is False  # swallowed, counted
    assert node_state(cluster, owner(key))["errors"] == 1
    with pytest.raises(UnconfirmedWrite) as raised:
        cluster.set(key, 1, confirm=True)
    assert isinstance(raised.value.__cause__, NodeError)
    assert (raised.value.answered, raised.value.required) == (0, 1)
    # Ejected now: the write goes to the next node and is confirmed there.
    assert cluster.set(key, 1, confirm=True)


def test_server_errors_count_but_do_not_eject(cluster: CacheCluster) -> None:
    key = "counter:text"
    cluster.set(key, "not a number")
    for _ in range(3):
        assert cluster.incr(key) is None
    with pytest.raises(UnconfirmedWrite):
        cluster.incr(key, confirm=True)
    stats = node_state(cluster, owner(key))
    assert (stats["errors"], stats["state"]) == (4, "up")


def test_gutter_takes_an_ejected_nodes_keys_with_a_short_ttl(fake: FakeNodes, clock: Clock) -> None:
    gutter = [NodeSpec("127.0.0.2", 21101), NodeSpec("127.0.0.2", 21102)]
    with CacheCluster(
        specs(3), fake, failure=FAILURE, clock=clock, gutter=gutter, gutter_ttl=10
    ) as cluster:
        key = "feed:7"
        first, second, _ = successors(key)
        fake.kill(first)
        cluster.get(key)
        cluster.get(key)
        assert cluster.set(key, "in-gutter", ttl=3600)
        (holder,) = fake.holders(key)
        assert holder in {g.address for g in gutter}
        assert cluster.get(key) == "in-gutter"
        assert fake.server(second).count("set") == 0
        clock.now += 11  # the gutter copy lives gutter_ttl seconds at most
        assert cluster.get(key) is None
        gutter_stats = cluster.stats()["gutter"]
        assert isinstance(gutter_stats, dict)
        assert set(gutter_stats) == {g.address for g in gutter}


def test_no_live_node_is_a_miss_or_an_unconfirmed_write(
    cluster: CacheCluster, fake: FakeNodes
) -> None:
    for spec in specs(3):
        fake.kill(spec)
    for i in range(10):  # enough to eject every node
        cluster.get(f"all-dead:{i}")
    unrouted = cluster.stats()["unrouted"]
    assert isinstance(unrouted, int)
    assert cluster.get("k") is None
    assert cluster.set("k", 1) is False
    with pytest.raises(UnconfirmedWrite):
        cluster.set("k", 1, confirm=True)
    assert cluster.stats()["unrouted"] == unrouted + 3


# ---- copies --------------------------------------------------------------------------------


@pytest.fixture
def four(fake: FakeNodes, clock: Clock) -> Iterator[CacheCluster]:
    rules: list[tuple[str, CopyRule]] = [
        ("r:", replicated(3)),
        ("f:", replicated(2, read="first")),
        ("hot:", hot(3)),
    ]
    with CacheCluster(specs(4), fake, failure=FAILURE, clock=clock, rules=rules) as c:
        yield c


def test_replicated_keys_are_written_to_r_nodes(four: CacheCluster, fake: FakeNodes) -> None:
    key = "r:profile"
    assert four.set(key, "v", confirm=True)
    assert sorted(fake.holders(key)) == sorted(s.address for s in successors(key, 4)[:3])


def test_majority_read_survives_one_dead_node(four: CacheCluster, fake: FakeNodes) -> None:
    key = "r:profile"
    four.set(key, "v", confirm=True)
    fake.kill(successors(key, 4)[0])
    assert four.get(key) == "v"
    assert four.get_many([key]) == {key: "v"}


def test_majority_read_outvotes_a_stale_copy_and_misses_without_a_majority(
    four: CacheCluster, fake: FakeNodes
) -> None:
    key = "r:profile"
    four.set(key, "new")
    a, b, _c, _ = successors(key, 4)
    fake.server(a).store("set", key, "old", 0)
    assert four.get(key) == "new"
    fake.kill(b)
    assert four.get(key) is None  # "old" vs "new": no two of three agree


def test_write_quorum(fake: FakeNodes, clock: Clock) -> None:
    key = "r:quorum"
    fake.kill(successors(key, 4)[1])
    rules = [("r:", replicated(3))]
    with CacheCluster(specs(4), fake, failure=FAILURE, clock=clock, rules=rules) as strict:
        assert strict.set(key, 1) is False
        with pytest.raises(UnconfirmedWrite) as raised:
            strict.set(key, 1, confirm=True)
        assert (raised.value.answered, raised.value.required) == (2, 3)
    with CacheCluster(
        specs(4), fake, failure=FAILURE, clock=clock, rules=rules, write_quorum=Quorum.MAJORITY
    ) as lenient:
        assert lenient.set(key, 1, confirm=True)
        assert lenient.get(key) == 1


def test_first_hit_read_falls_through_to_the_next_copy(four: CacheCluster, fake: FakeNodes) -> None:
    key = "f:page"
    four.set(key, "v")
    first, second = successors(key, 4)[:2]
    assert sorted(fake.holders(key)) == sorted([first.address, second.address])
    fake.server(first).delete(key)  # evicted from the first copy
    assert four.get(key) == "v"
    fake.kill(first)
    assert four.get_many([key, "f:other"]) == {key: "v"}


def test_per_call_copies_override_prefix_rules(four: CacheCluster, fake: FakeNodes) -> None:
    four.set("plain", 1, copies=replicated(2))
    assert len(fake.holders("plain")) == 2
    assert four.get("plain", copies=replicated(2)) == 1


def test_hot_keys_are_distinct_keys_on_distinct_nodes_read_at_random(
    fake: FakeNodes, clock: Clock
) -> None:
    rules = [("hot:", hot(3))]
    with CacheCluster(
        specs(4), fake, failure=FAILURE, clock=clock, rules=rules, rng=random.Random(5)
    ) as cluster:
        key = "hot:front"
        assert cluster.set(key, "page", confirm=True)
        placed = successors(key, 4)[:3]
        copies = [key, f"{key}#1", f"{key}#2"]
        for spec, copy in zip(placed, copies, strict=True):
            assert fake.holders(copy) == [spec.address]
        before = [fake.server(s).count("get_many") for s in placed]
        for _ in range(300):
            assert cluster.get(key) == "page"
        reads = [fake.server(s).count("get_many") - b for s, b in zip(placed, before, strict=True)]
        assert sum(reads) == 300
        assert all(r > 50 for r in reads)
        # A dead copy's reads go to the others.
        fake.kill(placed[0])
        assert all(cluster.get(key) == "page" for _ in range(30))
        assert cluster.delete(key)
        assert all(not fake.holders(copy) for copy in copies[1:])


# ---- metrics ---------------------------------------------------------------------------------


def test_stats_count_hits_misses_and_latency(cluster: CacheCluster) -> None:
    key = "m:1"
    cluster.set(key, 1)
    cluster.get(key)
    cluster.get(key)
    cluster.get("m:absent-on-" + owner(key).address.replace(":", "-"))
    stats = node_state(cluster, owner(key))
    assert stats["hits"] == 2
    latency = stats["latency"]
    assert isinstance(latency, dict)
    assert latency["count"] >= 3
    buckets = latency["buckets"]
    assert isinstance(buckets, list)
    assert buckets[-1] == ("+Inf", latency["count"])
    total_misses = 0
    for spec in specs(3):
        misses = node_state(cluster, spec)["misses"]
        assert isinstance(misses, int)
        total_misses += misses
    assert total_misses == 1


def test_close_closes_idle_connections(fake: FakeNodes) -> None:
    opened: list[object] = []

    def factory(spec: NodeSpec, *, connect_timeout: float, timeout: float) -> object:
        client = fake(spec, connect_timeout=connect_timeout, timeout=timeout)
        opened.append(client)
        return client

    cluster = CacheCluster(specs(2), factory)  # type: ignore[arg-type]
    cluster.get_many(["a", "b", "c", "d"])
    cluster.close()
    assert opened and all(getattr(c, "closed", False) for c in opened)
