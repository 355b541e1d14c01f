"""The worker master's decisions, as plain calls: no fork, no signal, no clock."""

from __future__ import annotations

import signal

import pytest

from tiers.jobs.child import EXIT_BOOT, EXIT_DB, EXIT_OK
from tiers.jobs.pool import Kill, Kind, Phase, PoolPlan, Release, Spawn, Terminate


def plan(processes: int = 2, **kwargs: object) -> PoolPlan:
    settings: dict[str, object] = {"graceful_timeout": 10.0, "max_jobs": 100,
                                   "max_jobs_jitter": 0, "backoff_initial": 0.5,
                                   "backoff_max": 8.0}
    settings.update(kwargs)
    return PoolPlan(processes=processes, **settings)  # type: ignore[arg-type]


def start(p: PoolPlan, now: float = 0.0, first_pid: int = 100) -> list[int]:
    """Carry out the first decision (spawn every slot) and mark the children ready."""
    pids = []
    for offset, action in enumerate(p.decide(now)):
        assert isinstance(action, Spawn)
        pid = first_pid + offset
        p.spawned(action.slot, pid, f"w{pid}", now)
        p.observed(pid, ready=True, job=None, deadline=None)
        pids.append(pid)
    return pids


def test_every_slot_gets_a_child_and_the_pool_is_ready_when_all_report() -> None:
    p = plan(3, scheduler=True)
    actions = p.decide(0.0)
    assert actions == [Spawn(0, Kind.WORKER, 100), Spawn(1, Kind.WORKER, 100),
                       Spawn(2, Kind.WORKER, 100), Spawn(3, Kind.SCHEDULER, 0)]
    assert p.decide(0.0) == []  # nothing twice
    for slot, pid in enumerate((10, 11, 12, 13)):
        p.spawned(slot, pid, f"w{pid}", 0.0)
    assert not p.all_ready()
    for pid in (10, 11, 12):
        p.observed(pid, ready=True, job=None, deadline=None)
    assert not p.all_ready()
    p.observed(13, ready=True, job=None, deadline=None)
    assert p.all_ready()


def test_max_jobs_has_jitter_and_zero_means_never() -> None:
    seen = []
    p = plan(4, max_jobs=1000, max_jobs_jitter=100,
             rand=lambda low, high: seen.append((low, high)) or 42)
    assert [a.max_jobs for a in p.decide(0.0) if isinstance(a, Spawn)] == [1042] * 4
    assert seen == [(0, 100)] * 4
    assert {a.max_jobs for a in plan(2, max_jobs=0).decide(0.0) if isinstance(a, Spawn)} == {0}


def test_a_recycled_child_is_replaced_at_once_and_holds_no_job() -> None:
    p = plan(1)
    (pid,) = start(p)
    p.exited(pid, EXIT_OK, 50.0)
    assert p.decide(50.0) == [Spawn(0, Kind.WORKER, 100)]  # no Release: it exited cleanly


def test_a_working_child_that_dies_has_its_jobs_released_and_is_replaced_at_once() -> None:
    p = plan(1)
    (pid,) = start(p)
    p.observed(pid, ready=True, job=7, deadline=100.0)
    p.exited(pid, -signal.SIGKILL, 1.0)
    assert p.decide(1.0) == [Release("w100", "worker w100 was killed by signal 9"),
                             Spawn(0, Kind.WORKER, 100)]


def test_a_child_that_dies_before_it_is_ready_is_restarted_with_backoff() -> None:
    p = plan(1)
    assert p.decide(0.0) == [Spawn(0, Kind.WORKER, 100)]
    p.spawned(0, 100, "w100", 0.0)
    p.exited(100, 1, 0.2)
    assert p.decide(0.2) == [Release("w100", "worker w100 exited with status 1")]
    assert p.decide(0.6) == []
    assert p.decide(0.7) == [Spawn(0, Kind.WORKER, 100)]
    p.spawned(0, 101, "w101", 0.7)
    p.exited(101, -signal.SIGSEGV, 0.8)  # again: the delay doubles
    p.decide(0.8)
    assert p.decide(1.7) == []
    assert p.decide(1.8) == [Spawn(0, Kind.WORKER, 100)]
    assert p.next_wakeup(1.8) == 1.0  # nothing timed is pending


def test_backoff_is_capped_and_a_child_that_gets_ready_resets_it() -> None:
    p = plan(1, backoff_max=2.0)
    now, pid = 0.0, 1
    for _ in range(6):
        (spawn,) = p.decide(now)
        assert isinstance(spawn, Spawn)
        p.spawned(0, pid, f"w{pid}", now)
        p.exited(pid, 1, now + 0.1)
        p.decide(now + 0.1)
        pid += 1
        now = p.slots[0].next_spawn_at
    assert p.slots[0].failures == 6
    assert now == pytest.approx(0.1 * 6 + 0.5 + 1.0 + 2.0 * 4)  # capped at backoff_max
    p.decide(now)
    p.spawned(0, pid, f"w{pid}", now)
    p.observed(pid, ready=True, job=None, deadline=None)
    p.exited(pid, -signal.SIGKILL, now + 1.0)
    assert p.slots[0].failures == 0
    assert p.slots[0].next_spawn_at == now + 1.0


def test_a_child_that_gave_up_on_the_database_backs_off_even_after_working() -> None:
    p = plan(1)
    (pid,) = start(p)
    p.exited(pid, EXIT_DB, 5.0)
    assert p.decide(5.0) == [Release("w100", "worker w100 exited with status 5")]
    assert p.decide(5.5) == [Spawn(0, Kind.WORKER, 100)]


