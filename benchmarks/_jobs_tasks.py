"""The job every queue of ``benchmarks/jobs.py`` runs, and the peers' apps that run it.

Worker processes import this module (the benchmarks directory is on their
``PYTHONPATH``); ``jobs.py`` imports it too, to enqueue. The job is the same
function for every system: it notes when it started, sleeps ``sleep_ms``
(0 for the no-op job), and appends one fixed-width line to the done log

    <job id, 10 wide> <started ns, 20 wide> <ended ns, 20 wide> <pid, 10 wide>\\n

with a single unbuffered ``write`` to a file opened with ``O_APPEND``, so
lines from many processes never interleave and a line that was written
survives a SIGKILL the moment after. Times are ``CLOCK_MONOTONIC``, which is
one clock for all processes of a Linux machine, so the enqueuing process can
subtract its own readings from the workers'. A job that runs twice (at least
once delivery after a kill) writes two lines. Where ``TIERS_BENCH_JOBS_STARTED``
names a file (the kill run), a job also appends ``<job id> <pid>`` to it when
it starts, so that the processes in the middle of a job can be told apart
from those between jobs or still starting.

The environment tells a worker process which app to build:
``TIERS_BENCH_JOBS_SYSTEM`` (``tiers``, ``celery`` or ``procrastinate``; RQ
needs no app), ``TIERS_BENCH_JOBS_RELIABLE`` (``1``: the peer's documented setting for
not losing jobs when a worker dies), ``TIERS_BENCH_JOBS_BROKER`` and
``TIERS_BENCH_JOBS_PREFIX`` (Celery), ``TIERS_BENCH_JOBS_DSN`` (procrastinate)
``TIERS_BENCH_JOBS_OUT`` (the done log) and ``TIERS_BENCH_JOBS_STARTED``.
"""

from __future__ import annotations

import os
import time
from typing import Any

CLOCK = time.CLOCK_MONOTONIC
LINE_BYTES = 64  # 10 + 1 + 20 + 1 + 20 + 1 + 10 + newline
QUEUE = "tiers-bench-jobs"
TASK_NAME = "tiers_bench.job"
OUT_ENV = "TIERS_BENCH_JOBS_OUT"
STARTED_ENV = "TIERS_BENCH_JOBS_STARTED"

_fds: dict[tuple[int, str], int] = {}  # (pid, path) -> descriptor


def _fd(path: str) -> int:
    # Descriptors of this process: a forked child opens its own rather than
    # writing through one it inherited.
    pid = os.getpid()
    fd = _fds.get((pid, path))
    if fd is None:
        if any(key[0] != pid for key in _fds):
            _fds.clear()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _fds[pid, path] = fd
    return fd


def run_job(job_id: int, sleep_ms: float = 0.0) -> None:
    """The benchmark's job: note the start, sleep ``sleep_ms``, append the done line."""
    started = time.clock_gettime_ns(CLOCK)
    pid = os.getpid()
    started_log = os.environ.get(STARTED_ENV)
    if started_log:
        os.write(_fd(started_log), b"%10d %10d\n" % (job_id, pid))
    if sleep_ms > 0:
        time.sleep(sleep_ms / 1000.0)
    os.write(_fd(os.environ[OUT_ENV]),
             b"%10d %20d %20d %10d\n" % (job_id, started, time.clock_gettime_ns(CLOCK), pid))


def _lines(path: str) -> list[list[bytes]]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return []
    return [line.split() for line in data.splitlines()]


def read_done(path: str) -> list[tuple[int, int, int, int]]:
    """Every (job id, started ns, ended ns, pid) line of a done log, in the order written."""
    return [(int(p[0]), int(p[1]), int(p[2]), int(p[3])) for p in _lines(path) if len(p) == 4]


def busy_pids(started_path: str, done_path: str) -> set[int]:
    """The processes that started a job and have not written its done line (yet, or ever)."""
    open_jobs: dict[tuple[int, int], int] = {}
    for p in _lines(started_path):
        if len(p) == 2:
            key = (int(p[0]), int(p[1]))
            open_jobs[key] = open_jobs.get(key, 0) + 1
    for job_id, _, _, pid in read_done(done_path):
        key = (job_id, pid)
        if open_jobs.get(key, 0) > 0:
            open_jobs[key] -= 1
    return {pid for (_, pid), count in open_jobs.items() if count > 0}


