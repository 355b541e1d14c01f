"""Stampede protection over in-memory nodes: one computation per expiry, XFetch, leases."""

from __future__ import annotations

import math
import random
import threading
from collections.abc import Iterable, Iterator, Mapping

import pytest

from tiers.cache.cluster import CacheCluster
from tiers.cache.fake import FakeNodes
from tiers.cache.ring import KetamaRing, NodeSpec
from tiers.cache.stampede import (
    JSON,
    LEASE_SUFFIX,
    get_or_compute,
    pack,
    should_recompute,
    unpack,
)

NODES = [NodeSpec("127.0.0.1", 21001 + i) for i in range(3)]


class Counter:
    """A ``compute`` that counts its calls and returns a new value each time."""

    def __init__(self, pause: threading.Event | None = None) -> None:
        self.calls = 0
        self.pause = pause
        self._lock = threading.Lock()

    def __call__(self) -> bytes:
        with self._lock:
            self.calls += 1
            n = self.calls
        if self.pause is not None:
            self.pause.wait(30)
        return f"value-{n}".encode()


@pytest.fixture
def cluster() -> Iterator[CacheCluster]:
    with CacheCluster(NODES, FakeNodes()) as c:
        yield c


def run_many(count: int, call: object) -> list[object]:
    """Run ``call`` from ``count`` threads released together; their results."""
    assert callable(call)
    start = threading.Barrier(count)
    results: list[object] = [None] * count
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            start.wait(30)
            results[i] = call()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_hundred_callers_on_a_missing_key_compute_once(cluster: CacheCluster) -> None:
    release = threading.Event()
    compute = Counter(release)
    # The winner holds its computation until the others are polling for its value.
    timer = threading.Timer(0.3, release.set)
    timer.start()
    try:
        results = run_many(
            100, lambda: get_or_compute(cluster, "page:home", compute, 60, wait=30.0)
        )
    finally:
        timer.cancel()
        release.set()
    assert compute.calls == 1
    assert set(results) == {b"value-1"}
    assert cluster.get("page:home" + LEASE_SUFFIX) is None  # the lease was released


def test_hundred_callers_on_an_expired_key_compute_once(cluster: CacheCluster) -> None:
    cluster.set("page:feed", pack(b"old", 0.5, 1.0), 0)  # expired long ago, still stored
    release = threading.Event()
    compute = Counter(release)
    timer = threading.Timer(0.3, release.set)
    timer.start()
    try:
        results = run_many(
            100, lambda: get_or_compute(cluster, "page:feed", compute, 60, wait=30.0)
        )
    finally:
        timer.cancel()
        release.set()
    assert compute.calls == 1
    # The winner returns the new value; the others get the stale one at once.
    assert results.count(b"value-1") >= 1
    assert set(results) <= {b"old", b"value-1"}
    stored = unpack(cluster.get("page:feed"))
    assert stored is not None and stored.value == b"value-1"


def test_fresh_values_are_returned_without_computing(cluster: CacheCluster) -> None:
    compute = Counter()
    assert get_or_compute(cluster, "k", compute, 60) == b"value-1"
    assert get_or_compute(cluster, "k", compute, 60, beta=0) == b"value-1"
    assert compute.calls == 1
    envelope = unpack(cluster.get("k"))
    assert envelope is not None and envelope.expiry > 0 and envelope.delta >= 0


def test_values_that_are_not_envelopes_count_as_missing(cluster: CacheCluster) -> None:
    cluster.set("foreign", b"written by someone else")
    assert get_or_compute(cluster, "foreign", Counter(), 60) == b"value-1"
    assert unpack(b"TX") is None and unpack("text") is None


def test_codec_carries_other_values(cluster: CacheCluster) -> None:
    def build() -> dict[str, int]:
        return {"a": 1}

    assert get_or_compute(cluster, "json", build, 60, codec=JSON) == {"a": 1}
    assert get_or_compute(cluster, "json", build, 60, codec=JSON, beta=0) == {"a": 1}


def test_compute_errors_reach_the_caller_and_release_the_lease(cluster: CacheCluster) -> None:
    def broken() -> bytes:
        raise RuntimeError("database down")

    with pytest.raises(RuntimeError, match="database down"):
        get_or_compute(cluster, "fails", broken, 60)
    assert cluster.get("fails" + LEASE_SUFFIX) is None
    assert get_or_compute(cluster, "fails", Counter(), 60) == b"value-1"


def test_a_waiter_takes_over_when_the_lease_disappears(cluster: CacheCluster) -> None:
    cluster.add("orphan" + LEASE_SUFFIX, b"someone", 30)
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 3:  # the holder gave up without storing a value
            cluster.delete("orphan" + LEASE_SUFFIX)

    compute = Counter()
    assert get_or_compute(cluster, "orphan", compute, 60, wait=30.0, sleep=sleep) == b"value-1"
    assert compute.calls == 1 and len(sleeps) == 3


