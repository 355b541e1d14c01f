"""Job queues: tiers' against procrastinate (same PostgreSQL), Celery and RQ (local Redis).

    .venv/bin/python benchmarks/jobs.py [--workers 2] [--rounds 3] [--jobs 20000]
        [--modes drain,live] [--latency-jobs 200] [--gap-ms 50]
        [--kill-jobs 2000] [--kill-job-ms 20] [--kill-every 0.5] [--max-kills 30]
        [--kill-settings reliable,default] [--settings reliable]
        [--systems tiers,tiers-sync,procrastinate,celery,rq] [--parts throughput,latency,kill]
        [--redis-url redis://127.0.0.1:6379] [--redis-db 12] [--quick]

Every system runs the same job (``_jobs_tasks.run_job``: note the start, sleep
``sleep_ms``, append a line to a done log) in the same number of worker
processes, one job at a time per process:

- tiers: ``tiers worker`` (a master forking N children), jobs in PostgreSQL;
- procrastinate: N ``procrastinate worker --concurrency 1`` processes (it has
  no prefork master: separate worker processes are its way to use N
  processes), jobs in PostgreSQL, the same embedded server as tiers';
- Celery: ``celery worker --pool prefork --concurrency N``, broker Redis;
- RQ: ``rq worker-pool -n N`` (each worker forks a work horse per job), Redis.

It measures, the systems taking turns round by round (the order rotating):

1. Throughput of no-op jobs, *drain*: N jobs enqueued in bulk before the
   workers start; jobs/s from the first job's start to the last one's end,
   and the CPU time per job of the worker processes, the store (PostgreSQL
   or Redis) and the enqueuing process. With ``--modes drain,live`` also
   *live*: workers running and warm, N jobs enqueued in batches while they
   work, jobs/s from the first enqueue to the last end.
2. Enqueue-to-start latency on an idle pool: jobs enqueued one at a time,
   each after the last has run and a gap; the time from just before the
   enqueue call to the job's first line of code (one monotonic clock for all
   processes); p50 and p99.
3. Lost jobs under kill -9: N jobs that sleep a little each, while
   processes in the middle of a job get SIGKILL again and again; then time
   for the system to recover; the jobs that never completed are lost. Run with each
   peer's documented setting for surviving a dead worker and, by default,
   with its defaults as well (which lose jobs: the table says so).

The adapters (``_jobs_adapters.py``) drive the systems the same way; the job
and the peers' apps are in ``_jobs_tasks.py``.

Exit status: 0 after a full run, 1 when a measurement fails or tiers was
asked for and could not be measured (its adapter needs tiers' job queue,
``tiers.jobs`` and ``tiers worker``), 2 for a bad argument or when the
embedded PostgreSQL cannot run here, 128+N after signal N (Ctrl-C: 130).
A peer that is not installed or cannot run here (no Redis, a missing
package) is skipped with the reason, the exit status unchanged. Every
process started is stopped, every Redis key created deleted and the
temporary directory removed in every case.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import importlib.util
import math
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _harness as h
import _jobs_tasks as tasks
from _harness import percentile, say
from _jobs_adapters import (
    ADAPTERS,
    REDIS_PREFIX,
    Adapter,
    DoneLog,
    Env,
    Unavailable,
)
from _postgres import PRIMARY, check_embedded, start_cluster

try:
    import psycopg

    from tiers.db import embedded
    from tiers.errors import DatabaseError
except ImportError as exc:
    print(f"error: {exc}; install the project first "
          f"(python3 -m venv .venv && .venv/bin/pip install -e .)", file=sys.stderr)
    raise SystemExit(h.EXIT_MISSING) from exc

SYSTEMS = ("tiers", "tiers-sync", "procrastinate", "celery", "rq")
# The kill run measures reliability, which the commit setting does not change.
KILL_SKIPS = frozenset({"tiers-sync"})
PARTS = ("throughput", "latency", "kill")
MODES = ("drain", "live")
SETTINGS = ("reliable", "default")
ENQUEUE_CHUNK = 500
# How long workers may take to start and run their first jobs, and one job of the
# latency run to start.
START_TIMEOUT = 60.0
LATENCY_JOB_TIMEOUT = 10.0


# ---- measurements ---------------------------------------------------------------------


@dataclass(frozen=True)
class Throughput:
    """One throughput run; CPU in microseconds per job."""

    rate: float  # jobs/s: drain, first start to last end; live, first enqueue to last end
    worker_us: float  # the worker processes (and all they forked)
    store_us: float  # PostgreSQL or Redis
    enqueue_us: float  # the enqueuing process (this one)
    complete: bool  # every job ran within --run-timeout
    enqueue_rate: float = math.nan  # drain: jobs/s of the bulk enqueue

    @property
    def total_us(self) -> float:
        return self.worker_us + self.store_us + self.enqueue_us


@dataclass(frozen=True)
class Latency:
    p50_ms: float
    p99_ms: float
    max_ms: float
    enqueue_p50_ms: float
    samples: int


@dataclass(frozen=True)
class KillRun:
    jobs: int
    kills: int
    restarts: int
    lost: int
    twice: int  # jobs that ran more than once
    all_ran_s: float | None  # enqueue to the last job's end; None if some were lost
    done_s: float  # enqueue to the end of the run, the wait for lost jobs included


class Runner:
    """Runs one system's measurements with fresh worker processes each time."""

    def __init__(self, args: argparse.Namespace, adapter: Adapter, tmp: Path) -> None:
        self.args = args
        self.adapter = adapter
        self.tmp = tmp
        self.runs = 0

    def _log(self, what: str) -> DoneLog:
        self.runs += 1
        path = self.tmp / f"done-{self.adapter.name}-{what}-{self.runs}.log"
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return DoneLog(path)

    def _warm_up(self, log: DoneLog, first_id: int) -> int:
        """Run a few jobs through every worker; the next free id."""
        count = max(8, 4 * self.args.workers)
        self.adapter.enqueue_batch(range(first_id, first_id + count), 0.0)
        if not log.wait_count(count, START_TIMEOUT, self.adapter.check_alive):
            raise Unavailable(f"its workers ran {log.count()} of {count} warm-up jobs within "
                              f"{START_TIMEOUT:g} s:\n{self._tails()}")
        return first_id + count

    def _tails(self) -> str:
        return "\n".join(self.adapter.env.children.log_tail(c) for c in self.adapter.roots)

    def drain(self) -> Throughput:
        """N jobs in the queue, then the workers start; the CPU counts from the first job."""
        a, n = self.adapter, self.args.jobs
        a.reset()
        log = self._log("drain")
        t0, own0 = time.monotonic(), time.process_time()
        for k in range(0, n, ENQUEUE_CHUNK):
            a.enqueue_batch(range(k, min(n, k + ENQUEUE_CHUNK)), 0.0)
        enqueue_s, enqueue_cpu = time.monotonic() - t0, time.process_time() - own0
        a.settle()
        a.start(log, self.args.workers)
        try:
            if not log.wait_count(1, START_TIMEOUT, a.check_alive):
                raise Unavailable(f"no job ran within {START_TIMEOUT:g} s of the workers' "
                                  f"start:\n{self._tails()}")
            # Starting the workers is not the queue's work: CPU counts from here.
            first, cpu0, store0 = log.count(), a.cpu(), a.store_cpu()
            complete = log.wait_count(n, self.args.run_timeout, a.check_alive)
            cpu, store = a.cpu() - cpu0, a.store_cpu() - store0
        finally:
            a.stop()
        rows = [r for r in log.rows() if r[0] < n]
        done = len({r[0] for r in rows})
        span = (max(r[2] for r in rows) - min(r[1] for r in rows)) / 1e9
        after = max(1, len(rows) - first)
        return Throughput(rate=done / span if span > 0 else math.nan,
                          worker_us=cpu / after * 1e6, store_us=store / after * 1e6,
                          enqueue_us=enqueue_cpu / n * 1e6, complete=complete,
                          enqueue_rate=n / enqueue_s if enqueue_s > 0 else math.nan)

    def live(self) -> Throughput:
        a, n = self.adapter, self.args.jobs
        a.reset()
        log = self._log("live")
        a.start(log, self.args.workers)
        try:
            warm = self._warm_up(log, n) - n
            cpu0, store0, own0 = a.cpu(), a.store_cpu(), time.process_time()
            t0 = tasks.now_ns()
            for k in range(0, n, ENQUEUE_CHUNK):
                a.enqueue_batch(range(k, min(n, k + ENQUEUE_CHUNK)), 0.0)
            complete = log.wait_count(n + warm, self.args.run_timeout, a.check_alive)
            cpu, store, own = a.cpu() - cpu0, a.store_cpu() - store0, time.process_time() - own0
        finally:
            a.stop()
        rows = [r for r in log.rows() if r[0] < n]
        if not rows:
            raise h.BenchmarkError(f"no job ran within {self.args.run_timeout:g} s")
        done = len({r[0] for r in rows})
        span = (max(r[2] for r in rows) - t0) / 1e9
        return Throughput(rate=done / span if span > 0 else math.nan, worker_us=cpu / done * 1e6,
                          store_us=store / done * 1e6, enqueue_us=own / done * 1e6,
                          complete=complete)

    def latency(self) -> Latency:
        a, k = self.adapter, self.args.latency_jobs
        a.reset()
        log = self._log("latency")
        a.start(log, self.args.workers)
        before: dict[int, int] = {}
        enqueue_ms: list[float] = []
        try:
            next_id = self._warm_up(log, 0)
            expected = log.count()
            time.sleep(self.args.gap_ms / 1000)
            for _ in range(k):
                job_id, next_id = next_id, next_id + 1
                t = tasks.now_ns()
                a.enqueue_one(job_id, 0.0)
                enqueue_ms.append((tasks.now_ns() - t) / 1e6)
                before[job_id] = t
                expected += 1
                if not log.wait_count(expected, LATENCY_JOB_TIMEOUT, a.check_alive):
                    raise h.BenchmarkError(f"job {job_id} did not run within "
                                           f"{LATENCY_JOB_TIMEOUT:g} s of its enqueue")
                time.sleep(self.args.gap_ms / 1000)  # the pool is idle again
        finally:
            a.stop()
        lat = [(start - before[i]) / 1e6 for i, start, _, _ in log.rows() if i in before]
        return Latency(p50_ms=percentile(lat, 0.5), p99_ms=percentile(lat, 0.99),
                       max_ms=max(lat), enqueue_p50_ms=percentile(enqueue_ms, 0.5),
                       samples=len(lat))

    def kill(self, rng: random.Random) -> KillRun:
        a, n, args = self.adapter, self.args.kill_jobs, self.args
        a.reset()
        log = self._log("kill")
        started = log.path.with_suffix(".started")
        a.start(log, args.workers, started=started)
        kills = 0
        try:
            warm = self._warm_up(log, n) - n
            t0 = time.monotonic()
            for k in range(0, n, ENQUEUE_CHUNK):
                a.enqueue_batch(range(k, min(n, k + ENQUEUE_CHUNK)), args.kill_job_ms)
            a.settle()
            # Kill while the backlog lasts: until the jobs not done could all be ones
            # a kill interrupted (waiting to be handed back), up to --max-kills and a
            # time bound.
            kill_deadline = t0 + args.run_timeout
            while (kills < args.max_kills and log.count() + kills < n + warm
                   and time.monotonic() < kill_deadline):
                time.sleep(args.kill_every * rng.uniform(0.5, 1.5))
                a.tend()
                if a.kill_one(rng, lambda: tasks.busy_pids(str(started), str(log.path))):
                    kills += 1
            # Recovery: until every job ran, or no job has run for the system's recovery
            # time (procrastinate's is longer: a stalled job waits for its worker's
            # heartbeat to be 30 s old).
            cap = max(a.recovery_seconds, t0 + args.run_timeout - time.monotonic())
            missing = log.wait_ids(range(n), a.recovery_seconds, cap, a.tend)
            ended = time.monotonic()
        finally:
            a.stop()
        rows = [r for r in log.rows() if r[0] < n]
        runs: dict[int, int] = {}
        for job_id, *_ in rows:
            runs[job_id] = runs.get(job_id, 0) + 1
        # CLOCK_MONOTONIC in seconds is time.monotonic()'s clock.
        last_done = max((r[2] for r in rows), default=0) / 1e9
        return KillRun(jobs=n, kills=kills, restarts=a.restarts, lost=len(missing),
                       twice=sum(1 for c in runs.values() if c > 1),
                       all_ran_s=None if missing else last_done - t0, done_s=ended - t0)


