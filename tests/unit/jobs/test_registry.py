"""Tasks by name, their job defaults and argument checks; schedules; the current job."""

from __future__ import annotations

import pytest

from tiers.jobs.errors import CronError, JobArgumentError, UnknownTaskError
from tiers.jobs.registry import JobContext, Registry, current_job, running


def test_a_task_is_registered_by_name_and_stays_callable() -> None:
    registry = Registry()

    @registry.task("mail.send", queue="mail", priority=5, max_attempts=8, timeout=30)
    def send(to: str, subject: str = "") -> str:
        return f"{to}:{subject}"

    assert registry.get("mail.send") is send
    assert send(to="a", subject="b") == "a:b"
    assert (send.queue, send.priority, send.max_attempts, send.timeout) == ("mail", 5, 8, 30)


def test_jobs_take_the_task_defaults_unless_told_otherwise() -> None:
    registry = Registry()

    @registry.task("t", queue="q", priority=2, max_attempts=3)
    def t(x: int) -> None: ...

    job = t.job({"x": 1})
    assert (job.task, job.queue, job.priority, job.max_attempts) == ("t", "q", 2, 3)
    job = t.job({"x": 1}, queue="other", priority=0, max_attempts=1, delay=5, unique_key="k")
    assert (job.queue, job.priority, job.max_attempts, job.delay, job.unique_key) == (
        "other", 0, 1, 5, "k")


def test_arguments_are_checked_against_the_signature_at_enqueue_time() -> None:
    registry = Registry()

    @registry.task("t")
    def t(entry_id: int, *, url: str) -> None: ...

    t.job({"entry_id": 1, "url": "u"})
    with pytest.raises(JobArgumentError, match="task 't' cannot take these args: missing"):
        t.job({"entry_id": 1})
    with pytest.raises(JobArgumentError, match="unexpected keyword argument 'urll'"):
        t.job({"entry_id": 1, "url": "u", "urll": "u"})


def test_names_and_options_are_checked_when_registering() -> None:
    registry = Registry()
    with pytest.raises(JobArgumentError, match="a task name"):
        registry.task("bad name")
    with pytest.raises(JobArgumentError, match="timeout must be a positive number"):
        registry.task("t", timeout=0)
    with pytest.raises(JobArgumentError, match="max_attempts"):
        registry.task("t", max_attempts=0)

    @registry.task("same")
    def first() -> None: ...

    with pytest.raises(JobArgumentError, match="'same' is already registered for"):
        @registry.task("same")
        def second() -> None: ...

    registry.task("same")(first.fn)  # the same function again (a re-import) is fine


def test_an_unknown_task_names_what_is_registered() -> None:
    registry = Registry()
    registry.task("known")(lambda: None)
    with pytest.raises(UnknownTaskError, match=r"no task 'missing' .*\(registered: known;"):
        registry.get("missing")


def test_periodic_schedules_a_task_once_per_name() -> None:
    registry = Registry()

    @registry.periodic("*/5 * * * *", args={"full": True}, timezone="Asia/Tokyo")
    @registry.task("reports.refresh", queue="reports")
    def refresh(full: bool = False) -> None: ...

    schedule = registry.schedules["reports.refresh"]
    assert (schedule.task, schedule.queue, dict(schedule.args), schedule.timezone) == (
        "reports.refresh", "reports", {"full": True}, "Asia/Tokyo")
    assert str(schedule.cron) == "*/5 * * * *"
    with pytest.raises(CronError):
        registry.periodic("61 * * * *")
    with pytest.raises(JobArgumentError, match="unknown timezone 'Mars/Base'"):
        registry.periodic("* * * * *", timezone="Mars/Base")
    with pytest.raises(JobArgumentError, match="cannot take these args"):
        registry.periodic("* * * * *", name="other", args={"nope": 1})(refresh)
    with pytest.raises(JobArgumentError, match="goes above @task"):
        registry.periodic("* * * * *")(refresh.fn)  # type: ignore[arg-type]


def test_current_job_only_inside_a_run() -> None:
    with pytest.raises(LookupError, match="only available inside a task"):
        current_job()
    job = JobContext(id=7, task="t", queue="default", attempt=2, max_attempts=5, worker="w",
                     args={})
    with running(job):
        assert current_job() is job
    with pytest.raises(LookupError):
        current_job()
