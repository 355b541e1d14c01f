"""The systems ``benchmarks/jobs.py`` compares, each behind the same small adapter.

An adapter starts N worker processes of its system, enqueues jobs in bulk
and one at a time, names the processes that run jobs (what the kill run
kills), restarts dead worker processes where the system has no master to,
stops everything it started, and empties and finally removes what its
system stored. Every job is ``_jobs_tasks.run_job``, which appends a line
to a done log; ``DoneLog`` reads it, so waiting for completion and listing
the jobs that completed is the same for every system.

Adding a system is adding an adapter to ``ADAPTERS``. tiers runs twice:
``tiers`` as it runs by default (outcomes committed with synchronous_commit
off, which a database crash can only turn into a second run of a job) and
``tiers-sync`` with ``--synchronous-commit`` (every outcome flushed to disk
before the next claim, as procrastinate does).
"""

from __future__ import annotations

import abc
import contextlib
import importlib.util
import os
import random
import shutil
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _harness as h
import _jobs_tasks as tasks
import psutil
from _postgres import PRIMARY, Nodes, connect, server_cpu

from tiers.db import embedded

BENCH_DIR = Path(__file__).resolve().parent
PEERS_INSTALL = ".venv/bin/pip install -e '.[bench]'"
# Every Celery key in Redis starts with this; RQ's keys are rq:* in the same database.
REDIS_PREFIX = "tiers-bench-jobs:"
POLL = 0.02


class Unavailable(Exception):
    """A system cannot run here; the message says why (its rows are skipped)."""


# ---- the done log ---------------------------------------------------------------------


class DoneLog:
    """The file the benchmark's job appends a line to each time it runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def count(self) -> int:
        """Lines written so far (runs, not distinct jobs)."""
        try:
            return self.path.stat().st_size // tasks.LINE_BYTES
        except FileNotFoundError:
            return 0

    def rows(self) -> list[tuple[int, int, int, int]]:
        return tasks.read_done(str(self.path))

    def wait_count(self, target: int, timeout: float, tend: Callable[[], object] | None = None,
                   ) -> bool:
        """Poll until ``target`` lines are written; False when ``timeout`` s pass first."""
        deadline = time.monotonic() + timeout
        while self.count() < target:
            if time.monotonic() > deadline:
                return False
            if tend is not None:
                tend()
            time.sleep(POLL)
        return True

    def wait_ids(self, ids: Iterable[int], quiet: float, timeout: float,
                 tend: Callable[[], object] | None = None) -> set[int]:
        """Poll until every job of ``ids`` ran; the ids still missing.

        Gives up when nothing new has run for ``quiet`` seconds, or after
        ``timeout`` seconds in all.
        """
        missing = set(ids)
        now = time.monotonic()
        deadline, progress = now + timeout, now
        seen = -1
        while missing:
            lines = self.count()
            now = time.monotonic()
            if lines != seen:
                seen, progress = lines, now
                missing -= {row[0] for row in self.rows()}
                if not missing:
                    break
            if now > deadline or now > progress + quiet:
                break
            if tend is not None:
                tend()
            time.sleep(POLL * 5)
        return missing


# ---- adapters -------------------------------------------------------------------------


@dataclass
class Env:
    """What the adapters share: the temporary directory, children, the stores."""

    tmp: Path
    children: h.Children
    redis_url: str
    redis_db: int
    pg: Nodes | None = None
    pg_error: str = ""
    redis_pid: int | None = None
    redis_error: str = ""
    redis_checked: bool = False


def _command(name: str) -> str:
    """The console script of a peer, from this interpreter's environment first."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise Unavailable(f"the command {name!r} is missing; install the peers with: "
                          f"{PEERS_INSTALL}")
    return found


