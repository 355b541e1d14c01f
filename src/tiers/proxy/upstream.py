"""Backend pools: keep-alive connections, slots and queue, active and passive health.

``Upstreams`` is one pool: a ``Backend`` per server, the pool's balancing
policy, its per-server slots and wait queue, and its health checks.
``Pools`` holds one ``Upstreams`` per configured pool, starts and stops them
together and checks each server address once however many pools list it.
The decisions (health transitions, which server, who gets a freed slot,
which idle connection) are ``tiers.proxy.balancer``'s ``PoolState`` and
``IdlePool``; this module does the sockets, the futures and the timers.

A request's life in a pool:

    backend = await upstreams.acquire(tried, key=uri)  # slot taken; may wait in the queue
    conn = upstreams.take_idle(backend, now) or await upstreams.connect(backend)
    ... exchange ...
    upstreams.release(conn, now)                    # connection back to the idle pool
    upstreams.finish(backend, outcome, now)         # slot freed, outcome counted

``acquire`` raises ``QueueFull`` or ``QueueTimeout`` (both ``PoolBusy``,
answered 503) when every eligible server stays at ``max_conns``.

An ``UpstreamConnection`` is an asyncio protocol that carries one exchange at
a time: ``begin`` arms a fresh ``ResponseParser``, the caller writes the
request, then pulls response events with ``next_event``. Reading pauses while
the caller is behind (its client is slow), so a fast backend never fills the
proxy's memory. Between exchanges the connection sits in its backend's
``IdlePool``; any byte or EOF received there makes it unusable.

Errors raised here, beside ``tiers.proxy.errors``:

    ProxyError                    (tiers.errors)
     +-- PoolBusy                 no slot on any eligible server of a pool: answer 503
          +-- QueueFull           the pool's wait queue was full
          +-- QueueTimeout        the request waited ``queue_timeout`` in vain (or the pool closed)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

from tiers.config.model import Address, ProxyConfig
from tiers.config.proxy import Pool, Server
from tiers.errors import ProxyError
from tiers.proxy.balancer import (
    Change,
    Health,
    IdlePool,
    Outcome,
    PoolState,
    PoolStats,
    ServerState,
)
from tiers.proxy.errors import (
    ConnectFailed,
    UpstreamClosed,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)
from tiers.proxy.http1 import BodyData, ResponseEvent, ResponseHead, ResponseParser
from tiers.proxy.waittimer import WaitTimer

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


class PoolBusy(ProxyError):
    """Every eligible server of a pool is at ``max_conns``: the request gets no slot (503)."""


class QueueFull(PoolBusy):
    """The pool's wait queue already held ``queue`` requests."""


class QueueTimeout(PoolBusy):
    """The request waited ``queue_timeout`` seconds without a slot, or the pool closed."""


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
        try:
            events = parser.feed(data)
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
        _wake(self._waiter)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if exc is not None and self._error is None:
            self._error = UpstreamClosed(f"connection to {self.backend.label} lost: {exc}")
        self._timer.stop()
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
        return not self.closed and self._error is None and not self._active

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
    """One server of a pool: its address, health and idle connections.

    ``index`` is its position in the pool (what ``exclude`` sets hold).
    """

    def __init__(self, state: ServerState, address: Address, settings: UpstreamSettings) -> None:
        self.index = state.index
        self.address = address
        self.label = state.label
        self.label_bytes = self.label.encode()
        self.state = state
        self.pool: IdlePool[UpstreamConnection] = IdlePool(
            settings.max_idle, settings.max_idle_time
        )

    @property
    def up(self) -> bool:
        return self.state.up

    @property
    def health(self) -> Health:
        return self.state.health

    @property
    def backup(self) -> bool:
        return self.state.backup


def _default_pool(addresses: Sequence[Address]) -> Pool:
    if not addresses:
        raise ValueError("at least one backend is needed")
    # A flat list of backends as the proxy has always run it: round robin, and
    # one failed connection takes a backend out until its checks pass again.
    return Pool(name="default", servers=tuple(Server(a) for a in addresses), passive_fall=1)


