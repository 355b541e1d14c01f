"""The job queue's SQL on a real PostgreSQL: transactional enqueue, unique keys, claims in
order, leases, outcomes, administration, and the schema install."""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta

import psycopg
import pytest

from tests.integration.jobkit import connect, job_row, statuses
from tiers.jobs import store
from tiers.jobs.errors import JobArgumentError, JobNotFound, JobStoreError
from tiers.jobs.registry import Registry
from tiers.jobs.spec import NewJob
from tiers.jobs.store import Outcome, Selection


def test_a_job_exists_only_if_the_enqueueing_transaction_commits(jobs_dsn: str) -> None:
    with psycopg.connect(jobs_dsn) as conn:  # not autocommit: one transaction
        conn.execute("CREATE TABLE orders (id int)")
        conn.commit()
        conn.execute("INSERT INTO orders VALUES (1)")
        rolled_back = store.enqueue(conn, "orders.confirm", {"order_id": 1})
        assert rolled_back is not None
        conn.rollback()
        conn.execute("INSERT INTO orders VALUES (2)")
        kept = store.enqueue(conn, "orders.confirm", {"order_id": 2})
        # Not visible to anyone else before the commit.
        assert statuses(jobs_dsn) == {}
        conn.commit()
    assert statuses(jobs_dsn) == {kept: "pending"}
    assert job_row(jobs_dsn, kept)["args"] == {"order_id": 2}


def test_inside_a_transaction_block_and_on_autocommit(jobs_dsn: str) -> None:
    with connect(jobs_dsn) as conn:
        with pytest.raises(RuntimeError), conn.transaction():
            store.enqueue(conn, "t", {})
            raise RuntimeError("the caller's transaction fails")
        committed = store.enqueue(conn, "t", {})  # autocommit: at once
    assert statuses(jobs_dsn) == {committed: "pending"}


def test_an_unserialisable_argument_fails_before_anything_is_sent(jobs_dsn: str) -> None:
    with psycopg.connect(jobs_dsn) as conn:
        conn.execute("SELECT 1")
        with pytest.raises(JobArgumentError, match=r"args\['when'\]: a datetime"):
            store.enqueue(conn, "t", {"when": datetime.now(UTC)})
        # The caller's transaction is intact and can go on.
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        store.enqueue(conn, "t", {"when": datetime.now(UTC).isoformat()})
        conn.commit()
    assert len(statuses(jobs_dsn)) == 1


def test_a_missing_schema_says_how_to_install_it(fresh_database: str) -> None:
    with connect(fresh_database) as conn, pytest.raises(JobStoreError,
                                                        match="install_schema"):
        store.enqueue(conn, "t", {})


