"""A durable job queue in PostgreSQL, with prefork workers and cron batches.

Define tasks, enqueue jobs inside your own transaction, run workers::

    import psycopg
    from tiers.jobs import task, periodic, enqueue, enqueue_many, install_schema

    @task("mail.welcome", queue="mail", max_attempts=8, timeout=30)
    def welcome(user_id: int) -> None: ...

    @periodic("0 * * * *")                  # hourly, enqueued exactly once per tick
    @task("reports.hourly")
    def hourly() -> None: ...

    install_schema(dsn)                     # idempotent; `tiers up` and `tiers worker` do it
    with psycopg.connect(dsn) as conn:      # a transaction, committed at the end of the block
        conn.execute("INSERT INTO users ...")
        welcome.enqueue(conn, {"user_id": 7})            # exists iff the transaction commits
        enqueue(conn, "mail.welcome", {"user_id": 8}, delay=60, unique_key="welcome:8")
        enqueue_many(conn, [welcome.job({"user_id": n}) for n in range(100)])

    # then: tiers worker --dsn DSN --import mymodule --processes 4
    # or, in Python: run_pool(WorkerOptions(dsn=DSN, imports=("mymodule",), processes=4))

Semantics:

* **At least once.** A job runs until a run of it finishes and that is
  recorded. A worker that dies mid-job (crash, ``kill -9``, power loss,
  timeout) leaves the job to run again: at once when its master sees the
  death, else when its lease (renewed by heartbeats) expires. So a task may
  run more than once and should be idempotent; ``current_job()`` gives it
  its job id and attempt number (1 on the first run) to help.
* **Attempts.** Every claim counts. A task that raises is retried after
  ``retry_base * 2**(attempt-1)`` seconds (at most ``retry_max``, jittered)
  while attempts remain, then buried: status ``dead``, last error kept, until
  ``tiers jobs retry`` or ``tiers jobs delete``. A job whose worker keeps
  dying is buried the same way.
* **Unique keys.** While a pending or running job holds a ``unique_key``,
  enqueueing another with that key adds nothing (``enqueue`` returns None).
* **Order.** A worker serves its queues in the order given; within a queue,
  higher ``priority`` first, then earlier ``run_at``.
* **Wake-up.** Enqueueing NOTIFYs idle workers at commit; workers also poll
  every ``poll_interval`` (default 1 s), so a missed notification costs
  latency, never a job.
* **Cron.** Any number of schedulers may run; each tick is enqueued once
  (:mod:`tiers.jobs.scheduler`).
* **Durability.** Jobs are rows in the primary, committed with the caller's
  transaction. Workers record outcomes with ``synchronous_commit`` off, so a
  database crash may forget the last fraction of a second of outcomes: those
  jobs run again, as at-least-once allows.

Modules: ``spec`` (what a job is, argument checks), ``registry`` (tasks,
schedules), ``store`` (SQL: enqueue, claim, admin), ``child`` (a worker
process's loop), ``pool`` (the master's decisions), ``master`` (forks and
signals), ``scheduler`` and ``cron``, ``batch``, ``outcome`` (retry rules).
"""

from tiers.jobs.batch import Batch, BatchProgress, batch_progress, enqueue_batch, wait_batch
from tiers.jobs.cron import CronExpression
from tiers.jobs.errors import (
    CronError,
    JobArgumentError,
    JobError,
    JobNotFound,
    JobStoreError,
    UnknownTaskError,
)
from tiers.jobs.master import run_pool
from tiers.jobs.options import WorkerOptions
from tiers.jobs.registry import (
    REGISTRY,
    JobContext,
    Registry,
    Schedule,
    Task,
    current_job,
    periodic,
    task,
)
from tiers.jobs.scheduler import Scheduler
from tiers.jobs.spec import NewJob
from tiers.jobs.store import (
    enqueue,
    enqueue_job,
    enqueue_many,
    get_job,
    install_schema,
    queue_stats,
)

__all__ = [
    "REGISTRY",
    "Batch",
    "BatchProgress",
    "CronError",
    "CronExpression",
    "JobArgumentError",
    "JobContext",
    "JobError",
    "JobNotFound",
    "JobStoreError",
    "NewJob",
    "Registry",
    "Schedule",
    "Scheduler",
    "Task",
    "UnknownTaskError",
    "WorkerOptions",
    "batch_progress",
    "current_job",
    "enqueue",
    "enqueue_batch",
    "enqueue_job",
    "enqueue_many",
    "get_job",
    "install_schema",
    "periodic",
    "queue_stats",
    "run_pool",
    "task",
    "wait_batch",
]
