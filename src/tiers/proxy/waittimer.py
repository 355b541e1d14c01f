"""One event-loop timer shared by the consecutive waits of a connection.

Setting up and cancelling a timer for every wait is a measurable cost per
request. A ``WaitTimer`` is armed once and reused: when it fires before the
deadline of the wait in progress (the wait that armed it ended early), it is
moved on to the current deadline; when nobody waits, it stays disarmed.
``Deadline`` is the same idea for code driven by callbacks: it calls a
function instead of completing a future.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from typing import Final

# Timers may fire a loop tick early; a wait this close to its deadline has timed out.
_SLACK: Final = 0.001


class WaitTimer:
    """Times out the future of the wait in progress with ``False``."""

    __slots__ = ("_at", "_deadline", "_handle", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0  # when the armed handle fires
        self._deadline = 0.0  # of the wait in progress, on the loop's clock
        self._waiter: asyncio.Future[bool] | None = None

    def arm(self, waiter: asyncio.Future[bool], timeout: float) -> None:
        """``waiter`` gets ``False`` unless something else completes it within ``timeout``."""
        deadline = self._loop.time() + timeout
        self._waiter = waiter
        self._deadline = deadline
        if self._handle is None or self._at > deadline:
            self._start(deadline)

    def release(self) -> None:
        """The wait is over (however it ended); the handle may stay armed for the next."""
        self._waiter = None

    def stop(self) -> None:
        """No more waits: cancel the handle (on close)."""
        self._waiter = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _start(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop.call_at(when, self._fire)
        self._at = when

    def _fire(self) -> None:
        self._handle = None
        waiter = self._waiter
        if waiter is None or waiter.done():
            return  # nobody waits: stay disarmed until the next wait
        if self._loop.time() + _SLACK >= self._deadline:
            waiter.set_result(False)
        else:
            self._start(self._deadline)


class Deadline:
    """Calls ``callback`` once the current deadline passes; the deadline moves cheaply.

    For code that runs in callbacks rather than waiting on a future. Moving
    the deadline later costs nothing: the armed handle fires at the old time
    and re-arms itself for the new one. Only moving it earlier replaces the
    handle. ``clear`` disarms it until the next ``set``.
    """

    __slots__ = ("_at", "_callback", "_deadline", "_handle", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
        self._loop = loop
        self._callback = callback
        self._handle: asyncio.TimerHandle | None = None
        self._at = 0.0  # when the armed handle fires
        self._deadline = math.inf

    def set(self, deadline: float) -> None:
        """Call back at ``deadline`` (loop clock) unless moved or cleared before."""
        self._deadline = deadline
        if self._handle is None or self._at > deadline:
            self._start(deadline)

    def clear(self) -> None:
        """No deadline until the next ``set`` (the handle, if any, fires idle once)."""
        self._deadline = math.inf

    def stop(self) -> None:
        """No more deadlines: cancel the handle (on close)."""
        self._deadline = math.inf
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _start(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._handle = self._loop.call_at(when, self._fire)
        self._at = when

    def _fire(self) -> None:
        self._handle = None
        deadline = self._deadline
        if deadline == math.inf:
            return
        if self._loop.time() + _SLACK >= deadline:
            self._deadline = math.inf
            self._callback()
        else:
            self._start(deadline)