# ---- the parts ------------------------------------------------------------------------


@dataclass
class System:
    """A system in the run: its adapter, or why it is not measured."""

    name: str
    adapter: Adapter | None
    reason: str = ""
    failed: bool = False
    drain: list[Throughput] = field(default_factory=list)
    live: list[Throughput] = field(default_factory=list)
    latency: list[Latency] = field(default_factory=list)


def med(values: Iterable[float]) -> float:
    vals = [v for v in values if not math.isnan(v)]
    return h.median(vals) if vals else float("nan")


def build(args: argparse.Namespace, env: Env, names: Sequence[str], reliable: bool,
          ) -> list[System]:
    systems = []
    for name in names:
        adapter = ADAPTERS[name](env, reliable=reliable)
        try:
            adapter.prepare()
        except Unavailable as exc:
            say(f"{name}: not measured: {exc}")
            systems.append(System(name, None, str(exc)))
            continue
        systems.append(System(name, adapter))
    return systems


def measure(system: System, what: str, fn: Callable[[], Any]) -> Any:
    """Run one measurement; a system that fails is marked and skipped from then on."""
    if system.adapter is None:
        return None
    try:
        return fn()
    except Unavailable as exc:
        system.reason = f"cannot run here: {exc}"
    except (h.BenchmarkError, psycopg.Error, DatabaseError, OSError) as exc:
        system.reason = f"{what} failed: {exc}"
        system.failed = True
    say(f"{system.name}: not measured further: {system.reason}")
    with contextlib.suppress(Exception):
        system.adapter.stop()
    with contextlib.suppress(Exception):
        system.adapter.close()
    system.adapter = None
    return None


