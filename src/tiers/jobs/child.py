"""One worker process's loop: claim a job, run it, record the outcome, repeat.

Each child has its own database connection (autocommit), on which it also
LISTENs for the wake-up hints of ``tiers_jobs``. The loop:

1. claims the first due job of its queues (``FOR UPDATE SKIP LOCKED``);
2. runs it, with a heartbeat thread renewing the job's lease every lease/3;
3. records the outcome and claims the next job in the same statement;
4. with nothing due, waits for a notification, the next delayed job's due
   time, or ``poll_interval``, whichever is first, then claims again. The
   poll is what makes a lost notification (or one sent while the listener
   was reconnecting) cost latency, never a job.

Every ``poll_interval`` (busy or not) it also makes jobs whose lease expired
due again, and deletes done jobs older than ``keep_done``.

It stops after the running job when asked (:meth:`ChildLoop.request_stop`,
which the process's SIGTERM handler calls), and after ``max_jobs`` jobs.
A lost connection is reopened with backoff (for up to a lease) and the
statement that failed is sent again: recording an outcome is idempotent
(it applies only while the job is still this worker's), and a claim whose
answer was lost is recovered when its lease expires.

Progress is reported to a :class:`Board` (the master's shared memory; a no-op
when the loop runs on its own) so the master can kill a child stuck past its
job's timeout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg import errors as pg_errors

from tiers.jobs import outcome as outcomes
from tiers.jobs import store
from tiers.jobs.errors import UnknownTaskError
from tiers.jobs.options import WorkerOptions
from tiers.jobs.registry import REGISTRY, JobContext, Registry, running
from tiers.jobs.store import ClaimedJob, Outcome

log = logging.getLogger("tiers.jobs")

T = TypeVar("T")

# Exit statuses of a child, read by the master.
EXIT_OK = 0  # stopped when asked, or recycled after max_jobs
EXIT_BOOT = 3  # a task module could not be imported: replacing the child cannot help
EXIT_DB = 5  # the database stayed unreachable
# Errors that mean "this connection is unusable", not "this statement is wrong":
# reconnect and send the statement again. After a failover the old primary
# answers read-only until the connection moves to the new one.
_RECONNECTABLE = (psycopg.OperationalError, pg_errors.ReadOnlySqlTransaction)
# The shortest wait when a job is due but every due row is locked by other claimers.
_MIN_WAIT = 0.05


class Board(Protocol):
    """Where a child says what it is doing (the master reads it)."""

    def ready(self) -> None: ...

    def busy(self, job_id: int, deadline: float) -> None: ...

    def idle(self) -> None: ...


class NoBoard:
    """A child with nobody watching it."""

    def ready(self) -> None:
        pass

    def busy(self, job_id: int, deadline: float) -> None:
        pass

    def idle(self) -> None:
        pass


class ChildLoop:
    """Claims and runs jobs one at a time on its own connection until stopped or recycled."""

    def __init__(self, options: WorkerOptions, worker_id: str, *,
                 registry: Registry = REGISTRY, board: Board | None = None,
                 max_jobs: int | None = None,
                 connect: Callable[[], psycopg.Connection[Any]] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.options = options
        self.worker_id = worker_id
        self.registry = registry
        self.board = board or NoBoard()
        self.max_jobs = options.max_jobs if max_jobs is None else max_jobs
        self.queues = list(options.queues)
        self.jobs_done = 0
        self._connect_fn = connect or self._connect_default
        self._clock = clock
        self._conn: psycopg.Connection[Any] | None = None
        self._lock = threading.Lock()  # one statement at a time: main loop or heartbeat
        self._current: ClaimedJob | None = None
        self._stopping = False
        self._closing = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._next_maintenance = 0.0
        self._next_prune = 0.0

    # ---- control ------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop after the running job (or at once when idle). Safe in a signal handler."""
        self._stopping = True
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"s")

    @property
    def stopping(self) -> bool:
        return self._stopping

    # ---- the loop ---------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped or recycled; the exit status for the process (EXIT_*)."""
        heartbeat = threading.Thread(target=self._heartbeat, daemon=True,
                                     name=f"heartbeat-{self.worker_id}")
        try:
            try:
                self._db(lambda conn: None)  # connect (and LISTEN) before saying ready
            except _GaveUp as exc:
                log.error("%s: %s", self.worker_id, exc)
                return EXIT_DB
            self.board.ready()
            heartbeat.start()
            return self._loop()
        except _GaveUp as exc:
            log.error("%s: %s", self.worker_id, exc)
            return EXIT_DB
        finally:
            self._closing.set()
            if heartbeat.is_alive():
                heartbeat.join(5)
            self._close()
            for fd in (self._wake_r, self._wake_w):
                with contextlib.suppress(OSError):
                    os.close(fd)

    def _loop(self) -> int:
        job: ClaimedJob | None = None
        while True:
            if self._finished():
                if job is not None:
                    # Claimed with the last outcome, then told to stop: not started, so
                    # handed back at once rather than left to its lease.
                    self._db(partial(_unclaim, job_id=job.id, worker=self.worker_id),
                             essential=True)
                return EXIT_OK
            if self._clock() >= self._next_maintenance:
                self._maintain()
            if job is None:
                job = self._db(lambda conn: store.claim(conn, self.worker_id, self.queues,
                                                         self.options.lease))
                if job is None:
                    self._wait_idle()
                    continue
                if self._finished():
                    continue  # asked to stop during the claim: handed back above
            result = self._execute(job)
            self.jobs_done += 1
            if self._finished() or self._clock() >= self._next_maintenance:
                self._db(partial(_finish, job_id=job.id, worker=self.worker_id,
                                 outcome=result), essential=True)
                job = None
            else:
                job = self._db(partial(_finish_and_claim, job_id=job.id,
                                       worker=self.worker_id, outcome=result,
                                       queues=self.queues, lease=self.options.lease),
                               essential=True)

    def _finished(self) -> bool:
        return self._stopping or (self.max_jobs > 0 and self.jobs_done >= self.max_jobs)

    # ---- one job -------------------------------------------------------------------------

    def _execute(self, job: ClaimedJob) -> Outcome:
        try:
            task = self.registry.get(job.task)
        except UnknownTaskError as exc:
            result = outcomes.after_failure(job, str(exc))
            self._log_outcome(job, result)
            return result
        timeout = task.timeout or self.options.job_timeout
        context = JobContext(id=job.id, task=job.task, queue=job.queue, attempt=job.attempt,
                             max_attempts=job.max_attempts, worker=self.worker_id,
                             args=job.args, batch_id=job.batch_id, unique_key=job.unique_key,
                             run_at=job.run_at)
        with self._lock:
            self._current = job
        self.board.busy(job.id, time.monotonic() + timeout)
        try:
            with running(context):
                value = task.fn(**job.args)
        except Exception as exc:
            result = outcomes.after_failure(job, outcomes.describe(exc), base=task.retry_base,
                                            cap=task.retry_max)
        else:
            result = outcomes.after_success(value)
        finally:
            self.board.idle()
            with self._lock:
                self._current = None
        self._log_outcome(job, result)
        return result

    def _log_outcome(self, job: ClaimedJob, result: Outcome) -> None:
        what = f"job {job.id} {job.task} (attempt {job.attempt}/{job.max_attempts})"
        if result.status == "done":
            if self.options.log_jobs:
                log.info("%s: %s done", self.worker_id, what)
            return
        error = (result.error or "").rstrip().rsplit("\n", 1)[-1]
        if result.status == "pending":
            log.warning("%s: %s failed, retry in %.1fs: %s", self.worker_id, what,
                        result.delay, error)
        else:
            log.error("%s: %s failed for the last time, buried: %s", self.worker_id, what,
                      error)

    def _heartbeat(self) -> None:
        interval = self.options.heartbeat_interval
        while not self._closing.wait(interval):
            with self._lock:
                job = self._current
                if job is None or self._conn is None:
                    continue
                try:
                    if not store.renew_lease(self._conn, job.id, self.worker_id,
                                             self.options.lease):
                        log.warning("%s: job %s is no longer ours (its lease expired)",
                                    self.worker_id, job.id)
                except psycopg.Error as exc:
                    # The main loop reconnects when it next needs the connection.
                    log.warning("%s: heartbeat for job %s failed: %s", self.worker_id, job.id,
                                str(exc).strip())

    # ---- idle time -----------------------------------------------------------------------

    def _maintain(self) -> None:
        now = self._clock()
        self._next_maintenance = now + self.options.poll_interval

        def sweep(conn: psycopg.Connection[Any]) -> None:
            for job_id, status in store.release_expired(conn):
                log.warning("%s: job %s lost its worker's lease; now %s", self.worker_id,
                            job_id, status)
            if self.options.keep_done and now >= self._next_prune:
                store.prune_done(conn, self.options.keep_done)
            # Notifications that came while busy; no need to keep them.
            for _ in conn.notifies(timeout=0):
                pass

        self._db(sweep)
        if now >= self._next_prune:
            self._next_prune = now + 60.0

    def _wait_idle(self) -> None:
        due = self._db(lambda conn: store.next_due(conn, self.queues))
        timeout = self.options.poll_interval
        if due is not None:
            timeout = min(timeout, max(due, _MIN_WAIT))
        deadline = time.monotonic() + timeout
        conn = self._conn
        assert conn is not None
        while not self._stopping:
            # Hints that arrived during earlier statements first, then the socket.
            if self._woken(conn):
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                readable, _, _ = select.select([conn.fileno(), self._wake_r], [], [], remaining)
            except (OSError, ValueError):
                return  # a closed connection: the next statement reconnects
            if self._wake_r in readable:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 64)

    def _woken(self, conn: psycopg.Connection[Any]) -> bool:
        try:
            with self._lock:
                return any(n.payload in self.queues for n in conn.notifies(timeout=0))
        except psycopg.Error:
            return True  # broken: let the next statement find out and reconnect

    # ---- the connection ------------------------------------------------------------------

    def _connect_default(self) -> psycopg.Connection[Any]:
        return psycopg.connect(self.options.dsn, autocommit=True, connect_timeout=5,
                               application_name=f"tiers {self.options.name} {self.worker_id}"[:63],
                               prepare_threshold=0)

    def _db(self, operation: Callable[[psycopg.Connection[Any]], T], *,
            essential: bool = False) -> T:
        """Run ``operation`` on the connection, reconnecting (for up to a lease) if it breaks.

        When stopping, only an ``essential`` operation (recording an outcome)
        keeps trying; anything else gives up at once.
        """
        deadline = time.monotonic() + self.options.lease
        delay = 0.1
        while True:
            try:
                with self._lock:
                    if self._conn is None or self._conn.closed:
                        self._conn = self._open()
                    return operation(self._conn)
            except _RECONNECTABLE as exc:
                self._close()
                reason = str(exc).strip()
                if time.monotonic() >= deadline or (self._stopping and not essential):
                    raise _GaveUp(f"the database is unreachable: {reason}") from exc
                log.warning("%s: database connection lost (%s); reconnecting", self.worker_id,
                            reason)
                time.sleep(delay)
                delay = min(delay * 2, 2.0)

    def _open(self) -> psycopg.Connection[Any]:
        conn = self._connect_fn()
        if not self.options.synchronous_commit:
            conn.execute("SET synchronous_commit = off")
        conn.execute(f"LISTEN {store.NOTIFY_CHANNEL}")
        return conn

    def _close(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def _finish(conn: psycopg.Connection[Any], *, job_id: int, worker: str,
            outcome: Outcome) -> bool:
    return store.finish(conn, job_id, worker, outcome)


def _unclaim(conn: psycopg.Connection[Any], *, job_id: int, worker: str) -> bool:
    return store.unclaim(conn, job_id, worker)


def _finish_and_claim(conn: psycopg.Connection[Any], *, job_id: int, worker: str,
                      outcome: Outcome, queues: list[str], lease: float) -> ClaimedJob | None:
    return store.finish_and_claim(conn, job_id, worker, outcome, queues=queues, lease=lease)


class _GaveUp(Exception):
    """The database stayed unreachable for longer than the loop waits."""
