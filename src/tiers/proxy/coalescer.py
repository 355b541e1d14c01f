"""Request coalescing for the page cache: one fetch per key at a time (Varnish's busy object).

The first miss of a key leads a fetch (a ``Lead``); later misses of the key
wait for its outcome (a ``Turn``): LOOKUP when it stored the answer, FETCH
when the answer turned out uncacheable (each waiter goes to the app itself),
FAILED when no usable answer came. An uncacheable answer also marks the key
"pass" for ``pass_ttl`` seconds, so the next misses go straight to the app
instead of queueing behind one another (hit-for-miss); each further
uncacheable answer renews the mark (at most once a second), and a later
cacheable answer clears it. A miss on a key whose mark was set or renewed
less than a second ago gets PASS rather than FETCH: its answer need not be
judged, as the mark will not be renewed before that second is over.
``tiers.proxy.cache`` decides what the turns mean.

Nothing here raises; a waiter that waits ``timeout`` in vain gets FETCH.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Callable
from typing import Final


class Turn(enum.Enum):
    """What a request that did not lead a fetch does next."""

    LOOKUP = "lookup"  # the fetch stored an answer: look the store up again
    FETCH = "fetch"  # go to the app yourself (uncacheable, passing, or waited too long)
    PASS = "pass"  # as FETCH; the key's pass mark is under a second old (see above)
    FAILED = "failed"  # the fetch failed: serve stale-if-error, or start over


class Lead:
    """The one fetch in flight for a key; every outcome wakes the waiters (first call wins).

    The future the waiters wait on is made by the first of them, so a fetch
    nobody waits for (nearly all of them) costs no future.
    """

    __slots__ = ("_coalescer", "_future", "done", "key")

    def __init__(self, coalescer: Coalescer, key: bytes) -> None:
        self._coalescer = coalescer
        self._future: asyncio.Future[Turn] | None = None
        self.key = key
        self.done = False

    def stored(self) -> None:
        """The answer is in the store; it also clears a pass mark."""
        self._coalescer.clear_pass(self.key)
        self._finish(Turn.LOOKUP)

    def uncacheable(self) -> None:
        """The answer cannot be stored: waiters fetch for themselves, the key passes a while."""
        if not self.done:
            self._coalescer.mark_pass(self.key)
        self._finish(Turn.FETCH)

    def failed(self) -> None:
        """No usable answer came (error, 5xx, or the fetch was abandoned)."""
        self._finish(Turn.FAILED)

    def outcome(self) -> asyncio.Future[Turn]:
        """The future that gets this fetch's outcome (made on first use)."""
        future = self._future
        if future is None:
            future = self._future = asyncio.get_running_loop().create_future()
        return future

    def _finish(self, turn: Turn) -> None:
        if self.done:
            return
        self.done = True
        flights = self._coalescer._flights
        if flights.get(self.key) is self:
            del flights[self.key]
        future = self._future
        if future is not None and not future.done():
            future.set_result(turn)


# How long a pass mark stands before an uncacheable answer renews it.
_REMARK_AFTER: Final = 1.0


class Coalescer:
    """Lets one fetch per key run at a time while concurrent misses wait for it.

    Pass marks (keys whose last answer was uncacheable) last ``pass_ttl``
    seconds of ``clock`` and at most ``max_marks`` are kept (oldest out).
    The methods that read ``clock`` also take ``now``, a reading of it the
    caller already has (the event loop's time: ``time.monotonic``'s clock,
    the default), which spares reading it once more.
    """

    def __init__(
        self,
        *,
        pass_ttl: float = 30.0,
        max_marks: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._flights: dict[bytes, Lead] = {}
        # In the order marked or renewed, oldest first (a plain dict keeps
        # insertion order, and its methods are the compiled build's primitives).
        self._marks: dict[bytes, float] = {}
        self._pass_ttl = pass_ttl
        self._max_marks = max_marks
        self._clock = clock
        self.timeouts = 0

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    def lead(self, key: bytes) -> Lead | None:
        """Become the fetch for ``key`` if none is in flight (never waits)."""
        if key in self._flights:
            return None
        lead = Lead(self, key)
        self._flights[key] = lead
        return lead

    def try_join(
        self, key: bytes, *, may_lead: bool = True, now: float | None = None
    ) -> Lead | Turn | None:
        """What ``join`` decides without waiting.

        A ``Lead``, FETCH, PASS, or None when a fetch of ``key`` is in flight.
        """
        if key in self._flights:
            return None
        if not may_lead:
            return Turn.FETCH
        age = self._mark_age(key, now)
        if age is not None:
            return Turn.PASS if age < _REMARK_AFTER else Turn.FETCH
        lead = Lead(self, key)
        self._flights[key] = lead
        return lead

    async def join(self, key: bytes, timeout: float, *, may_lead: bool = True) -> Lead | Turn:
        """Lead the fetch for ``key``, or wait up to ``timeout`` seconds for the one in flight.

        Without a fetch in flight: a ``Lead`` if ``may_lead`` and the key is
        not passing, else FETCH or PASS. With one: its outcome, or FETCH on
        timeout.
        Cancelling a waiter does not disturb the fetch or the other waiters.
        """
        decided = self.try_join(key, may_lead=may_lead)
        if decided is not None:
            return decided
        future = self._flights[key].outcome()
        if timeout > 0:
            done, _ = await asyncio.wait((future,), timeout=timeout)
            if done:
                return future.result()
        self.timeouts += 1
        return Turn.FETCH

    def passing(self, key: bytes, now: float | None = None) -> bool:
        return self._mark_age(key, now) is not None

    def mark_pass(self, key: bytes, now: float | None = None) -> None:
        if now is None:
            now = self._clock()
        age = self._mark_age(key, now)
        if age is not None and age < _REMARK_AFTER:
            # Renewed less than a second ago: a key that passes under load is
            # marked again once a second, not on every answer.
            return
        marks = self._marks
        marks.pop(key, None)  # to be inserted again as the newest
        marks[key] = now + self._pass_ttl
        if len(marks) > self._max_marks:
            del marks[next(iter(marks))]

    def _mark_age(self, key: bytes, now: float | None) -> float | None:
        """Seconds since the pass mark of ``key`` was set or renewed; None if it has none.

        An expired mark is dropped here. The clock is read only for a mark.
        """
        expires = self._marks.get(key)
        if expires is None:
            return None
        if now is None:
            now = self._clock()
        if expires <= now:
            del self._marks[key]
            return None
        return now - (expires - self._pass_ttl)

    def clear_pass(self, key: bytes) -> None:
        self._marks.pop(key, None)
