"""The job queue in PostgreSQL: install the schema, enqueue, claim, finish, administer.

Every function takes a psycopg connection and runs the named statements of
``queries.sql`` on it; none opens, commits or closes the caller's
connection, except :func:`install_schema` with a DSN.

Enqueueing is transactional: :func:`enqueue` runs one INSERT on the
caller's connection, so inside the caller's transaction the job exists if
and only if that transaction commits (and workers are woken at the commit,
by a trigger's NOTIFY). On an autocommit connection the job is committed at
once::

    with cluster.write() as conn:                 # or psycopg.connect(...) and conn.transaction()
        conn.execute("INSERT INTO orders ...")
        enqueue(conn, "orders.confirm", {"order_id": 42}, unique_key="confirm:42")

Arguments are validated before anything is sent (:mod:`tiers.jobs.spec`):
an unserialisable argument raises JobArgumentError and leaves the caller's
transaction untouched. Database errors inside the caller's transaction are
the caller's psycopg errors, except a missing schema, which raises
JobStoreError saying how to install it. The administrative functions raise
JobStoreError for database failures and JobNotFound for missing jobs.

Claiming (for workers) takes the first due job of the worker's queues with
``FOR UPDATE SKIP LOCKED``, highest priority first, then earliest ``run_at``,
marks it running under a lease, and counts the attempt; finishing a job and
claiming the next one is a single statement.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.rows import tuple_row

from tiers.jobs.errors import JobArgumentError, JobNotFound, JobStoreError
from tiers.jobs.spec import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_PRIORITY,
    DEFAULT_QUEUE,
    CheckedJob,
    NewJob,
)
from tiers.jobs.sql import query, schema

Connection = psycopg.Connection[Any]

# Serialises concurrent installs: "tjobs" in ASCII, as a bigint.
SCHEMA_LOCK_KEY = 0x746A6F6273
NOTIFY_CHANNEL = "tiers_jobs"
STATUSES = ("pending", "running", "done", "dead")


# ---- schema -------------------------------------------------------------------------


def schema_version() -> str:
    """A digest of the schema script: an install is skipped when the database has it."""
    return hashlib.sha256(schema().encode("utf-8")).hexdigest()[:16]


def install_schema(target: str | Connection) -> bool:
    """Create or update the job queue's tables, indexes and triggers; True if it ran the DDL.

    ``target`` is a DSN (connected and closed here) or an open connection
    (used in a transaction of its own). Idempotent and safe to run
    concurrently: an advisory lock orders installers, and a database that
    already has this version of the schema is left alone (no DDL, no locks
    on the jobs table). Raises JobStoreError on failure.
    """
    try:
        if isinstance(target, str):
            with psycopg.connect(target, autocommit=True, connect_timeout=5) as conn:
                return _install(conn)
        return _install(target)
    except psycopg.Error as exc:
        raise JobStoreError(f"cannot install the job queue's schema: {exc}") from exc


def _install(conn: Connection) -> bool:
    version = schema_version()
    with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        cur.execute("CREATE TABLE IF NOT EXISTS tiers_jobs_meta ("
                    " key text PRIMARY KEY, value text NOT NULL)")
        row = cur.execute("SELECT value FROM tiers_jobs_meta WHERE key = 'schema'").fetchone()
        if row is not None and row[0] == version:
            return False
        # No parameters: the simple query protocol runs the whole script.
        cur.execute(schema().encode("utf-8"))
        cur.execute("INSERT INTO tiers_jobs_meta (key, value) VALUES ('schema', %s)"
                    " ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value", (version,))
    return True


# ---- enqueue ------------------------------------------------------------------------


def enqueue(conn: Connection, task: str | Any, args: Mapping[str, Any] | None = None, *,
            queue: str | None = None, priority: int | None = None,
            run_at: datetime | None = None, delay: float | None = None,
            unique_key: str | None = None, max_attempts: int | None = None) -> int | None:
    """Add one job of ``task`` (a name, or a registered :class:`~tiers.jobs.registry.Task`).

    Runs on ``conn`` as it is: inside the caller's transaction the job
    exists iff it commits. Returns the new job's id, or None when
    ``unique_key`` is held by a pending or running job (nothing is added).
    ``args`` are the task's keyword arguments (JSON); ``run_at`` (aware) or
    ``delay`` (seconds) defer it; ``priority``: higher first. Options left
    None take the Task's defaults, or the queue ``default``, priority 0 and
    5 attempts for a bare name. JobArgumentError for anything invalid,
    before anything is sent.
    """
    from tiers.jobs.registry import Task

    if isinstance(task, Task):
        return enqueue_job(conn, task.job(args, queue=queue, priority=priority, run_at=run_at,
                                          delay=delay, unique_key=unique_key,
                                          max_attempts=max_attempts))
    if not isinstance(task, str):
        raise JobArgumentError(f"task must be a task name or a Task, got {task!r}")
    return enqueue_job(conn, NewJob(
        task=task, args=args if args is not None else {},
        queue=DEFAULT_QUEUE if queue is None else queue,
        priority=DEFAULT_PRIORITY if priority is None else priority,
        run_at=run_at, delay=delay, unique_key=unique_key,
        max_attempts=DEFAULT_MAX_ATTEMPTS if max_attempts is None else max_attempts))


def enqueue_job(conn: Connection, job: NewJob) -> int | None:
    """Add ``job`` (see :func:`enqueue`); its id, or None if its unique key is taken."""
    checked = job.checked()
    with _translated_missing_schema(), conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(query("enqueue"), checked.params()).fetchone()
    return None if row is None else int(row[0])


def enqueue_many(conn: Connection, jobs: Iterable[NewJob], *,
                 batch_id: int | None = None) -> list[int]:
    """Add many jobs in one statement on ``conn``; the ids of those added.

    All are validated first (JobArgumentError names the job by position and
    adds nothing). Jobs whose unique key is held by a pending or running job
    (or by an earlier job of the same call) are skipped, so the list may be
    shorter than ``jobs``. Like :func:`enqueue`, transactional on ``conn``.
    """
    checked: list[CheckedJob] = []
    for index, job in enumerate(jobs):
        try:
            checked.append(job.checked())
        except JobArgumentError as exc:
            raise JobArgumentError(f"job {index} ({job.task!r}): {exc}") from None
    if not checked:
        return []
    params = {
        "queues": [c.job.queue for c in checked],
        "tasks": [c.job.task for c in checked],
        "args": [c.args_json for c in checked],
        "priorities": [c.job.priority for c in checked],
        "run_ats": [c.job.run_at for c in checked],
        "delays": [c.delay for c in checked],
        "max_attempts": [c.job.max_attempts for c in checked],
        "unique_keys": [c.job.unique_key for c in checked],
        "batch_id": batch_id,
    }
    with _translated_missing_schema(), conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(query("enqueue_many"), params).fetchall()
    return [int(row[0]) for row in rows]


class _translated_missing_schema:
    """Turn 'relation tiers_jobs does not exist' into a JobStoreError that says what to do."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if isinstance(exc, pg_errors.UndefinedTable) and "tiers_jobs" in str(exc):
            raise JobStoreError(
                "the job queue's tables are missing in this database: run "
                "tiers.jobs.install_schema(dsn) (tiers up and tiers worker do it)") from exc