class Upstreams:
    """One pool of backends: choice, slots and queue, idle connections, health checks.

    Built from a ``Pool`` or, as before pools existed, from a list of
    addresses (a round-robin pool named "default" whose backends go down on
    the first failed connection). Every method runs on the event loop thread.
    """

    def __init__(self, servers: Pool | Sequence[Address], settings: UpstreamSettings) -> None:
        pool = servers if isinstance(servers, Pool) else _default_pool(servers)
        self.config = pool
        self.name = pool.name
        self.settings = settings
        self._state: PoolState[asyncio.Future[int]] = PoolState(
            pool, fall=settings.health_fall, rise=settings.health_rise
        )
        self.backends = [
            Backend(state, server.address, settings)
            for state, server in zip(self._state.servers, pool.servers, strict=True)
        ]
        self._checks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, checks: bool = True) -> None:
        """Start one health-check task per backend (needs a running loop).

        ``checks=False`` leaves checking to the caller, which feeds results to
        ``record_check`` (``Pools`` does, once per address).
        """
        self._loop = asyncio.get_running_loop()
        if checks:
            for backend in self.backends:
                task = self._loop.create_task(
                    _check_forever(backend.address, [(self, backend)], self.settings)
                )
                self._checks.append(task)

    async def close(self) -> None:
        """Stop the health checks, fail the queued requests, close every idle connection."""
        for task in self._checks:
            task.cancel()
        for task in self._checks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._checks.clear()
        for ticket in self._state.clear_queue():
            if not ticket.done():
                ticket.set_exception(QueueTimeout(f"pool {self.name} is closing"))
        for backend in self.backends:
            for conn in backend.pool.drain():
                conn.close()

    def _now(self) -> float:
        loop = self._loop
        return loop.time() if loop is not None else time.monotonic()

    # ---- choosing a backend -----------------------------------------------------

    def pick(self, exclude: Collection[int], key: bytes = b"") -> Backend | None:
        """The next healthy backend not in ``exclude``, or None; takes no slot.

        For callers that do not report when requests end: ``max_conns`` and
        least-connections counts do not see these requests. ``key`` is the
        request URI for hashing pools.
        """
        index = self._state.choose(key, exclude, self._now())
        return None if index is None else self.backends[index]

    async def acquire(self, exclude: Collection[int] = (), key: bytes = b"") -> Backend | None:
        """A backend for a request, holding one of its slots until ``finish``.

        ``exclude`` holds the indexes already tried for this request (kept by
        reference while waiting: do not change it meanwhile); ``key`` is the
        request URI, used by hashing pools. Returns None when no backend is up
        in the tier in use or every one is excluded. When every eligible
        backend is at ``max_conns``, waits in the pool's FIFO queue; raises
        ``QueueFull`` if the queue is full and ``QueueTimeout`` after
        ``queue_timeout`` seconds without a slot. If the caller is cancelled
        while waiting, no slot is left taken.
        """
        loop = self._loop or asyncio.get_running_loop()
        state = self._state
        now = loop.time()
        index = state.acquire(key, exclude, now)
        if isinstance(index, int):
            return self.backends[index]
        if index is None:
            return None
        waiter: asyncio.Future[int] = loop.create_future()
        if not state.enqueue(waiter, key, exclude, now):
            raise QueueFull(
                f"pool {self.name}: every server has {state.max_conns} requests in flight "
                f"and {state.queue_limit} wait"
            )
        timer = loop.call_later(state.queue_timeout, self._expire, waiter)
        try:
            index = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
                # Granted just as the caller was cancelled: hand the slot on.
                self._free(waiter.result(), loop.time())
            else:
                state.withdraw(waiter)
            raise
        finally:
            timer.cancel()
        return self.backends[index]

    def finish(self, backend: Backend, outcome: Outcome, now: float) -> None:
        """Free the slot ``acquire`` gave for ``backend`` and count the exchange's outcome.

        Call it exactly once per ``acquire`` that returned a backend, however
        the request ended (``Outcome.NEUTRAL`` when nothing was learnt,
        including after ``connect`` failed: it counted that itself).
        ``passive_fall`` failures in a row take the backend out at once.
        """
        state = self._state
        change = state.finish(backend.index, outcome, now)
        if change is not None:
            self._changed(backend, change, self._streak(backend, outcome))
        if state.queued:
            self._dispatch(now)

    def report(self, backend: Backend, outcome: Outcome, now: float) -> None:
        """Count an exchange's outcome for a backend from ``pick`` (no slot to free)."""
        change = self._state.report(backend.index, outcome, now)
        if change is not None:
            self._changed(backend, change, self._streak(backend, outcome))

    def _streak(self, backend: Backend, outcome: Outcome) -> str:
        return f"{backend.state.passive_failures} failed requests in a row, last: {outcome.value}"

    def _free(self, index: int, now: float) -> None:
        state = self._state
        state.release(index)
        if state.queued:
            self._dispatch(now)

    def _dispatch(self, now: float) -> None:
        state = self._state
        # Each round removes at least one waiter, so the queue bounds the rounds.
        for _ in range(state.queued + 1):
            unclaimed = False
            for waiter, index in state.dispatch(now):
                if index is None:
                    if not waiter.done():
                        waiter.set_exception(self._timeout_error())
                elif waiter.done():
                    # Its task was cancelled and has not withdrawn yet.
                    state.release(index)
                    unclaimed = True
                else:
                    waiter.set_result(index)
            if not unclaimed or not state.queued:
                return

    def _expire(self, waiter: asyncio.Future[int]) -> None:
        if not waiter.done():
            self._state.withdraw(waiter, timed_out=True)
            waiter.set_exception(self._timeout_error())

    def _timeout_error(self) -> QueueTimeout:
        return QueueTimeout(
            f"pool {self.name}: no server had a free slot within {self._state.queue_timeout:g} s"
        )

    # ---- connections ------------------------------------------------------------

    def take_idle(self, backend: Backend, now: float) -> UpstreamConnection | None:
        conn, discard = backend.pool.take(now)
        for stale in discard:
            stale.close()
        return conn

    def release(self, conn: UpstreamConnection, now: float) -> None:
        """Return ``conn`` to its pool after an exchange, or close it if it cannot be reused."""
        if not conn.reusable or not conn.backend.up:
            conn.close()
            return
        conn.finish(now)
        for extra in conn.backend.pool.put(conn):
            extra.close()

    async def connect(self, backend: Backend) -> UpstreamConnection:
        """A new connection to ``backend``; on failure count it and raise ``ConnectFailed``.

        The failure counts toward the pool's ``passive_fall`` (the backend
        may go down at once); a slot taken by ``acquire`` stays taken until
        ``finish``.
        """
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
            change = self._state.connect_failed(backend.index, loop.time())
            if change is not None:
                self._changed(backend, change, f"connect failed: {reason}")
            raise ConnectFailed(f"cannot connect to {backend.label}: {reason}") from exc
        return conn

    # ---- health -----------------------------------------------------------------

    def record_check(self, backend: Backend, ok: bool, why: str, now: float) -> None:
        """Apply one active check's result to ``backend`` and sweep its idle connections."""
        change = self._state.check(backend.index, ok, now, why)
        if change is not None:
            self._changed(backend, change, why)
        for conn in backend.pool.sweep(now):
            conn.close()

    def _changed(self, backend: Backend, change: Change, why: str) -> None:
        if change is Change.DOWN:
            log.warning("pool %s: backend %s is down (%s)", self.name, backend.label, why)
            for conn in backend.pool.drain():
                conn.close()
            return
        log.info("pool %s: backend %s is up", self.name, backend.label)
        if self._state.queued:
            self._dispatch(self._now())

    async def probe(self, backend: Backend) -> tuple[bool, str]:
        """One active check of ``backend`` (see ``probe``)."""
        return await probe(backend.address, self.settings)

    # ---- reporting --------------------------------------------------------------

    def stats(self) -> PoolStats:
        """The pool and its backends as plain data; check times on the wall clock."""
        return self._state.snapshot(self._now(), wall=time.time())

    def effective_weight(self, backend: Backend) -> float:
        """``backend``'s weight now, less than configured while it ramps up after slow start."""
        return self._state.weight_at(backend.index, self._now())


