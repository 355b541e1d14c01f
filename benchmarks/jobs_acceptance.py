"""The job queue's acceptance runs at full size (the tests run small forms of both).

    .venv/bin/python benchmarks/jobs_acceptance.py                 # both parts, about 4 minutes
    .venv/bin/python benchmarks/jobs_acceptance.py --parts kill --jobs 10000
    .venv/bin/python benchmarks/jobs_acceptance.py --parts cron --minutes 3

``kill``: a pool of ``--processes`` workers (``tiers worker``) while 10,000
jobs are enqueued in bursts and a random worker child is killed with SIGKILL
every ``--kill-every`` seconds. Each job records its runs in a table; the
run passes when every job is done and every job's work completed, i.e. none
is lost. Repeated runs (a job cut short by a kill runs again: at least once)
are counted and shown.

``cron``: two scheduler-only pools (``tiers worker --processes 0
--scheduler``) side by side for ``--minutes`` minutes on the real clock, with
a task scheduled every minute. It passes when every minute tick between the
first and the last is enqueued exactly once, and nothing twice.

It starts its own PostgreSQL (embedded, on an ephemeral loopback port, in a
temporary directory removed at the end) unless given ``--dsn``; there it uses
only its own queue (``acceptance``), schedule and table (``acceptance_runs``),
which it clears at the start. Exit status
0 when every part passes, 1 when one fails, 2 for a bad argument or when the
embedded PostgreSQL cannot run here.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from datetime import datetime
from pathlib import Path

import psutil
import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as h

from tiers.db import embedded
from tiers.jobs import store
from tiers.jobs.spec import NewJob

warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

TASKS = '''
"""Tasks of benchmarks/jobs_acceptance.py (written into its temporary directory)."""
import os

import psycopg

from tiers.jobs import current_job, periodic, task

_conns = {}


def _db():
    conn = _conns.get(os.getpid())
    if conn is None or conn.closed:
        conn = _conns[os.getpid()] = psycopg.connect(os.environ["ACCEPTANCE_DSN"],
                                                     autocommit=True)
    return conn


@task("acceptance.work", queue="acceptance")
def work(key: int) -> None:
    _db().execute("INSERT INTO acceptance_runs (key, attempt, pid) VALUES (%s, %s, %s)",
                  (key, current_job().attempt, os.getpid()))


@periodic("* * * * *")
@task("acceptance.tick", queue="acceptance")
def tick() -> None:
    pass
'''


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def start_postgres(children: h.Children, tmp: Path) -> str:
    run_as = embedded.resolve_run_as(embedded.SUPERUSER)
    root = tmp / "pg"
    root.mkdir(mode=0o755)
    layout = embedded.prepare_layout(root / "db", run_as)
    try:
        embedded.init_primary(layout, run_as, "db-primary")
    except Exception as exc:
        print(f"error: the embedded PostgreSQL cannot run here: {exc}", file=sys.stderr)
        sys.exit(h.EXIT_MISSING)
    port = h.free_port()
    children.start("postgres", embedded.server_argv(layout, "db-primary", port),
                   stop_signal=signal.SIGINT,
                   popen_kwargs={**run_as.popen_kwargs(), "cwd": str(layout.root)})
    dsn = embedded.conninfo(port, "postgres")
    deadline = time.monotonic() + 60
    while True:
        try:
            psycopg.connect(dsn, connect_timeout=1).close()
            return dsn
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise h.BenchmarkError("the embedded PostgreSQL did not answer in 60 s") from None
            time.sleep(0.1)


def worker(children: h.Children, tmp: Path, dsn: str, name: str, *args: str) -> h.Child:
    ready = tmp / f"{name}.ready"
    child = children.start(name, [sys.executable, "-m", "tiers", "--state-dir",
                                  str(tmp / "state"), "worker", "--dsn", dsn, "--pythonpath",
                                  str(tmp), "--import", "acceptance_tasks", "--name", name,
                                  "--ready-file", str(ready), *args],
                           env={**os.environ, "ACCEPTANCE_DSN": dsn},
                           popen_kwargs={"cwd": str(tmp)})
    deadline = time.monotonic() + 60
    while not ready.exists():
        if child.proc.poll() is not None or time.monotonic() > deadline:
            raise h.BenchmarkError(f"{name} did not start:\n{children.log_tail(child)}")
        time.sleep(0.05)
    return child


def part_kill(args: argparse.Namespace, children: h.Children, tmp: Path, dsn: str) -> bool:
    say(f"kill: {args.jobs} jobs, {args.processes} workers, a SIGKILL every "
        f"{args.kill_every:g} s")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE acceptance_runs (key integer NOT NULL, attempt integer,"
                     " pid integer)")
    pool = worker(children, tmp, dsn, "kill-pool", "--processes", str(args.processes),
                  "--no-scheduler", "--poll-interval", "0.5", "--queue", "acceptance")
    done_enqueueing = threading.Event()
    kills = 0

    def produce() -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            for first in range(0, args.jobs, args.burst):
                store.enqueue_many(conn, [
                    NewJob("acceptance.work", {"key": key}, queue="acceptance",
                           max_attempts=args.max_attempts)
                    for key in range(first, min(first + args.burst, args.jobs))])
                time.sleep(args.burst_pause)
        done_enqueueing.set()

    producer = threading.Thread(target=produce, daemon=True)
    started = time.monotonic()
    producer.start()
    chance = random.Random(args.seed)
    deadline = started + args.timeout
    states: Counter[str] = Counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        while time.monotonic() < deadline:
            time.sleep(args.kill_every)
            states = Counter(dict(conn.execute(
                "SELECT status, count(*) FROM tiers_jobs WHERE task = 'acceptance.work'"
                " GROUP BY status").fetchall()))
            if done_enqueueing.is_set() and states["done"] + states["dead"] >= args.jobs:
                break
            victims = [c.pid for c in psutil.Process(pool.proc.pid).children()]
            if victims and (not done_enqueueing.is_set() or states["done"] < args.jobs * 0.98):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(chance.choice(victims), signal.SIGKILL)
                    kills += 1
        elapsed = time.monotonic() - started
        finished = {r[0] for r in conn.execute("SELECT DISTINCT key FROM acceptance_runs")}
        runs = conn.execute("SELECT count(*) FROM acceptance_runs").fetchone()
        repeated = conn.execute("SELECT count(*) FROM tiers_jobs"
                                " WHERE task = 'acceptance.work' AND attempts > 1").fetchone()
    children.stop(pool)
    lost = args.jobs - len(finished)
    print(f"  enqueued {args.jobs}, done {states['done']}, dead {states['dead']}, "
          f"work completed for {len(finished)}, lost {lost}")
    print(f"  {kills} children killed in {elapsed:.1f} s; {repeated[0] if repeated else 0} "
          f"jobs ran more than once (cut short by a kill), {runs[0] if runs else 0} runs "
          f"recorded")
    passed = lost == 0 and states["done"] == args.jobs
    print(f"  kill: {'PASS' if passed else 'FAIL'}", flush=True)
    return passed


def part_cron(args: argparse.Namespace, children: h.Children, tmp: Path, dsn: str) -> bool:
    say(f"cron: two schedulers side by side for {args.minutes:g} minutes (a task every minute)")
    pools = [worker(children, tmp, dsn, f"scheduler-{n}", "--processes", "0", "--scheduler")
             for n in (1, 2)]
    time.sleep(args.minutes * 60 + 5)
    for pool in pools:
        children.stop(pool)
    with psycopg.connect(dsn, autocommit=True) as conn:
        keys = Counter(r[0] for r in conn.execute(
            "SELECT unique_key FROM tiers_jobs WHERE task = 'acceptance.tick'"))
    ticks = sorted(datetime.fromisoformat(key.split(":", 2)[2]) for key in keys)
    twice = sorted(key for key, count in keys.items() if count > 1)
    gaps = [t for a, t in itertools.pairwise(ticks) if (t - a).total_seconds() != 60]
    print(f"  {len(ticks)} minute ticks enqueued"
          + (f", {ticks[0]:%H:%M} to {ticks[-1]:%H:%M}" if ticks else "")
          + f"; enqueued twice: {len(twice)}; gaps: {len(gaps)}")
    passed = not twice and not gaps and len(ticks) >= int(args.minutes)
    print(f"  cron: {'PASS' if passed else 'FAIL'}", flush=True)
    return passed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", type=h.choice_list(("kill", "cron")),
                        default=["kill", "cron"], help="default: both")
    parser.add_argument("--dsn", help="use this database instead of an embedded server")
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--kill-every", type=float, default=0.5, metavar="SECONDS")
    parser.add_argument("--burst", type=int, default=200, help="jobs per enqueue statement")
    parser.add_argument("--burst-pause", type=float, default=0.05, metavar="SECONDS")
    parser.add_argument("--max-attempts", type=int, default=20)
    parser.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS")
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    if args.jobs < 1 or args.processes < 1 or args.kill_every <= 0 or args.minutes <= 0:
        parser.error("--jobs, --processes, --kill-every and --minutes must be positive")
    h.exit_on_signals()
    tmp = Path(tempfile.mkdtemp(prefix="tiers-jobs-acceptance-"))
    tmp.chmod(0o755)
    (tmp / "acceptance_tasks.py").write_text(TASKS, encoding="utf-8")
    results = []
    try:
        with h.Children(str(tmp)) as children:
            dsn = args.dsn or start_postgres(children, tmp)
            store.install_schema(dsn)
            with psycopg.connect(dsn, autocommit=True) as conn:
                # Only what an earlier run of this script left (its queue and schedule).
                conn.execute("DELETE FROM tiers_jobs WHERE queue = 'acceptance'")
                conn.execute("DELETE FROM tiers_cron_ticks WHERE schedule = 'acceptance.tick'")
                conn.execute("DROP TABLE IF EXISTS acceptance_runs")
            if "kill" in args.parts:
                results.append(part_kill(args, children, tmp, dsn))
            if "cron" in args.parts:
                results.append(part_cron(args, children, tmp, dsn))
    except h.BenchmarkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
