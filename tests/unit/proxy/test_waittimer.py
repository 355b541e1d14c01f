"""The shared timers: one event-loop handle reused across many deadlines."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from tiers.proxy.waittimer import Deadline


async def _until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not condition() and loop.time() < end:
        await asyncio.sleep(0.005)


def test_a_deadline_calls_back_once_when_it_passes() -> None:
    async def scenario() -> None:
        fired: list[float] = []
        deadline = Deadline(asyncio.get_running_loop(), lambda: fired.append(1.0))
        loop = asyncio.get_running_loop()
        deadline.set(loop.time() + 0.01)
        await _until(lambda: bool(fired))
        await asyncio.sleep(0.03)
        assert fired == [1.0]  # once, not again

    asyncio.run(scenario())


def test_a_deadline_moved_later_fires_at_the_new_time_only() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        deadline = Deadline(loop, lambda: fired.append(loop.time()))
        start = loop.time()
        deadline.set(start + 0.01)
        deadline.set(start + 0.08)  # later: the armed handle re-arms itself
        await _until(lambda: bool(fired))
        # Never before the deadline (the loop's timers may be a millisecond early).
        assert len(fired) == 1 and fired[0] >= start + 0.08 - 0.0015

    asyncio.run(scenario())


def test_a_deadline_moved_earlier_fires_at_the_earlier_time() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        fired: list[float] = []
        deadline = Deadline(loop, lambda: fired.append(loop.time()))
        deadline.set(loop.time() + 10.0)
        deadline.set(loop.time() + 0.01)
        await _until(lambda: bool(fired))
        assert len(fired) == 1
        deadline.stop()

    asyncio.run(scenario())


def test_a_cleared_or_stopped_deadline_stays_silent() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        fired: list[str] = []
        cleared = Deadline(loop, lambda: fired.append("cleared"))
        cleared.set(loop.time() + 0.01)
        cleared.clear()
        stopped = Deadline(loop, lambda: fired.append("stopped"))
        stopped.set(loop.time() + 0.01)
        stopped.stop()
        await asyncio.sleep(0.05)
        assert fired == []
        cleared.set(loop.time() + 0.01)  # usable again after a clear
        await _until(lambda: bool(fired))
        assert fired == ["cleared"]

    asyncio.run(scenario())
