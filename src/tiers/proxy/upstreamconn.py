"""One keep-alive connection to a backend, carrying one exchange at a time.

An ``UpstreamConnection`` is an asyncio protocol: ``begin`` arms its
``ResponseParser`` for a new response, the caller writes the request, then
pulls response events with ``next_event``. Reading pauses while the caller
is behind (its client is slow), so a fast backend never fills the proxy's
memory. Between exchanges the connection sits idle in its backend's
``IdlePool`` (``tiers.proxy.upstream``); any byte or EOF received there
makes it unusable.

A caller that runs in callbacks rather than a task registers with
``listen`` instead of waiting: it is called whenever events arrive or the
connection ends or breaks, takes a complete response with
``take_response``, and may at any point go back to ``next_event``
(``listen(None)``) with nothing lost.

Failures surface as ``tiers.proxy.errors.UpstreamError``: ``UpstreamClosed``
when the backend closed or reset the connection, ``UpstreamProtocolError``
for bytes that cannot be framed (or that came unasked), ``UpstreamTimeout``
when ``next_event`` waited in vain. ``received`` counts the response bytes
of the current exchange: zero proves the backend answered nothing, which is
what the retry rules rest on.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Final, cast

from tiers.proxy.errors import (
    UpstreamClosed,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from tiers.proxy.http1 import END, BodyData
from tiers.proxy.responseparser import (
    ResponseEvent,
    ResponseHead,
    ResponseParser,
    whole_body,
    whole_events,
)
from tiers.proxy.waittimer import WaitTimer
from tiers.proxy.writebatch import WriteBatch

if TYPE_CHECKING:
    from tiers.proxy.upstream import Backend

# Response bytes buffered per connection before reading from the backend pauses.
_HIGH_WATER: Final = 256 * 1024
_LOW_WATER: Final = 64 * 1024


def _wake(waiter: asyncio.Future[bool] | None, value: bool = True) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(value)


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to a backend, carrying one request/response at a time.

    One ``ResponseParser`` serves every exchange of the connection, and one
    timer bounds every wait for the backend. It is not set up and torn down
    per wait: armed by a wait, it stays armed for the waits that follow, and
    when it fires it ends the wait in progress if that one's time is up, or
    else moves on to that wait's deadline. A backend that answers within the
    timeout thus costs one timer per timeout period, not one per request.
    """

    def __init__(self, backend: Backend, loop: asyncio.AbstractEventLoop) -> None:
        self.backend = backend
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser: ResponseParser | None = None
        self._active = False  # an exchange is in progress
        self._events: deque[ResponseEvent] = deque()
        self._buffered = 0
        self._reading_paused = False
        self._waiter: asyncio.Future[bool] | None = None
        self._listener: Callable[[], None] | None = None
        # A whole response that came in one read while a listener listened,
        # kept as it came rather than as events, until taken (take_response).
        self._whole: ResponseHead | None = None
        self._whole_data = b""
        self._timer = WaitTimer(loop)
        self._write_paused = False
        self._drain_waiter: asyncio.Future[bool] | None = None
        self._error: UpstreamError | None = None
        self.closed = False
        # Response bytes received in the current exchange: zero means the
        # backend provably sent nothing back, which is what retries depend on.
        self.received = 0
        self.idle_since = 0.0
        self.exchanges = 0

    # ---- asyncio callbacks ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        parser = self._parser
        if parser is None or not self._active:
            # Bytes nobody asked for: the stream can no longer be trusted.
            self._fail(UpstreamProtocolError("unsolicited bytes from backend"))
            return
        self.received += len(data)
        # A whole response comes only first in an exchange: nothing is queued or kept.
        whole = parser.feed_whole(data)
        if whole is not None and self._listener is not None:
            self._whole, self._whole_data = whole, data
            self._listener()
            return
        try:
            events = parser.feed_rest(data) if whole is None else whole_events(whole, data)
        except UpstreamProtocolError as exc:
            self._fail(exc)
            return
        if events:
            self._push(events)

    def eof_received(self) -> bool:
        parser = self._parser
        if parser is not None and self._active:
            try:
                events = parser.feed_eof()
            except UpstreamProtocolError as exc:
                self._error = self._error or exc
            else:
                if events:
                    self._push(events)
        self.closed = True
        self._notify()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if exc is not None and self._error is None:
            self._error = UpstreamClosed(f"connection to {self.backend.label} lost: {exc}")
        self._timer.stop()
        self._notify()
        _wake(self._drain_waiter)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        _wake(self._drain_waiter)

    # ---- used by the proxy ----------------------------------------------------

    @property
    def usable(self) -> bool:
        """Still open and idle with nothing unread: fit to carry a new exchange."""
        return not self.closed and self._error is None and not self._active

    @property
    def failed(self) -> bool:
        """Closed or broken: no further response event will come."""
        return self.closed or self._error is not None

    @property
    def reusable(self) -> bool:
        """The current exchange ended cleanly and the backend keeps the connection open."""
        parser = self._parser
        if parser is None or not self._active or self.closed or self._error is not None:
            return False
        return parser.reusable

    def begin(self, head_request: bool) -> None:
        """Start an exchange; ``head_request`` says the request is HEAD."""
        parser = self._parser
        if parser is None:
            self._parser = ResponseParser(head_request)
        else:
            parser.begin(head_request)
        self._whole, self._whole_data = None, b""
        if self._events:
            # Left over from an exchange that was given up: not this one's.
            self._events.clear()
            self._buffered = 0
            if self._reading_paused and self._transport is not None:
                self._reading_paused = False
                self._transport.resume_reading()
        self._active = True
        self.received = 0
        self.exchanges += 1

    def finish(self, now: float) -> None:
        """End the exchange; the connection goes idle."""
        self._active = False
        self.idle_since = now

    def _live_transport(self) -> asyncio.Transport:
        """The transport to write to; ``UpstreamClosed`` once the connection is closed."""
        if self._transport is None or self.closed:
            raise UpstreamClosed(f"connection to {self.backend.label} is closed")
        return self._transport

    def write(self, data: bytes) -> None:
        self._live_transport().write(data)

    def write_batched(self, data: bytes, batch: WriteBatch) -> None:
        """``write`` through ``batch``: at once or at the end of this loop iteration.

        For a request head sent from callbacks: nothing else is written on the
        connection until the response comes, and the response cannot come
        before the head has gone out.
        """
        batch.write(self._live_transport(), data)

    def writelines(self, data: list[bytes]) -> None:
        self._live_transport().writelines(data)

    async def drain(self) -> None:
        """Wait until the backend reads what was written (flow control)."""
        while self._write_paused and not self.closed:
            waiter = self._loop.create_future()
            self._drain_waiter = waiter
            try:
                await waiter
            finally:
                self._drain_waiter = None
        if self.closed:
            raise self._error or UpstreamClosed(f"connection to {self.backend.label} closed")

    async def next_event(self, timeout: float) -> ResponseEvent:
        """The next response event; raises an ``UpstreamError`` on failure or silence.

        Silence means no event for ``timeout`` seconds from the call.
        """
        events = self._events
        if events:
            return self._pop()
        loop = self._loop
        deadline = loop.time() + timeout
        while not events:
            if self._error is not None:
                raise self._error
            if self.closed:
                raise UpstreamClosed(f"{self.backend.label} closed the connection")
            waiter = loop.create_future()
            self._waiter = waiter
            self._timer.arm(waiter, deadline - loop.time())
            try:
                arrived = await waiter
            finally:
                self._waiter = None
                self._timer.release()
            if not arrived and not events:
                raise UpstreamTimeout(f"{self.backend.label} sent nothing for {timeout:g} s")
        return self._pop()

    def pop_ready(self) -> ResponseEvent | None:
        """The next response event if one is already parsed, else None (never waits)."""
        return self._pop() if self._events else None

    def listen(self, listener: Callable[[], None] | None) -> None:
        """Have ``listener`` called on news instead of waking ``next_event``; None undoes it.

        News is: response events were parsed, or the connection ended or
        failed (``failed``). Events stay queued until taken, by
        ``take_response`` or, after ``listen(None)``, by ``next_event``.
        A listener takes a response whole and small (``take_response``), so
        reading does not pause for it; going back to ``next_event`` brings
        the flow control back.
        """
        self._listener = listener
        if listener is None and self._whole is not None:
            self._events.extend(whole_events(self._whole, self._whole_data))
            self._whole, self._whole_data = None, b""
        if listener is None and self._events:
            self._buffered = sum(len(e.data) for e in self._events if type(e) is BodyData)
            if not self._reading_paused and self._buffered > _HIGH_WATER and self._transport:
                self._reading_paused = True
                self._transport.pause_reading()

    def queued_head(self) -> ResponseHead | None:
        """The response head, if it has arrived and nothing was taken yet."""
        if self._whole is not None:
            return self._whole
        events = self._events
        if events:
            first = events[0]
            if type(first) is ResponseHead:
                return first
        return None

    def take_response(self) -> tuple[ResponseHead, bytes] | None:
        """The whole response, head and body, if all of it has arrived; else None.

        For a listener (see ``listen``). Taking it empties the queue; None
        leaves the queue as it was.
        """
        head = self._whole
        if head is not None:
            data = self._whole_data
            self._whole, self._whole_data = None, b""
            return head, whole_body(head, data)
        events = self._events
        if not events or events[-1] is not END:
            return None
        events.pop()
        first = events.popleft()
        assert type(first) is ResponseHead
        body = [event.data for event in events if type(event) is BodyData]
        events.clear()
        return first, body[0] if len(body) == 1 else b"".join(body)

    def _pop(self) -> ResponseEvent:
        event = self._events.popleft()
        if type(event) is BodyData:
            self._buffered -= len(event.data)
            if self._reading_paused and self._buffered <= _LOW_WATER:
                self._reading_paused = False
                if self._transport is not None and not self.closed:
                    self._transport.resume_reading()
        return event

    def close(self) -> None:
        self.closed = True
        self._timer.stop()
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self.closed = True
        self._timer.stop()
        if self._transport is not None:
            self._transport.abort()
        _wake(self._waiter)

    def _push(self, events: list[ResponseEvent]) -> None:
        queue = self._events
        listener = self._listener
        if listener is not None:
            queue.extend(events)
            listener()
            return
        for event in events:
            queue.append(event)
            if type(event) is BodyData:
                self._buffered += len(event.data)
        if not self._reading_paused and self._buffered > _HIGH_WATER and self._transport:
            self._reading_paused = True
            self._transport.pause_reading()
        self._notify()

    def _notify(self) -> None:
        listener = self._listener
        if listener is not None:
            listener()
        else:
            _wake(self._waiter)

    def _fail(self, exc: UpstreamError) -> None:
        if self._error is None:
            self._error = exc
        self.abort()
        listener = self._listener
        if listener is not None:
            listener()
