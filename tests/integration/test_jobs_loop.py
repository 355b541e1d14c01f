"""One worker's loop on a real PostgreSQL, in a thread (the pool's forks are tested apart):
outcomes, retries with backoff, burial, wake-ups by notification and by polling, leases."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from tests.integration.jobkit import connect, job_row, running_loop, statuses, wait_until
from tiers.jobs import store
from tiers.jobs.registry import Registry, current_job
from tiers.jobs.spec import NewJob


def test_jobs_run_with_their_args_and_results_are_stored(jobs_dsn: str) -> None:
    registry = Registry()
    seen: list[tuple[int, int]] = []

    @registry.task("t.double")
    def double(n: int) -> dict[str, int]:
        job = current_job()
        seen.append((n, job.attempt))
        return {"twice": n * 2, "job": job.id}

    with connect(jobs_dsn) as conn:
        ids = store.enqueue_many(conn, [double.job({"n": n}) for n in range(20)])
    with running_loop(jobs_dsn, registry):
        wait_until(lambda: set(statuses(jobs_dsn).values()) == {"done"}, 20, "every job done")
    assert sorted(seen) == [(n, 1) for n in range(20)]
    row = job_row(jobs_dsn, ids[3])
    assert row["result"] == {"twice": 6, "job": ids[3]}
    assert row["worker"] == "test-worker" and row["attempts"] == 1


def test_failures_back_off_and_the_last_one_is_buried_with_its_error(jobs_dsn: str) -> None:
    registry = Registry()
    runs: list[tuple[int, float]] = []

    @registry.task("t.flaky", max_attempts=3, retry_base=0.4, retry_max=10)
    def flaky() -> None:
        runs.append((current_job().attempt, time.monotonic()))
        raise ValueError(f"boom on attempt {current_job().attempt}")

    with connect(jobs_dsn) as conn:
        job_id = flaky.enqueue(conn)
    assert job_id is not None
    with running_loop(jobs_dsn, registry, poll_interval=0.1):
        wait_until(lambda: statuses(jobs_dsn)[job_id] == "dead", 30, "the job buried")
    assert [attempt for attempt, _ in runs] == [1, 2, 3]
    # Each retry waited at least half its backoff: 0.4 * 2**(attempt-1) / 2.
    assert runs[1][1] - runs[0][1] >= 0.2
    assert runs[2][1] - runs[1][1] >= 0.4
    row = job_row(jobs_dsn, job_id)
    assert row["attempts"] == 3 and row["finished_at"] is not None
    assert "ValueError: boom on attempt 3" in row["last_error"]
    assert "Traceback" in row["last_error"]


def test_a_job_that_fails_once_then_succeeds_is_done(jobs_dsn: str) -> None:
    registry = Registry()

    @registry.task("t.second_time", retry_base=0.1)
    def second_time() -> int:
        if current_job().attempt == 1:
            raise RuntimeError("not yet")
        return current_job().attempt

    with connect(jobs_dsn) as conn:
        job_id = second_time.enqueue(conn)
    assert job_id is not None
    with running_loop(jobs_dsn, registry, poll_interval=0.1):
        wait_until(lambda: statuses(jobs_dsn)[job_id] == "done", 20, "the retry to succeed")
    row = job_row(jobs_dsn, job_id)
    assert (row["result"], row["attempts"]) == (2, 2)
    assert "RuntimeError: not yet" in row["last_error"]  # the history stays


def test_an_unknown_task_is_retried_then_buried_naming_it(jobs_dsn: str) -> None:
    registry = Registry()
    with connect(jobs_dsn) as conn:
        job_id = store.enqueue(conn, "nobody.knows", {}, max_attempts=1)
    assert job_id is not None
    with running_loop(jobs_dsn, registry):
        wait_until(lambda: statuses(jobs_dsn)[job_id] == "dead", 20, "the job buried")
    assert "no task 'nobody.knows' is registered" in job_row(jobs_dsn, job_id)["last_error"]


def test_a_notification_wakes_an_idle_worker_before_its_poll(jobs_dsn: str) -> None:
    registry = Registry()
    started: dict[int, float] = {}

    @registry.task("t.mark")
    def mark(n: int) -> None:
        started[n] = time.monotonic()

    # A poll every minute: only the notification can start the job within the test.
    with running_loop(jobs_dsn, registry, poll_interval=60.0), connect(jobs_dsn) as conn:
        time.sleep(0.5)  # idle, waiting
        for n in range(3):
            mark.enqueue(conn, {"n": n})
            wait_until(lambda n=n: n in started, 10, f"job {n} to start")  # type: ignore[misc]


def test_a_missed_notification_still_gets_the_job_run_by_polling(jobs_dsn: str,
                                                                 postgres_admin_dsn: str
                                                                 ) -> None:
    registry = Registry()
    done = threading.Event()

    @registry.task("t.quiet")
    def quiet() -> None:
        done.set()

    with running_loop(jobs_dsn, registry, poll_interval=0.3):
        time.sleep(0.5)
        # Triggers off for this session (as for a replica applying changes): the job
        # arrives without its NOTIFY.
        with psycopg.connect(jobs_dsn, autocommit=True) as conn:
            conn.execute("SET session_replication_role = replica")
            conn.execute("INSERT INTO tiers_jobs (queue, task) VALUES ('default', 't.quiet')")
        assert done.wait(10), "the poll did not find the job"


def test_a_listener_that_reconnects_misses_nothing(jobs_dsn: str) -> None:
    registry = Registry()
    runs: list[int] = []

    @registry.task("t.count")
    def count(n: int) -> None:
        runs.append(n)

    with running_loop(jobs_dsn, registry, poll_interval=0.3,
                      worker_id="reconnecting") as loop, connect(jobs_dsn) as admin:
        count.enqueue(admin, {"n": 1})
        wait_until(lambda: runs == [1], 10, "the first job")
        # The server drops the worker's connection (a restart, a failover, a network cut),
        # and a job is enqueued while it is gone: its notification goes nowhere.
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                      " WHERE application_name LIKE '%reconnecting%'")
        count.enqueue(admin, {"n": 2})
        wait_until(lambda: runs == [1, 2], 15, "the job enqueued while disconnected")
        count.enqueue(admin, {"n": 3})
        wait_until(lambda: runs == [1, 2, 3], 10, "a job after the reconnection")
        assert not loop.stopping


def test_heartbeats_keep_a_long_job_while_another_worker_sweeps(jobs_dsn: str) -> None:
    registry = Registry()
    runs: list[str] = []

    @registry.task("t.long")
    def long_job() -> None:
        runs.append(current_job().worker)
        time.sleep(3.5)  # longer than the lease: only heartbeats keep it

    with connect(jobs_dsn) as conn:
        job_id = long_job.enqueue(conn)
    assert job_id is not None
    with running_loop(jobs_dsn, registry, worker_id="holder", lease=1.5):
        wait_until(lambda: runs == ["holder"], 10, "the job to start")
        # A second worker sweeps expired leases every poll while the first holds the job.
        with running_loop(jobs_dsn, registry, worker_id="sweeper", lease=1.5,
                          poll_interval=0.2):
            wait_until(lambda: statuses(jobs_dsn)[job_id] == "done", 20, "the job done")
    assert runs == ["holder"]


def test_a_job_whose_worker_vanished_is_taken_again_when_its_lease_expires(jobs_dsn: str
                                                                          ) -> None:
    registry = Registry()
    runs: list[tuple[str, int]] = []

    @registry.task("t.once_more")
    def once_more() -> None:
        runs.append((current_job().worker, current_job().attempt))

    with connect(jobs_dsn) as conn:
        job_id = once_more.enqueue(conn)
        assert job_id is not None
        # A worker claims it and is never heard of again (no heartbeat, no outcome).
        assert store.claim(conn, "vanished", ["default"], 1.0) is not None
    with running_loop(jobs_dsn, registry, worker_id="survivor", poll_interval=0.2):
        wait_until(lambda: statuses(jobs_dsn)[job_id] == "done", 15, "the job done")
    assert runs == [("survivor", 2)]
    assert "the lease of worker vanished expired" in job_row(jobs_dsn, job_id)["last_error"]


def test_delayed_jobs_start_when_due_without_waiting_for_a_poll(jobs_dsn: str) -> None:
    registry = Registry()
    started: list[datetime] = []

    @registry.task("t.later")
    def later() -> None:
        started.append(datetime.now(UTC))

    with running_loop(jobs_dsn, registry, poll_interval=30.0), connect(jobs_dsn) as conn:
        time.sleep(0.3)
        job_id = later.enqueue(conn, delay=1.0)
        assert job_id is not None
        due = job_row(jobs_dsn, job_id)["run_at"]
        wait_until(lambda: bool(started), 10, "the delayed job")
    assert started[0] >= due - timedelta(milliseconds=50)


def test_max_jobs_ends_the_loop_after_that_many(jobs_dsn: str) -> None:
    registry = Registry()
    registry.task("t.noop")(lambda: None)
    with connect(jobs_dsn) as conn:
        store.enqueue_many(conn, [NewJob("t.noop") for _ in range(10)])
    from tiers.jobs.child import EXIT_OK, ChildLoop
    from tiers.jobs.options import WorkerOptions

    loop = ChildLoop(WorkerOptions(dsn=jobs_dsn, poll_interval=0.2), "w", registry=registry,
                     max_jobs=4)
    result: list[Any] = []
    thread = threading.Thread(target=lambda: result.append(loop.run()))
    thread.start()
    thread.join(30)
    assert result == [EXIT_OK] and loop.jobs_done == 4
    assert sorted(statuses(jobs_dsn).values()) == ["done"] * 4 + ["pending"] * 6


def test_a_stop_after_the_next_claim_hands_that_job_back(jobs_dsn: str,
                                                         monkeypatch: Any) -> None:
    from tiers.jobs import child

    registry = Registry()
    ran: list[int] = []

    @registry.task("t.n")
    def n(i: int) -> None:
        ran.append(i)

    loops: list[child.ChildLoop] = []

    def claim_then_stop(conn: Any, **kwargs: Any) -> Any:
        # The stop arrives just as the outcome is recorded and the next job claimed.
        claimed = store.finish_and_claim(conn, kwargs.pop("job_id"), kwargs.pop("worker"),
                                         kwargs.pop("outcome"), **kwargs)
        loops[0].request_stop()
        return claimed

    monkeypatch.setattr(child, "_finish_and_claim", claim_then_stop)
    with running_loop(jobs_dsn, registry, poll_interval=60) as loop:
        loops.append(loop)
        with connect(jobs_dsn) as conn:  # once the loop is known to the patch
            first, second = store.enqueue_many(conn, [n.job({"i": 1}), n.job({"i": 2})])
        wait_until(lambda: loop.jobs_done == 1 and statuses(jobs_dsn)[second] == "pending"
                   and statuses(jobs_dsn)[first] == "done", 10, "the second job handed back")
    assert ran == [1]
    row = job_row(jobs_dsn, second)
    assert (row["attempts"], row["worker"]) == (0, None)
