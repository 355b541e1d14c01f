"""Cron schedulers on a real PostgreSQL: each tick is enqueued exactly once, however many
schedulers run, whenever they check, and whichever of them crashes."""

from __future__ import annotations

import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from tests.integration.jobkit import connect
from tiers.jobs.cron import CronExpression
from tiers.jobs.registry import Schedule
from tiers.jobs.scheduler import Scheduler

START = datetime(2026, 3, 1, 12, 0, 30, tzinfo=UTC)


def minutely(name: str = "report", cron: str = "* * * * *", **kwargs: Any) -> Schedule:
    return Schedule(name=name, cron=CronExpression.parse(cron), task="reports.build",
                    args={"full": True}, **kwargs)


def enqueued(dsn: str) -> Counter[str]:
    """How many jobs each unique key (schedule and tick) got."""
    with connect(dsn) as conn:
        return Counter(r[0] for r in conn.execute("SELECT unique_key FROM tiers_jobs"))


def connector(dsn: str) -> Callable[[], psycopg.Connection[Any]]:
    return lambda: psycopg.connect(dsn, autocommit=True)


def test_two_schedulers_enqueue_each_tick_once_over_a_simulated_day(jobs_dsn: str) -> None:
    schedules = [minutely(), minutely("quarter", "*/15 * * * *")]
    a = Scheduler(connector(jobs_dsn), schedules, name="a")
    b = Scheduler(connector(jobs_dsn), schedules, name="b")
    chance = random.Random(6)
    now_a = now_b = START
    end = START + timedelta(hours=24)
    made: list[Any] = []
    try:
        # Each checks at its own irregular pace: sometimes twice a minute, sometimes once
        # in 50 seconds; sometimes one is ahead of the other.
        while now_a < end or now_b < end:
            if now_a <= now_b:
                made += a.tick(now_a)
                now_a += timedelta(seconds=chance.uniform(5, 50))
            else:
                made += b.tick(now_b)
                now_b += timedelta(seconds=chance.uniform(5, 50))
    finally:
        a.close()
        b.close()
    counts = enqueued(jobs_dsn)
    # From 12:00 (within the first check's look-back) to 12:00 the next day.
    expected_minutes = [START.replace(second=0) + timedelta(minutes=m)
                        for m in range(24 * 60 + 1)]
    for tick in expected_minutes:
        assert counts[f"cron:report:{tick.isoformat()}"] == 1, tick
    assert sum(1 for key in counts if key.startswith("cron:report:")) == 24 * 60 + 1
    assert sum(1 for key in counts if key.startswith("cron:quarter:")) == 24 * 4 + 1
    assert set(counts.values()) == {1}
    assert len(made) == len(counts)  # what each call reports is what it made
    with connect(jobs_dsn) as conn:
        row = conn.execute("SELECT task, args, queue FROM tiers_jobs LIMIT 1").fetchone()
    assert row == ("reports.build", {"full": True}, "default")


def test_concurrent_schedulers_in_threads_never_double_a_tick(jobs_dsn: str) -> None:
    schedules = [minutely()]
    instants = [START + timedelta(seconds=20 * n) for n in range(180)]  # an hour
    barrier = threading.Barrier(4)

    def run(name: str) -> None:
        scheduler = Scheduler(connector(jobs_dsn), schedules, name=name)
        try:
            barrier.wait(10)
            for moment in instants:
                scheduler.tick(moment)
        finally:
            scheduler.close()

    threads = [threading.Thread(target=run, args=(f"s{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    counts = enqueued(jobs_dsn)
    # 12:00 (within the first look-back) to 13:00.
    assert len(counts) == 61 and set(counts.values()) == {1}


def test_a_tick_missed_by_everyone_is_enqueued_late_within_the_lookback(jobs_dsn: str
                                                                        ) -> None:
    scheduler = Scheduler(connector(jobs_dsn), [minutely()], lookback=120)
    try:
        scheduler.tick(START)
        # Down for 3.5 minutes: ticks within the last 120 s are caught up, older ones are not.
        made = scheduler.tick(START + timedelta(seconds=210))
    finally:
        scheduler.close()
    ticks = [e.tick for e in made]
    assert ticks == [datetime(2026, 3, 1, 12, 3, tzinfo=UTC), datetime(2026, 3, 1, 12, 4,
                                                                        tzinfo=UTC)]


def test_a_scheduler_that_dies_mid_tick_leaves_the_tick_to_another(jobs_dsn: str) -> None:
    tick = datetime(2026, 3, 1, 12, 1, tzinfo=UTC)
    # A scheduler's transaction that got as far as claiming the tick, then died.
    with psycopg.connect(jobs_dsn) as conn:
        conn.execute("INSERT INTO tiers_cron_ticks (schedule, tick) VALUES ('report', %s)",
                     (tick,))
        conn.rollback()
    other = Scheduler(connector(jobs_dsn), [minutely()])
    try:
        made = other.tick(START + timedelta(seconds=40))
    finally:
        other.close()
    assert [e.tick for e in made] == [tick]
    assert enqueued(jobs_dsn) == Counter({f"cron:report:{tick.isoformat()}": 1})


def test_schedules_follow_their_timezone(jobs_dsn: str) -> None:
    tokyo = minutely("morning", "0 9 * * *", timezone="Asia/Tokyo")
    scheduler = Scheduler(connector(jobs_dsn), [tokyo], lookback=3600)
    try:
        made = scheduler.tick(datetime(2026, 3, 2, 0, 30, tzinfo=UTC))  # 09:30 in Tokyo
    finally:
        scheduler.close()
    assert [e.tick for e in made] == [datetime(2026, 3, 2, 0, 0, tzinfo=UTC)]


def test_real_time_smoke_two_running_schedulers_on_a_fast_clock(jobs_dsn: str) -> None:
    """Two schedulers run their own loops for a few real seconds on a clock where a
    second is a minute: every minute tick in between is enqueued once."""
    base = START
    began = time.monotonic()

    def clock() -> datetime:
        return base + timedelta(seconds=(time.monotonic() - began) * 60)

    stop = threading.Event()
    schedulers = [Scheduler(connector(jobs_dsn), [minutely()], clock=clock, name=f"s{n}")
                  for n in range(2)]
    threads = [threading.Thread(target=s.run, args=(stop,), kwargs={"poll": 0.05})
               for s in schedulers]
    for thread in threads:
        thread.start()
    time.sleep(4.5)
    stop.set()
    for thread in threads:
        thread.join(10)
    for scheduler in schedulers:
        scheduler.close()
    end = clock()
    counts = enqueued(jobs_dsn)
    assert set(counts.values()) == {1}
    ticks = sorted(datetime.fromisoformat(key.split(":", 2)[2]) for key in counts)
    assert len(ticks) >= 3
    # No tick missing between the first and the last.
    assert ticks == [ticks[0] + timedelta(minutes=n) for n in range(len(ticks))]
    assert ticks[-1] <= end


def test_old_ticks_are_pruned_by_the_schedulers_clock(jobs_dsn: str) -> None:
    first = Scheduler(connector(jobs_dsn), [minutely()])
    later = Scheduler(connector(jobs_dsn), [minutely()])
    try:
        first.tick(START)
        later.tick(START + timedelta(days=8))
    finally:
        first.close()
        later.close()
    with connect(jobs_dsn) as conn:
        ticks = [r[0] for r in conn.execute("SELECT tick FROM tiers_cron_ticks")]
    assert ticks == [START.replace(second=0) + timedelta(days=8)]