def ratio_note(systems: Sequence[System]) -> str:
    tiers = next((s for s in systems if s.name == "tiers"), None)
    if tiers is None:
        return "tiers not in --systems"
    return f"tiers not measured: {tiers.reason}"


def fmt(value: float, spec: str) -> str:
    return "-" if math.isnan(value) else format(value, spec)


def part_throughput(args: argparse.Namespace, systems: list[System], tmp: Path) -> None:
    runners = {s.name: Runner(args, s.adapter, tmp) for s in systems if s.adapter is not None}
    order = [s.name for s in systems]
    by_name = {s.name: s for s in systems}
    for r in range(args.rounds):
        for mode in args.modes:
            for name in h.rotated(order, r):
                system = by_name[name]
                if system.adapter is None:
                    continue
                runner = runners[name]
                t = measure(system, mode, runner.drain if mode == "drain" else runner.live)
                if t is None:
                    continue
                (system.drain if mode == "drain" else system.live).append(t)
                extra = f", enqueue {t.enqueue_rate:.0f} jobs/s" if mode == "drain" else ""
                say(f"  round {r + 1}/{args.rounds} {mode:<5} {name:<14}{t.rate:8.0f} jobs/s  "
                    f"CPU us/job: workers {t.worker_us:.0f}, store {t.store_us:.0f}, "
                    f"enqueue {t.enqueue_us:.0f}{extra}{'' if t.complete else '  INCOMPLETE'}")
    for mode in args.modes:
        print_throughput(args, systems, mode)


