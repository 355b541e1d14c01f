"""The supervisor's decisions as plain calls: order, readiness, backoff, giving up, stopping."""

from __future__ import annotations

from tiers.config.model import SupervisorConfig
from tiers.supervisor.plan import (
    STABLE_AFTER,
    Kill,
    Phase,
    Plan,
    Service,
    ServiceState,
    Start,
    Stop,
)

CONFIG = SupervisorConfig(ready_timeout=30, stop_timeout=10, backoff_initial=0.5,
                          backoff_max=4, max_failed_starts=3)


def three_tier() -> Plan:
    return Plan([
        Service("db", ()),
        Service("replica", ("db",)),
        Service("app1", ("db", "replica")),
        Service("app2", ("db", "replica")),
        Service("proxy", ("app1", "app2")),
    ], CONFIG)


def start(plan: Plan, name: str, pid: int, now: float) -> None:
    plan.spawned(name, pid, now)
    plan.ready(name, now)


def bring_up(plan: Plan, now: float = 0.0) -> None:
    pid = 100
    while True:
        actions = plan.decide(now)
        if not actions:
            break
        for action in actions:
            assert isinstance(action, Start)
            pid += 1
            start(plan, action.name, pid, now)


def test_starts_in_dependency_order_waiting_for_readiness() -> None:
    plan = three_tier()
    assert plan.decide(0) == [Start("db")]
    assert plan.decide(0) == []  # db is starting, nothing else may start
    plan.spawned("db", 10, 0)
    assert plan.decide(1) == []
    plan.ready("db", 1)
    assert plan.decide(1) == [Start("replica")]
    start(plan, "replica", 11, 2)
    assert plan.decide(2) == [Start("app1"), Start("app2")]
    start(plan, "app1", 12, 3)
    assert plan.decide(3) == []  # proxy needs both app servers
    start(plan, "app2", 13, 3)
    assert plan.decide(3) == [Start("proxy")]
    assert plan.phase() is Phase.STARTING
    start(plan, "proxy", 14, 4)
    assert plan.phase() is Phase.RUNNING


def test_crash_of_a_ready_service_restarts_it_with_backoff() -> None:
    plan = three_tier()
    bring_up(plan)
    plan.exited("app1", -9, 100.0)
    app1 = plan.get("app1")
    assert app1.state is ServiceState.RESTARTING
    assert app1.restarts == 1
    assert plan.decide(100.2) == []
    assert plan.decide(100.5) == [Start("app1")]
    assert plan.phase() is Phase.RUNNING  # the stack stays up while one server restarts


def test_backoff_doubles_and_is_capped_then_gives_up() -> None:
    plan = Plan([Service("flaky")], CONFIG)
    now = 0.0
    delays = []
    for _ in range(CONFIG.max_failed_starts - 1):
        assert plan.decide(now) == [Start("flaky")]
        plan.spawned("flaky", 1, now)
        plan.exited("flaky", 1, now)
        delays.append(plan.get("flaky").next_start_at - now)
        now = plan.get("flaky").next_start_at
    assert delays == [0.5, 1.0]
    assert plan.decide(now) == [Start("flaky")]
    plan.spawned("flaky", 1, now)
    plan.exited("flaky", 1, now)
    assert plan.get("flaky").state is ServiceState.FAILED
    assert plan.decide(now + 1000) == []  # no endless loop
    assert plan.phase() is Phase.FAILED


def test_backoff_never_exceeds_the_maximum() -> None:
    config = SupervisorConfig(backoff_initial=1, backoff_max=3, max_failed_starts=10)
    plan = Plan([Service("s")], config)
    now = 0.0
    for _ in range(6):
        plan.decide(now)
        plan.spawned("s", 1, now)
        plan.exited("s", 1, now)
        assert plan.get("s").next_start_at - now <= 3
        now = plan.get("s").next_start_at
    assert plan.get("s").next_start_at - now <= 3


def test_a_service_that_crashes_soon_after_ready_counts_as_failing() -> None:
    plan = Plan([Service("s")], CONFIG)
    now = 0.0
    for _ in range(CONFIG.max_failed_starts):
        assert plan.decide(now) == [Start("s")]
        start(plan, "s", 1, now)
        plan.exited("s", 1, now + 1)
        now = plan.get("s").next_start_at
    assert plan.get("s").state is ServiceState.FAILED


