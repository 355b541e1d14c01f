"""A client connection's I/O state, its request body, and the answers the proxy writes itself.

``ClientIO`` holds what every way of serving a client connection shares:

- the transport and the queue of parsed request events, with flow control:
  reading pauses while more than ``_HIGH_WATER`` body bytes or
  ``_MAX_QUEUED`` events wait, and resumes once the queue is drained;
- the waits of the task path: ``_wait`` for news from the client, ``_drain``
  for a client that reads slowly (given up after ``send_timeout``);
- the request body as the backend gets it (``_relay_queued``,
  ``_frame_body``), kept for a replay up to ``REPLAY_LIMIT`` bytes;
- the proxy's own answers: ``_answer`` for errors and fixed responses,
  ``_reject`` for a request that cannot be parsed (answered, then the
  connection closes after a lingering read);
- the access log line and the counters of each exchange (``_log``).

``tiers.proxy.connection.ClientConnection`` builds the request flow on it.
A body error raises ``ClientGone`` carrying the status to answer.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final

from tiers.proxy.errors import ClientGone
from tiers.proxy.exchange import CLIENT_CLOSED, Exchange
from tiers.proxy.forward import LAST_CHUNK, chunk_size_line, error_response
from tiers.proxy.http1 import END, BodyData
from tiers.proxy.requestparser import RequestError, RequestEvent, RequestHead, RequestParser
from tiers.proxy.waittimer import WaitTimer

if TYPE_CHECKING:
    from tiers.proxy.server import ProxyServer
    from tiers.proxy.shared import Shared

log = logging.getLogger("tiers.proxy")

# Request bytes buffered per client connection before reading from it pauses.
_HIGH_WATER: Final = 256 * 1024
_LOW_WATER: Final = 64 * 1024
# Pipelined requests parsed ahead of the one being served.
_MAX_QUEUED: Final = 64
# Served events an EventQueue keeps at its start before dropping them.
_COMPACT_AFTER: Final = 256
# A request body up to this size is kept until the response starts, so an
# idempotent request can be sent again to another backend.
REPLAY_LIMIT: Final = 64 * 1024
# After answering a malformed request, keep reading (and dropping) for this
# long before closing, so the kernel does not reset the connection and lose
# the answer while the client is still sending.
_LINGER: Final = 2.0
_PROTOCOLS: Final = {b"1.1": b"HTTP/1.1", b"1.0": b"HTTP/1.0"}


def wake(waiter: asyncio.Future[bool] | None, value: bool = True) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(value)


class EventQueue:
    """A connection's parsed request events waiting to be served, oldest first.

    A list read from a moving start rather than a deque: in the compiled
    build every step here is a native operation, where a deque's methods
    are looked up by name.
    """

    __slots__ = ("_events", "_start")

    def __init__(self) -> None:
        self._events: list[RequestEvent] = []
        self._start = 0

    def __len__(self) -> int:
        return len(self._events) - self._start

    def __bool__(self) -> bool:
        return self._start < len(self._events)

    def append(self, event: RequestEvent) -> None:
        self._events.append(event)

    def peek(self, index: int = 0) -> RequestEvent | None:
        """The event ``index`` places from the oldest, or None if there are fewer."""
        at = self._start + index
        events = self._events
        return events[at] if at < len(events) else None

    def popleft(self) -> RequestEvent:
        """Remove and return the oldest event (IndexError when there is none)."""
        events = self._events
        start = self._start
        event = events[start]
        start += 1
        if start == len(events):
            events.clear()
            start = 0
        elif start >= _COMPACT_AFTER:
            del events[:start]  # a long run of pipelined requests: drop the served ones
            start = 0
        self._start = start
        return event


class ClientIO(asyncio.Protocol):
    """The shared state of one client connection; see the module docstring."""

    def __init__(self, server: ProxyServer) -> None:
        self._server = server
        self._shared: Shared = server.shared
        self._settings = server.settings
        self._loop = server.loop
        self._parser = RequestParser(server.settings.limits)
        self._events = EventQueue()
        self._buffered = 0
        self._reading_paused = False
        self._waiter: asyncio.Future[bool] | None = None
        self._timer = WaitTimer(server.loop)
        self._write_paused = False
        self._drain_waiter: asyncio.Future[bool] | None = None
        self._transport: asyncio.Transport | None = None
        self._client_ip = b"-"
        self._awaiting_head = False
        self._head_started: float | None = None
        self._eof = False
        self._lost = False
        self._gone = False
        self._busy = False
        self._lingering = False
        self._stopping = False

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _flush_batched(self) -> None:
        """Send what the callback paths batched, before a direct write or a close.

        Those writes wait for the end of the loop iteration (``WriteBatch``);
        one to this connection must not be overtaken by a later direct write
        nor lost by a close.
        """
        self._shared.writes.flush()

    # ---- the event queue --------------------------------------------------------

    def _queue(self, events: list[RequestEvent]) -> None:
        queue = self._events
        for event in events:
            queue.append(event)
            if type(event) is BodyData:
                self._buffered += len(event.data)
        if not self._reading_paused and (
            self._buffered > _HIGH_WATER or len(queue) > _MAX_QUEUED
        ):
            self._reading_paused = True
            assert self._transport is not None
            self._transport.pause_reading()

    def _pop(self) -> RequestEvent | None:
        queue = self._events
        if not queue:
            return None
        event = queue.popleft()
        if type(event) is BodyData:
            self._buffered -= len(event.data)
        if self._reading_paused:
            self._resume_reading()
        return event

    def _resume_reading(self) -> None:
        """Read from the client again if reading paused and the queue has drained enough."""
        if self._buffered <= _LOW_WATER and len(self._events) <= _MAX_QUEUED:
            self._reading_paused = False
            if self._transport is not None and not self._lost:
                self._transport.resume_reading()

    # ---- waits of the task path -------------------------------------------------

    async def _wait(self, timeout: float) -> bool:
        """Wait for news from the client (data, EOF, close, stop); False on timeout."""
        waiter = self._loop.create_future()
        self._waiter = waiter
        self._timer.arm(waiter, timeout)
        try:
            arrived: bool = await waiter
        finally:
            self._waiter = None
            self._timer.release()
        return arrived

    async def _drain(self) -> None:
        """Wait until the client reads what was written, at most ``send_timeout``."""
        while self._write_paused and not self._lost:
            waiter = self._loop.create_future()
            self._drain_waiter = waiter
            timer = self._loop.call_later(self._settings.send_timeout, wake, waiter, False)
            try:
                if not await waiter:
                    # A client that reads nothing must not hold a connection forever.
                    self.abort()
                    raise ClientGone("client read nothing within the send timeout",
                                     CLIENT_CLOSED)
            finally:
                timer.cancel()
                self._drain_waiter = None
        if self._lost:
            raise ClientGone("client closed the connection", CLIENT_CLOSED)

    # ---- request body -------------------------------------------------------------

    def _relay_queued(self, x: Exchange, out: list[bytes]) -> None:
        """Move the body bytes already received into ``out`` (no waiting)."""
        while not x.body_done:
            event = self._pop()
            if event is None:
                return
            self._frame_body(x, event, out)

    def _frame_body(self, x: Exchange, event: RequestEvent, out: list[bytes]) -> None:
        if type(event) is BodyData:
            data = event.data
            x.body_size += len(data)
            limit = self._settings.policy.max_body_size
            if limit and x.body_size > limit:
                raise ClientGone("request body too large", 413)
            pieces = [chunk_size_line(len(data)), data, b"\r\n"] if x.chunked else [data]
        elif event is END:
            x.body_done = True
            if not x.chunked:
                return
            pieces = [LAST_CHUNK]
        elif type(event) is RequestError:
            raise ClientGone(f"malformed request body: {event.reason}", event.status)
        else:
            raise ClientGone("request head where body was expected")
        out += pieces
        replay = x.replay
        if replay is not None:
            if len(replay) + sum(len(p) for p in pieces) > REPLAY_LIMIT:
                x.replay = None
            else:
                assert isinstance(replay, bytearray)  # a request with a body has its own
                for piece in pieces:
                    replay += piece

    # ---- answers of the proxy itself ------------------------------------------

    def _answer(self, x: Exchange, status: int, message: str, *, extra: bytes = b"",
                body: bytes | None = None) -> bool:
        """Send the proxy's own response; True if the connection stays usable."""
        # A body already received in full does not stand in the way of keep-alive.
        if not x.body_done and x.pump is None:
            discard: list[bytes] = []
            try:
                self._relay_queued(x, discard)
            except ClientGone:
                x.body_done = False
        keep_alive = (
            x.body_done
            and x.head.keep_alive
            and not self._shared.stopping
            and status not in (400, 408, 413)
        )
        head_only = x.head.method == b"HEAD"
        response = error_response(
            status, message, keep_alive=keep_alive, head_only=head_only, extra=extra, body=body
        )
        assert self._transport is not None
        self._flush_batched()
        self._transport.write(response)
        x.status = status
        x.responded = True
        x.size = 0 if head_only else len(message) + 1 if body is None else len(body)
        return keep_alive

    def _reject(self, status: int, reason: str) -> None:
        """Answer a request that cannot be served, then close after a lingering read."""
        assert self._transport is not None
        body = error_response(status, reason, keep_alive=False)
        self._flush_batched()
        self._transport.write(body)
        self._shared.counters.count(status, len(reason) + 1)
        access_log = self._shared.access_log
        if access_log is not None:
            access_log.record(
                host=self._client_ip,
                forwardedfor=None,
                method=b"-",
                uri=b"-",
                protocol=b"-",
                status=status,
                size=len(reason) + 1,
                reqtime=self._loop.time() - (self._head_started or self._loop.time()),
                apptime=None,
                upstream=None,
                ua=None,
            )
        self._linger()

    def _linger(self) -> None:
        transport = self._transport
        if transport is None or self._lost:
            return
        self._lingering = True
        self._flush_batched()
        if transport.can_write_eof():
            transport.write_eof()
        self._loop.call_later(_LINGER, transport.close)

    def _close_after_failure(self) -> None:
        if not self._lost:
            self._linger()

    def _cut_client(self) -> None:
        # The response is cut short; closing is the only signal HTTP/1.1 has.
        if self._transport is not None:
            self._flush_batched()
            self._transport.close()

    @staticmethod
    def _log_failure(head: RequestHead, failure: str) -> None:
        log.warning("%s %s: %s", head.method.decode(), head.path.decode("latin-1"), failure)

    # ---- the access log ---------------------------------------------------------

    def _log(self, x: Exchange, now: float) -> None:
        """Count ``x`` and write its access log line; ``now`` is the loop's time."""
        shared = self._shared
        shared.counters.count(x.status, x.size)
        access_log = shared.access_log
        if access_log is not None:
            head = x.head
            version = head.version
            access_log.record(
                self._client_ip,
                head.forwarded_for,
                head.method,
                head.target,
                _PROTOCOLS.get(version) or b"HTTP/" + version,
                x.status,
                x.size,
                now - x.start,
                x.apptime,
                x.upstream,
                head.user_agent,
                x.body_size,
                head.referer,
                x.cache,
                x.route,
                x.request_id,
                now,
            )
