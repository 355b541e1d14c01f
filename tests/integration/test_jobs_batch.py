"""Batches split into chunk jobs: made in one transaction, counted exactly by the chunks'
own transactions, completed once (with a completion job), reopened by a retry."""

from __future__ import annotations

import psycopg
import pytest

from tests.integration.jobkit import connect, running_loop, statuses, wait_until
from tiers.jobs import batch, store
from tiers.jobs.errors import JobArgumentError, JobNotFound
from tiers.jobs.registry import Registry, current_job
from tiers.jobs.store import Outcome, Selection


def test_ranges_and_chunks_cover_everything_once() -> None:
    assert list(batch.ranges(0, 25, 10)) == [{"start": 0, "stop": 10}, {"start": 10, "stop": 20},
                                              {"start": 20, "stop": 25}]
    assert list(batch.chunks("abcde", 2)) == [{"items": ["a", "b"]}, {"items": ["c", "d"]},
                                              {"items": ["e"]}]
    assert list(batch.chunks([], 3)) == []
    with pytest.raises(JobArgumentError):
        list(batch.ranges(0, 10, 0))


def test_a_batch_runs_its_chunks_and_completes_once(jobs_dsn: str) -> None:
    registry = Registry()
    covered: list[int] = []
    completed: list[dict[str, int]] = []

    @registry.task("sum.range")
    def sum_range(start: int, stop: int) -> int:
        assert current_job().batch_id is not None
        covered.extend(range(start, stop))
        return sum(range(start, stop))

    @registry.task("sum.done")
    def summed(batch_id: int, label: str) -> None:
        completed.append({"batch_id": batch_id, "label": label})

    with psycopg.connect(jobs_dsn) as conn:  # one transaction: the batch and its chunks
        made = batch.enqueue_batch(conn, sum_range, batch.ranges(0, 1000, 100), name="sums",
                                   on_complete=summed, on_complete_args={"label": "all"})
        assert len(made.job_ids) == 10
    with connect(jobs_dsn) as conn:
        progress = batch.batch_progress(conn, made.id)
        assert (progress.total, progress.done, progress.dead, progress.open) == (10, 0, 0, 10)
        assert not progress.complete
    with running_loop(jobs_dsn, registry):
        wait_until(lambda: bool(completed), 30, "the completion job")
        final = batch.wait_batch(jobs_dsn, made.id, timeout=10)
    assert sorted(covered) == list(range(1000))
    assert (final.done, final.dead, final.open, final.complete, final.succeeded) == (
        10, 0, 0, True, True)
    assert final.finished_at is not None
    assert completed == [{"batch_id": made.id, "label": "all"}]
    with connect(jobs_dsn) as conn:
        listed = batch.list_batches(conn)
    assert [b.id for b in listed] == [made.id] and listed[0].name == "sums"


def test_a_dead_chunk_completes_the_batch_as_failed_and_a_retry_reopens_it(jobs_dsn: str
                                                                            ) -> None:
    with connect(jobs_dsn) as conn:
        made = batch.enqueue_batch(conn, "chunk", [{"n": n} for n in range(3)], max_attempts=1)
        outcomes = iter([Outcome("done"), Outcome("dead", error="bad chunk"), Outcome("done")])
        while (job := store.claim(conn, "w", ["default"], 30)) is not None:
            store.finish(conn, job.id, "w", next(outcomes))
        progress = batch.batch_progress(conn, made.id)
        assert (progress.done, progress.dead, progress.complete, progress.succeeded) == (
            2, 1, True, False)
        dead = [job_id for job_id, status in statuses(jobs_dsn).items() if status == "dead"]
        store.retry_dead(conn, Selection(ids=tuple(dead)))
        reopened = batch.batch_progress(conn, made.id)
        assert (reopened.done, reopened.dead, reopened.open, reopened.complete) == (
            2, 0, 1, False)
        assert reopened.finished_at is None
        job = store.claim(conn, "w", ["default"], 30)
        assert job is not None
        store.finish(conn, job.id, "w", Outcome("done"))
        again = batch.batch_progress(conn, made.id)
        assert again.succeeded and again.finished_at is not None


def test_a_batch_in_a_rolled_back_transaction_leaves_nothing(jobs_dsn: str) -> None:
    with psycopg.connect(jobs_dsn) as conn:
        made = batch.enqueue_batch(conn, "chunk", [{"n": 1}, {"n": 2}])
        conn.rollback()
    with connect(jobs_dsn) as conn:
        with pytest.raises(JobNotFound):
            batch.batch_progress(conn, made.id)
        assert batch.list_batches(conn) == []
    assert statuses(jobs_dsn) == {}


def test_bad_chunks_are_refused_before_anything_is_sent(jobs_dsn: str) -> None:
    with connect(jobs_dsn) as conn:
        with pytest.raises(JobArgumentError, match=r"chunk 1: args\['n'\]"):
            batch.enqueue_batch(conn, "chunk", [{"n": 1}, {"n": {1}}])
        with pytest.raises(JobArgumentError, match="at least one chunk"):
            batch.enqueue_batch(conn, "chunk", [])
    assert statuses(jobs_dsn) == {}
