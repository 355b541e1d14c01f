"""What a run's end means for its job: done, retried after a backoff, or buried.

Plain functions, no I/O: the worker calls them with what happened and
records the :class:`~tiers.jobs.store.Outcome` they return.

* A task that returns: ``done``, its return value stored as the result
  when it is JSON (else the job is still done, and ``last_error`` says the
  result was not stored).
* A task that raises, or a job whose task is not registered: if attempts
  remain, ``pending`` again after :func:`backoff_delay`; otherwise ``dead``,
  keeping the error.

Backoff: ``retry_base * 2**(attempt - 1)`` seconds, at most ``retry_max``,
of which a random half is taken off ("equal jitter"), so jobs that failed
together do not all come back at the same instant, and none comes back
sooner than half its delay.
"""

from __future__ import annotations

import random
import traceback
from collections.abc import Callable

from tiers.jobs.errors import JobArgumentError
from tiers.jobs.registry import DEFAULT_RETRY_BASE, DEFAULT_RETRY_MAX
from tiers.jobs.spec import encode_result
from tiers.jobs.store import ClaimedJob, Outcome

# The error kept with a job: the end of the traceback, where the cause is.
MAX_ERROR_CHARS = 8000


def backoff_delay(attempt: int, base: float = DEFAULT_RETRY_BASE,
                  cap: float = DEFAULT_RETRY_MAX,
                  rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 for the first run)."""
    delay = min(cap, base * 2.0 ** min(max(attempt - 1, 0), 60))
    return delay / 2 + rand() * delay / 2


def after_failure(job: ClaimedJob, error: str, *, base: float = DEFAULT_RETRY_BASE,
                  cap: float = DEFAULT_RETRY_MAX,
                  rand: Callable[[], float] = random.random) -> Outcome:
    """A retry after backoff while attempts remain, else burial; ``error`` is kept either way."""
    if job.attempt >= job.max_attempts:
        return Outcome("dead", error=error)
    return Outcome("pending", error=error, delay=backoff_delay(job.attempt, base, cap, rand))


def after_success(result: object) -> Outcome:
    """Done, with the result as JSON when it is JSON."""
    try:
        return Outcome("done", result=encode_result(result))
    except JobArgumentError as exc:
        return Outcome("done", error=f"the task's result was not stored: {exc}")


def describe(exc: BaseException) -> str:
    """The exception and its traceback, cut to the last MAX_ERROR_CHARS characters."""
    text = "".join(traceback.format_exception(exc)).rstrip()
    if len(text) > MAX_ERROR_CHARS:
        text = "..." + text[-(MAX_ERROR_CHARS - 3):]
    return text