def _ratio(tiers: float, peer: float) -> str:
    if math.isnan(tiers) or math.isnan(peer) or peer == 0:
        return "-"
    return f"{tiers / peer:.2f}"


def print_throughput(args: argparse.Namespace, systems: Sequence[System], mode: str) -> None:
    def runs(s: System) -> list[Throughput]:
        return s.drain if mode == "drain" else s.live

    print()
    if mode == "drain":
        print(f"Throughput, drain: {args.jobs} no-op jobs enqueued in bulk before "
              f"{args.workers} worker processes start; jobs/s from the first job's start to "
              f"the last one's end; CPU us per job (medians of {args.rounds} rounds)")
    else:
        print(f"Throughput, live: {args.jobs} no-op jobs enqueued in batches of "
              f"{ENQUEUE_CHUNK} while {args.workers} warm worker processes run; jobs/s from "
              f"the first enqueue to the last end; CPU us per job (medians of {args.rounds} "
              f"rounds)")
    print(f"  {'system':<15}{'jobs/s':>8}{'enqueue':>9}{'workers':>9}{'store':>8}{'enqueue':>9}"
          f"{'total':>8}  jobs/s per round")
    print(f"  {'':<15}{'':>8}{'jobs/s':>9}{'CPU':>9}{'CPU':>8}{'CPU':>9}{'CPU':>8}")
    for s in systems:
        if not runs(s):
            print(f"  {s.name:<15}{'-':>8}{'-':>9}{'-':>9}{'-':>8}{'-':>9}{'-':>8}  "
                  f"not measured: {s.reason}")
            continue
        rs = runs(s)
        per_round = "  ".join(f"{t.rate:.0f}" + ("" if t.complete else "*") for t in rs)
        print(f"  {s.name:<15}{med(t.rate for t in rs):>8.0f}"
              f"{fmt(med(t.enqueue_rate for t in rs), '.0f'):>9}"
              f"{med(t.worker_us for t in rs):>9.0f}{med(t.store_us for t in rs):>8.0f}"
              f"{med(t.enqueue_us for t in rs):>9.0f}{med(t.total_us for t in rs):>8.0f}"
              f"  {per_round}")
    if any(not t.complete for s in systems for t in runs(s)):
        print(f"  * incomplete: not every job ran within --run-timeout ({args.run_timeout:g} s); "
              f"the rate counts those that did")
    _print_ratios(systems, lambda s: med(t.rate for t in runs(s)), "jobs/s",
                  second=lambda s: med(t.total_us for t in runs(s)), label2="CPU/job",
                  has=lambda s: bool(runs(s)))