def test_the_schema_installs_once_and_concurrently(fresh_database: str) -> None:
    results: list[bool] = []
    threads = [threading.Thread(target=lambda: results.append(
        store.install_schema(fresh_database))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(results) == [False, False, False, True]
    assert store.install_schema(fresh_database) is False
    with connect(fresh_database) as conn:
        assert store.install_schema(conn) is False


def test_unique_keys_allow_one_pending_or_running_job(jobs_dsn: str) -> None:
    with connect(jobs_dsn) as conn:
        first = store.enqueue(conn, "t", {}, unique_key="k")
        assert first is not None
        assert store.enqueue(conn, "t", {"other": 1}, unique_key="k") is None
        assert store.enqueue(conn, "t", {}, unique_key="other") is not None
        claimed = store.claim(conn, "w", ["default"], 30)
        assert claimed is not None and claimed.id == first
        assert store.enqueue(conn, "t", {}, unique_key="k") is None  # running holds it too
        store.finish(conn, first, "w", Outcome("done"))
        again = store.enqueue(conn, "t", {}, unique_key="k")  # done no longer holds it
        assert again is not None and again != first
        added = store.enqueue_many(conn, [NewJob("t", unique_key="k"),
                                          NewJob("t", unique_key="new"),
                                          NewJob("t", unique_key="new"), NewJob("t")])
        assert len(added) == 2  # "k" is held, the second "new" repeats the first


def test_bulk_enqueue_validates_everything_first(jobs_dsn: str) -> None:
    with connect(jobs_dsn) as conn:
        with pytest.raises(JobArgumentError, match=r"job 2 \('t'\): args\['x'\]"):
            store.enqueue_many(conn, [NewJob("t"), NewJob("t"), NewJob("t", {"x": {1}})])
        assert statuses(jobs_dsn) == {}
        assert store.enqueue_many(conn, []) == []
        ids = store.enqueue_many(conn, [NewJob("t", {"n": n}, delay=n % 2 * 60)
                                        for n in range(100)])
    assert len(ids) == 100 and len(set(ids)) == 100
    stats = {s.queue: s for s in store.queue_stats(connect(jobs_dsn))}
    assert (stats["default"].ready, stats["default"].scheduled) == (50, 50)


def test_claims_follow_queue_order_then_priority_then_time(jobs_dsn: str) -> None:
    past = datetime.now(UTC) - timedelta(minutes=5)
    with connect(jobs_dsn) as conn:
        low_old = store.enqueue(conn, "t", {}, priority=0, run_at=past)
        high = store.enqueue(conn, "t", {}, priority=10)
        low_new = store.enqueue(conn, "t", {}, priority=0)
        urgent = store.enqueue(conn, "t", {}, queue="urgent", priority=-5)
        later = store.enqueue(conn, "t", {}, priority=100, delay=3600)
        order = []
        while (job := store.claim(conn, "w", ["urgent", "default"], 30)) is not None:
            order.append(job.id)
    assert order == [urgent, high, low_old, low_new]
    assert later not in order
    assert statuses(jobs_dsn)[later] == "pending"


def test_concurrent_claimers_never_take_the_same_job(jobs_dsn: str) -> None:
    with connect(jobs_dsn) as conn:
        store.enqueue_many(conn, [NewJob("t", {"n": n}) for n in range(300)])
    taken: list[list[int]] = [[], [], []]

    def claimer(index: int) -> None:
        with connect(jobs_dsn) as conn:
            while (job := store.claim(conn, f"w{index}", ["default"], 30)) is not None:
                taken[index].append(job.id)

    threads = [threading.Thread(target=claimer, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    every = [job_id for ids in taken for job_id in ids]
    assert len(every) == 300 and len(set(every)) == 300


def test_a_claim_counts_the_attempt_and_holds_a_lease(jobs_dsn: str) -> None:
    with connect(jobs_dsn) as conn:
        job_id = store.enqueue(conn, "t", {"a": [1, "two"]}, max_attempts=3)
        assert job_id is not None
        job = store.claim(conn, "worker-1", ["default"], 30)
        assert job is not None
        assert (job.id, job.attempt, job.max_attempts, job.args) == (job_id, 1, 3,
                                                                     {"a": [1, "two"]})
        row = job_row(jobs_dsn, job_id)
        assert row["status"] == "running" and row["worker"] == "worker-1"
        assert timedelta(seconds=25) < row["lease_until"] - row["started_at"] <= timedelta(
            seconds=30)
        assert store.renew_lease(conn, job_id, "worker-1", 120)
        assert not store.renew_lease(conn, job_id, "someone-else", 120)


def test_outcomes_done_retry_dead_and_only_for_the_holder(jobs_dsn: str) -> None:
    with connect(jobs_dsn) as conn:
        job_id = store.enqueue(conn, "t", {}, max_attempts=2)
        assert job_id is not None
        store.claim(conn, "w", ["default"], 30)
        assert not store.finish(conn, job_id, "intruder", Outcome("done"))
        assert store.finish(conn, job_id, "w", Outcome("pending", error="boom", delay=3600))
        row = job_row(jobs_dsn, job_id)
        assert (row["status"], row["last_error"], row["attempts"]) == ("pending", "boom", 1)
        assert row["run_at"] > datetime.now(UTC) + timedelta(minutes=59)
        assert store.claim(conn, "w", ["default"], 30) is None  # not due yet
        conn.execute("UPDATE tiers_jobs SET run_at = now() WHERE id = %s", (job_id,))
        again = store.claim(conn, "w", ["default"], 30)
        assert again is not None and again.attempt == 2
        assert store.finish(conn, job_id, "w", Outcome("dead", error="for good"))
        row = job_row(jobs_dsn, job_id)
        assert (row["status"], row["last_error"]) == ("dead", "for good")
        assert row["finished_at"] is not None
        other = store.enqueue(conn, "t", {})
        assert other is not None
        store.claim(conn, "w", ["default"], 30)
        store.finish(conn, other, "w", Outcome("done", result='{"n": 1}'))
        assert job_row(jobs_dsn, other)["result"] == {"n": 1}


def test_finish_and_claim_is_one_step(jobs_dsn: str) -> None:
    with connect(jobs_dsn) as conn:
        first, second = store.enqueue_many(conn, [NewJob("t"), NewJob("t")])
        job = store.claim(conn, "w", ["default"], 30)
        assert job is not None and job.id == first
        following = store.finish_and_claim(conn, first, "w", Outcome("done"),
                                           queues=["default"], lease=30)
        assert following is not None and following.id == second
        assert store.finish_and_claim(conn, second, "w", Outcome("done"), queues=["default"],
                                      lease=30) is None
    assert statuses(jobs_dsn) == {first: "done", second: "done"}


def test_a_dead_workers_jobs_and_expired_leases_are_released(jobs_dsn: str) -> None:
    with connect(jobs_dsn) as conn:
        a, b, c = store.enqueue_many(conn, [NewJob("t"), NewJob("t"),
                                            NewJob("t", max_attempts=1)])
        store.claim(conn, "dead-worker", ["default"], 30)
        store.claim(conn, "slow-worker", ["default"], 30)
        store.claim(conn, "slow-worker", ["default"], 30)
        released = store.release_worker(conn, "dead-worker", "worker dead-worker died")
        assert released == [(a, "pending")]
        row = job_row(jobs_dsn, a)
        assert row["last_error"] == "worker dead-worker died (attempt 1 of 5)"
        assert store.release_expired(conn) == []  # b and c hold live leases
        conn.execute("UPDATE tiers_jobs SET lease_until = now() - interval '1 second'"
                     " WHERE worker = 'slow-worker'")
        assert sorted(store.release_expired(conn)) == [(b, "pending"), (c, "dead")]
        assert "the lease of worker slow-worker expired" in job_row(jobs_dsn, c)["last_error"]
        retried = store.claim(conn, "w", ["default"], 30)
        assert retried is not None and retried.id == a and retried.attempt == 2


def test_next_due_and_prune(jobs_dsn: str) -> None:
    with connect(jobs_dsn) as conn:
        assert store.next_due(conn, ["default"]) is None
        job_id = store.enqueue(conn, "t", {}, delay=30)
        assert job_id is not None
        due = store.next_due(conn, ["default"])
        assert due is not None and 25 < due <= 30
        assert store.next_due(conn, ["other"]) is None
        conn.execute("UPDATE tiers_jobs SET run_at = now()")
        store.claim(conn, "w", ["default"], 30)
        store.finish(conn, job_id, "w", Outcome("done"))
        assert store.prune_done(conn, 3600) == 0
        conn.execute("UPDATE tiers_jobs SET finished_at = now() - interval '2 hours'")
        assert store.prune_done(conn, 3600) == 1
    assert statuses(jobs_dsn) == {}


def test_retry_and_delete_dead_jobs(jobs_dsn: str) -> None:
    with connect(jobs_dsn) as conn:
        ids = store.enqueue_many(conn, [NewJob("t", unique_key=f"u{n}", max_attempts=1,
                                               queue="q" if n < 3 else "r") for n in range(5)])
        while (job := store.claim(conn, "w", ["q", "r"], 30)) is not None:
            store.finish(conn, job.id, "w", Outcome("dead", error="x"))
        pending = store.enqueue(conn, "t", {}, unique_key="u1")  # the key is free again
        with pytest.raises(JobNotFound, match=rf"{ids[1]} \(its unique key is held"):
            store.retry_dead(conn, Selection(ids=(ids[0], ids[1])))
        assert statuses(jobs_dsn)[ids[0]] == "dead"  # nothing changed
        with pytest.raises(JobNotFound, match=rf"{pending} \(it is pending, not dead\)"):
            store.delete_dead(conn, Selection(ids=(pending,)))
        with pytest.raises(JobNotFound, match=r"99999 \(no such job"):
            store.retry_dead(conn, Selection(ids=(99999,)))
        with pytest.raises(JobArgumentError):
            store.retry_dead(conn, Selection())
        assert store.retry_dead(conn, Selection(ids=(ids[0],))) == [ids[0]]
        row = job_row(jobs_dsn, ids[0])
        assert (row["status"], row["attempts"]) == ("pending", 0)
        # --all skips the dead job whose key is held, and narrows by queue.
        assert store.retry_dead(conn, Selection(all=True, queue="q")) == [ids[2]]
        assert store.delete_dead(conn, Selection(all=True, queue="r")) == [ids[3], ids[4]]
        dead = store.list_jobs(conn)
        assert [j.id for j in dead] == [ids[1]]
        assert dead[0].last_error == "x"
        everything = store.list_jobs(conn, status=None, limit=2)
        assert [j.id for j in everything] == sorted(statuses(jobs_dsn), reverse=True)[:2]
        with pytest.raises(JobArgumentError, match="status must be one of"):
            store.list_jobs(conn, status="lost")
        assert store.get_job(conn, ids[1]).status == "dead"
        with pytest.raises(JobNotFound):
            store.get_job(conn, 424242)


def test_queue_depth_and_the_age_of_the_oldest_ready_job(jobs_dsn: str) -> None:
    with connect(jobs_dsn) as conn:
        store.enqueue(conn, "t", {}, queue="mail", run_at=datetime.now(UTC) - timedelta(
            seconds=90))
        store.enqueue(conn, "t", {}, queue="mail")
        store.enqueue(conn, "t", {}, queue="mail", delay=600)
        store.enqueue(conn, "t", {}, queue="reports")
        store.claim(conn, "w", ["reports"], 30)
        stats = {s.queue: s for s in store.queue_stats(conn)}
    mail, reports = stats["mail"], stats["reports"]
    assert (mail.ready, mail.scheduled, mail.running, mail.dead) == (2, 1, 0, 0)
    assert mail.oldest_ready_age is not None and 89 < mail.oldest_ready_age < 120
    assert (reports.ready, reports.running, reports.oldest_ready_age) == (0, 1, None)


def test_notifications_are_sent_at_commit_and_not_on_rollback(jobs_dsn: str) -> None:
    with connect(jobs_dsn) as listener, psycopg.connect(jobs_dsn) as writer:
        listener.execute(f"LISTEN {store.NOTIFY_CHANNEL}")
        store.enqueue(writer, "t", {}, queue="mail")
        writer.rollback()
        assert list(listener.notifies(timeout=0.3)) == []
        store.enqueue_many(writer, [NewJob("t", queue="mail"), NewJob("t", queue="mail"),
                                    NewJob("t", queue="reports")])
        writer.commit()
        got = sorted(n.payload for n in listener.notifies(timeout=1.0, stop_after=2))
    assert got == ["mail", "reports"]  # one per queue, however many jobs


def test_a_task_enqueues_with_its_defaults(jobs_dsn: str) -> None:
    registry = Registry()

    @registry.task("mail.send", queue="mail", priority=3, max_attempts=7)
    def send(to: str) -> None: ...

    with connect(jobs_dsn) as conn:
        job_id = send.enqueue(conn, {"to": "a@example.com"})
        with pytest.raises(JobArgumentError, match="missing a required argument: 'to'"):
            send.enqueue(conn, {})
        by_name = store.enqueue(conn, send, {"to": "b"}, priority=9)
    assert job_id is not None and by_name is not None
    row = job_row(jobs_dsn, job_id)
    assert (row["task"], row["queue"], row["priority"], row["max_attempts"]) == (
        "mail.send", "mail", 3, 7)
    assert job_row(jobs_dsn, by_name)["priority"] == 9


def test_a_job_claimed_but_not_started_is_handed_back_without_an_attempt(jobs_dsn: str
                                                                        ) -> None:
    with connect(jobs_dsn) as conn:
        job_id = store.enqueue(conn, "t", {})
        assert job_id is not None
        assert store.claim(conn, "w", ["default"], 30) is not None
        assert not store.unclaim(conn, job_id, "someone-else")
        assert store.unclaim(conn, job_id, "w")
        row = job_row(jobs_dsn, job_id)
        assert (row["status"], row["attempts"], row["worker"]) == ("pending", 0, None)
        again = store.claim(conn, "w2", ["default"], 30)
        assert again is not None and again.attempt == 1