def now_ns() -> int:
    return time.clock_gettime_ns(CLOCK)


# ---- Celery ------------------------------------------------------------------------


def make_celery_app(broker: str, prefix: str, *, reliable: bool) -> Any:
    """A Celery app on ``broker`` whose every Redis key starts with ``prefix``.

    ``reliable`` sets what Celery documents for a task that must survive the
    death of the process running it: ``task_acks_late`` (acknowledge after
    the task ran, not when it is received) and ``task_reject_on_worker_lost``
    (when a pool child dies mid-task, requeue the message instead of
    acknowledging it, which acks_late alone still does). Without them, the
    defaults, a message is acknowledged before its task runs.
    """
    from celery import Celery

    app = Celery("tiers_bench_jobs", broker=broker, set_as_current=False)
    app.conf.update(
        task_default_queue=QUEUE,
        broker_transport_options={"global_keyprefix": prefix},
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=reliable,
        task_reject_on_worker_lost=reliable,
    )

    # shared=False: an app of its own per call (reliable, then default), no
    # task of the same name in Celery's process-wide registry.
    @app.task(name=TASK_NAME, shared=False)  # type: ignore[untyped-decorator]
    def job(job_id: int, sleep_ms: float = 0.0) -> None:
        run_job(job_id, sleep_ms)

    return app


# ---- procrastinate -----------------------------------------------------------------

# How often the stalled-job recipe runs in the workers (procrastinate's howto
# uses every 10 minutes; a benchmark cannot wait that long).
STALLED_CRON = "* * * * * */5"


def make_procrastinate_app(dsn: str, *, reliable: bool, sync: bool = False) -> Any:
    """A procrastinate app on ``dsn``; ``sync`` for the enqueuing side (no event loop).

    Its workers run one job at a time (``concurrency`` 1), one process each.
    ``reliable`` adds procrastinate's documented recipe for jobs left in
    ``doing`` by a killed worker ("Retry stalled jobs"): a periodic task that
    hands every job of a worker whose heartbeat is older than
    ``get_stalled_jobs``' default (30 s; workers beat every 10 s) back to
    ``retry_job``. Without it, the default, such a job stays ``doing`` forever.
    """
    import procrastinate

    connector = (procrastinate.SyncPsycopgConnector(conninfo=dsn) if sync
                 else procrastinate.PsycopgConnector(conninfo=dsn))
    app = procrastinate.App(connector=connector,
                            worker_defaults={"concurrency": 1, "queues": [QUEUE]})

    @app.task(name=TASK_NAME, queue=QUEUE)
    def job(job_id: int, sleep_ms: float = 0.0) -> None:
        run_job(job_id, sleep_ms)

    if reliable:

        @app.periodic(cron=STALLED_CRON)
        @app.task(name="tiers_bench.retry_stalled_jobs", queue=QUEUE,
                  queueing_lock="retry_stalled_jobs", pass_context=True)
        async def retry_stalled_jobs(context: Any, timestamp: int) -> None:
            for stalled in await app.job_manager.get_stalled_jobs():
                await app.job_manager.retry_job(stalled)

    return app


def _reliable() -> bool:
    return os.environ.get("TIERS_BENCH_JOBS_RELIABLE", "1") == "1"


def register_tiers_task() -> None:
    """Register the job with tiers' job queue (``tiers worker --import _jobs_tasks``)."""
    from tiers.jobs import task

    @task(TASK_NAME, queue=QUEUE)
    def job(job_id: int, sleep_ms: float = 0.0) -> None:
        run_job(job_id, sleep_ms)


_SYSTEM = os.environ.get("TIERS_BENCH_JOBS_SYSTEM", "")
if _SYSTEM == "tiers":
    register_tiers_task()
elif _SYSTEM == "celery":
    celery_app = make_celery_app(os.environ["TIERS_BENCH_JOBS_BROKER"],
                                 os.environ["TIERS_BENCH_JOBS_PREFIX"], reliable=_reliable())
elif _SYSTEM == "procrastinate":
    procrastinate_app = make_procrastinate_app(os.environ["TIERS_BENCH_JOBS_DSN"],
                                               reliable=_reliable())