def test_a_job_past_its_deadline_gets_its_worker_killed_released_and_replaced() -> None:
    p = plan(2)
    first, second = start(p)
    p.observed(first, ready=True, job=42, deadline=30.0)
    p.observed(second, ready=True, job=43, deadline=90.0)
    assert p.decide(29.9) == []
    assert p.next_wakeup(29.5) == 0.5  # the master wakes for the deadline
    reason = "job 42 ran past its timeout on worker w100, which was killed"
    assert p.decide(30.0) == [Kill(first, reason)]
    assert p.decide(30.5) == []  # killed once
    p.exited(first, -signal.SIGKILL, 30.1)
    # The job is released with the reason; its worker is replaced at once.
    assert p.decide(30.1) == [Release("w100", reason), Spawn(0, Kind.WORKER, 100)]


def test_a_child_that_finished_its_job_is_not_judged_by_the_old_deadline() -> None:
    p = plan(1)
    (pid,) = start(p)
    p.observed(pid, ready=True, job=1, deadline=5.0)
    p.observed(pid, ready=True, job=None, deadline=None)
    assert p.decide(100.0) == []


def test_stop_asks_every_child_to_finish_then_kills_the_late_ones() -> None:
    p = plan(2, scheduler=True)
    pids = start(p)
    p.observed(pids[0], ready=True, job=5, deadline=1000.0)
    p.request_stop(1.0)
    assert p.phase is Phase.STOPPING
    assert p.decide(1.0) == [Terminate(pid) for pid in pids]
    p.exited(pids[1], EXIT_OK, 2.0)  # idle: exits at once, not replaced
    p.exited(pids[2], EXIT_OK, 2.0)
    assert p.decide(2.0) == []
    assert not p.finished
    late = ("worker w100 did not finish its job within the graceful timeout of 10s "
            "while stopping")
    assert p.decide(11.0) == [Kill(pids[0], late)]
    p.exited(pids[0], -signal.SIGKILL, 11.1)
    assert p.decide(11.1) == [Release("w100", late)]
    assert p.finished and p.exit_code == EXIT_OK


def test_a_second_stop_aborts_at_once() -> None:
    p = plan(2)
    pids = start(p)
    p.request_stop(0.0)
    assert p.decide(0.0) == [Terminate(pid) for pid in pids]
    p.request_stop(0.5)
    kills = p.decide(0.5)
    assert [k.pid for k in kills if isinstance(k, Kill)] == pids
    assert all("stopped at once (abort)" in k.reason for k in kills if isinstance(k, Kill))
    for pid in pids:
        p.exited(pid, -signal.SIGKILL, 0.6)
    releases = p.decide(0.6)
    assert [r.worker_id for r in releases if isinstance(r, Release)] == ["w100", "w101"]
    assert p.finished


def test_nothing_is_spawned_while_stopping_even_if_a_child_dies() -> None:
    p = plan(1)
    (pid,) = start(p)
    p.request_stop(0.0)
    p.decide(0.0)
    p.exited(pid, -signal.SIGSEGV, 0.5)
    assert p.decide(0.5) == [Release("w100", "worker w100 was killed by signal 11")]
    assert p.finished


def test_reload_starts_new_children_at_once_and_retires_the_old() -> None:
    p = plan(2)
    old = start(p)
    p.request_reload(5.0)
    actions = p.decide(5.0)
    assert actions == [Terminate(old[0]), Terminate(old[1]), Spawn(0, Kind.WORKER, 100),
                       Spawn(1, Kind.WORKER, 100)]
    p.spawned(0, 200, "w200", 5.0)
    p.spawned(1, 201, "w201", 5.0)
    # An old child's exit neither frees nor fills its slot again.
    p.exited(old[0], EXIT_OK, 6.0)
    assert p.decide(6.0) == []
    assert p.slots[0].pid == 200
    # One that does not finish in time is killed, and its job released.
    late = ("worker w101 did not finish its job within the graceful timeout of 10s "
            "while being replaced")
    assert p.decide(15.0) == [Kill(old[1], late)]
    p.exited(old[1], -signal.SIGKILL, 15.1)
    assert p.decide(15.1) == [Release("w101", late)]
    assert p.phase is Phase.RUNNING


def test_a_boot_failure_stops_the_pool_with_its_exit_code() -> None:
    p = plan(2)
    pids = start(p)
    p.exited(pids[0], EXIT_BOOT, 1.0)
    assert p.phase is Phase.STOPPING
    assert p.decide(1.0) == [Release("w100", "worker w100 exited with status 3"),
                             Terminate(pids[1])]
    p.exited(pids[1], EXIT_OK, 1.5)
    p.decide(1.5)
    assert p.finished and p.exit_code == EXIT_BOOT


def test_a_failed_fork_is_retried_after_backoff() -> None:
    p = plan(1)
    (spawn,) = p.decide(0.0)
    assert isinstance(spawn, Spawn)
    p.spawn_failed(spawn.slot, 0.0)
    assert p.decide(0.2) == []
    assert p.decide(0.5) == [Spawn(0, Kind.WORKER, 100)]


def test_a_scheduler_child_is_never_judged_by_job_deadlines() -> None:
    p = plan(0, scheduler=True)
    (pid,) = start(p)
    p.observed(pid, ready=True, job=None, deadline=None)
    assert p.decide(10_000.0) == []
    p.exited(pid, -signal.SIGKILL, 10_001.0)
    # A scheduler holds no job: nothing to release; it had worked: replaced at once.
    assert p.decide(10_001.0) == [Spawn(0, Kind.SCHEDULER, 0)]
