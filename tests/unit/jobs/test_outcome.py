"""Retry rules: exponential backoff with equal jitter, burial on the last attempt."""

from __future__ import annotations

from tiers.jobs.outcome import after_failure, after_success, backoff_delay, describe
from tiers.jobs.store import ClaimedJob


def job(attempt: int, max_attempts: int = 5) -> ClaimedJob:
    return ClaimedJob(id=1, queue="default", task="t", args={}, attempt=attempt,
                      max_attempts=max_attempts, batch_id=None, unique_key=None, run_at=None)


def test_backoff_doubles_keeps_at_least_half_and_stops_at_the_cap() -> None:
    assert [backoff_delay(a, 1.0, 300.0, lambda: 0.0) for a in (1, 2, 3, 4)] == [
        0.5, 1.0, 2.0, 4.0]
    assert [backoff_delay(a, 1.0, 300.0, lambda: 1.0) for a in (1, 2, 3, 4)] == [
        1.0, 2.0, 4.0, 8.0]
    assert backoff_delay(20, 1.0, 300.0, lambda: 1.0) == 300.0
    assert backoff_delay(1000, 1.0, 300.0, lambda: 0.0) == 150.0  # no overflow
    assert backoff_delay(3, 0.1, 300.0, lambda: 0.5) == 0.1 * 4 * 0.75


def test_a_failure_is_retried_while_attempts_remain_then_buried() -> None:
    first = after_failure(job(1, 3), "ValueError: boom", rand=lambda: 1.0)
    assert (first.status, first.error, first.delay) == ("pending", "ValueError: boom", 1.0)
    second = after_failure(job(2, 3), "again", base=10, cap=15, rand=lambda: 1.0)
    assert (second.status, second.delay) == ("pending", 15.0)
    last = after_failure(job(3, 3), "for good")
    assert (last.status, last.error) == ("dead", "for good")


def test_success_stores_a_json_result_and_notes_one_that_is_not() -> None:
    assert after_success({"n": 1}).result == '{"n":1}'
    done = after_success(None)
    assert (done.status, done.result, done.error) == ("done", None, None)
    odd = after_success(object())
    assert odd.status == "done" and odd.result is None
    assert odd.error is not None and "result was not stored" in odd.error


def test_describe_keeps_the_end_of_the_traceback() -> None:
    try:
        raise ValueError("x" * 20000)
    except ValueError as exc:
        text = describe(exc)
    assert text.startswith("...") and len(text) == 8000
    assert text.rstrip().endswith("x")
