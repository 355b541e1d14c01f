"""Tasks by name, and the cron schedules that enqueue them.

A task is a plain function registered under a stable name; jobs name their
task, so the function can move between modules without stranding jobs::

    from tiers.jobs import task, periodic, current_job

    @task("mail.send_welcome", queue="mail", max_attempts=8, timeout=30)
    def send_welcome(user_id: int) -> None:
        job = current_job()          # id, attempt (1 on the first run), max_attempts, ...
        ...

    @periodic("*/5 * * * *")         # every 5 minutes, enqueued once per tick
    @task("reports.refresh")
    def refresh() -> dict[str, int]:
        return {"rows": 12}          # a JSON result is stored with the job

    send_welcome.enqueue(conn, {"user_id": 7})          # in the caller's transaction
    send_welcome(user_id=7)                             # or call it directly

A job's arguments are the task's keyword arguments, a JSON object; a task's
:meth:`Task.enqueue` also checks them against the function's signature, so a
missing or misspelt argument fails at enqueue time. Delivery is at least once
(see :mod:`tiers.jobs`): a task may run again after a crash, so it should be
idempotent; ``current_job().attempt`` and ``.id`` help it be.

Workers import the modules that register tasks (``--import``); a job whose
task is not registered in the worker fails (and is retried, then buried)
with an error naming the task. :data:`REGISTRY` is the process's registry;
tests make their own :class:`Registry`.
"""

from __future__ import annotations

import contextvars
import inspect
import math
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

import psycopg

from tiers.jobs.cron import CronExpression
from tiers.jobs.errors import JobArgumentError, UnknownTaskError
from tiers.jobs.spec import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_PRIORITY,
    DEFAULT_QUEUE,
    NewJob,
    check_queue_name,
    check_task_name,
)

F = TypeVar("F", bound=Callable[..., Any])

# Retry backoff: base * 2**(attempt - 1), at most the cap, with jitter (see tiers.jobs.outcome).
DEFAULT_RETRY_BASE = 1.0
DEFAULT_RETRY_MAX = 300.0


@dataclass(frozen=True)
class JobContext:
    """What a running task may know of its job (``current_job()``).

    ``attempt`` is 1 on the first run and counts every claim, including runs
    cut short by a crash, so ``attempt > 1`` means the task may have run
    (partly) before.
    """

    id: int
    task: str
    queue: str
    attempt: int
    max_attempts: int
    worker: str
    args: Mapping[str, Any]
    batch_id: int | None = None
    unique_key: str | None = None
    run_at: datetime | None = None


_CURRENT: contextvars.ContextVar[JobContext | None] = contextvars.ContextVar(
    "tiers_current_job", default=None)


def current_job() -> JobContext:
    """The job the calling task runs for; LookupError outside a task run by a worker."""
    job = _CURRENT.get()
    if job is None:
        raise LookupError("current_job() is only available inside a task run by a worker")
    return job


@contextmanager
def running(job: JobContext) -> Iterator[None]:
    """Make ``job`` the current job while the block runs (the worker's, and tests')."""
    token = _CURRENT.set(job)
    try:
        yield
    finally:
        _CURRENT.reset(token)


@dataclass(frozen=True)
class Task:
    """A function registered under ``name`` with the defaults of its jobs.

    ``timeout`` (seconds, None for the worker's default): a run longer than
    this gets its worker process killed and the job retried. ``retry_base``
    and ``retry_max`` shape the backoff between failed attempts.
    """

    name: str
    fn: Callable[..., Any]
    queue: str = DEFAULT_QUEUE
    priority: int = DEFAULT_PRIORITY
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    timeout: float | None = None
    retry_base: float = DEFAULT_RETRY_BASE
    retry_max: float = DEFAULT_RETRY_MAX

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def check_args(self, args: Mapping[str, Any]) -> None:
        """JobArgumentError if the function cannot be called with ``args`` as keywords."""
        try:
            signature = inspect.signature(self.fn)
        except (TypeError, ValueError):
            return  # a builtin without a signature: the worker will tell
        try:
            signature.bind(**args)
        except TypeError as exc:
            raise JobArgumentError(f"task {self.name!r} cannot take these args: {exc}") from None

    def job(self, args: Mapping[str, Any] | None = None, *, queue: str | None = None,
            priority: int | None = None, run_at: datetime | None = None,
            delay: float | None = None, unique_key: str | None = None,
            max_attempts: int | None = None) -> NewJob:
        """A NewJob of this task (for ``enqueue_many``), with the task's defaults filled in."""
        values = dict(args or {})
        self.check_args(values)
        return NewJob(
            task=self.name, args=values,
            queue=self.queue if queue is None else queue,
            priority=self.priority if priority is None else priority,
            run_at=run_at, delay=delay, unique_key=unique_key,
            max_attempts=self.max_attempts if max_attempts is None else max_attempts)

    def enqueue(self, conn: psycopg.Connection[Any], args: Mapping[str, Any] | None = None, *,
                queue: str | None = None, priority: int | None = None,
                run_at: datetime | None = None, delay: float | None = None,
                unique_key: str | None = None, max_attempts: int | None = None) -> int | None:
        """Enqueue a job of this task on ``conn``; see :func:`tiers.jobs.store.enqueue`."""
        from tiers.jobs.store import enqueue_job

        return enqueue_job(conn, self.job(args, queue=queue, priority=priority, run_at=run_at,
                                          delay=delay, unique_key=unique_key,
                                          max_attempts=max_attempts))