def _require_module(module: str, package: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise Unavailable(f"the Python package {package!r} is missing; install the peers "
                          f"with: {PEERS_INSTALL}")


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and all its descendants, those already reaped included.

    A descendant that exited and was waited for moves its time into its
    parent's children times, so the sum only grows (RQ's work horses, one
    per job, are counted that way).
    """
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


class Adapter(abc.ABC):
    """One job queue system, driven the same way as every other.

    ``start`` runs ``workers`` processes that execute jobs and append to
    ``out``; ``enqueue_batch``/``enqueue_one`` add jobs running
    ``run_job(job_id, sleep_ms)``; ``job_processes`` are the processes that run
    jobs (what the kill run kills); ``tend`` restarts worker processes that
    died, for a system that has no master of its own doing it (a process
    supervisor's job); ``stop`` ends every worker process; ``reset`` empties
    the queue and the job storage between runs; ``close`` removes what the
    system stored.
    """

    name = ""
    # The longest a system may need to hand the jobs of a killed process to
    # another one, with its settings; the kill run waits until no job has run
    # for this long before counting what never completed as lost.
    recovery_seconds = 15.0

    def __init__(self, env: Env, *, reliable: bool) -> None:
        self.env = env
        self.reliable = reliable
        self.roots: list[h.Child] = []
        self.restarts = 0

    # What each system implements.
    @abc.abstractmethod
    def setting(self) -> str:
        """The settings this system runs with, as the report prints them."""

    def prepare(self) -> None:  # noqa: B027 (optional; by default nothing)
        """Check that the system can run here (Unavailable if not) and set up its storage."""

    @abc.abstractmethod
    def worker_argvs(self, workers: int) -> list[list[str]]:
        """The command lines of the processes that run ``workers`` workers."""

    def worker_env(self) -> dict[str, str]:
        return {}

    @abc.abstractmethod
    def enqueue_batch(self, ids: Sequence[int], sleep_ms: float) -> None:
        """Enqueue one job per id, each running ``run_job(id, sleep_ms)``."""

    def enqueue_one(self, job_id: int, sleep_ms: float) -> None:
        self.enqueue_batch([job_id], sleep_ms)

    def settle(self) -> None:  # noqa: B027 (optional; by default nothing)
        """After a bulk enqueue, before the clock runs: what the store would soon do anyway."""

    def job_processes(self) -> list[psutil.Process]:
        """Children of the master process(es): where the jobs run."""
        procs: list[psutil.Process] = []
        for root in self.roots:
            with contextlib.suppress(psutil.Error):
                procs.extend(psutil.Process(root.proc.pid).children())
        return procs

    def restarts_dead_workers(self) -> bool:
        return False

    @abc.abstractmethod
    def reset(self) -> None:
        """Drop every job and result, ready for the next run."""

    def close(self) -> None:  # noqa: B027 (optional; by default nothing)
        """Remove what the system stored (its database or keys)."""

    # Shared.
    def start(self, out: DoneLog, workers: int, *, started: Path | None = None) -> None:
        """Start the workers; their jobs append to ``out`` (and ``started``, if given)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            [str(BENCH_DIR), *filter(None, [env.get("PYTHONPATH")])])
        env[tasks.OUT_ENV] = str(out.path)
        env.pop(tasks.STARTED_ENV, None)
        if started is not None:
            env[tasks.STARTED_ENV] = str(started)
        env["TIERS_BENCH_JOBS_RELIABLE"] = "1" if self.reliable else "0"
        env.update(self.worker_env())
        self._argvs = self.worker_argvs(workers)
        self._env = env
        self.restarts = 0
        for i, argv in enumerate(self._argvs):
            self.roots.append(self._spawn(i, argv))

    def _spawn(self, index: int, argv: Sequence[str]) -> h.Child:
        # In the temporary directory: no configuration file of the current one is read.
        return self.env.children.start(f"{self.name}-{index}", argv, env=self._env,
                                       popen_kwargs={"cwd": str(self.env.tmp)})

    def tend(self) -> None:
        """Restart the worker processes that died, where the system has no master to."""
        if not self.restarts_dead_workers():
            return
        for i, child in enumerate(list(self.roots)):
            if child.proc.poll() is None:
                continue
            self.env.children.stop(child)
            self.roots[i] = self._spawn(i, self._argvs[i])
            self.restarts += 1

    def check_alive(self) -> None:
        """BenchmarkError when a worker process has exited (and is not replaced by ``tend``)."""
        if self.restarts_dead_workers():
            return
        for child in self.roots:
            if child.proc.poll() is not None:
                raise h.BenchmarkError(
                    f"{child.name} exited with status {child.proc.returncode}:\n"
                    f"{self.env.children.log_tail(child)}")

    def cpu(self) -> float:
        return sum(tree_cpu(child.proc.pid) for child in self.roots)

    @abc.abstractmethod
    def store_cpu(self) -> float:
        """CPU seconds used so far by the system's store (database or broker)."""

    def stop(self) -> None:
        """Stop every worker process and whatever they forked (even into its own group)."""
        descendants: list[psutil.Process] = []
        for child in self.roots:
            with contextlib.suppress(psutil.Error):
                descendants.extend(psutil.Process(child.proc.pid).children(recursive=True))
        for child in reversed(self.roots):
            self.env.children.stop(child)
        self.roots = []
        for proc in descendants:
            with contextlib.suppress(psutil.Error):
                proc.kill()
        psutil.wait_procs(descendants, timeout=5)

    def kill_one(self, rng: random.Random, busy: Callable[[], set[int]]) -> bool:
        """SIGKILL one process in the middle of a job; False if there was none for a while.

        ``busy`` gives the pids that started a job and have not finished it: a
        process between two jobs, or still starting, is not what this kills.
        """
        for _ in range(40):
            in_job = busy()
            procs = [p for p in self.job_processes() if p.pid in in_job and p.is_running()]
            if procs:
                try:
                    rng.choice(procs).kill()
                except psutil.Error:
                    continue
                return True
            time.sleep(0.005)
        return False