def _print_ratios(systems: Sequence[System], metric: Callable[[System], float], label: str, *,
                  second: Callable[[System], float] | None = None, label2: str = "",
                  has: Callable[[System], bool]) -> None:
    """A line per measured tiers variant: its ``metric`` over each peer's."""
    variants = [s for s in systems if s.name.startswith("tiers") and has(s)]
    if not variants:
        print(f"  ratio tiers/peer: n/a ({ratio_note(systems)})")
        return
    for tiers in variants:
        parts = []
        for s in systems:
            if s.name.startswith("tiers") or not has(s):
                continue
            text = f"{s.name} {_ratio(metric(tiers), metric(s))}"
            if second is not None:
                text += f" ({label2} {_ratio(second(tiers), second(s))})"
            parts.append(text)
        print(f"  ratio {tiers.name}/peer, {label}: " + ", ".join(parts))


def part_latency(args: argparse.Namespace, systems: list[System], tmp: Path) -> None:
    runners = {s.name: Runner(args, s.adapter, tmp) for s in systems if s.adapter is not None}
    order = [s.name for s in systems]
    by_name = {s.name: s for s in systems}
    for r in range(args.rounds):
        for name in h.rotated(order, r):
            system = by_name[name]
            if system.adapter is None:
                continue
            lat = measure(system, "latency", runners[name].latency)
            if lat is not None:
                system.latency.append(lat)
                say(f"  round {r + 1}/{args.rounds} latency {name:<14}p50 {lat.p50_ms:7.2f} ms  "
                    f"p99 {lat.p99_ms:7.2f} ms  max {lat.max_ms:7.2f} ms")
    print()
    print(f"Enqueue-to-start latency on an idle pool of {args.workers} worker processes: "
          f"{args.latency_jobs} jobs one at a time, each {args.gap_ms:g} ms after the last ran "
          f"(medians of {args.rounds} rounds)")
    print(f"  {'system':<15}{'p50 ms':>8}{'p99 ms':>8}{'max ms':>8}{'enqueue':>9}  "
          f"p50 ms per round")
    print(f"  {'':<15}{'':>8}{'':>8}{'':>8}{'p50 ms':>9}")
    for s in systems:
        if not s.latency:
            print(f"  {s.name:<15}{'-':>8}{'-':>8}{'-':>8}{'-':>9}  not measured: {s.reason}")
            continue
        rounds = "  ".join(f"{x.p50_ms:.2f}" for x in s.latency)
        print(f"  {s.name:<15}{med(x.p50_ms for x in s.latency):>8.2f}"
              f"{med(x.p99_ms for x in s.latency):>8.2f}{med(x.max_ms for x in s.latency):>8.2f}"
              f"{med(x.enqueue_p50_ms for x in s.latency):>9.2f}  {rounds}")
    _print_ratios(systems, lambda s: med(x.p50_ms for x in s.latency), "p50",
                  second=lambda s: med(x.p99_ms for x in s.latency), label2="p99",
                  has=lambda s: bool(s.latency))


