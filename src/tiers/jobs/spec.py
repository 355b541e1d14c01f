"""What a job is before it is stored: :class:`NewJob`, checked completely at enqueue time.

A job's arguments are a JSON object of keyword arguments for its task. They
are checked here, before anything is sent, so a mistake surfaces at the
``enqueue`` call that made it and not minutes later in a worker:

* only ``None``, ``bool``, ``int``, finite ``float``, ``str``, ``list`` /
  ``tuple`` and ``dict`` with ``str`` keys are JSON (a ``datetime``, a
  ``set``, ``bytes``, a ``Decimal`` or an object is not: pass an ISO string,
  a list, text, a string or the fields you need);
* ``float('nan')`` and infinities are not JSON; nor are strings holding NUL
  or lone surrogates (PostgreSQL's jsonb refuses them);
* a non-string key would silently become a string in JSON, so it is refused;
* the whole object is at most :data:`MAX_ARGS_BYTES` once encoded.

Each violation raises :class:`~tiers.jobs.errors.JobArgumentError` naming the
path of the offending value (``args['items'][3]``) and why.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tiers.jobs.errors import JobArgumentError

DEFAULT_QUEUE = "default"
DEFAULT_PRIORITY = 0
DEFAULT_MAX_ATTEMPTS = 5
MAX_ATTEMPTS_LIMIT = 1000
MAX_ARGS_BYTES = 1 << 20
MAX_UNIQUE_KEY = 500
MAX_DEPTH = 100
_INT32 = 2**31 - 1

TASK_NAME_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_.:-]{0,199}\Z")
QUEUE_NAME_RE = re.compile(r"\A[A-Za-z0-9_.:-]{1,63}\Z")


@dataclass(frozen=True)
class NewJob:
    """One job to enqueue; :meth:`checked` validates it and encodes its arguments.

    ``run_at`` (an aware datetime) and ``delay`` (seconds from the database's
    now) are exclusive; with neither the job is due at once. ``unique_key``:
    while a pending or running job holds the key, another job with it is not
    added. ``priority``: higher runs first.
    """

    task: str
    args: Mapping[str, Any] = field(default_factory=dict)
    queue: str = DEFAULT_QUEUE
    priority: int = DEFAULT_PRIORITY
    run_at: datetime | None = None
    delay: float | None = None
    unique_key: str | None = None
    max_attempts: int = DEFAULT_MAX_ATTEMPTS

    def checked(self) -> CheckedJob:
        """The job with its arguments as JSON text; JobArgumentError for anything invalid."""
        check_task_name(self.task)
        check_queue_name(self.queue)
        if isinstance(self.priority, bool) or not isinstance(self.priority, int) \
                or not -_INT32 <= self.priority <= _INT32:
            raise JobArgumentError(f"priority must be an integer within +-{_INT32}, "
                                   f"got {self.priority!r}")
        if isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) \
                or not 1 <= self.max_attempts <= MAX_ATTEMPTS_LIMIT:
            raise JobArgumentError(f"max_attempts must be an integer from 1 to "
                                   f"{MAX_ATTEMPTS_LIMIT}, got {self.max_attempts!r}")
        if self.unique_key is not None and (
                not isinstance(self.unique_key, str)
                or not 1 <= len(self.unique_key) <= MAX_UNIQUE_KEY or "\x00" in self.unique_key):
            raise JobArgumentError(f"unique_key must be a string of 1 to {MAX_UNIQUE_KEY} "
                                   f"characters without NUL, got {self.unique_key!r}")
        if self.run_at is not None and self.delay is not None:
            raise JobArgumentError("give run_at or delay, not both")
        if self.run_at is not None:
            if not isinstance(self.run_at, datetime):
                raise JobArgumentError(f"run_at must be a datetime, got {self.run_at!r}")
            if self.run_at.tzinfo is None or self.run_at.utcoffset() is None:
                raise JobArgumentError(
                    f"run_at must be timezone-aware (e.g. datetime.now(UTC)), got {self.run_at}")
        delay = 0.0
        if self.delay is not None:
            if isinstance(self.delay, bool) or not isinstance(self.delay, int | float) \
                    or not math.isfinite(self.delay) or self.delay < 0:
                raise JobArgumentError(f"delay must be a finite number of seconds >= 0, "
                                       f"got {self.delay!r}")
            delay = float(self.delay)
        return CheckedJob(self, encode_args(self.args), delay)


@dataclass(frozen=True)
class CheckedJob:
    """A valid NewJob and its arguments encoded as JSON text."""

    job: NewJob
    args_json: str
    delay: float

    def params(self) -> dict[str, Any]:
        """The parameters of the ``enqueue`` statement."""
        job = self.job
        return {"queue": job.queue, "task": job.task, "args": self.args_json,
                "priority": job.priority, "run_at": job.run_at, "delay": self.delay,
                "max_attempts": job.max_attempts, "unique_key": job.unique_key}


def check_task_name(name: object) -> str:
    if not isinstance(name, str) or not TASK_NAME_RE.match(name):
        raise JobArgumentError(
            f"a task name is 1 to 200 letters, digits, '_', '.', ':' or '-', starting with a "
            f"letter or '_'; got {name!r}")
    return name


def check_queue_name(name: object) -> str:
    if not isinstance(name, str) or not QUEUE_NAME_RE.match(name):
        raise JobArgumentError(
            f"a queue name is 1 to 63 letters, digits, '_', '.', ':' or '-'; got {name!r}")
    return name


def encode_args(args: object) -> str:
    """``args`` as compact JSON text; JobArgumentError naming the first value that is not JSON."""
    if not isinstance(args, Mapping):
        raise JobArgumentError(f"a job's args must be a mapping of argument names to JSON "
                               f"values, got {type(args).__name__}")
    check_json(args, "args")
    text = json.dumps(args, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    size = len(text.encode("utf-8"))
    if size > MAX_ARGS_BYTES:
        raise JobArgumentError(f"args are {size} bytes as JSON, more than {MAX_ARGS_BYTES}; "
                               f"store large data elsewhere and pass its key")
    return text


def encode_result(value: object) -> str | None:
    """A task's return value as JSON text (None stays None); JobArgumentError if it is not JSON."""
    if value is None:
        return None
    check_json(value, "result")
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def check_json(value: object, path: str) -> None:
    """Raise JobArgumentError unless ``value`` is JSON that round-trips through jsonb."""
    # Iterative, so a deeply nested value is an error message, not a RecursionError.
    stack: list[tuple[object, str, int]] = [(value, path, 0)]
    while stack:
        item, where, depth = stack.pop()
        if item is None or isinstance(item, bool | int):
            continue
        if isinstance(item, str):
            _check_text(item, where)
        elif isinstance(item, float):
            if not math.isfinite(item):
                raise JobArgumentError(f"{where}: {item!r} is not a JSON number")
        elif isinstance(item, Mapping | list | tuple):
            if depth >= MAX_DEPTH:
                raise JobArgumentError(f"{where}: nested more than {MAX_DEPTH} levels deep")
            if isinstance(item, Mapping):
                for key, inner in item.items():
                    if not isinstance(key, str):
                        raise JobArgumentError(f"{where}: key {key!r} is a "
                                               f"{type(key).__name__}; JSON keys are strings")
                    _check_text(key, f"{where} key {key!r}")
                    stack.append((inner, f"{where}[{key!r}]", depth + 1))
            else:
                stack.extend((inner, f"{where}[{index}]", depth + 1)
                             for index, inner in enumerate(item))
        else:
            raise JobArgumentError(
                f"{where}: a {type(item).__module__}.{type(item).__qualname__} is not JSON"
                f"{_hint(item)}")


def _check_text(text: str, where: str) -> None:
    if "\x00" in text:
        raise JobArgumentError(f"{where}: text with a NUL character cannot be stored as JSON")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            raise JobArgumentError(f"{where}: text with a lone surrogate is not valid "
                                   f"Unicode") from None


def _hint(value: object) -> str:
    if isinstance(value, datetime):
        return " (pass value.isoformat())"
    if isinstance(value, bytes | bytearray | memoryview):
        return " (pass text, e.g. base64)"
    if isinstance(value, set | frozenset):
        return " (pass a sorted list)"
    return ""