def _pg_store_cpu(env: Env) -> float:
    assert env.pg is not None
    return server_cpu(env.pg.servers[PRIMARY].proc.pid)


class TiersAdapter(Adapter):
    """tiers' own job queue: ``tiers worker`` and the enqueue API of ``tiers.jobs``.

    There is no reliability setting to choose: a job whose worker child dies
    runs again, at once when the master sees the death, else when its lease
    expires (``--lease``, 30 s).
    """

    name = "tiers"
    DATABASE = "tiers_bench_tiers"
    EXTRA_ARGS: tuple[str, ...] = ()
    # The master hands a dead child's job back at once; the lease (30 s) is the fallback.
    recovery_seconds = 45.0

    def __init__(self, env: Env, *, reliable: bool) -> None:
        super().__init__(env, reliable=reliable)
        self._conn: Any = None

    def setting(self) -> str:
        return ("tiers worker --processes N (a master forking N children); at-least-once "
                "(leases), whatever the setting")

    def _dsn(self) -> str:
        assert self.env.pg is not None
        return embedded.conninfo(self.env.pg.ports[PRIMARY], self.DATABASE)

    def prepare(self) -> None:
        try:
            import tiers.jobs as tiers_jobs
        except ImportError as exc:
            raise Unavailable(f"tiers is not installed here ({exc}): "
                              f"pip install -e . first") from exc
        self._jobs: Any = tiers_jobs
        self._cmd = _command("tiers")
        if self.env.pg is None:
            raise Unavailable(f"no PostgreSQL: {self.env.pg_error}")
        _create_database(self.env.pg, self.DATABASE)
        tiers_jobs.install_schema(self._dsn())
        self._conn = connect(self._dsn())

    def worker_argvs(self, workers: int) -> list[list[str]]:
        return [[self._cmd, "worker", "--dsn", self._dsn(), "--processes", str(workers),
                 "--queue", tasks.QUEUE, "--import", "_jobs_tasks", "--pythonpath",
                 str(BENCH_DIR), "--no-scheduler", "--name", "tiers-bench", *self.EXTRA_ARGS]]

    def worker_env(self) -> dict[str, str]:
        return {"TIERS_BENCH_JOBS_SYSTEM": "tiers"}

    def enqueue_batch(self, ids: Sequence[int], sleep_ms: float) -> None:
        new_job = self._jobs.NewJob
        self._jobs.enqueue_many(self._conn, [
            new_job(task=tasks.TASK_NAME, args={"job_id": i, "sleep_ms": sleep_ms},
                    queue=tasks.QUEUE) for i in ids])

    def enqueue_one(self, job_id: int, sleep_ms: float) -> None:
        self._jobs.enqueue(self._conn, tasks.TASK_NAME, {"job_id": job_id, "sleep_ms": sleep_ms},
                           queue=tasks.QUEUE)

    def store_cpu(self) -> float:
        return _pg_store_cpu(self.env)

    def settle(self) -> None:
        _analyze(self._dsn(), "tiers_jobs")

    def reset(self) -> None:
        self._conn.execute("TRUNCATE tiers_jobs, tiers_job_batches RESTART IDENTITY CASCADE")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class TiersSyncAdapter(TiersAdapter):
    """tiers with ``--synchronous-commit``: each job's outcome is on disk before the next claim."""

    name = "tiers-sync"
    DATABASE = "tiers_bench_tiers_sync"
    EXTRA_ARGS = ("--synchronous-commit",)

    def setting(self) -> str:
        return super().setting() + "; --synchronous-commit"