def test_a_long_stable_service_starts_backoff_afresh() -> None:
    plan = Plan([Service("s")], CONFIG)
    now = 0.0
    for _ in range(10):  # crashes far apart never add up to a failure
        plan.decide(now)
        start(plan, "s", 1, now)
        now += STABLE_AFTER + 1
        plan.exited("s", 1, now)
        assert plan.get("s").state is ServiceState.RESTARTING
        assert plan.get("s").next_start_at - now == CONFIG.backoff_initial
        now = plan.get("s").next_start_at


def test_not_ready_in_time_is_killed_and_counted() -> None:
    plan = Plan([Service("slow")], CONFIG)
    plan.decide(0)
    plan.spawned("slow", 5, 0)
    assert plan.decide(29) == []
    assert plan.decide(30) == [Kill("slow")]
    assert plan.decide(31) == []  # killed once, then wait for the exit
    plan.exited("slow", -9, 31)
    assert plan.get("slow").state is ServiceState.RESTARTING
    assert "not ready within" in plan.get("slow").last_error


def test_launch_failure_counts_as_failed_start() -> None:
    plan = Plan([Service("db")], CONFIG)
    plan.decide(0)
    plan.launch_failed("db", "initdb failed", 0)
    assert plan.get("db").state is ServiceState.RESTARTING
    assert plan.get("db").last_error == "initdb failed"


def test_stop_goes_in_reverse_order_one_layer_at_a_time() -> None:
    plan = three_tier()
    bring_up(plan)
    plan.request_stop()
    assert plan.decide(0) == [Stop("proxy")]
    assert plan.decide(1) == []
    plan.exited("proxy", 0, 1)
    assert plan.decide(1) == [Stop("app2"), Stop("app1")]
    plan.exited("app1", 0, 2)
    assert plan.decide(2) == []  # replica waits for app2 too
    plan.exited("app2", 0, 2)
    assert plan.decide(2) == [Stop("replica")]
    plan.exited("replica", 0, 3)
    assert plan.decide(3) == [Stop("db")]
    assert plan.phase() is Phase.STOPPING
    plan.exited("db", 0, 4)
    assert plan.decide(4) == []
    assert plan.phase() is Phase.STOPPED


def test_stop_deadline_escalates_to_kill() -> None:
    plan = Plan([Service("stubborn")], CONFIG)
    plan.decide(0)
    start(plan, "stubborn", 7, 0)
    plan.request_stop()
    assert plan.decide(100) == [Stop("stubborn")]
    assert plan.decide(109) == []
    assert plan.decide(110) == [Kill("stubborn")]
    assert plan.decide(111) == []
    plan.exited("stubborn", -9, 111)
    assert plan.phase() is Phase.STOPPED


def test_stop_while_launching_waits_for_the_launch() -> None:
    plan = Plan([Service("db"), Service("app", ("db",))], CONFIG)
    plan.decide(0)  # db launching (prepare running in a thread)
    plan.request_stop()
    assert plan.decide(1) == []
    assert plan.phase() is Phase.STOPPING
    plan.spawned("db", 9, 2)  # the launch completed after all
    assert plan.decide(2) == [Stop("db")]
    plan.exited("db", 0, 3)
    assert plan.phase() is Phase.STOPPED


def test_exit_during_stop_is_not_a_crash() -> None:
    plan = three_tier()
    bring_up(plan)
    plan.request_stop()
    plan.decide(0)
    plan.exited("db", 1, 0)  # died on its own while the proxy was stopping
    assert plan.get("db").state is ServiceState.STOPPED
    assert plan.get("db").restarts == 0


def test_a_pending_service_with_a_failed_dependency_never_starts() -> None:
    plan = Plan([Service("db"), Service("app", ("db",))],
                SupervisorConfig(max_failed_starts=1))
    plan.decide(0)
    plan.spawned("db", 3, 0)
    plan.exited("db", 1, 0)
    assert plan.get("db").state is ServiceState.FAILED
    assert plan.decide(100) == []
    assert plan.get("app").state is ServiceState.PENDING
    plan.request_stop()
    plan.decide(101)
    assert plan.phase() is Phase.STOPPED


def test_start_failed_kills_once_and_keeps_the_reason() -> None:
    plan = Plan([Service("db")], CONFIG)
    plan.decide(0)
    plan.spawned("db", 4, 0)
    assert plan.start_failed("db", "after start: migration 001 failed") == [Kill("db")]
    assert plan.start_failed("db", "again") == []
    plan.exited("db", -9, 1)
    assert plan.get("db").state is ServiceState.RESTARTING
    assert plan.get("db").last_error == "again"
