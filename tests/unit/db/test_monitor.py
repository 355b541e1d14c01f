from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Iterator

import pytest

from tiers.db.health import Check, ClusterHealth, HealthPolicy, NodeObservation, Standing
from tiers.db.monitor import HealthMonitor, changes

NODES = {
    "p": "host=127.0.0.1 port=1 dbname=p",
    "r1": "host=127.0.0.1 port=2 dbname=r1",
    "r2": "host=127.0.0.1 port=3 dbname=r2",
}
POLICY = HealthPolicy(max_lag_bytes=1024, max_lag_seconds=1.0, fall=3, rise=2)


class FakeNodes:
    """A probe whose answers the test sets per DSN: "primary", "replica", "dead", "raise"."""

    def __init__(self) -> None:
        self.mode = {NODES["p"]: "primary", NODES["r1"]: "replica", NODES["r2"]: "replica"}
        self.calls: dict[str, int] = dict.fromkeys(self.mode, 0)
        self.hold: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def __call__(self, dsn: str, timeout: float) -> NodeObservation:
        with self._lock:
            self.calls[dsn] += 1
            mode = self.mode[dsn]
        gate = self.hold.get(dsn)
        if gate is not None:
            gate.wait(30)
        if mode == "raise":
            raise RuntimeError("probe bug")
        # The monitor names observations itself: give a wrong one on purpose.
        name = "whatever"
        if mode == "dead":
            return NodeObservation(name, dsn, reachable=False, error="refused")
        return NodeObservation(name, dsn, reachable=True, in_recovery=mode == "replica",
                               position=1000, replay_lag_seconds=0.0 if mode == "replica"
                               else None, checked_at=time.monotonic())


@pytest.fixture
def fake() -> FakeNodes:
    return FakeNodes()


@pytest.fixture
def monitor(fake: FakeNodes) -> Iterator[HealthMonitor]:
    made = HealthMonitor(NODES, POLICY, interval=0.01, probe=fake, timeout=0.2)
    yield made
    assert made.stop()
    for gate in fake.hold.values():
        gate.set()


def health_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "tiers-db-health"]


def test_before_any_round_nothing_is_in_the_read_pool(monitor: HealthMonitor) -> None:
    snap = monitor.snapshot()
    assert snap.rounds == 0 and snap.read_pool == ()
    assert [n.name for n in snap.nodes] == ["p", "r1", "r2"]
    assert all(n.standing is Standing.NEW for n in snap.nodes)


def test_check_now_runs_one_round_and_publishes_it(monitor: HealthMonitor,
                                                    fake: FakeNodes) -> None:
    snap = monitor.check_now()
    assert snap is monitor.snapshot()
    assert snap.rounds == 1
    assert snap.primary == "p"
    assert snap.read_pool == ("r1", "r2")
    # Observations carry the monitor's names, not the probe's.
    assert [n.last.name for n in snap.nodes if n.last is not None] == ["p", "r1", "r2"]
    assert set(fake.calls.values()) == {1}


def test_a_dead_replica_leaves_after_fall_rounds_and_returns_after_rise(
        monitor: HealthMonitor, fake: FakeNodes) -> None:
    monitor.check_now()
    fake.mode[NODES["r1"]] = "dead"
    pools = [monitor.check_now().read_pool for _ in range(POLICY.fall)]
    assert pools == [("r1", "r2"), ("r1", "r2"), ("r2",)]
    assert monitor.snapshot().node("r1").reason == "unreachable"
    fake.mode[NODES["r1"]] = "replica"
    pools = [monitor.check_now().read_pool for _ in range(POLICY.rise)]
    assert pools == [("r2",), ("r1", "r2")]


def test_a_probe_that_raises_counts_as_unreachable(monitor: HealthMonitor,
                                                   fake: FakeNodes) -> None:
    fake.mode[NODES["r2"]] = "raise"
    snap = monitor.check_now()
    last = snap.node("r2").last
    assert last is not None and last.reachable is False
    assert last.error is not None and "probe raised RuntimeError('probe bug')" in last.error
    assert snap.read_pool == ("r1",)


def test_a_hanging_probe_is_given_up_on_and_not_piled_up(monitor: HealthMonitor,
                                                         fake: FakeNodes) -> None:
    gate = fake.hold[NODES["r1"]] = threading.Event()
    snap = monitor.check_now()
    last = snap.node("r1").last
    assert last is not None and last.reachable is False
    assert last.error is not None and "did not return" in last.error
    monitor.check_now()
    assert fake.calls[NODES["r1"]] == 1  # still the first probe, not a second one
    gate.set()
    del fake.hold[NODES["r1"]]
    deadline = time.monotonic() + 10
    while fake.calls[NODES["r1"]] < 2:
        assert time.monotonic() < deadline, "the node was never probed again"
        monitor.check_now()
    snap = monitor.check_now()
    assert snap.node("r1").check is Check.GOOD