def _analyze(dsn: str, table: str) -> None:
    """ANALYZE a job table that was just filled, as autovacuum soon would.

    Without statistics, on a fresh table, the planner picks poor plans for
    the claim queries: procrastinate's first run here went three times slower.
    """
    with connect(dsn) as conn:
        conn.execute(f"ANALYZE {table}")


def _create_database(pg: Nodes, name: str) -> bool:
    """Create database ``name`` on the primary unless it exists; True if it was created."""
    with connect(pg.dsn(PRIMARY)) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return False
        conn.execute(f'CREATE DATABASE "{name}"')
        return True


class ProcrastinateAdapter(Adapter):
    name = "procrastinate"
    DATABASE = "tiers_bench_procrastinate"
    # get_stalled_jobs' default heartbeat age (30 s), the recipe's period (5 s),
    # a worker's heartbeat interval (10 s) and a margin.
    recovery_seconds = 60.0

    def __init__(self, env: Env, *, reliable: bool) -> None:
        super().__init__(env, reliable=reliable)
        self._app: Any = None

    def setting(self) -> str:
        if self.reliable:
            return ("N worker processes, concurrency 1; 'Retry stalled jobs' recipe "
                    f"(get_stalled_jobs() + retry_job, cron '{tasks.STALLED_CRON}')")
        return "N worker processes, concurrency 1; defaults (no stalled-job retry)"

    def _dsn(self) -> str:
        assert self.env.pg is not None
        return embedded.conninfo(self.env.pg.ports[PRIMARY], self.DATABASE)

    def prepare(self) -> None:
        _require_module("procrastinate", "procrastinate")
        self._cmd = _command("procrastinate")
        if self.env.pg is None:
            raise Unavailable(f"no PostgreSQL: {self.env.pg_error}")
        fresh = _create_database(self.env.pg, self.DATABASE)
        self._app = tasks.make_procrastinate_app(self._dsn(), reliable=self.reliable, sync=True)
        self._app.open()
        if fresh:
            self._app.schema_manager.apply_schema()
        self._task = self._app.tasks[tasks.TASK_NAME]

    def worker_argvs(self, workers: int) -> list[list[str]]:
        return [[self._cmd, "--app", "_jobs_tasks.procrastinate_app", "--log-level", "warning",
                 "worker", "--concurrency", "1", "--queues", tasks.QUEUE, "--name",
                 f"bench-{i}"] for i in range(workers)]

    def worker_env(self) -> dict[str, str]:
        return {"TIERS_BENCH_JOBS_SYSTEM": "procrastinate", "TIERS_BENCH_JOBS_DSN": self._dsn()}

    def enqueue_batch(self, ids: Sequence[int], sleep_ms: float) -> None:
        self._task.batch_defer(*({"job_id": i, "sleep_ms": sleep_ms} for i in ids))

    def enqueue_one(self, job_id: int, sleep_ms: float) -> None:
        self._task.defer(job_id=job_id, sleep_ms=sleep_ms)

    def job_processes(self) -> list[psutil.Process]:
        # No master: each worker process runs its jobs itself.
        procs = []
        for child in self.roots:
            with contextlib.suppress(psutil.Error):
                procs.append(psutil.Process(child.proc.pid))
        return procs

    def settle(self) -> None:
        _analyze(self._dsn(), "procrastinate_jobs")

    def restarts_dead_workers(self) -> bool:
        return True

    def store_cpu(self) -> float:
        return _pg_store_cpu(self.env)

    def reset(self) -> None:
        with connect(self._dsn()) as conn:
            conn.execute("TRUNCATE procrastinate_events, procrastinate_periodic_defers, "
                         "procrastinate_jobs, procrastinate_workers RESTART IDENTITY")

    def close(self) -> None:
        if self._app is not None:
            self._app.close()
            self._app = None