# ---- claiming and finishing (workers) --------------------------------------------------


@dataclass(frozen=True)
class ClaimedJob:
    """A job a worker holds: ``attempt`` counts this claim (1 on the first run)."""

    id: int
    queue: str
    task: str
    args: dict[str, Any]
    attempt: int
    max_attempts: int
    batch_id: int | None
    unique_key: str | None
    run_at: datetime | None


def _claimed(row: Sequence[Any] | None) -> ClaimedJob | None:
    if row is None:
        return None
    args = row[3] if isinstance(row[3], dict) else {}
    return ClaimedJob(id=int(row[0]), queue=row[1], task=row[2], args=args,
                      attempt=int(row[4]), max_attempts=int(row[5]), batch_id=row[6],
                      unique_key=row[7], run_at=row[8])


@dataclass(frozen=True)
class Outcome:
    """How a run ended, as the store records it.

    ``status``: ``done``; ``pending`` (retry after ``delay`` seconds); ``dead``.
    ``result`` is JSON text or None; ``error`` is kept as the job's last error.
    """

    status: str
    result: str | None = None
    error: str | None = None
    delay: float = 0.0


def claim(conn: Connection, worker: str, queues: Sequence[str],
          lease: float) -> ClaimedJob | None:
    """Take the first due job of ``queues`` for ``worker`` under a ``lease``; None if none."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(query("claim"), {"worker": worker, "queues": list(queues),
                                           "lease": lease}).fetchone()
    return _claimed(row)


def _outcome_params(job_id: int, worker: str, outcome: Outcome) -> dict[str, Any]:
    return {"id": job_id, "worker": worker, "status": outcome.status, "result": outcome.result,
            "error": outcome.error, "delay": outcome.delay}


def finish_and_claim(conn: Connection, job_id: int, worker: str, outcome: Outcome, *,
                     queues: Sequence[str], lease: float) -> ClaimedJob | None:
    """Record ``outcome`` for the worker's job and claim the next, in one round trip.

    The outcome is dropped if the job is no longer this worker's (its lease
    expired and it was taken again).
    """
    params = _outcome_params(job_id, worker, outcome)
    params.update(queues=list(queues), lease=lease)
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(query("finish_and_claim"), params).fetchone()
    return _claimed(row)


def finish(conn: Connection, job_id: int, worker: str, outcome: Outcome) -> bool:
    """Record ``outcome`` for the worker's job; False if it is no longer the worker's."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(query("finish"), _outcome_params(job_id, worker, outcome)).fetchone()
    return row is not None


