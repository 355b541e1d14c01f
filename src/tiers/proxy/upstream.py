"""Backends: pooled keep-alive connections, round-robin choice, active health checks.

``Upstreams`` owns one ``Backend`` per app server. The decisions (health
transitions, which backend, which idle connection) are the plain functions
of ``tiers.proxy.balancer``; this module does the sockets and the timers.

An ``UpstreamConnection`` is an asyncio protocol that carries one exchange at
a time: ``begin`` arms a fresh ``ResponseParser``, the caller writes the
request, then pulls response events with ``next_event``. Reading pauses while
the caller is behind (its client is slow), so a fast backend never fills the
proxy's memory. Between exchanges the connection sits in its backend's
``IdlePool``; any byte or EOF received there makes it unusable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from dataclasses import dataclass
from typing import cast

from tiers.config.model import Address, ProxyConfig
from tiers.proxy.balancer import Health, IdlePool, RoundRobin, mark_unreachable, observe_check
from tiers.proxy.errors import (
    ConnectFailed,
    UpstreamClosed,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from tiers.proxy.http1 import BodyData, ResponseEvent, ResponseHead, ResponseParser

log = logging.getLogger("tiers.proxy")

# Response bytes buffered per connection before reading from the backend pauses.
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    """How backends are checked, connected to and pooled."""

    health_path: str = ProxyConfig.health_path
    health_interval: float = ProxyConfig.health_interval
    health_timeout: float = ProxyConfig.health_timeout
    health_fall: int = ProxyConfig.health_fall
    health_rise: int = ProxyConfig.health_rise
    connect_timeout: float = ProxyConfig.connect_timeout
    max_idle: int = 64
    # Below the app servers' own keep-alive timeout (5 s), so the proxy closes
    # idle connections before a backend does and rarely sends on a dying one.
    max_idle_time: float = 2.0


def _wake(waiter: asyncio.Future[bool] | None, value: bool = True) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(value)


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to a backend, carrying one request/response at a time."""

    def __init__(self, backend: Backend, loop: asyncio.AbstractEventLoop) -> None:
        self.backend = backend
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._parser: ResponseParser | None = None
        self._events: deque[ResponseEvent] = deque()
        self._buffered = 0
        self._reading_paused = False
        self._waiter: asyncio.Future[bool] | None = None
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
        if parser is None:
            # Bytes nobody asked for: the stream can no longer be trusted.
            self._fail(UpstreamProtocolError("unsolicited bytes from backend"))
            return
        self.received += len(data)
        try:
            events = parser.feed(data)
        except UpstreamProtocolError as exc:
            self._fail(exc)
            return
        if events:
            self._push(events)

    def eof_received(self) -> bool:
        parser = self._parser
        if parser is not None:
            try:
                events = parser.feed_eof()
            except UpstreamProtocolError as exc:
                self._error = self._error or exc
            else:
                if events:
                    self._push(events)
        self.closed = True
        _wake(self._waiter)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if exc is not None and self._error is None:
            self._error = UpstreamClosed(f"connection to {self.backend.label} lost: {exc}")
        _wake(self._waiter)
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
        return not self.closed and self._error is None and self._parser is None

    @property
    def reusable(self) -> bool:
        """The current exchange ended cleanly and the backend keeps the connection open."""
        parser = self._parser
        if parser is None or self.closed or self._error is not None:
            return False
        head = parser.head
        return parser.done and not parser.extra and head is not None and head.keep_alive

    def begin(self, head_request: bool) -> None:
        """Start an exchange; ``head_request`` says the request is HEAD."""
        self._parser = ResponseParser(head_request)
        self.received = 0
        self.exchanges += 1

    def finish(self, now: float) -> None:
        """End the exchange; the connection goes idle."""
        self._parser = None
        self.idle_since = now

    def write(self, data: bytes) -> None:
        if self._transport is None or self.closed:
            raise UpstreamClosed(f"connection to {self.backend.label} is closed")
        self._transport.write(data)

    def writelines(self, data: list[bytes]) -> None:
        if self._transport is None or self.closed:
            raise UpstreamClosed(f"connection to {self.backend.label} is closed")
        self._transport.writelines(data)

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
        """The next response event; raises an ``UpstreamError`` on failure or silence."""
        events = self._events
        while not events:
            if self._error is not None:
                raise self._error
            if self.closed:
                raise UpstreamClosed(f"{self.backend.label} closed the connection")
            waiter = self._loop.create_future()
            self._waiter = waiter
            timer = self._loop.call_later(timeout, _wake, waiter, False)
            try:
                arrived = await waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not arrived and not events:
                raise UpstreamTimeout(f"{self.backend.label} sent nothing for {timeout:g} s")
        return self._pop()

    def pop_ready(self) -> ResponseEvent | None:
        """The next response event if one is already parsed, else None (never waits)."""
        return self._pop() if self._events else None

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
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self.closed = True
        if self._transport is not None:
            self._transport.abort()
        _wake(self._waiter)

    def _push(self, events: list[ResponseEvent]) -> None:
        queue = self._events
        for event in events:
            queue.append(event)
            if type(event) is BodyData:
                self._buffered += len(event.data)
        if not self._reading_paused and self._buffered > _HIGH_WATER and self._transport:
            self._reading_paused = True
            self._transport.pause_reading()
        _wake(self._waiter)

    def _fail(self, exc: UpstreamError) -> None:
        if self._error is None:
            self._error = exc
        self.abort()