class RedisAdapter(Adapter):
    """What Celery and RQ share: the local Redis, one database of the benchmark's own."""

    def _redis(self) -> Any:
        _require_module("redis", "redis")
        import redis

        client = redis.Redis.from_url(self.env.redis_url, db=self.env.redis_db,
                                      socket_timeout=5, socket_connect_timeout=2)
        if not self.env.redis_checked:
            self.env.redis_checked = True
            try:
                info = client.info("server")
                self.env.redis_pid = int(info.get("process_id", 0)) or None
            except redis.RedisError as exc:
                self.env.redis_error = f"no Redis at {self.env.redis_url}: {exc}"
        if self.env.redis_error:
            raise Unavailable(self.env.redis_error)
        return client

    def broker_url(self) -> str:
        return f"{self.env.redis_url.rstrip('/')}/{self.env.redis_db}"

    def store_cpu(self) -> float:
        if self.env.redis_pid is None:
            return 0.0
        try:
            t = psutil.Process(self.env.redis_pid).cpu_times()
        except psutil.Error:
            return 0.0
        return t.user + t.system

    def _delete(self, pattern: str) -> int:
        client = self._redis()
        deleted = 0
        batch: list[bytes] = []
        for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += int(client.delete(*batch))
                batch = []
        if batch:
            deleted += int(client.delete(*batch))
        return deleted


