"""The idle keep-alive connections to one backend, as bookkeeping without I/O.

``IdlePool`` decides which idle connection a request reuses and which ones
have to go (expired, closed by the backend, beyond ``max_idle``); it never
closes anything itself. ``tiers.proxy.upstream`` keeps one per backend and
closes what it is handed back. Nothing here reads a clock: callers pass
``now`` in.
"""

from __future__ import annotations

from typing import Generic, Protocol, TypeVar

__all__ = ["Idle", "IdlePool"]


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
