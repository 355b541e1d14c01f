"""Long batches as many small jobs: split, enqueue together, track until every chunk is done.

A batch that runs for hours as one job restarts from the beginning when it
fails an hour in. Split into chunks, each chunk is a job of its own: it is
retried alone (with backoff, up to its max_attempts), and the rest of the
work goes on meanwhile::

    from tiers.jobs import batch

    @task("reports.rebuild_range")
    def rebuild_range(start: int, stop: int) -> None: ...

    @task("reports.rebuilt")
    def rebuilt(batch_id: int) -> None: ...          # runs once every chunk is finished

    with cluster.write() as conn:                     # one transaction: all chunks or none
        made = batch.enqueue_batch(conn, rebuild_range, batch.ranges(0, 1_000_000, 10_000),
                                   name="rebuild 2026", on_complete=rebuilt)
    progress = batch.wait_batch(dsn, made.id, timeout=3600)
    progress.done, progress.dead, progress.total, progress.complete

The counts are kept by a trigger in each chunk's own transaction, so they are
always exact: ``done`` chunks succeeded, ``dead`` ones failed for good (and
can be retried with ``tiers jobs retry``, which reopens the batch), the rest
are pending or running. A batch is *complete* when done + dead = total; its
``on_complete`` task is then enqueued once, with ``batch_id`` added to its args.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import tuple_row

from tiers.jobs.errors import JobArgumentError, JobNotFound, JobStoreError
from tiers.jobs.registry import Task
from tiers.jobs.spec import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_PRIORITY,
    DEFAULT_QUEUE,
    NewJob,
    check_task_name,
    encode_args,
)
from tiers.jobs.sql import query
from tiers.jobs.store import Connection, enqueue_many


@dataclass(frozen=True)
class Batch:
    """A batch just made: its id and the ids of its chunk jobs."""

    id: int
    job_ids: tuple[int, ...]


@dataclass(frozen=True)
class BatchProgress:
    """Where a batch is: chunks done, dead, still open (pending or running), of ``total``."""

    id: int
    name: str
    total: int
    done: int
    dead: int
    open: int
    created_at: datetime
    finished_at: datetime | None

    @property
    def complete(self) -> bool:
        """Every chunk is finished (done or dead)."""
        return self.done + self.dead >= self.total

    @property
    def succeeded(self) -> bool:
        """Every chunk is done."""
        return self.done >= self.total

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "total": self.total, "done": self.done,
                "dead": self.dead, "open": self.open, "complete": self.complete,
                "created_at": self.created_at.isoformat(),
                "finished_at": None if self.finished_at is None
                else self.finished_at.isoformat()}


def ranges(start: int, stop: int, size: int) -> Iterator[dict[str, int]]:
    """``{"start": a, "stop": b}`` chunk args covering ``[start, stop)`` in steps of ``size``."""
    if size < 1:
        raise JobArgumentError(f"a chunk size is at least 1, got {size}")
    for first in range(start, stop, size):
        yield {"start": first, "stop": min(first + size, stop)}


def chunks(items: Iterable[Any], size: int, key: str = "items") -> Iterator[dict[str, Any]]:
    """``{key: [up to size items]}`` chunk args, in order (the items must be JSON)."""
    if size < 1:
        raise JobArgumentError(f"a chunk size is at least 1, got {size}")
    bunch: list[Any] = []
    for item in items:
        bunch.append(item)
        if len(bunch) == size:
            yield {key: bunch}
            bunch = []
    if bunch:
        yield {key: bunch}


def enqueue_batch(conn: Connection, task: Task | str, chunk_args: Iterable[Mapping[str, Any]],
                  *, name: str = "", queue: str | None = None, priority: int | None = None,
                  max_attempts: int | None = None, on_complete: Task | str | None = None,
                  on_complete_args: Mapping[str, Any] | None = None) -> Batch:
    """Make a batch of one ``task`` job per chunk (args from ``chunk_args``), on ``conn``.

    Transactional like ``enqueue``: in the caller's transaction the batch and
    all its chunks exist iff it commits (on an autocommit connection they are
    made in one transaction here). ``on_complete`` (a task) is enqueued once
    the batch is complete, with ``on_complete_args`` plus ``batch_id``.
    JobArgumentError, before anything is sent, for invalid chunks or options.
    """
    if isinstance(task, Task):
        jobs = [task.job(args, queue=queue, priority=priority, max_attempts=max_attempts)
                for args in chunk_args]
    else:
        jobs = [NewJob(task=task, args=args, queue=queue or DEFAULT_QUEUE,
                       priority=DEFAULT_PRIORITY if priority is None else priority,
                       max_attempts=DEFAULT_MAX_ATTEMPTS if max_attempts is None
                       else max_attempts)
                for args in chunk_args]
    for index, job in enumerate(jobs):
        try:
            job.checked()
        except JobArgumentError as exc:
            raise JobArgumentError(f"chunk {index}: {exc}") from None
    if not jobs:
        raise JobArgumentError("a batch needs at least one chunk")
    complete_task: str | None = None
    complete_queue = queue or DEFAULT_QUEUE
    if isinstance(on_complete, Task):
        on_complete.check_args({**(on_complete_args or {}), "batch_id": 0})
        complete_task, complete_queue = on_complete.name, on_complete.queue
    elif on_complete is not None:
        complete_task = check_task_name(on_complete)
    complete_args = encode_args(on_complete_args or {})
    params = {"name": name, "total": len(jobs), "on_complete_task": complete_task,
              "on_complete_args": complete_args, "on_complete_queue": complete_queue}
    # On an autocommit connection, a transaction of its own; otherwise the caller's
    # (psycopg's transaction() would commit by itself on an idle non-autocommit one).
    block = conn.transaction() if conn.autocommit else contextlib.nullcontext()
    with block, conn.cursor(row_factory=tuple_row) as cur:
        row = cur.execute(query("create_batch"), params).fetchone()
        assert row is not None
        batch_id = int(row[0])
        job_ids = enqueue_many(conn, jobs, batch_id=batch_id)
    return Batch(batch_id, tuple(job_ids))


def _progress(row: tuple[Any, ...]) -> BatchProgress:
    return BatchProgress(id=int(row[0]), name=row[1], total=int(row[2]), done=int(row[3]),
                         dead=int(row[4]), open=int(row[5]), created_at=row[6],
                         finished_at=row[7])


def batch_progress(conn: Connection, batch_id: int) -> BatchProgress:
    """The batch's counts now; JobNotFound if there is no such batch."""
    try:
        with conn.cursor(row_factory=tuple_row) as cur:
            row = cur.execute(query("get_batch"), {"id": batch_id}).fetchone()
    except psycopg.Error as exc:
        raise JobStoreError(f"cannot read batch {batch_id}: {str(exc).strip()}") from exc
    if row is None:
        raise JobNotFound(f"no batch {batch_id}")
    return _progress(row)


def list_batches(conn: Connection, limit: int = 20) -> list[BatchProgress]:
    """The newest batches with their counts."""
    try:
        with conn.cursor(row_factory=tuple_row) as cur:
            rows = cur.execute(query("list_batches"), {"limit": limit}).fetchall()
    except psycopg.Error as exc:
        raise JobStoreError(f"cannot list batches: {str(exc).strip()}") from exc
    return [_progress(row) for row in rows]


def wait_batch(dsn: str, batch_id: int, *, timeout: float, interval: float = 0.5
               ) -> BatchProgress:
    """Poll until the batch is complete or ``timeout`` passes; its progress either way."""
    deadline = time.monotonic() + timeout
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        while True:
            progress = batch_progress(conn, batch_id)
            if progress.complete or time.monotonic() >= deadline:
                return progress
            time.sleep(interval)