@dataclass(frozen=True)
class Schedule:
    """Enqueue ``task`` with ``args`` at every time ``cron`` names (in ``timezone``).

    ``name`` identifies the schedule's ticks in the database (default: the
    task's name): schedulers that share a name share ticks, and each tick is
    enqueued once among them.
    """

    name: str
    cron: CronExpression
    task: str
    args: Mapping[str, Any] = field(default_factory=dict)
    queue: str = DEFAULT_QUEUE
    priority: int = DEFAULT_PRIORITY
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    timezone: str = "UTC"


class Registry:
    """Tasks and schedules by name."""

    def __init__(self) -> None:
        self.tasks: dict[str, Task] = {}
        self.schedules: dict[str, Schedule] = {}

    def task(self, name: str, *, queue: str = DEFAULT_QUEUE, priority: int = DEFAULT_PRIORITY,
             max_attempts: int = DEFAULT_MAX_ATTEMPTS, timeout: float | None = None,
             retry_base: float = DEFAULT_RETRY_BASE,
             retry_max: float = DEFAULT_RETRY_MAX) -> Callable[[Callable[..., Any]], Task]:
        """Register the decorated function as task ``name``; the decorator returns the Task.

        Raises JobArgumentError for a bad name or option, or a name already
        taken by another function (registering the same function again, as
        a re-import does, is allowed).
        """
        check_task_name(name)
        check_queue_name(queue)
        NewJob(task=name, queue=queue, priority=priority, max_attempts=max_attempts).checked()
        for label, value in (("timeout", timeout), ("retry_base", retry_base),
                             ("retry_max", retry_max)):
            if value is not None and (isinstance(value, bool)
                                      or not isinstance(value, int | float)
                                      or not math.isfinite(value) or value <= 0):
                raise JobArgumentError(f"task {name!r}: {label} must be a positive number of "
                                       f"seconds, got {value!r}")

        def register(fn: Callable[..., Any]) -> Task:
            if not callable(fn):
                raise JobArgumentError(f"task {name!r}: @task decorates a function, "
                                       f"got {fn!r}")
            known = self.tasks.get(name)
            if known is not None and _origin(known.fn) != _origin(fn):
                raise JobArgumentError(f"task name {name!r} is already registered for "
                                       f"{_origin(known.fn)}")
            registered = Task(name=name, fn=fn, queue=queue, priority=priority,
                              max_attempts=max_attempts, timeout=timeout,
                              retry_base=float(retry_base), retry_max=float(retry_max))
            self.tasks[name] = registered
            return registered

        return register

    def periodic(self, cron: str, *, name: str | None = None,
                 args: Mapping[str, Any] | None = None,
                 timezone: str = "UTC") -> Callable[[Task], Task]:
        """Schedule the decorated Task (put it above ``@task``) on ``cron``.

        CronError for a bad expression, JobArgumentError for bad args, an
        unknown timezone or a schedule name already in use.
        """
        expression = CronExpression.parse(cron)
        _check_timezone(timezone)

        def register(registered: Task) -> Task:
            if not isinstance(registered, Task):
                raise JobArgumentError("@periodic goes above @task: it schedules a Task")
            values = dict(args or {})
            job = registered.job(values)
            job.checked()
            schedule = Schedule(name=name or registered.name, cron=expression,
                                task=registered.name, args=values, queue=job.queue,
                                priority=job.priority, max_attempts=job.max_attempts,
                                timezone=timezone)
            known = self.schedules.get(schedule.name)
            if known is not None and known != schedule:
                raise JobArgumentError(f"schedule name {schedule.name!r} is already in use")
            self.schedules[schedule.name] = schedule
            return registered

        return register

    def get(self, name: str) -> Task:
        """The task named ``name``; UnknownTaskError (listing what is registered) if none."""
        try:
            return self.tasks[name]
        except KeyError:
            known = ", ".join(sorted(self.tasks)) or "none"
            raise UnknownTaskError(f"no task {name!r} is registered in this worker "
                                   f"(registered: {known}; is its module imported?)") from None


def _origin(fn: Callable[..., Any]) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}"


def _check_timezone(name: str) -> None:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise JobArgumentError(f"unknown timezone {name!r} (an IANA name such as "
                               f"'Asia/Tokyo' or 'UTC')") from None


REGISTRY = Registry()
task = REGISTRY.task
periodic = REGISTRY.periodic
