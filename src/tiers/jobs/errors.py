"""The job queue's errors: one subtree of :class:`tiers.errors.TiersError`.

    JobError                   anything the job queue raises on purpose
     +-- JobArgumentError      a job's task name, arguments or options are not valid;
     |                         raised by enqueue before anything is sent
     +-- UnknownTaskError      no task of that name is registered in this process
     +-- CronError             a cron expression does not parse (names the field and why)
     +-- JobNotFound           no job (or batch) with that id, or not in the state asked for
     +-- JobStoreError         the database failed or refused a job-queue statement

Database errors (psycopg) are translated into JobStoreError with the cause
kept (``raise ... from exc``), except inside the caller's own transaction in
:func:`tiers.jobs.store.enqueue`, where the caller's psycopg error is theirs
to see and handle with the rest of their transaction.
"""

from __future__ import annotations

from tiers.errors import TiersError

__all__ = ["CronError", "JobArgumentError", "JobError", "JobNotFound", "JobStoreError",
           "UnknownTaskError"]


class JobError(TiersError):
    """The job queue could not enqueue, claim, run or change a job."""


class JobArgumentError(JobError, ValueError):
    """A job cannot be enqueued as given: the message names the argument and the reason."""


class UnknownTaskError(JobError, LookupError):
    """No task is registered under the name."""


class CronError(JobError, ValueError):
    """A cron expression is not valid; the message quotes it and names the field."""


class JobNotFound(JobError, LookupError):
    """No job or batch has the id, or it is not in the state the operation needs."""


class JobStoreError(JobError):
    """A statement of the job queue failed in the database."""
