"""The asyncio protocol of a client connection: its requests, served in order.

A ``ClientConnection`` serves the requests of one client connection one
after another (HTTP/1.1 keep-alive and pipelining), each through abuse
limits, body size, routing, then the page cache and a pool, a static file,
or an answer of the proxy's own. It does so in one of two ways:

- By callbacks, from ``data_received`` on (``tiers.proxy.fastpath``): a
  request without a body whose answer needs no waiting (the proxy's own
  answers, page cache hits) or comes from a pooled backend connection in
  one piece. Nothing waits on a future; the connection has no task.
- In a task (``tiers.proxy.forwarding``), made when a request needs
  waiting the callbacks cannot do: a request body, a static file, a queue
  for a pool slot, a wait for another request's page cache fill, a new
  backend connection, a streamed response, a failure. The callbacks hand
  their exchange over where it stands. The task serves on while what is
  queued needs it, and ends once the callbacks can take over again.

Timeouts, the same either way: a new connection has ``header_timeout`` to
send a request head; a kept-alive one may stay silent
``client_idle_timeout``, then has ``header_timeout`` from its first byte
(408 when it runs out). A client that reads nothing for ``send_timeout``
is dropped. A client that closes (or half-closes) its side while its
request is in flight has given up on it: 499, as nginx logs it.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final, cast

from tiers.config.proxy import RouteKind
from tiers.proxy.cache import MISS_LABEL, CacheRequest, Fill, Pass, Serve
from tiers.proxy.client import wake
from tiers.proxy.errors import ClientGone, StaticFileError
from tiers.proxy.exchange import CLIENT_CLOSED, Exchange
from tiers.proxy.fastpath import FastPath
from tiers.proxy.filesender import send_static
from tiers.proxy.http1 import END, Framing
from tiers.proxy.limits import ALLOW
from tiers.proxy.requestparser import RequestError, RequestHead
from tiers.proxy.routing import CompiledRoute
from tiers.proxy.static import plan_static_file
from tiers.proxy.upstream import Upstreams
from tiers.proxy.waittimer import Deadline

if TYPE_CHECKING:
    from tiers.proxy.server import ProxyServer

log = logging.getLogger("tiers.proxy")

_NONE: Final = Framing.NONE
# Enum members read through their (interpreted) class cost a type lookup each time.
_POOL: Final = RouteKind.POOL
_STATIC: Final = RouteKind.STATIC
_REDIRECT: Final = RouteKind.REDIRECT


class ClientConnection(FastPath):
    """One client connection: parses requests and serves them one after another."""

    def __init__(self, server: ProxyServer) -> None:
        super().__init__(server)
        self._deadline = Deadline(server.loop, self._deadline_passed)
        self._task: asyncio.Task[None] | None = None
        self._served = 0  # requests begun: the first has header_timeout to arrive
        self._idle_since = 0.0  # when the connection last had nothing to do
        self._request_start = 0.0
        self._advancing = False
        self._closing = False
        self._write_blocked = False

    # ---- asyncio callbacks ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self._client_ip = str(peer[0]).encode()
        self._server.connections.add(self)
        self._idle_since = now = self._loop.time()
        self._advance(now)

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        # One clock reading serves the whole callback: its steps are
        # microseconds apart, and the loop's clock counts milliseconds.
        now = self._loop.time()
        events = self._parser.feed(data)
        if self._awaiting_head and self._head_started is None:
            self._head_started = now
        if events:
            self._queue(events)
        if self._task is not None:
            wake(self._waiter)
        elif not self._busy:
            self._advance(now)

    def eof_received(self) -> bool:
        self._eof = True
        wake(self._waiter)
        if self._lingering and self._transport is not None:
            self._flush_batched()
            self._transport.close()
        elif self._busy:
            # As nginx does, a client that closes while its request is in
            # flight has given up on it (a half-close cannot be told apart).
            self._abandon()
        elif self._task is None:
            self._advance(self._loop.time())
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.stop()
        self._deadline.stop()
        self._lost = True
        wake(self._waiter)
        wake(self._drain_waiter)
        if self._busy:
            self._abandon()
        if self._task is None:
            self._server.connection_done(self)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        wake(self._drain_waiter)
        if self._write_blocked:
            self._write_blocked = False
            self._advance(self._loop.time())

    def _abandon(self) -> None:
        # Nobody will read the answer; stop waiting for the backend.
        self._gone = True
        task = self._task
        if task is not None:
            # A task made in a callback may not have run yet, and cancelling
            # it before its first step would skip its cleanup (backend slot,
            # cache fill, log line): cancel it once it has run.
            self._loop.call_soon(_cancel, task)
        elif self._fast is not None:
            self._fast_abandon()
            self._close()

    # ---- used by the server ---------------------------------------------------

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def shutdown(self) -> None:
        """Finish the request in flight, if any, then close; close now if idle."""
        self._stopping = True
        wake(self._waiter)
        if self._task is None and not self._busy:
            self._close()

    # ---- serving by callbacks -----------------------------------------------------

    def _advance(self, now: float) -> None:
        """Serve what is queued by callbacks as far as they go; then wait for more, or close.

        ``now`` is the loop's time, read at the start of the callback.
        """
        if self._advancing or self._closing or self._lost:
            return
        self._advancing = True
        queue = self._events
        try:
            while queue:
                if self._closing or self._lost:
                    return
                if self._stopping:  # the answers in flight are done: nothing more
                    self._close()
                    return
                if self._write_paused:
                    # The client reads nothing: serve it nothing more until it does.
                    if not self._write_blocked:
                        self._write_blocked = True
                        self._deadline.set(now + self._settings.send_timeout)
                    return
                head = queue.peek()
                if (type(head) is not RequestHead or head.framing is not _NONE
                        or queue.peek(1) is not END):
                    self._hand_over_queue()  # a body, a malformed request, ...
                    return
                queue.popleft()
                queue.popleft()  # its END
                if self._reading_paused:
                    self._resume_reading()
                self._awaiting_head = False
                x = Exchange(head, self._head_started or self._idle_since)
                self._head_started = None
                self._served += 1
                self._busy = True
                self._dispatch_now(x, now)
                if self._busy or self._task is not None:
                    return  # in flight, or handed to a task
            self._await_head()
        except Exception as exc:  # a bug must cost one connection, not the process
            log.error("client %s: unexpected %s: %s",
                      self._client_ip.decode(), type(exc).__name__, exc)
            self.abort()
        finally:
            self._advancing = False

    def _await_head(self) -> None:
        """Nothing is queued: wait for the next request, unless there will be none."""
        parser = self._parser
        if self._eof or self._stopping or parser.closed:
            self._close()
            return
        settings = self._settings
        started = self._head_started
        if started is None and parser.in_head:
            started = self._head_started = self._loop.time()
        self._awaiting_head = True
        if started is not None:
            self._deadline.set(started + settings.header_timeout)
        else:
            limit = settings.client_idle_timeout if self._served else settings.header_timeout
            self._deadline.set(self._idle_since + limit)

    def _dispatch_now(self, x: Exchange, now: float) -> None:
        """``_dispatch`` for a request without a body, by callbacks as far as it goes."""
        found = self._route(x, now)
        if isinstance(found, bool):
            self._exchange_done(x, found, now)
            return
        route = found
        if route.kind is not _POOL:
            self._hand_over(x, functools.partial(self._serve_static, x, route))
            return
        assert route.pool is not None
        upstreams = self._shared.pools[route.pool]
        cache = self._shared.cache
        req = self._cache_request(x, route)
        if req is not None:
            plan = cache.prepare_nowait(req, now)
            if plan is None:  # another request is fetching this page: wait for it
                self._hand_over(x, functools.partial(self._from_pool, x, route, upstreams))
                return
            if isinstance(plan, Serve):
                self._exchange_done(x, self._serve_cached(x, req, plan), now)
                return
            _fetch_for_cache(x, req, plan)
        self._forward_now(x, upstreams, now)

    def _exchange_done(self, x: Exchange, keep_alive: bool, now: float) -> None:
        self._busy = False
        self._log(x, now)
        if not keep_alive or self._stopping or self._lost:
            self._close()
            return
        self._idle_since = now
        if not self._advancing:  # else the loop in _advance goes on by itself
            if self._events:
                self._advance(now)
            else:
                self._await_head()

    def _deadline_passed(self) -> None:
        if self._task is not None or self._lost or self._closing:
            return
        if self._fast is not None:
            self._fast_expired()
        elif self._busy:
            return
        elif self._write_blocked:
            # A client that reads nothing must not hold a connection forever.
            self.abort()
        elif self._head_started is not None:
            self._reject(408, "request head not received in time")
            self._server.connection_done(self)
        else:
            self._close()

    def _close(self) -> None:
        self._closing = True
        self._deadline.stop()
        if self._transport is not None and not self._lingering and not self._lost:
            self._flush_batched()
            self._transport.close()

    # ---- serving in a task ----------------------------------------------------------

    def _hand_over(self, x: Exchange, work: Callable[[], Awaitable[bool]]) -> None:
        self._deadline.clear()
        self._task = self._loop.create_task(self._run(x, work))

    def _hand_over_queue(self) -> None:
        """Have a task serve what is queued (a request with a body, a malformed one, ...)."""
        self._deadline.clear()
        self._task = self._loop.create_task(self._run(None, None))

    async def _run(self, x: Exchange | None, work: Callable[[], Awaitable[bool]] | None) -> None:
        back = False
        try:
            back = await self._serve_in_task(x, work)
        except asyncio.CancelledError:
            if not self._gone:
                raise
        except Exception as exc:  # a bug must cost one connection, not the process
            log.error(
                "client %s: unexpected %s: %s", self._client_ip.decode(), type(exc).__name__, exc
            )
        finally:
            self._task = None
            if not back:
                self._timer.stop()
                self._close()
                self._server.connection_done(self)
        if back:
            self._idle_since = now = self._loop.time()
            self._advance(now)

    async def _serve_in_task(
        self, x: Exchange | None, work: Callable[[], Awaitable[bool]] | None
    ) -> bool:
        """Serve requests until the callbacks can take over (True) or the connection ends."""
        keep_alive = True
        if x is not None and work is not None:
            keep_alive = await self._exchange(x, work)
        while keep_alive and not self._stopping and not self._lost:
            if self._callbacks_can_serve():
                return True
            head = await self._next_head(self._served == 0)
            if head is None:
                return False
            self._served += 1
            x = Exchange(head, self._request_start)
            self._busy = True
            keep_alive = await self._exchange(x, functools.partial(self._dispatch, x))
        return False

    def _callbacks_can_serve(self) -> bool:
        """Nothing is queued, or a whole request without a body is next."""
        queue = self._events
        if not queue:
            return True
        head = queue.peek()
        return type(head) is RequestHead and head.framing is _NONE and queue.peek(1) is END

    async def _next_head(self, first: bool) -> RequestHead | None:
        settings = self._settings
        loop = self._loop
        wait_start = loop.time()
        # Bytes of this head may have come while the previous request was served.
        if self._head_started is None and self._parser.in_head:
            self._head_started = wait_start
        self._awaiting_head = True
        try:
            while True:
                event = self._pop()
                if event is not None:
                    if type(event) is RequestHead:
                        self._request_start = self._head_started or wait_start
                        self._head_started = None
                        return event
                    if type(event) is RequestError:
                        self._reject(event.status, event.reason)
                        return None
                    continue  # left over from a request answered early; the connection closes
                if self._lost or self._eof or self._parser.closed:
                    return None
                started = self._head_started
                if started is None:
                    if self._stopping:
                        return None
                    limit = settings.header_timeout if first else settings.client_idle_timeout
                    deadline = wait_start + limit
                else:
                    deadline = started + settings.header_timeout
                remaining = deadline - loop.time()
                if remaining <= 0:
                    if started is not None:
                        self._reject(408, "request head not received in time")
                    return None
                await self._wait(remaining)
        finally:
            self._awaiting_head = False

    async def _exchange(self, x: Exchange, work: Callable[[], Awaitable[bool]]) -> bool:
        """Serve one request by awaiting ``work()``; True if the connection may carry another."""
        try:
            return await work()
        except ClientGone as exc:
            if not x.responded and not self._lost:
                self._answer(x, exc.status, str(exc))
            elif self._lost and not x.responded:
                x.status = CLIENT_CLOSED
            self._close_after_failure()
            return False
        except asyncio.CancelledError:
            if not x.responded:
                x.status = CLIENT_CLOSED
            raise
        finally:
            try:
                await self._stop_pump(x)
            finally:
                self._busy = False
                self._log(x, self._loop.time())

    # ---- one request ----------------------------------------------------------

    def _route(self, x: Exchange, now: float) -> CompiledRoute | bool:
        """Abuse limits, body size, routing: the route to a pool or files, else the answer.

        What needs no backend and no file is answered here; then the result
        says whether the connection stays usable.
        """
        shared = self._shared
        head = x.head
        verdict = shared.abuse.check(self._client_ip, head.user_agent, now)
        if verdict is not ALLOW:
            retry = b"Retry-After: %d\r\n" % verdict.retry_after if verdict.retry_after else b""
            return self._answer(x, verdict.status, verdict.reason, extra=retry)
        limit = shared.max_body_size
        if limit and head.content_length is not None and head.content_length > limit:
            return self._answer(x, 413, "request body too large")
        route = shared.router.route_head(head, self._client_ip)
        if route is None:
            return self._answer(x, 404, "no route for this request")
        x.route = route.label
        kind = route.kind
        if kind is _POOL or kind is _STATIC:
            return route
        if kind is _REDIRECT:
            location = route.location(head.path)
            return self._answer(x, route.status, "", extra=b"Location: %s\r\n" % location,
                                body=b"")
        return self._answer(x, route.status, "", body=route.body)

    async def _dispatch(self, x: Exchange) -> bool:
        """Route ``x``, then forward it, serve a file or answer directly."""
        found = self._route(x, self._loop.time())
        if isinstance(found, bool):
            return found
        if found.kind is _POOL:
            assert found.pool is not None
            return await self._from_pool(x, found, self._shared.pools[found.pool])
        return await self._serve_static(x, found)

    async def _from_pool(self, x: Exchange, route: CompiledRoute, upstreams: Upstreams) -> bool:
        """Answer from the page cache when it can, else forward (filling the cache)."""
        cache = self._shared.cache
        req = self._cache_request(x, route)
        if req is not None:
            plan = cache.prepare_nowait(req)
            if plan is None:
                plan = await cache.prepare(req)
            if isinstance(plan, Serve):
                return self._serve_cached(x, req, plan)
            _fetch_for_cache(x, req, plan)
        return await self._forward_pool(x, upstreams)

    def _cache_request(self, x: Exchange, route: CompiledRoute) -> CacheRequest | None:
        """``x`` as the page cache sees it, or None when the cache stays out of it."""
        if not route.cache:
            return None
        return self._shared.cache.admit(x.head, route.route, self._client_ip,
                                        private_ok=route.cache_private_requests)

    async def _serve_static(self, x: Exchange, route: CompiledRoute) -> bool:
        head = x.head
        if not x.body_done:  # a body has no meaning here: drop what already came
            discard: list[bytes] = []
            try:
                self._relay_queued(x, discard)
            except ClientGone:
                x.body_done = False
        relative = route.static_path(head.path)
        if relative is None:
            return self._answer(x, 404, "not found")
        plan = plan_static_file(self._server.static_roots[route.name], head.method, relative,
                                head.headers, time.time(), path=head.path)
        keep_alive = x.body_done and head.keep_alive and not self._shared.stopping
        x.status, x.responded, x.size = plan.status, True, plan.size
        assert self._transport is not None
        self._flush_batched()
        try:
            await send_static(self._loop, self._transport, plan, self._drain,
                              keep_alive=keep_alive, version=head.version)
        except StaticFileError as exc:
            log.warning("%s: %s", head.path.decode("latin-1"), exc)
            self._cut_client()
            return False
        return keep_alive and not self._lost


def _fetch_for_cache(x: Exchange, req: CacheRequest, plan: Fill | Pass) -> None:
    """Forward ``x`` on the cache's behalf: feeding ``plan`` if a Fill; marked MISS either way."""
    if type(plan) is Fill:
        x.fill, x.cache_req = plan, req
    x.cache = MISS_LABEL


def _cancel(task: asyncio.Task[None]) -> None:
    if not task.done():
        task.cancel()
