"""Tasks for the tests that run real worker pools (imported by forked children).

Each run is recorded in ``job_runs`` of the database in ``JOBTASKS_DSN``
(with the pid and attempt), so a test can tell whether a job ran, how often
and where.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import psycopg

from tiers.jobs import current_job, task

_conns: dict[int, psycopg.Connection[Any]] = {}

SCHEMA = """
CREATE TABLE IF NOT EXISTS job_runs (
    key text NOT NULL, pid integer NOT NULL, attempt integer NOT NULL,
    phase text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp())
"""


def _db() -> psycopg.Connection[Any]:
    """This process's connection (a forked child makes its own)."""
    conn = _conns.get(os.getpid())
    if conn is None or conn.closed:
        conn = _conns[os.getpid()] = psycopg.connect(os.environ["JOBTASKS_DSN"],
                                                     autocommit=True)
    return conn


def _record(key: str, phase: str) -> None:
    _db().execute("INSERT INTO job_runs (key, pid, attempt, phase) VALUES (%s, %s, %s, %s)",
                  (key, os.getpid(), current_job().attempt, phase))


@task("test.record")
def record(key: str, sleep: float = 0.0) -> dict[str, int]:
    """Note the start, sleep, note the end: a run cut short has a start and no end."""
    _record(key, "start")
    time.sleep(sleep)
    _record(key, "end")
    return {"pid": os.getpid()}


@task("test.hang", timeout=0.5, max_attempts=2)
def hang(key: str) -> None:
    _record(key, "start")
    time.sleep(3600)


@task("test.noop")
def noop() -> None:
    pass


@task("test.die_twice", max_attempts=5)
def die_twice(key: str) -> None:
    """Dies by SIGKILL on its first two attempts, as soon as it starts; then completes."""
    _record(key, "start")
    if current_job().attempt <= 2:
        os.kill(os.getpid(), signal.SIGKILL)
    _record(key, "end")