def part_kill(args: argparse.Namespace, env: Env, names: Sequence[str], tmp: Path, *,
              unavailable: dict[str, str]) -> tuple[bool, set[str]]:
    """The kill runs: whether none failed, and the systems measured."""
    rng = random.Random(args.seed)
    results: list[tuple[str, str, str, KillRun | None]] = []  # system, setting, text, run
    ok = True
    measured: set[str] = set()
    for setting in args.kill_settings:
        reliable = setting == "reliable"
        for name in names:
            if name in unavailable:
                results.append((name, setting, f"not measured: {unavailable[name]}", None))
                continue
            system = build(args, env, [name], reliable)[0]
            if system.adapter is None:
                results.append((name, setting, f"not measured: {system.reason}", None))
                continue
            text = system.adapter.setting()
            runner = Runner(args, system.adapter, tmp)
            try:
                run = measure(system, "kill run", functools.partial(runner.kill, rng))
            finally:
                if system.adapter is not None:
                    system.adapter.close()
            if run is None:
                ok = ok and not system.failed
                results.append((name, setting, f"not measured: {system.reason}", None))
                continue
            results.append((name, setting, text, run))
            measured.add(name)
            say(f"  kill {name:<14}{setting:<9} {run.kills} kills, lost {run.lost} of "
                f"{run.jobs}, ran twice {run.twice}, "
                f"all ran {'never' if run.all_ran_s is None else f'{run.all_ran_s:.1f} s'}")
    print()
    print(f"kill -9: {args.kill_jobs} jobs of {args.kill_job_ms:g} ms each on {args.workers} "
          f"worker processes; a process in the middle of a job gets SIGKILL every "
          f"~{args.kill_every:g} s "
          f"while the backlog lasts (at most {args.max_kills}); lost: never completed; all ran: "
          f"seconds from the enqueue to the last job's end")
    print(f"  {'system':<15}{'setting':<10}{'kills':>6}{'lost':>7}{'twice':>7}{'all ran':>9}"
          f"{'run s':>7}  settings")
    for name, setting, text, run in results:
        if run is None:
            print(f"  {name:<15}{setting:<10}{'-':>6}{'-':>7}{'-':>7}{'-':>9}{'-':>7}  {text}")
            continue
        rec = "never" if run.all_ran_s is None else f"{run.all_ran_s:.1f}"
        print(f"  {name:<15}{setting:<10}{run.kills:>6}{run.lost:>7}{run.twice:>7}{rec:>9}"
              f"{run.done_s:>7.1f}  {text}")
    return ok, measured