class Backend:
    """One app server: its address, health and idle connections."""

    def __init__(self, index: int, address: Address, settings: UpstreamSettings) -> None:
        self.index = index
        self.address = address
        self.label = str(address)
        self.label_bytes = self.label.encode()
        self.health = Health()
        self.pool: IdlePool[UpstreamConnection] = IdlePool(
            settings.max_idle, settings.max_idle_time
        )

    @property
    def up(self) -> bool:
        return self.health.up


class Upstreams:
    """All backends of the proxy, their pools and their health checks."""

    def __init__(self, addresses: list[Address], settings: UpstreamSettings) -> None:
        if not addresses:
            raise ValueError("at least one backend is needed")
        self.settings = settings
        self.backends = [Backend(i, a, settings) for i, a in enumerate(addresses)]
        self._balancer = RoundRobin()
        self._checks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Start one health-check task per backend (needs a running loop)."""
        self._loop = asyncio.get_running_loop()
        for backend in self.backends:
            task = self._loop.create_task(self._check_loop(backend))
            self._checks.append(task)

    async def close(self) -> None:
        """Stop the health checks and close every idle connection."""
        for task in self._checks:
            task.cancel()
        for task in self._checks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._checks.clear()
        for backend in self.backends:
            for conn in backend.pool.drain():
                conn.close()

    def pick(self, exclude: set[int]) -> Backend | None:
        """The next healthy backend not in ``exclude``, or None."""
        index = self._balancer.pick([b.health.up for b in self.backends], exclude)
        return None if index is None else self.backends[index]

    def take_idle(self, backend: Backend, now: float) -> UpstreamConnection | None:
        conn, discard = backend.pool.take(now)
        for stale in discard:
            stale.close()
        return conn

    def release(self, conn: UpstreamConnection, now: float) -> None:
        """Return ``conn`` to its pool after an exchange, or close it if it cannot be reused."""
        if not conn.reusable or not conn.backend.health.up:
            conn.close()
            return
        conn.finish(now)
        for extra in conn.backend.pool.put(conn):
            extra.close()

    async def connect(self, backend: Backend) -> UpstreamConnection:
        """A new connection to ``backend``; on failure mark it down and raise ``ConnectFailed``."""
        loop = asyncio.get_running_loop()
        address = backend.address
        try:
            _, conn = await asyncio.wait_for(
                loop.create_connection(
                    lambda: UpstreamConnection(backend, loop), address.host, address.port
                ),
                self.settings.connect_timeout,
            )
        except OSError as exc:  # TimeoutError included
            reason = "timed out" if isinstance(exc, TimeoutError) else str(exc)
            self._set_health(backend, mark_unreachable(backend.health), f"connect failed: {reason}")
            raise ConnectFailed(f"cannot connect to {backend.label}: {reason}") from exc
        return conn

    # ---- health ---------------------------------------------------------------

    def _set_health(self, backend: Backend, health: Health, why: str) -> None:
        was_up = backend.health.up
        backend.health = health
        if was_up and not health.up:
            log.warning("backend %s is down (%s)", backend.label, why)
            for conn in backend.pool.drain():
                conn.close()
        elif health.up and not was_up:
            log.info("backend %s is up", backend.label)

    async def _check_loop(self, backend: Backend) -> None:
        settings = self.settings
        loop = asyncio.get_running_loop()
        while True:
            ok, why = await self.probe(backend)
            health = observe_check(
                backend.health, ok, fall=settings.health_fall, rise=settings.health_rise
            )
            self._set_health(backend, health, why)
            for conn in backend.pool.sweep(loop.time()):
                conn.close()
            await asyncio.sleep(settings.health_interval)

    async def probe(self, backend: Backend) -> tuple[bool, str]:
        """One active check: GET the health path; a 2xx or 3xx within the timeout passes."""
        settings = self.settings
        request = (
            f"GET {settings.health_path} HTTP/1.1\r\nHost: {backend.label}\r\n"
            "User-Agent: tiers-proxy-health\r\nConnection: close\r\n\r\n"
        ).encode()
        writer: asyncio.StreamWriter | None = None
        try:
            async with asyncio.timeout(settings.health_timeout):
                reader, writer = await asyncio.open_connection(
                    backend.address.host, backend.address.port
                )
                writer.write(request)
                parser = ResponseParser(head_request=False)
                while True:
                    data = await reader.read(65536)
                    if not data:
                        parser.feed_eof()
                        return False, "health check: no response"
                    for event in parser.feed(data):
                        if isinstance(event, ResponseHead):
                            if 200 <= event.status < 400:
                                return True, ""
                            return False, f"health check answered {event.status}"
        except TimeoutError:
            return False, f"health check timed out after {settings.health_timeout:g} s"
        except (OSError, UpstreamError) as exc:
            return False, f"health check failed: {exc}"
        finally:
            if writer is not None:
                writer.close()
