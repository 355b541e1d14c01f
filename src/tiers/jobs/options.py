"""How a worker pool runs: one frozen value, checked once, shared by master and children."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tiers.jobs.errors import JobArgumentError
from tiers.jobs.spec import DEFAULT_QUEUE, check_queue_name


@dataclass(frozen=True)
class WorkerOptions:
    """A prefork worker pool's settings (``tiers worker``; ``[worker]`` in the topology).

    ``processes`` children each run one job at a time; ``scheduler`` adds a
    process that enqueues the registered cron schedules. ``imports`` are the
    modules that register tasks, imported by each child after it starts (so
    SIGHUP's new children run new code), with ``pythonpath`` first on
    sys.path. ``lease``: a claimed job stays the worker's this long past the
    last heartbeat (every lease/3). ``poll_interval``: an idle child looks for
    due jobs at least this often, notifications or not. ``job_timeout``: the
    default for tasks without their own timeout. A child exits after
    ``max_jobs`` jobs plus a random 0..``max_jobs_jitter`` (0: never).
    ``graceful_timeout``: on SIGTERM, running jobs get this long to finish.
    ``keep_done``: done jobs are deleted this many seconds after they finish
    (0: kept). ``synchronous_commit``: outcomes and claims wait for their
    WAL flush; off by default, since a crash that forgets an outcome only
    means the job runs again, which at-least-once delivery allows anyway.
    """

    dsn: str
    queues: tuple[str, ...] = (DEFAULT_QUEUE,)
    processes: int = 2
    scheduler: bool = True
    imports: tuple[str, ...] = ()
    pythonpath: tuple[Path, ...] = ()
    lease: float = 30.0
    poll_interval: float = 1.0
    job_timeout: float = 300.0
    max_jobs: int = 1000
    max_jobs_jitter: int = 100
    graceful_timeout: float = 10.0
    keep_done: float = 86400.0
    name: str = "worker"
    # Created once every child is connected (and removed at exit): the stack's readiness.
    ready_file: Path | None = None
    log_jobs: bool = False
    synchronous_commit: bool = False
    # Restart backoff of a child that keeps dying early.
    backoff_initial: float = 0.5
    backoff_max: float = 30.0

    def __post_init__(self) -> None:
        if not self.queues:
            raise JobArgumentError("a worker needs at least one queue")
        for queue in self.queues:
            check_queue_name(queue)
        if self.processes < 0 or (self.processes == 0 and not self.scheduler):
            raise JobArgumentError("a worker needs processes >= 1, or a scheduler")
        for label, value in (("lease", self.lease), ("poll_interval", self.poll_interval),
                             ("job_timeout", self.job_timeout),
                             ("graceful_timeout", self.graceful_timeout),
                             ("backoff_initial", self.backoff_initial),
                             ("backoff_max", self.backoff_max)):
            if not math.isfinite(value) or value <= 0:
                raise JobArgumentError(f"{label} must be a positive number of seconds, "
                                       f"got {value!r}")
        if self.keep_done < 0 or not math.isfinite(self.keep_done):
            raise JobArgumentError(f"keep_done must be >= 0 seconds, got {self.keep_done!r}")
        if self.max_jobs < 0 or self.max_jobs_jitter < 0:
            raise JobArgumentError("max_jobs and max_jobs_jitter must be >= 0")

    @property
    def heartbeat_interval(self) -> float:
        return self.lease / 3


def writable_dsn(primary: str, replicas: Sequence[str] = ()) -> str:
    """One libpq DSN that finds whichever of the nodes is writable now.

    A worker outlives failovers: listing every node with
    ``target_session_attrs=read-write`` lets each reconnect land on the
    current primary. Nodes whose database or user differ from the primary's
    are left out (they are not the same database).
    """
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    first = conninfo_to_dict(primary)
    hosts = [str(first.get("host") or "127.0.0.1")]
    ports = [str(first.get("port") or 5432)]
    for dsn in replicas:
        other = conninfo_to_dict(dsn)
        if other.get("dbname") != first.get("dbname") or other.get("user") != first.get("user"):
            continue
        hosts.append(str(other.get("host") or "127.0.0.1"))
        ports.append(str(other.get("port") or 5432))
    if len(hosts) == 1:
        return primary
    first.update(host=",".join(hosts), port=",".join(ports),
                 target_session_attrs="read-write")
    return make_conninfo(**first)  # type: ignore[arg-type]