def test_the_thread_runs_rounds_until_stopped(monitor: HealthMonitor) -> None:
    monitor.start()
    monitor.start()  # idempotent
    assert monitor.running
    assert len(health_threads()) == 1
    assert monitor.wait_for(lambda s: s.rounds >= 3, 10) is not None
    assert monitor.stop() is True
    assert not monitor.running
    assert health_threads() == []
    stopped_at = monitor.snapshot().rounds
    assert monitor.wait_for(lambda s: s.rounds > stopped_at, 0.05) is None


def test_it_can_be_restarted_and_used_as_a_context_manager(fake: FakeNodes) -> None:
    made = HealthMonitor(NODES, POLICY, interval=0.01, probe=fake)
    with made:
        assert made.wait_for(lambda s: s.read_pool == ("r1", "r2"), 10) is not None
    assert not made.running
    with made:
        assert made.running
        rounds = made.snapshot().rounds
        assert made.wait_for(lambda s: s.rounds > rounds, 10) is not None
    assert health_threads() == []


def test_wait_for_returns_the_current_snapshot_or_none(monitor: HealthMonitor) -> None:
    assert monitor.wait_for(lambda s: s.rounds == 0, 0) is monitor.snapshot()
    assert monitor.wait_for(lambda s: s.rounds > 0, 0.02) is None


def test_wait_for_wakes_on_a_round_from_another_thread(monitor: HealthMonitor) -> None:
    result: list[ClusterHealth | None] = []
    waiter = threading.Thread(
        target=lambda: result.append(monitor.wait_for(lambda s: s.rounds >= 1, 10)))
    waiter.start()
    monitor.check_now()
    waiter.join(10)
    assert len(result) == 1 and result[0] is not None and result[0].rounds >= 1


def test_readers_never_see_a_round_go_backwards(monitor: HealthMonitor) -> None:
    monitor.start()
    seen: list[int] = []
    deadline = time.monotonic() + 10
    while len(set(seen)) < 5:
        assert time.monotonic() < deadline
        seen.append(monitor.snapshot().rounds)
    assert seen == sorted(seen)


def test_bad_arguments_are_refused(fake: FakeNodes) -> None:
    with pytest.raises(ValueError):
        HealthMonitor({}, probe=fake)
    with pytest.raises(ValueError):
        HealthMonitor(NODES, probe=fake, primary="nope")
    with pytest.raises(ValueError):
        HealthMonitor(NODES, probe=fake, interval=0)


def test_the_expected_primary_is_known_before_the_first_round(fake: FakeNodes) -> None:
    made = HealthMonitor(NODES, POLICY, probe=fake, primary="p")
    assert made.snapshot().primary == "p"


def answer(dsn: str, timeout: float) -> NodeObservation:
    return NodeObservation("x", dsn, reachable=True, in_recovery=dsn != NODES["p"], position=1)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # fork with threads, on purpose
def test_a_forked_child_starts_its_own_thread() -> None:
    made = HealthMonitor(NODES, POLICY, interval=0.01, probe=answer)
    made.start()
    assert made.wait_for(lambda s: s.rounds >= 2, 10) is not None
    pid = os.fork()
    if pid == 0:  # the child: report through the exit status only
        code = 10
        try:
            inherited = made.snapshot()
            code = 11 if made.running else 12  # the parent's thread is not here
            if code == 12:
                made.start()
                later = made.wait_for(lambda s: s.rounds >= inherited.rounds + 3, 10)
                code = 0 if made.running and later is not None and made.stop() else 13
        finally:
            os._exit(code)
    try:
        assert made.stop()
        deadline = time.monotonic() + 20
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                pytest.fail("the child hung")
            time.sleep(0.01)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        made.stop()


def test_changes_are_described_and_logged(monitor: HealthMonitor, fake: FakeNodes,
                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tiers.db")
    first = monitor.check_now()
    assert changes(ClusterHealth(), first) == [
        "p: role unknown -> primary",
        "r1: role unknown -> replica", "r1: joined the read pool",
        "r2: role unknown -> replica", "r2: joined the read pool",
    ]
    fake.mode[NODES["r1"]] = "primary"
    fake.mode[NODES["r2"]] = "dead"  # one bad check: not out yet
    later = monitor.check_now()
    assert changes(first, later) == [
        "r1: role replica -> unknown",
        "r1: left (not in recovery: a second primary?) the read pool",
        "r1: not in recovery while p is the primary: a second primary?",
    ]
    assert "database health: r1: not in recovery while p is the primary: a second primary?" in [
        record.getMessage() for record in caplog.records]
