"""``tiers worker`` and ``tiers jobs``: run a worker pool; look at and repair the job queue.

Both find the jobs database the same way: ``--dsn``, else ``TIERS_DB_PRIMARY``
(and ``TIERS_DB_REPLICAS``) as the stack gives its services, else the main
cluster of the stack in the state directory. With several nodes the DSN
lists them all with ``target_session_attrs=read-write``, so it reaches
whichever is the primary now.

    tiers worker [--processes N] [--import MODULE]... [--queue Q]...   a prefork pool
    tiers jobs queues                   depth and age of the oldest ready job per queue
    tiers jobs list [--status dead]     jobs, newest first (default: the dead ones)
    tiers jobs inspect ID               everything stored of one job
    tiers jobs retry ID... | --all      dead jobs back to pending, attempts from zero
    tiers jobs delete ID... | --all     dead jobs removed
    tiers jobs enqueue TASK [--args JSON]   one job, committed at once
    tiers jobs batches                  batches and their progress
    tiers jobs prune [--older-than S]   forget done jobs
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import psycopg

from tiers.cli.context import Context, handles_errors
from tiers.db.nodes import PRIMARY_ENV, REPLICAS_ENV
from tiers.errors import ConfigError
from tiers.jobs import batch as batches
from tiers.jobs import store
from tiers.jobs.errors import JobArgumentError, JobStoreError
from tiers.jobs.options import WorkerOptions, writable_dsn

_DSN_HELP = ("The jobs database (default: TIERS_DB_PRIMARY, else the stack of the state "
             "directory).")


def jobs_dsn(ctx: Context, dsn: str | None) -> str:
    """The DSN of the jobs database, as the module docstring says."""
    if dsn:
        return dsn
    primary = os.environ.get(PRIMARY_ENV, "").strip()
    if primary:
        replicas = [r.strip() for r in os.environ.get(REPLICAS_ENV, "").split(",") if r.strip()]
        return writable_dsn(primary, replicas)
    from tiers.supervisor.stack import Stack

    nodes = Stack(ctx.topology(), ctx.state.path).database
    return writable_dsn(nodes.primary_dsn(), nodes.replica_dsns())


@contextmanager
def _connect(dsn: str) -> Iterator[psycopg.Connection[Any]]:
    try:
        conn = psycopg.connect(dsn, autocommit=True, connect_timeout=5,
                               application_name="tiers jobs")
    except psycopg.Error as exc:
        raise JobStoreError(f"cannot connect to the jobs database ({str(exc).strip()}); "
                            f"is the stack running ('tiers up')?") from exc
    with conn:
        yield conn


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, default=str))


def _table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}m"
    return f"{seconds / 3600:.1f}h"


def _one_line(text: str | None, width: int = 60) -> str:
    if not text:
        return ""
    last = text.strip().splitlines()[-1]
    return last if len(last) <= width else last[:width - 3] + "..."


# ---- tiers worker ----------------------------------------------------------------------


@click.command()
@click.option("--dsn", help=_DSN_HELP)
@click.option("--processes", type=click.IntRange(0, 256), help="Worker children (default: "
              "[worker] processes, 2).")
@click.option("--queue", "queues", multiple=True, metavar="QUEUE",
              help="A queue to serve, in order (repeatable; default: [worker] queues).")
@click.option("--import", "imports", multiple=True, metavar="MODULE",
              help="A module that registers tasks (repeatable; default: [worker] imports).")
@click.option("--pythonpath", multiple=True, metavar="DIR",
              help="Put DIR on sys.path first (repeatable; default: [app] pythonpath).")
@click.option("--scheduler/--no-scheduler", default=None,
              help="Run a scheduler process for the cron schedules (default: yes).")
@click.option("--max-jobs", type=click.IntRange(0), help="Recycle a child after this many "
              "jobs (plus jitter); 0 never.")
@click.option("--max-jobs-jitter", type=click.IntRange(0))
@click.option("--job-timeout", type=click.FloatRange(0.001), metavar="SECONDS")
@click.option("--lease", type=click.FloatRange(1.0), metavar="SECONDS")
@click.option("--poll-interval", type=click.FloatRange(0.01), metavar="SECONDS")
@click.option("--graceful-timeout", type=click.FloatRange(0.001), metavar="SECONDS")
@click.option("--keep-done", type=click.FloatRange(0.0), metavar="SECONDS",
              help="Delete done jobs this long after they finish (0 keeps them).")
@click.option("--name", default="worker", show_default=True, help="Name in logs.")
@click.option("--ready-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Create this file once every child is ready (removed at exit).")
@click.option("--log-jobs", is_flag=True, help="Log every job done, not only failures.")
@click.option("--synchronous-commit", is_flag=True,
              help="Wait for each outcome's WAL flush (slower; see the README).")
@click.pass_obj
@handles_errors
def worker(ctx: Context, *, dsn: str | None, processes: int | None, queues: tuple[str, ...],
           imports: tuple[str, ...], pythonpath: tuple[str, ...], scheduler: bool | None,
           max_jobs: int | None, max_jobs_jitter: int | None, job_timeout: float | None,
           lease: float | None, poll_interval: float | None, graceful_timeout: float | None,
           keep_done: float | None, name: str, ready_file: Path | None, log_jobs: bool,
           synchronous_commit: bool) -> None:
    """Run a prefork pool of job workers in the foreground until SIGTERM or Ctrl-C.

    The master forks the children, replaces them when they exit (after
    max-jobs, a crash or a job timeout), and stops gracefully on SIGTERM or
    SIGINT: running jobs finish first (a second signal, or graceful-timeout,
    kills them and their jobs are retried). SIGHUP replaces every child.
    """
    topology = ctx.topology()
    config = topology.worker

    def pick(value: Any, default: Any) -> Any:
        return default if value is None or value == () else value

    paths = tuple(Path(p).resolve() for p in pythonpath) or topology.app.pythonpath
    try:
        options = WorkerOptions(
            dsn=jobs_dsn(ctx, dsn),
            queues=pick(queues, config.queues),
            processes=pick(processes, config.processes),
            scheduler=pick(scheduler, config.scheduler),
            imports=pick(imports, config.imports),
            pythonpath=paths,
            lease=pick(lease, config.lease),
            poll_interval=pick(poll_interval, config.poll_interval),
            job_timeout=pick(job_timeout, config.job_timeout),
            max_jobs=pick(max_jobs, config.max_jobs),
            max_jobs_jitter=pick(max_jobs_jitter, config.max_jobs_jitter),
            graceful_timeout=pick(graceful_timeout, config.graceful_timeout),
            keep_done=pick(keep_done, config.keep_done),
            name=name, ready_file=ready_file, log_jobs=log_jobs,
            synchronous_commit=synchronous_commit,
            backoff_initial=topology.supervisor.backoff_initial,
            backoff_max=topology.supervisor.backoff_max)
    except JobArgumentError as exc:
        raise ConfigError("tiers worker", "-", str(exc)) from None
    if not options.imports:
        click.echo("tiers: the worker imports no task module (--import MODULE, or [worker] "
                   "imports); every job would fail as an unknown task", err=True)
    from tiers.jobs.master import run_pool

    sys.exit(run_pool(options))


# ---- tiers jobs ------------------------------------------------------------------------


@click.group()
def jobs() -> None:
    """The job queue: depths, dead jobs (list, inspect, retry, delete), batches."""


_dsn_option = click.option("--dsn", help=_DSN_HELP)
_json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


@jobs.command("queues")
@_dsn_option
@_json_option
@click.pass_obj
@handles_errors
def jobs_queues(ctx: Context, dsn: str | None, as_json: bool) -> None:
    """Per queue: jobs ready now, scheduled later, running, dead, and the age of the
    oldest ready job (how long it has been due)."""
    with _connect(jobs_dsn(ctx, dsn)) as conn:
        stats = store.queue_stats(conn)
    if as_json:
        _echo_json([s.__dict__ for s in stats])
        return
    if not stats:
        click.echo("no pending, running or dead jobs")
        return
    rows = [("QUEUE", "READY", "SCHEDULED", "RUNNING", "DEAD", "OLDEST READY")]
    rows += [(s.queue, str(s.ready), str(s.scheduled), str(s.running), str(s.dead),
              _age(s.oldest_ready_age)) for s in stats]
    _table(rows)


@jobs.command("list")
@_dsn_option
@click.option("--status", default="dead", show_default=True,
              type=click.Choice([*store.STATUSES, "all"]), help="Which jobs to list.")
@click.option("--queue", help="Only this queue.")
@click.option("--task", help="Only this task.")
@click.option("-n", "--limit", default=50, show_default=True, type=click.IntRange(1, 100000))
@_json_option
@click.pass_obj
@handles_errors
def jobs_list(ctx: Context, *, dsn: str | None, status: str, queue: str | None,
              task: str | None, limit: int, as_json: bool) -> None:
    """Jobs, newest first (by default the dead ones, with their last error)."""
    with _connect(jobs_dsn(ctx, dsn)) as conn:
        found = store.list_jobs(conn, status=None if status == "all" else status, queue=queue,
                                task=task, limit=limit)
    if as_json:
        _echo_json([job.as_json() for job in found])
        return
    if not found:
        click.echo(f"no {'' if status == 'all' else status + ' '}jobs")
        return
    rows = [("ID", "QUEUE", "TASK", "STATUS", "ATTEMPTS", "RUN AT", "LAST ERROR")]
    rows += [(str(j.id), j.queue, j.task, j.status, f"{j.attempts}/{j.max_attempts}",
              j.run_at.strftime("%Y-%m-%d %H:%M:%S"), _one_line(j.last_error)) for j in found]
    _table(rows)


@jobs.command("inspect")
@click.argument("job_id", type=int)
@_dsn_option
@_json_option
@click.pass_obj
@handles_errors
def jobs_inspect(ctx: Context, job_id: int, dsn: str | None, as_json: bool) -> None:
    """Everything stored of one job: args, state, attempts, lease, result, last error."""
    with _connect(jobs_dsn(ctx, dsn)) as conn:
        job = store.get_job(conn, job_id).as_json()
    if as_json:
        _echo_json(job)
        return
    error = job.pop("last_error")
    for key, value in job.items():
        shown = json.dumps(value) if isinstance(value, dict | list) else value
        click.echo(f"{key + ':':14} {'-' if shown is None else shown}")
    if error:
        click.echo("last_error:")
        for line in error.splitlines():
            click.echo(f"  {line}")


def _dead_jobs_options(command: Callable[..., None]) -> Callable[..., None]:
    """The arguments of the commands that act on dead jobs: ids, or --all narrowed."""
    for decorate in reversed((
        click.argument("job_ids", nargs=-1, type=int),
        click.option("--all", "everything", is_flag=True,
                     help="Every dead job (narrow with --queue, --task)."),
        click.option("--queue"),
        click.option("--task"),
        _dsn_option,
        _json_option,
        click.pass_obj,
        handles_errors,
    )):
        command = decorate(command)
    return command


def _selection(ids: tuple[int, ...], everything: bool, queue: str | None,
               task: str | None) -> store.Selection:
    if ids and everything:
        raise click.UsageError("give job ids or --all, not both")
    if not ids and not everything:
        raise click.UsageError("give the ids of dead jobs, or --all")
    if (queue or task) and not everything:
        raise click.UsageError("--queue and --task narrow --all")
    return store.Selection(ids=ids, all=everything, queue=queue, task=task)


@jobs.command("retry")
@_dead_jobs_options
def jobs_retry(ctx: Context, job_ids: tuple[int, ...], *, everything: bool, queue: str | None,
               task: str | None, dsn: str | None, as_json: bool) -> None:
    """Put dead jobs back in their queue, due now, with attempts counted from zero.

    Named jobs that are not dead change nothing and are reported.
    """
    selection = _selection(job_ids, everything, queue, task)
    with _connect(jobs_dsn(ctx, dsn)) as conn:
        changed = store.retry_dead(conn, selection)
    if as_json:
        _echo_json({"retried": changed})
    else:
        click.echo(f"tiers: {len(changed)} job(s) back in their queue"
                   + (f": {', '.join(map(str, changed))}" if changed else ""))


@jobs.command("delete")
@_dead_jobs_options
def jobs_delete(ctx: Context, job_ids: tuple[int, ...], *, everything: bool, queue: str | None,
                task: str | None, dsn: str | None, as_json: bool) -> None:
    """Remove dead jobs for good. Named jobs that are not dead change nothing and are reported."""
    selection = _selection(job_ids, everything, queue, task)
    with _connect(jobs_dsn(ctx, dsn)) as conn:
        changed = store.delete_dead(conn, selection)
    if as_json:
        _echo_json({"deleted": changed})
    else:
        click.echo(f"tiers: {len(changed)} dead job(s) deleted"
                   + (f": {', '.join(map(str, changed))}" if changed else ""))


@jobs.command("enqueue")
@click.argument("task")
@click.option("--args", "args_text", default="{}", show_default=True, metavar="JSON",
              help="The task's keyword arguments, a JSON object.")
@click.option("--queue")
@click.option("--priority", type=int)
@click.option("--delay", type=click.FloatRange(0.0), metavar="SECONDS")
@click.option("--unique-key")
@click.option("--max-attempts", type=click.IntRange(1, 1000))
@_dsn_option
@_json_option
@click.pass_obj
@handles_errors
def jobs_enqueue(ctx: Context, task: str, *, args_text: str, queue: str | None,
                 priority: int | None, delay: float | None, unique_key: str | None,
                 max_attempts: int | None, dsn: str | None, as_json: bool) -> None:
    """Add one job of TASK (by name), committed at once."""
    try:
        args = json.loads(args_text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="--args") from None
    with _connect(jobs_dsn(ctx, dsn)) as conn:
        job_id = store.enqueue(conn, task, args, queue=queue, priority=priority, delay=delay,
                               unique_key=unique_key, max_attempts=max_attempts)
    if as_json:
        _echo_json({"id": job_id})
    elif job_id is None:
        click.echo(f"tiers: not added: a pending or running job holds {unique_key!r}")
    else:
        click.echo(f"tiers: job {job_id} enqueued")


@jobs.command("batches")
@click.option("-n", "--limit", default=20, show_default=True, type=click.IntRange(1, 10000))
@_dsn_option
@_json_option
@click.pass_obj
@handles_errors
def jobs_batches(ctx: Context, limit: int, dsn: str | None, as_json: bool) -> None:
    """Batches, newest first: chunks done, dead and open of the total."""
    with _connect(jobs_dsn(ctx, dsn)) as conn:
        found = batches.list_batches(conn, limit)
    if as_json:
        _echo_json([b.as_json() for b in found])
        return
    if not found:
        click.echo("no batches")
        return
    rows = [("ID", "NAME", "TOTAL", "DONE", "DEAD", "OPEN", "STATE")]
    rows += [(str(b.id), b.name or "-", str(b.total), str(b.done), str(b.dead), str(b.open),
              "complete" if b.complete else "running") for b in found]
    _table(rows)


@jobs.command("prune")
@click.option("--older-than", default=86400.0, show_default=True, type=click.FloatRange(0.0),
              metavar="SECONDS", help="Delete done jobs that finished longer ago than this.")
@_dsn_option
@click.pass_obj
@handles_errors
def jobs_prune(ctx: Context, older_than: float, dsn: str | None) -> None:
    """Delete done jobs (workers do this by themselves after [worker] keep_done)."""
    total = 0
    with _connect(jobs_dsn(ctx, dsn)) as conn:
        while True:
            try:
                deleted = store.prune_done(conn, older_than)
            except psycopg.Error as exc:
                raise JobStoreError(f"cannot prune done jobs: {str(exc).strip()}") from exc
            total += deleted
            if deleted == 0:
                break
    click.echo(f"tiers: {total} done job(s) deleted")


COMMANDS = (worker, jobs)