class CeleryAdapter(RedisAdapter):
    name = "celery"
    recovery_seconds = 15.0

    def setting(self) -> str:
        if self.reliable:
            return "prefork -c N; task_acks_late + task_reject_on_worker_lost"
        return "prefork -c N; defaults (early acknowledgement)"

    def prepare(self) -> None:
        _require_module("celery", "celery[redis]")
        self._cmd = _command("celery")
        self._redis()
        self._delete(REDIS_PREFIX + "*")  # a killed earlier run's
        self._app = tasks.make_celery_app(self.broker_url(), REDIS_PREFIX, reliable=self.reliable)
        self._task = self._app.tasks[tasks.TASK_NAME]

    def worker_argvs(self, workers: int) -> list[list[str]]:
        return [[self._cmd, "-A", "_jobs_tasks:celery_app", "worker", "--pool", "prefork",
                 "--concurrency", str(workers), "--loglevel", "WARNING", "--queues", tasks.QUEUE,
                 "--hostname", f"tiers-bench-{os.getpid()}@%h", "--without-gossip",
                 "--without-mingle"]]

    def worker_env(self) -> dict[str, str]:
        return {"TIERS_BENCH_JOBS_SYSTEM": "celery", "TIERS_BENCH_JOBS_BROKER": self.broker_url(),
                "TIERS_BENCH_JOBS_PREFIX": REDIS_PREFIX}

    def enqueue_batch(self, ids: Sequence[int], sleep_ms: float) -> None:
        with self._app.producer_or_acquire() as producer:
            for i in ids:
                self._task.apply_async((i, sleep_ms), producer=producer)

    def enqueue_one(self, job_id: int, sleep_ms: float) -> None:
        self._task.apply_async((job_id, sleep_ms))

    def reset(self) -> None:
        self._delete(REDIS_PREFIX + "*")

    def close(self) -> None:
        with contextlib.suppress(Unavailable):
            self._delete(REDIS_PREFIX + "*")
        app = getattr(self, "_app", None)
        if app is not None:
            app.close()


class RQAdapter(RedisAdapter):
    name = "rq"
    recovery_seconds = 15.0
    RETRIES = 3

    def setting(self) -> str:
        if self.reliable:
            return f"worker-pool -n N (a work horse per job); Retry(max={self.RETRIES}) per job"
        return "worker-pool -n N (a work horse per job); defaults (no retry)"

    def prepare(self) -> None:
        _require_module("rq", "rq")
        self._cmd = _command("rq")
        client = self._redis()
        # Its keys cannot be prefixed: the database must hold none but ours, which
        # every run deletes when it ends.
        theirs = next(iter(client.scan_iter(match="rq:*", count=1000)), None)
        if theirs is not None:
            db = self.env.redis_db
            raise Unavailable(
                f"Redis database {db} already holds RQ keys ({theirs.decode(errors='replace')}: "
                f"another RQ, or a killed run of this script); choose another --redis-db or "
                f"delete them: redis-cli -n {db} --scan --pattern 'rq:*' | "
                f"xargs -r redis-cli -n {db} del")
        import rq

        self._rq = rq
        self._queue = rq.Queue(tasks.QUEUE, connection=client)

    def worker_argvs(self, workers: int) -> list[list[str]]:
        return [[self._cmd, "worker-pool", "--url", self.broker_url(), "--num-workers",
                 str(workers), "--logging-level", "WARNING", "--path", str(BENCH_DIR),
                 tasks.QUEUE]]

    def job_processes(self) -> list[psutil.Process]:
        # The pool's workers fork a work horse per job: the horses run the jobs.
        horses: list[psutil.Process] = []
        for worker in super().job_processes():
            with contextlib.suppress(psutil.Error):
                horses.extend(worker.children())
        return horses

    def _data(self, job_id: int, sleep_ms: float) -> Any:
        retry = self._rq.Retry(max=self.RETRIES) if self.reliable else None
        return self._rq.Queue.prepare_data(tasks.run_job, args=(job_id, sleep_ms), retry=retry)

    def enqueue_batch(self, ids: Sequence[int], sleep_ms: float) -> None:
        self._queue.enqueue_many([self._data(i, sleep_ms) for i in ids])

    def enqueue_one(self, job_id: int, sleep_ms: float) -> None:
        retry = self._rq.Retry(max=self.RETRIES) if self.reliable else None
        self._queue.enqueue(tasks.run_job, job_id, sleep_ms, retry=retry)

    def reset(self) -> None:
        self._delete("rq:*")

    def close(self) -> None:
        with contextlib.suppress(Unavailable):
            self._delete("rq:*")


ADAPTERS: dict[str, type[Adapter]] = {
    "tiers": TiersAdapter,
    "tiers-sync": TiersSyncAdapter,
    "procrastinate": ProcrastinateAdapter,
    "celery": CeleryAdapter,
    "rq": RQAdapter,
}
