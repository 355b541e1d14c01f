"""The cron scheduler: enqueue each schedule's jobs on time, each tick exactly once.

Any number of schedulers may run (one per app host, say, or one per worker
pool); they need not know of each other. For each schedule and each tick
(a time its cron expression names), a scheduler runs one transaction:

    INSERT INTO tiers_cron_ticks (schedule, tick) ... ON CONFLICT DO NOTHING
    -- only if that row was new:
    INSERT INTO tiers_jobs ...            (unique key cron:<schedule>:<tick>)

The primary key of ``tiers_cron_ticks`` lets exactly one transaction per tick
insert its row, so exactly one scheduler enqueues the tick's job, whatever
their clocks, start times or crashes: a scheduler that dies mid-transaction
leaves nothing behind, and another (or the same one, restarted) enqueues the
tick. Unlike a leader lease there is nothing to expire and no tick run
twice across a hand-over.

A scheduler looks back ``lookback`` seconds (default 60) at each check, so a
tick is still enqueued if every scheduler was down or slow for less than
that; ticks older than that are skipped, not run late in a burst. Tick rows
are pruned after a week.

The clock is injectable (``clock`` returns an aware datetime), so tests run
days of ticks in a moment.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import FrameType
from typing import Any
from zoneinfo import ZoneInfo

import psycopg

from tiers.jobs import store
from tiers.jobs.child import EXIT_OK, Board
from tiers.jobs.options import WorkerOptions
from tiers.jobs.registry import REGISTRY, Schedule
from tiers.jobs.spec import NewJob
from tiers.jobs.sql import query

log = logging.getLogger("tiers.jobs")

DEFAULT_LOOKBACK = 60.0
TICK_RETENTION = 7 * 86400.0
_PRUNE_EVERY = 3600.0


@dataclass(frozen=True)
class Enqueued:
    """A tick this scheduler enqueued, and the job it made (None if its unique key was taken)."""

    schedule: str
    tick: datetime
    job_id: int | None


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Scheduler:
    """Enqueues the ticks of ``schedules`` that are due; see the module docstring.

    ``connect`` opens a connection to the jobs database (a DSN string is
    connected with autocommit). Not thread-safe: one thread per scheduler.
    """

    def __init__(self, connect: str | Callable[[], psycopg.Connection[Any]],
                 schedules: Iterable[Schedule], *,
                 clock: Callable[[], datetime] = _utc_now,
                 lookback: float = DEFAULT_LOOKBACK, name: str = "scheduler") -> None:
        self._connect = (connect if callable(connect)
                         else lambda: psycopg.connect(connect, autocommit=True,
                                                      connect_timeout=5))
        self.schedules = list(schedules)
        self.clock = clock
        self.lookback = timedelta(seconds=lookback)
        self.name = name
        self._zones = {s.name: ZoneInfo(s.timezone) for s in self.schedules}
        self._checked: datetime | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._next_prune = 0.0

    # ---- one check ------------------------------------------------------------------

    def due(self, now: datetime) -> list[tuple[Schedule, datetime]]:
        """Each (schedule, tick) in the window this check covers, oldest first."""
        since = now - self.lookback
        if self._checked is not None and self._checked > since:
            since = self._checked
        found = []
        for schedule in self.schedules:
            zone = self._zones[schedule.name]
            for tick in schedule.cron.ticks(since.astimezone(zone), now.astimezone(zone)):
                found.append((schedule, tick.astimezone(UTC)))
        found.sort(key=lambda pair: (pair[1], pair[0].name))
        return found

    def tick(self, now: datetime | None = None) -> list[Enqueued]:
        """Enqueue every due tick no scheduler has enqueued; what this call enqueued.

        Raises psycopg errors (the connection is dropped and reopened at the
        next call); the window is then checked again, so nothing is skipped.
        """
        moment = now or self.clock()
        if moment.tzinfo is None:
            raise ValueError("the scheduler's clock must give timezone-aware datetimes")
        made = []
        conn = self._connection()
        try:
            for schedule, tick in self.due(moment):
                enqueued = self._enqueue(conn, schedule, tick)
                if enqueued is not None:
                    made.append(enqueued)
            self._prune(conn, moment)
        except psycopg.Error:
            self._drop()
            raise
        self._checked = moment
        return made

    def _enqueue(self, conn: psycopg.Connection[Any], schedule: Schedule,
                 tick: datetime) -> Enqueued | None:
        with conn.transaction():
            claimed = conn.execute(query("claim_tick"), {"schedule": schedule.name,
                                                         "tick": tick}).fetchone()
            if claimed is None:
                return None  # another scheduler has this tick
            job_id = store.enqueue_job(conn, NewJob(
                task=schedule.task, args=schedule.args, queue=schedule.queue,
                priority=schedule.priority, max_attempts=schedule.max_attempts,
                unique_key=f"cron:{schedule.name}:{tick.isoformat()}"))
            conn.execute(query("record_tick_job"), {"schedule": schedule.name, "tick": tick,
                                                    "job_id": job_id})
        log.info("%s: enqueued %s for %s (job %s)", self.name, schedule.name,
                 tick.isoformat(), job_id)
        return Enqueued(schedule.name, tick, job_id)

    def _prune(self, conn: psycopg.Connection[Any], now: datetime) -> None:
        # By the scheduler's clock, as the ticks are: a tick is pruned only long after
        # this scheduler's look-back has passed it.
        if time.monotonic() >= self._next_prune:
            conn.execute(query("prune_ticks"),
                         {"before": now - timedelta(seconds=TICK_RETENTION)})
            self._next_prune = time.monotonic() + _PRUNE_EVERY

    def next_tick(self, now: datetime) -> datetime | None:
        """The earliest tick after ``now`` of any schedule (None without schedules)."""
        upcoming = [s.cron.next_after(now.astimezone(self._zones[s.name])).astimezone(UTC)
                    for s in self.schedules]
        return min(upcoming, default=None)

    # ---- running ----------------------------------------------------------------------

    def run(self, stop: threading.Event, *, poll: float = 1.0,
            on_ready: Callable[[], None] | None = None) -> None:
        """Check at every tick (and at least every ``poll`` seconds) until ``stop`` is set.

        Database errors are logged and retried at the next check.
        """
        ready = False
        while not stop.is_set():
            try:
                self.tick()
                if not ready:
                    ready = True
                    if on_ready is not None:
                        on_ready()
            except psycopg.Error as exc:
                log.warning("%s: cannot enqueue due ticks now: %s", self.name,
                            str(exc).strip())
            now = self.clock()
            upcoming = self.next_tick(now)
            wait = poll if upcoming is None else (upcoming - now).total_seconds()
            stop.wait(min(max(wait, 0.01), poll))

    def close(self) -> None:
        self._drop()

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = self._connect()
        return self._conn

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()


def run_scheduler_process(options: WorkerOptions, board: Board) -> int:
    """The body of a pool's scheduler child: the registry's schedules until SIGTERM."""
    stop = threading.Event()

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    schedules = list(REGISTRY.schedules.values())
    if schedules:
        log.info("%s: scheduling %s", options.name,
                 ", ".join(f"{s.name} ({s.cron})" for s in schedules))
    else:
        log.info("%s: no schedules are registered; the scheduler idles", options.name)
    scheduler = Scheduler(options.dsn, schedules, name=f"{options.name} scheduler")
    try:
        scheduler.run(stop, poll=min(options.poll_interval * 5, 5.0), on_ready=board.ready)
    finally:
        scheduler.close()
    return EXIT_OK