def test_a_waiter_computes_itself_when_the_wait_runs_out(cluster: CacheCluster) -> None:
    cluster.add("stuck" + LEASE_SUFFIX, b"someone", 30)
    compute = Counter()
    result = get_or_compute(cluster, "stuck", compute, 60, wait=0.05, poll=0.01)
    assert result == b"value-1" and compute.calls == 1
    assert cluster.get("stuck" + LEASE_SUFFIX) == b"someone"  # not ours to release
    stored = unpack(cluster.get("stuck"))
    assert stored is not None and stored.value == b"value-1"


def test_without_the_lease_node_callers_compute_without_a_lease() -> None:
    fake = FakeNodes()
    lease_owner = KetamaRing(NODES).node_for("dark" + LEASE_SUFFIX)
    fake.kill(lease_owner)
    with CacheCluster(NODES, fake) as cluster:
        compute = Counter()
        assert get_or_compute(cluster, "dark", compute, 60) == b"value-1"
        assert compute.calls == 1


# ---- XFetch -------------------------------------------------------------------------------


def test_beta_zero_never_recomputes_early() -> None:
    class Worst(random.Random):
        def random(self) -> float:
            return 1.0 - 1e-300  # the draw closest to 0: the earliest recomputation

    for now in (0.0, 99.0, 99.999999):
        assert not should_recompute(now, 50.0, 100.0, 0.0, Worst())
    assert should_recompute(100.0, 50.0, 100.0, 0.0, Worst())


def test_seeded_rng_recomputes_early_at_the_expected_point() -> None:
    delta, beta, expiry = 2.0, 1.5, 1000.0
    draw = 1.0 - random.Random(7).random()
    # Early once now >= expiry + delta * beta * ln(draw) (ln(draw) <= 0).
    threshold = expiry + delta * beta * math.log(draw)
    assert threshold < expiry
    assert not should_recompute(threshold - 1e-6, delta, expiry, beta, random.Random(7))
    assert should_recompute(threshold + 1e-6, delta, expiry, beta, random.Random(7))


def test_get_or_compute_recomputes_early_with_xfetch(cluster: CacheCluster) -> None:
    delta, beta, expiry = 2.0, 1.0, 1000.0
    threshold = expiry + delta * beta * math.log(1.0 - random.Random(3).random())
    cluster.set("xf", pack(b"current", delta, expiry))
    compute = Counter()

    def at(now: float) -> bytes:
        return get_or_compute(
            cluster, "xf", compute, 60, beta=beta, clock=lambda: now, rng=random.Random(3)
        )

    assert at(threshold - 0.01) == b"current"
    assert compute.calls == 0
    assert at(threshold + 0.01) == b"value-1"
    assert compute.calls == 1
    stored = unpack(cluster.get("xf"))
    assert stored is not None and stored.expiry == pytest.approx(threshold + 0.01 + 60)


def test_a_late_lease_winner_takes_the_value_stored_meanwhile(cluster: CacheCluster) -> None:
    # This caller read a miss; by the time it wins the lease, another caller has
    # stored the value and released its own lease.
    class LateCluster:
        def __init__(self) -> None:
            self.reads = 0

        def get_many(self, keys: Iterable[str]) -> Mapping[str, object]:
            self.reads += 1
            if self.reads == 1:
                return {}
            return cluster.get_many(keys)

        def set(self, key: str, value: object, ttl: int = 0) -> bool:
            return cluster.set(key, value, ttl)

        def add(self, key: str, value: object, ttl: int = 0, *, confirm: bool = False) -> bool:
            return cluster.add(key, value, ttl, confirm=confirm)

        def delete(self, key: str) -> bool:
            return cluster.delete(key)

    assert get_or_compute(cluster, "late", Counter(), 60) == b"value-1"
    compute = Counter()
    assert get_or_compute(LateCluster(), "late", compute, 60) == b"value-1"
    assert compute.calls == 0
    assert cluster.get("late" + LEASE_SUFFIX) is None


def test_a_poller_that_sees_the_lease_gone_before_the_value_does_not_recompute(
    cluster: CacheCluster,
) -> None:
    # The value and the lease live on different nodes: one poll may read the value's
    # node just before the winner stores it and the lease's node just after it is released.
    class Skewed:
        def __init__(self) -> None:
            self.reads = 0

        def get_many(self, keys: Iterable[str]) -> Mapping[str, object]:
            self.reads += 1
            if self.reads <= 2:  # the first read, and the skewed poll
                return {}
            return cluster.get_many(keys)

        def set(self, key: str, value: object, ttl: int = 0) -> bool:
            return cluster.set(key, value, ttl)

        def add(self, key: str, value: object, ttl: int = 0, *, confirm: bool = False) -> bool:
            return cluster.add(key, value, ttl, confirm=confirm)

        def delete(self, key: str) -> bool:
            return cluster.delete(key)

    cluster.add("skew" + LEASE_SUFFIX, b"winner", 30)

    def sleep(seconds: float) -> None:
        # Meanwhile the winner stores its value and releases the lease.
        if cluster.get("skew") is None:
            get_or_compute(cluster, "skew", Counter(), 60, wait=0)  # stored without a lease
            cluster.delete("skew" + LEASE_SUFFIX)

    compute = Counter()
    assert get_or_compute(Skewed(), "skew", compute, 60, sleep=sleep) == b"value-1"
    assert compute.calls == 0