# ---- the run --------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/jobs.py",
        description="tiers' job queue against procrastinate, Celery and RQ: no-op throughput, "
                    "enqueue-to-start latency, jobs lost under kill -9.")
    p.add_argument("--quick", action="store_true",
                   help="about two minutes: 1 round, fewer jobs, reliable settings only in "
                        "the kill run")
    p.add_argument("--systems", type=h.choice_list(SYSTEMS), default=list(SYSTEMS),
                   help="comma-separated: tiers, procrastinate, celery, rq (default all)")
    p.add_argument("--parts", type=h.choice_list(PARTS), default=list(PARTS),
                   help="comma-separated: throughput, latency, kill (default all)")
    p.add_argument("--workers", type=int, default=2,
                   help="worker processes of every system (default 2)")
    p.add_argument("--rounds", type=int, help="rounds of throughput and latency (default 3)")
    p.add_argument("--jobs", type=int, help="no-op jobs per throughput run (default 20000)")
    p.add_argument("--modes", type=h.choice_list(MODES),
                   help="throughput modes: drain, live (default drain)")
    p.add_argument("--latency-jobs", type=int, help="jobs per latency run (default 200)")
    p.add_argument("--gap-ms", type=float, default=50.0,
                   help="idle time between two latency jobs (default 50)")
    p.add_argument("--kill-jobs", type=int, help="jobs of the kill run (default 2000; 500 with "
                                                 "--quick)")
    p.add_argument("--kill-job-ms", type=float, default=20.0,
                   help="how long each job of the kill run sleeps (default 20)")
    p.add_argument("--kill-every", type=float, default=0.5,
                   help="mean seconds between two kills (default 0.5)")
    p.add_argument("--max-kills", type=int, help="kills per kill run at most (default 30; 8 "
                                                 "with --quick)")
    p.add_argument("--kill-settings", type=h.choice_list(SETTINGS),
                   help="reliable (each peer's documented setting against lost jobs), "
                        "default (its defaults), or both (default both; reliable with --quick)")
    p.add_argument("--settings", choices=SETTINGS, default="reliable",
                   help="the peers' settings for throughput and latency (default reliable)")
    p.add_argument("--run-timeout", type=float,
                   help="seconds one throughput or kill run may take (default 600; 120 with "
                        "--quick)")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379",
                   help="the Redis of Celery and RQ (default redis://127.0.0.1:6379)")
    p.add_argument("--redis-db", type=int, default=12,
                   help="the Redis database the benchmark uses and cleans (default 12)")
    p.add_argument("--seed", type=int, default=1, help="random seed of the kill runs")
    args = p.parse_args(argv)
    quick = args.quick
    defaults = {"rounds": (1, 3), "jobs": (2000, 20_000), "latency_jobs": (40, 200),
                "kill_jobs": (500, 2000), "max_kills": (8, 30), "run_timeout": (120.0, 600.0),
                "modes": (["drain"], ["drain"]),
                "kill_settings": (["reliable"], list(SETTINGS))}
    for name, (q, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, q if quick else full)
    if not 1 <= args.workers <= 64:
        p.error("--workers must be in [1, 64]")
    if not 1 <= args.rounds <= 50:
        p.error("--rounds must be in [1, 50]")
    if not 10 <= args.jobs <= 1_000_000 or not 10 <= args.kill_jobs <= 1_000_000:
        p.error("--jobs and --kill-jobs must be in [10, 1000000]")
    if not 1 <= args.latency_jobs <= 100_000:
        p.error("--latency-jobs must be in [1, 100000]")
    if not 0 <= args.gap_ms <= 10_000 or not 0 <= args.kill_job_ms <= 10_000:
        p.error("--gap-ms and --kill-job-ms must be in [0, 10000]")
    if not 0.01 <= args.kill_every <= 60 or not 1 <= args.max_kills <= 100_000:
        p.error("--kill-every must be in [0.01, 60] s and --max-kills in [1, 100000]")
    if not 1 <= args.run_timeout <= 7200:
        p.error("--run-timeout must be in [1, 7200] seconds")
    if not 0 <= args.redis_db <= 15:
        p.error("--redis-db must be in [0, 15]")
    if not args.redis_url.startswith(("redis://127.0.0.1", "redis://localhost")):
        p.error("--redis-url must be a loopback redis:// URL")
    return args