def unclaim(conn: Connection, job_id: int, worker: str) -> bool:
    """Give back a job the worker claimed but never started; False if it was not the worker's."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(query("unclaim"), {"id": job_id, "worker": worker}).fetchone()
    return row is not None


def renew_lease(conn: Connection, job_id: int, worker: str, lease: float) -> bool:
    """Extend the worker's lease on its job; False if the job is no longer the worker's."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(query("renew_lease"), {"id": job_id, "worker": worker,
                                                 "lease": lease}).fetchone()
    return row is not None


def release_worker(conn: Connection, worker: str, reason: str) -> list[tuple[int, str]]:
    """Make the running jobs of a dead ``worker`` due again (or dead); (id, new status) each."""
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(query("release_worker"), {"worker": worker,
                                                     "reason": reason}).fetchall()
    return [(int(r[0]), r[1]) for r in rows]


def release_expired(conn: Connection) -> list[tuple[int, str]]:
    """Make running jobs whose lease expired due again (or dead); (id, new status) each."""
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(query("release_expired")).fetchall()
    return [(int(r[0]), r[1]) for r in rows]


def next_due(conn: Connection, queues: Sequence[str]) -> float | None:
    """Seconds until the earliest pending job of ``queues`` is due (<= 0: due); None if none."""
    with conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(query("next_due"), {"queues": list(queues)}).fetchone()
    return None if row is None or row[0] is None else float(row[0])


def prune_done(conn: Connection, older_than: float, limit: int = 5000) -> int:
    """Delete up to ``limit`` done jobs finished more than ``older_than`` seconds ago."""
    with conn.cursor(row_factory=tuple_row) as cur:
        cur.execute(query("prune_done"), {"older_than": older_than, "limit": limit})
        return cur.rowcount


# ---- administration (tiers jobs) ------------------------------------------------------


