"""Decisions about backends, as plain values and functions: health, choice, idle pool.

Nothing here does I/O or reads a clock; callers pass ``now`` in and carry
out what is returned (``tiers.proxy.upstream`` does the sockets).

Health follows the usual fall/rise rule: an up backend goes down after
``fall`` consecutive failed checks, a down one comes back after ``rise``
consecutive good ones. A refused connection is proof enough: it takes a
backend down at once, and only ``rise`` good checks bring it back.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar


@dataclass(frozen=True, slots=True)
class Health:
    """The health of one backend: ``up`` plus the current streak of results."""

    up: bool = True
    successes: int = 0
    failures: int = 0


def observe_check(health: Health, ok: bool, *, fall: int, rise: int) -> Health:
    """The health after one active check that succeeded (``ok``) or failed."""
    if ok:
        successes = health.successes + 1
        up = health.up or successes >= rise
        return Health(up=up, successes=0 if up and not health.up else successes, failures=0)
    failures = health.failures + 1
    up = health.up and failures < fall
    return Health(up=up, successes=0, failures=0 if health.up and not up else failures)


def mark_unreachable(health: Health) -> Health:
    """The health after a connection to the backend was refused or timed out."""
    return Health(up=False, successes=0, failures=0)


class RoundRobin:
    """Picks the next backend that is up, in turn.

    ``pick`` skips backends that are down and those in ``exclude`` (already
    tried for this request); it returns None when no candidate is left.
    """

    def __init__(self) -> None:
        self._next = 0

    def pick(
        self, up: Sequence[bool], exclude: frozenset[int] | set[int] = frozenset()
    ) -> int | None:
        count = len(up)
        start = self._next
        for step in range(count):
            index = (start + step) % count
            if up[index] and index not in exclude:
                self._next = index + 1
                return index
        return None


class Idle(Protocol):
    """What the pool needs to know of an idle connection."""

    @property
    def usable(self) -> bool: ...

    @property
    def idle_since(self) -> float: ...


C = TypeVar("C", bound=Idle)


class IdlePool(Generic[C]):
    """Idle keep-alive connections to one backend, most recently used first.

    Reusing the newest connection keeps the others idle long enough to
    expire, so the pool shrinks back after a burst. A connection idle longer
    than ``max_idle_time`` may be about to be closed by the backend, and one
    the backend already closed is not ``usable``: both are handed back to the
    caller to close rather than reused.
    """

    def __init__(self, max_idle: int, max_idle_time: float) -> None:
        self.max_idle = max_idle
        self.max_idle_time = max_idle_time
        self._idle: list[C] = []

    def __len__(self) -> int:
        return len(self._idle)

    def take(self, now: float) -> tuple[C | None, list[C]]:
        """A reusable connection or None, and the connections to close."""
        discard: list[C] = []
        idle = self._idle
        while idle:
            conn = idle.pop()
            if conn.usable and now - conn.idle_since <= self.max_idle_time:
                return conn, discard
            discard.append(conn)
        return None, discard

    def put(self, conn: C) -> list[C]:
        """Keep ``conn`` for reuse; return the connections to close to respect ``max_idle``."""
        self._idle.append(conn)
        excess = len(self._idle) - self.max_idle
        if excess <= 0:
            return []
        oldest = self._idle[:excess]
        del self._idle[:excess]
        return oldest

    def sweep(self, now: float) -> list[C]:
        """Remove and return the connections that expired or were closed while idle."""
        keep: list[C] = []
        discard: list[C] = []
        for conn in self._idle:
            if conn.usable and now - conn.idle_since <= self.max_idle_time:
                keep.append(conn)
            else:
                discard.append(conn)
        self._idle = keep
        return discard

    def drain(self) -> list[C]:
        """Remove and return every idle connection."""
        idle, self._idle = self._idle, []
        return idle
