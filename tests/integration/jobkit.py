"""Helpers for the job queue's integration tests: a jobs database, loops in threads, waits."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from tiers.jobs.child import ChildLoop
from tiers.jobs.options import WorkerOptions
from tiers.jobs.registry import Registry


def connect(dsn: str) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(dsn, autocommit=True, connect_timeout=5)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str,
               interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def statuses(dsn: str) -> dict[int, str]:
    with connect(dsn) as conn:
        return {int(r[0]): r[1] for r in conn.execute("SELECT id, status FROM tiers_jobs")}


def job_row(dsn: str, job_id: int) -> dict[str, Any]:
    with connect(dsn) as conn:
        cur = conn.execute("SELECT * FROM tiers_jobs WHERE id = %s", (job_id,))
        row = cur.fetchone()
        assert row is not None, f"no job {job_id}"
        names = [c.name for c in cur.description or ()]
        return dict(zip(names, row, strict=True))


@contextmanager
def running_loop(dsn: str, registry: Registry, worker_id: str = "test-worker",
                 **options: Any) -> Iterator[ChildLoop]:
    """A ChildLoop in a thread (no fork), stopped and joined when the block ends."""
    settings: dict[str, Any] = {"poll_interval": 0.5, "lease": 5.0, "max_jobs": 0}
    settings.update(options)
    loop = ChildLoop(WorkerOptions(dsn=dsn, **settings), worker_id, registry=registry)
    outcome: list[int] = []
    thread = threading.Thread(target=lambda: outcome.append(loop.run()), daemon=True)
    thread.start()
    try:
        yield loop
    finally:
        loop.request_stop()
        thread.join(30)
        assert not thread.is_alive(), "the loop did not stop"
