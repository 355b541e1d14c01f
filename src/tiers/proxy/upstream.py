"""Backend pools: keep-alive connections, slots and queue, active and passive health.

``Upstreams`` is one pool: a ``Backend`` per server, the pool's balancing
policy, its per-server slots and wait queue, and its health checks.
``Pools`` holds one ``Upstreams`` per configured pool, starts and stops them
together and checks each server address once however many pools list it.
The decisions (health transitions, which server, who gets a freed slot,
which idle connection) are ``tiers.proxy.poolstate.PoolState`` and
``tiers.proxy.idlepool.IdlePool``; this module does the sockets, the futures
and the timers.

A request's life in a pool:

    backend = await upstreams.acquire(tried, key=uri)  # slot taken; may wait in the queue
    conn = upstreams.take_idle(backend, now) or await upstreams.connect(backend)
    ... exchange ...
    upstreams.release(conn, now)                    # connection back to the idle pool
    upstreams.finish(backend, outcome, now)         # slot freed, outcome counted

``acquire`` raises ``QueueFull`` or ``QueueTimeout`` (both ``PoolBusy``,
answered 503) when every eligible server stays at ``max_conns``.

The connections themselves are ``tiers.proxy.upstreamconn.UpstreamConnection``
(re-exported here); between exchanges they sit in their backend's
``IdlePool``.

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
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

from tiers.config.model import Address, ProxyConfig
from tiers.config.proxy import Pool, Server
from tiers.errors import ProxyError
from tiers.proxy.balancer import BUSY, Busy, Change, Health, Outcome, ServerState
from tiers.proxy.errors import (
    ConnectFailed,
    UpstreamError,
)
from tiers.proxy.idlepool import IdlePool
from tiers.proxy.poolstate import PoolState, PoolStats
from tiers.proxy.responseparser import ResponseHead, ResponseParser
from tiers.proxy.upstreamconn import UpstreamConnection

log = logging.getLogger("tiers.proxy")


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
        found = self.try_acquire(exclude, key, now)
        if found is not BUSY:
            return found
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

    def try_acquire(
        self, exclude: Collection[int], key: bytes, now: float
    ) -> Backend | Busy | None:
        """``acquire`` as far as it goes without waiting.

        A backend (its slot taken until ``finish``), None, or ``BUSY`` when
        every eligible backend is at ``max_conns``: then nothing is taken
        and ``acquire`` would queue.
        """
        index = self._state.acquire(key, exclude, now)
        if isinstance(index, int):
            return self.backends[index]
        return index

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