@dataclass(frozen=True)
class JobRecord:
    """Everything stored of one job."""

    id: int
    queue: str
    task: str
    args: dict[str, Any]
    priority: int
    run_at: datetime
    status: str
    attempts: int
    max_attempts: int
    unique_key: str | None
    lease_until: datetime | None
    worker: str | None
    last_error: str | None
    result: Any
    batch_id: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None

    def as_json(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            values[name] = value.isoformat() if isinstance(value, datetime) else value
        return values


def _record(row: Sequence[Any]) -> JobRecord:
    return JobRecord(*row)


def get_job(conn: Connection, job_id: int) -> JobRecord:
    """The job ``job_id``; JobNotFound if there is none."""
    with _store_errors("read job"), conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(query("get_job"), {"id": job_id}).fetchone()
    if row is None:
        raise JobNotFound(f"no job {job_id}")
    return _record(row)


def list_jobs(conn: Connection, *, status: str | None = "dead", queue: str | None = None,
              task: str | None = None, limit: int = 50) -> list[JobRecord]:
    """Jobs newest first, filtered by status (None: any), queue and task."""
    if status is not None and status not in STATUSES:
        raise JobArgumentError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    with _store_errors("list jobs"), conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(query("list_jobs"), {"status": status, "queue": queue,
                                                "task": task, "limit": limit}).fetchall()
    return [_record(row) for row in rows]


@dataclass(frozen=True)
class Selection:
    """Which dead jobs an operation applies to: ``ids``, or all (optionally by queue/task)."""

    ids: tuple[int, ...] = ()
    all: bool = False
    queue: str | None = None
    task: str | None = None

    def params(self) -> dict[str, Any]:
        return {"ids": list(self.ids), "all": self.all, "queue": self.queue,
                "task": self.task}


def retry_dead(conn: Connection, selection: Selection) -> list[int]:
    """Dead jobs back to pending with fresh attempts; the ids changed.

    Given ids that are not dead (or whose unique key another pending job
    holds now) raise JobNotFound naming them, and nothing changes.
    """
    return _change_dead(conn, selection, "retry_dead", "retry")


def delete_dead(conn: Connection, selection: Selection) -> list[int]:
    """Delete dead jobs; the ids deleted. Ids that are not dead: JobNotFound, nothing deleted."""
    return _change_dead(conn, selection, "delete_dead", "delete")


def _change_dead(conn: Connection, selection: Selection, statement: str,
                 verb: str) -> list[int]:
    if not selection.ids and not selection.all:
        raise JobArgumentError(f"name the dead jobs to {verb}, or ask for all of them")
    with _store_errors(f"{verb} dead jobs"), conn.transaction(), \
            conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(query(statement), selection.params()).fetchall()
        changed = sorted(int(r[0]) for r in rows)
        missing = sorted(set(selection.ids) - set(changed))
        if missing and not selection.all:
            states: dict[int, str] = {
                int(r[0]): r[1]
                for r in cur.execute(query("job_states"), {"ids": missing}).fetchall()}
            reasons = [f"{job_id} ({_why_not(states.get(job_id), verb)})" for job_id in missing]
            # Leaving the block by an exception rolls the whole change back.
            raise JobNotFound(f"cannot {verb}: {', '.join(reasons)}")
    return changed


def _why_not(status: str | None, verb: str) -> str:
    if status is None:
        return "no such job"
    if status == "dead" and verb == "retry":
        return "its unique key is held by a pending or running job"
    return f"it is {status}, not dead"


@dataclass(frozen=True)
class QueueStats:
    """One queue's depth: jobs ready now, scheduled later, running and dead, and the age
    in seconds of the oldest ready job (how long it has been due; None if none is)."""

    queue: str
    ready: int
    scheduled: int
    running: int
    dead: int
    oldest_ready_age: float | None


def queue_stats(conn: Connection) -> list[QueueStats]:
    """Every queue that has pending, running or dead jobs, by name."""
    with _store_errors("read queue depths"), conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(query("queue_stats")).fetchall()
    return [QueueStats(queue=r[0], ready=int(r[1]), scheduled=int(r[2]), running=int(r[3]),
                       dead=int(r[4]), oldest_ready_age=None if r[5] is None else float(r[5]))
            for r in rows]


class _store_errors:
    """Translate psycopg errors of an administrative statement into JobStoreError."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: object) -> None:
        if isinstance(exc, psycopg.Error):
            raise JobStoreError(f"cannot {self.what}: {str(exc).strip()}") from exc


__all__ = [
    "DEFAULT_PRIORITY", "DEFAULT_QUEUE", "ClaimedJob", "JobRecord", "NewJob", "Outcome",
    "QueueStats", "Selection", "claim", "delete_dead", "enqueue", "enqueue_job",
    "enqueue_many", "finish", "finish_and_claim", "get_job", "install_schema", "list_jobs",
    "next_due", "prune_done", "queue_stats", "release_expired", "release_worker",
    "renew_lease", "retry_dead", "unclaim",
]