class Pools:
    """Every backend pool of the proxy by name, started and stopped together.

    A server address listed in several pools is checked once; each result
    goes to every pool that lists it. Passive health stays per pool.
    Raises ``ValueError`` on two pools of one name or a pool without servers.
    """

    def __init__(self, pools: Sequence[Pool], settings: UpstreamSettings) -> None:
        self.settings = settings
        self._by_name: dict[str, Upstreams] = {}
        for pool in pools:
            if pool.name in self._by_name:
                raise ValueError(f"two pools are named {pool.name}")
            self._by_name[pool.name] = Upstreams(pool, settings)
        self._checks: list[asyncio.Task[None]] = []

    def __getitem__(self, name: str) -> Upstreams:
        """The pool called ``name``; ``KeyError`` if there is none."""
        return self._by_name[name]

    def get(self, name: str) -> Upstreams | None:
        return self._by_name.get(name)

    def __iter__(self) -> Iterator[Upstreams]:
        return iter(self._by_name.values())

    def __len__(self) -> int:
        return len(self._by_name)

    @property
    def checked_addresses(self) -> int:
        """How many health-check tasks run: one per distinct server address."""
        return len(self._checks)

    def start(self) -> None:
        """Start every pool and one health-check task per address (needs a running loop)."""
        loop = asyncio.get_running_loop()
        members: dict[Address, list[tuple[Upstreams, Backend]]] = {}
        for upstreams in self._by_name.values():
            upstreams.start(checks=False)
            for backend in upstreams.backends:
                members.setdefault(backend.address, []).append((upstreams, backend))
        for address, group in members.items():
            self._checks.append(loop.create_task(_check_forever(address, group, self.settings)))

    async def close(self) -> None:
        """Stop the checks, then close every pool (queued requests fail, idle connections close)."""
        for task in self._checks:
            task.cancel()
        for task in self._checks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._checks.clear()
        for upstreams in self._by_name.values():
            await upstreams.close()

    def stats(self) -> list[PoolStats]:
        """Every pool as plain data, in configuration order."""
        return [upstreams.stats() for upstreams in self._by_name.values()]


async def _check_forever(
    address: Address, members: Sequence[tuple[Upstreams, Backend]], settings: UpstreamSettings
) -> None:
    loop = asyncio.get_running_loop()
    while True:
        ok, why = await probe(address, settings)
        now = loop.time()
        for upstreams, backend in members:
            upstreams.record_check(backend, ok, why, now)
        await asyncio.sleep(settings.health_interval)


async def probe(address: Address, settings: UpstreamSettings) -> tuple[bool, str]:
    """One active check: GET the health path; a 2xx or 3xx within the timeout passes.

    Returns whether it passed and, if not, why. Never raises for a failed check.
    """
    request = (
        f"GET {settings.health_path} HTTP/1.1\r\nHost: {address}\r\n"
        "User-Agent: tiers-proxy-health\r\nConnection: close\r\n\r\n"
    ).encode()
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(settings.health_timeout):
            reader, writer = await asyncio.open_connection(address.host, address.port)
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
