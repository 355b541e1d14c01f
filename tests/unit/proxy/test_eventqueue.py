"""The queue of a client connection's parsed request events."""

from __future__ import annotations

import pytest

from tiers.proxy.client import EventQueue
from tiers.proxy.http1 import END, BodyData


def test_events_come_out_oldest_first_and_can_be_looked_at() -> None:
    queue = EventQueue()
    assert not queue and len(queue) == 0 and queue.peek() is None
    first, second = BodyData(b"a"), BodyData(b"b")
    queue.append(first)
    queue.append(second)
    queue.append(END)
    assert queue and len(queue) == 3
    assert queue.peek() is first and queue.peek(1) is second and queue.peek(3) is None
    assert queue.popleft() is first
    assert len(queue) == 2 and queue.peek() is second and queue.peek(1) is END
    assert queue.popleft() is second and queue.popleft() is END
    assert not queue and queue.peek() is None
    with pytest.raises(IndexError):
        queue.popleft()


def test_a_long_pipelined_run_keeps_its_order_and_lets_served_events_go() -> None:
    queue = EventQueue()
    served: list[object] = []
    events = [BodyData(b"%d" % n) for n in range(2000)]
    for n, event in enumerate(events):
        queue.append(event)
        if n % 3:  # the queue never quite drains
            served.append(queue.popleft())
        # What was served is dropped now and then, not kept for the connection's life.
        assert len(queue._events) - len(queue) <= 256
    while queue:
        served.append(queue.popleft())
    assert served == events