def versions() -> str:
    parts = [f"tiers {importlib.metadata.version('tiers')}"]
    for dist in ("procrastinate", "celery", "kombu", "rq", "redis"):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            parts.append(f"{dist} {importlib.metadata.version(dist)}")
    return f"{', '.join(parts)}; Python {platform.python_version()}, psycopg {psycopg.__version__}"


def run(args: argparse.Namespace, tmp: Path, children: h.Children) -> int:
    print(h.machine_summary())
    print(versions())
    env = Env(tmp=tmp, children=children, redis_url=args.redis_url, redis_db=args.redis_db)
    if any(name.startswith("tiers") or name == "procrastinate" for name in args.systems):
        run_as = embedded.resolve_run_as(embedded.SUPERUSER)
        print(check_embedded(tmp, run_as))
        say("starting PostgreSQL")
        env.pg = start_cluster(children, tmp / "pg", run_as, "pg", 0)
    stores = []
    if env.pg is not None:
        stores.append(f"embedded PostgreSQL on 127.0.0.1:{env.pg.ports[PRIMARY]} (fsync on) for "
                      f"tiers and procrastinate")
    if "celery" in args.systems or "rq" in args.systems:
        stores.append(f"Redis {args.redis_url} database {args.redis_db} for Celery (keys "
                      f"{REDIS_PREFIX}*) and RQ (keys rq:*)")
    print(f"stores: {'; '.join(stores)}")
    print(f"every system: {args.workers} worker processes, one job at a time each; the job is "
          f"_jobs_tasks.run_job (a sync function)")
    print(flush=True)
    status = 0
    unavailable: dict[str, str] = {}
    measured: set[str] = set()
    tiers_reason = ""
    measured_parts = [p for p in args.parts if p in ("throughput", "latency")]
    if measured_parts:
        systems = build(args, env, args.systems, args.settings == "reliable")
        print(f"settings for throughput and latency ({args.settings}):")
        for s in systems:
            text = s.adapter.setting() if s.adapter is not None else f"not measured: {s.reason}"
            print(f"  {s.name:<15}{text}")
        print(flush=True)
        try:
            if "throughput" in args.parts:
                part_throughput(args, systems, tmp)
                print(flush=True)
            if "latency" in args.parts:
                part_latency(args, systems, tmp)
                print(flush=True)
        finally:
            for s in systems:
                if s.adapter is not None:
                    s.adapter.close()
        for s in systems:
            if s.drain or s.live or s.latency:
                measured.add(s.name)
            if s.failed:
                status = 1
            elif s.name not in measured and s.reason:
                unavailable[s.name] = s.reason
            if s.name == "tiers":
                tiers_reason = s.reason
    if "kill" in args.parts:
        ok, killed = part_kill(args, env, [n for n in args.systems if n not in KILL_SKIPS],
                               tmp, unavailable=unavailable)
        measured |= killed
        if not ok:
            status = 1
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if "tiers" in args.systems and "tiers" not in measured:
        print(f"error: tiers was not measured: {tiers_reason or unavailable.get('tiers', '')}",
              file=sys.stderr)
        status = 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    h.exit_on_signals()
    tmp = Path(tempfile.mkdtemp(prefix="tiers-bench-jobs-"))
    # The PostgreSQL system user (when run as root) must be able to reach the data.
    tmp.chmod(0o755)
    try:
        with h.Children(str(tmp), grace=10.0) as children:
            return run(args, tmp, children)
    except (h.BenchmarkError, DatabaseError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
