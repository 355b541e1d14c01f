"""The asyncio adapter: client connections, forwarding to backends, graceful stop.

Each accepted connection is a ``ClientConnection`` protocol feeding a
``RequestParser``, plus one task that serves its requests in order (HTTP/1.1
keep-alive and pipelining). For each request the task picks a backend, sends
the head, relays the body and streams the response back:

- The request body is relayed as it arrives. Reading from the client pauses
  while more than ``_HIGH_WATER`` bytes wait unsent, and a relay that the
  backend does not read waits for it (``drain``), so a slow backend slows the
  client instead of filling memory. The same holds for responses.
- Retries follow one rule: a request is sent again only when it provably did
  not reach an app (the connection failed), or when it is idempotent, its
  whole body is still known, and the backend answered not a single byte. A
  POST that may have reached an app is never sent twice.
- Status of failures: no backend up 503, backend unreachable or broken 502,
  backend silent past the read timeout 504. After the response head went to
  the client, a failure can only be signalled by closing the connection.

Timeouts: a new connection has ``header_timeout`` to send a request head; a
kept-alive one may stay silent ``client_idle_timeout``, then has
``header_timeout`` from its first byte (408 when it runs out).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import TYPE_CHECKING, cast

from tiers.config.proxy import RouteKind
from tiers.proxy.balancer import Outcome, outcome_for_status
from tiers.proxy.cache import MISS_LABEL, CacheRequest, Fill, Serve, with_x_cache
from tiers.proxy.errors import ClientGone, ConnectFailed, UpstreamError, UpstreamTimeout
from tiers.proxy.forward import (
    CONTINUE,
    IDEMPOTENT_METHODS,
    LAST_CHUNK,
    chunk_size_line,
    client_response_head,
    error_response,
    header_value,
    plan_response,
    upstream_request_head,
)
from tiers.proxy.http1 import (
    END,
    BodyData,
    Framing,
    RequestError,
    RequestEvent,
    RequestHead,
    RequestParser,
    ResponseHead,
)
from tiers.proxy.limits import ALLOW
from tiers.proxy.routing import CompiledRoute
from tiers.proxy.static import StaticFileError, plan_static_file, send_static
from tiers.proxy.upstream import PoolBusy, UpstreamConnection, Upstreams
from tiers.proxy.waittimer import WaitTimer

if TYPE_CHECKING:
    from tiers.proxy.server import ProxyServer

log = logging.getLogger("tiers.proxy")

# Request bytes buffered per client connection before reading from it pauses.
_HIGH_WATER = 256 * 1024
_LOW_WATER = 64 * 1024
# Pipelined requests parsed ahead of the one being served.
_MAX_QUEUED = 64
# A request body up to this size is kept until the response starts, so an
# idempotent request can be sent again to another backend.
_REPLAY_LIMIT = 64 * 1024
# After answering a malformed request, keep reading (and dropping) for this
# long before closing, so the kernel does not reset the connection and lose
# the answer while the client is still sending.
_LINGER = 2.0

_CLIENT_CLOSED = 499  # nginx's code for "client closed the connection first"


def _wake(waiter: asyncio.Future[bool] | None, value: bool = True) -> None:
    if waiter is not None and not waiter.done():
        waiter.set_result(value)


class _Exchange:
    """The state of one request being served, and what the access log needs of it."""

    __slots__ = (
        "apptime",
        "body_done",
        "body_error",
        "body_size",
        "cache",
        "cache_req",
        "chunked",
        "continue_sent",
        "cut",
        "fill",
        "head",
        "pump",
        "replay",
        "request_id",
        "responded",
        "route",
        "size",
        "start",
        "status",
        "upstream",
        "upstream_status",
    )

    def __init__(self, head: RequestHead, start: float) -> None:
        self.head = head
        self.start = start
        self.status = 0
        self.size = 0
        self.apptime: float | None = None
        self.upstream: bytes | None = None
        self.body_done = head.framing is Framing.NONE
        self.chunked = head.framing is Framing.CHUNKED
        # The body bytes sent so far, as framed for the backend; None once too
        # large to keep, which rules out sending the request again.
        self.replay: bytearray | None = bytearray()
        self.pump: asyncio.Task[None] | None = None
        self.body_error: ClientGone | None = None
        self.responded = False
        self.continue_sent = not head.expect_continue
        self.body_size = 0  # request body bytes received
        self.route: bytes | None = None
        self.request_id: bytes | None = None
        self.cache: bytes | None = None  # X-Cache label for the access log
        self.cut = False  # the backend failed after the response started
        self.upstream_status = 0  # what the backend answered (stale may be served instead)
        # Set when the page cache sends this request to the app on its behalf.
        self.fill: Fill | None = None
        self.cache_req: CacheRequest | None = None


class ClientConnection(asyncio.Protocol):
    """One client connection: parses requests and serves them one after another."""

    def __init__(self, server: ProxyServer) -> None:
        self._server = server
        self._settings = server.settings
        self._loop = server.loop
        self._parser = RequestParser(server.settings.limits)
        self._events: deque[RequestEvent] = deque()
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
        self._request_start = 0.0
        self._eof = False
        self._lost = False
        self._gone = False
        self._busy = False
        self._lingering = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    # ---- asyncio callbacks ----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self._client_ip = str(peer[0]).encode()
        self._server.connections.add(self)
        self._task = self._loop.create_task(self._run())

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return
        events = self._parser.feed(data)
        if self._awaiting_head and self._head_started is None:
            self._head_started = self._loop.time()
        if events:
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
        _wake(self._waiter)

    def eof_received(self) -> bool:
        self._eof = True
        _wake(self._waiter)
        if self._lingering and self._transport is not None:
            self._transport.close()
        elif self._busy:
            # As nginx does, a client that closes while its request is in
            # flight has given up on it (a half-close cannot be told apart).
            self._abandon()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.stop()
        self._lost = True
        _wake(self._waiter)
        _wake(self._drain_waiter)
        if self._busy:
            self._abandon()

    def _abandon(self) -> None:
        # Nobody will read the answer; stop waiting for the backend.
        self._gone = True
        if self._task is not None:
            self._task.cancel()

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        _wake(self._drain_waiter)

    # ---- used by the server ---------------------------------------------------

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    def shutdown(self) -> None:
        """Finish the request in flight, if any, then close; close now if idle."""
        self._stopping = True
        _wake(self._waiter)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # ---- the connection's task ------------------------------------------------

    async def _run(self) -> None:
        try:
            first = True
            while True:
                head = await self._next_head(first)
                if head is None:
                    break
                first = False
                self._busy = True
                try:
                    keep_alive = await self._exchange(head)
                finally:
                    self._busy = False
                if not keep_alive or self._stopping or self._lost:
                    break
        except asyncio.CancelledError:
            if not self._gone:
                raise
        except Exception as exc:  # a bug must cost one connection, not the process
            log.error(
                "client %s: unexpected %s: %s", self._client_ip.decode(), type(exc).__name__, exc
            )
        finally:
            self._timer.stop()
            if self._transport is not None and not self._lingering:
                self._transport.close()
            self._server.connection_done(self)

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

    def _pop(self) -> RequestEvent | None:
        queue = self._events
        if not queue:
            return None
        event = queue.popleft()
        if type(event) is BodyData:
            self._buffered -= len(event.data)
        if self._reading_paused and self._buffered <= _LOW_WATER and len(queue) <= _MAX_QUEUED:
            self._reading_paused = False
            if self._transport is not None and not self._lost:
                self._transport.resume_reading()
        return event

    async def _next_head(self, first: bool) -> RequestHead | None:
        settings = self._settings
        loop = self._loop
        wait_start = loop.time()
        # Bytes of this head may have come while the previous request was served.
        self._head_started = wait_start if self._parser.in_head else None
        self._awaiting_head = True
        try:
            while True:
                event = self._pop()
                if event is not None:
                    if type(event) is RequestHead:
                        self._request_start = self._head_started or wait_start
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

    def _reject(self, status: int, reason: str) -> None:
        """Answer a request that cannot be served, then close after a lingering read."""
        assert self._transport is not None
        body = error_response(status, reason, keep_alive=False)
        self._transport.write(body)
        self._server.counters.count(status, len(reason) + 1)
        access_log = self._server.access_log
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
        if transport.can_write_eof():
            transport.write_eof()
        self._loop.call_later(_LINGER, transport.close)

    async def _drain(self) -> None:
        """Wait until the client reads what was written, at most ``send_timeout``."""
        while self._write_paused and not self._lost:
            waiter = self._loop.create_future()
            self._drain_waiter = waiter
            timer = self._loop.call_later(self._settings.send_timeout, _wake, waiter, False)
            try:
                if not await waiter:
                    # A client that reads nothing must not hold a connection forever.
                    self.abort()
                    raise ClientGone("client read nothing within the send timeout",
                                     _CLIENT_CLOSED)
            finally:
                timer.cancel()
                self._drain_waiter = None
        if self._lost:
            raise ClientGone("client closed the connection", _CLIENT_CLOSED)

    # ---- one request ----------------------------------------------------------

    async def _exchange(self, head: RequestHead) -> bool:
        """Serve one request; True if the connection may carry another."""
        x = _Exchange(head, self._request_start)
        try:
            return await self._dispatch(x)
        except ClientGone as exc:
            if not x.responded and not self._lost:
                self._answer(x, exc.status, str(exc))
            elif self._lost and not x.responded:
                x.status = _CLIENT_CLOSED
            self._close_after_failure()
            return False
        except asyncio.CancelledError:
            if not x.responded:
                x.status = _CLIENT_CLOSED
            raise
        finally:
            try:
                await self._stop_pump(x)
            finally:
                self._log(x)

    def _log(self, x: _Exchange) -> None:
        self._server.counters.count(x.status, x.size)
        access_log = self._server.access_log
        if access_log is not None:
            head = x.head
            access_log.record(
                host=self._client_ip,
                forwardedfor=head.forwarded_for,
                method=head.method,
                uri=head.target,
                protocol=b"HTTP/" + head.version,
                status=x.status,
                size=x.size,
                reqtime=self._loop.time() - x.start,
                apptime=x.apptime,
                upstream=x.upstream,
                ua=head.user_agent,
                reqsize=x.body_size,
                referer=header_value(head, b"referer"),
                cache=x.cache,
                route=x.route,
                reqid=x.request_id,
            )

    async def _dispatch(self, x: _Exchange) -> bool:
        """Abuse limits, body size, routing: then forward, serve a file or answer directly."""
        server = self._server
        head = x.head
        verdict = server.abuse.check(self._client_ip, head.user_agent, self._loop.time())
        if verdict is not ALLOW:
            retry = b"Retry-After: %d\r\n" % verdict.retry_after if verdict.retry_after else b""
            return self._answer(x, verdict.status, verdict.reason, extra=retry)
        limit = server.settings.policy.max_body_size
        if limit and head.content_length is not None and head.content_length > limit:
            return self._answer(x, 413, "request body too large")
        route = server.router.route_head(head, self._client_ip)
        if route is None:
            return self._answer(x, 404, "no route for this request")
        x.route = route.label
        kind = route.kind
        if kind is RouteKind.POOL:
            assert route.pool is not None
            return await self._from_pool(x, route, server.pools[route.pool])
        if kind is RouteKind.STATIC:
            return await self._serve_static(x, route)
        if kind is RouteKind.REDIRECT:
            location = route.location(head.path)
            return self._answer(x, route.status, "", extra=b"Location: %s\r\n" % location,
                                body=b"")
        return self._answer(x, route.status, "", body=route.body)

    async def _from_pool(self, x: _Exchange, route: CompiledRoute, upstreams: Upstreams) -> bool:
        """Answer from the page cache when it can, else forward (filling the cache)."""
        cache = self._server.cache
        head = x.head
        req = cache.request(head, route.route, self._client_ip)
        if req is None:
            keep_alive = await self._forward(x, upstreams)
            cache.invalidate(head, x.status)  # after a successful POST, PUT, DELETE, ...
            return keep_alive
        plan = await cache.prepare(req)
        if type(plan) is Serve:
            return self._serve_cached(x, req, plan)
        assert isinstance(plan, Fill)
        x.fill, x.cache_req, x.cache = plan, req, MISS_LABEL
        try:
            return await self._forward(x, upstreams)
        finally:
            plan.close()

    def _serve_cached(self, x: _Exchange, req: CacheRequest, serve: Serve) -> bool:
        keep_alive = x.head.keep_alive and not self._server.stopping and not self._lost
        answer = serve.response(req, keep_alive=keep_alive)
        assert self._transport is not None
        self._transport.write(answer.head + answer.body if answer.body else answer.head)
        x.status, x.size, x.responded, x.cache = answer.status, len(answer.body), True, serve.label
        return keep_alive

    def _fail(self, x: _Exchange, status: int, message: str) -> bool:
        """Answer a failure to reach the app, or a stale page where stale-if-error allows."""
        fill = x.fill
        if fill is not None and x.cache_req is not None:
            stale = fill.serve_stale()
            if stale is not None:
                return self._serve_cached(x, x.cache_req, stale)
        return self._answer(x, status, message)

    async def _serve_static(self, x: _Exchange, route: CompiledRoute) -> bool:
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
        keep_alive = x.body_done and head.keep_alive and not self._server.stopping
        x.status, x.responded, x.size = plan.status, True, plan.size
        assert self._transport is not None
        try:
            await send_static(self._loop, self._transport, plan, self._drain,
                              keep_alive=keep_alive, version=head.version)
        except StaticFileError as exc:
            log.warning("%s: %s", head.path.decode("latin-1"), exc)
            self._cut_client()
            return False
        return keep_alive and not self._lost

    async def _forward(self, x: _Exchange, upstreams: Upstreams) -> bool:
        head = x.head
        x.request_id = self._server.request_ids.next()
        idempotent = head.method in IDEMPOTENT_METHODS
        tried: set[int] = set()
        fresh_only = False
        failure = "no backend reachable"
        loop = self._loop
        while True:
            try:
                backend = await upstreams.acquire(tried, key=head.path)
            except PoolBusy as exc:
                self._log_failure(head, f"pool {upstreams.name}: {exc}")
                return self._fail(x, 503, "service unavailable: all servers busy")
            if backend is None:
                if not tried:
                    return self._fail(x, 503, "no backend is available")
                self._log_failure(head, failure)
                return self._fail(x, 502, "bad gateway")
            outcome = Outcome.NEUTRAL
            try:
                conn = None if fresh_only else upstreams.take_idle(backend, loop.time())
                reused = conn is not None
                if conn is None:
                    try:
                        conn = await upstreams.connect(backend)
                    except ConnectFailed as exc:
                        # The request never left the proxy: any method may go elsewhere.
                        tried.add(backend.index)
                        failure = str(exc)
                        continue
                x.upstream = backend.label_bytes
                try:
                    keep_alive = await self._attempt(x, conn, upstreams)
                    outcome = (Outcome.BROKEN if x.cut
                               else outcome_for_status(x.upstream_status))
                    return keep_alive
                except UpstreamError as exc:
                    conn.abort()
                    await self._stop_pump(x)
                    if x.body_error is not None:
                        raise x.body_error from exc
                    failure = f"{backend.label}: {exc}"
                    if isinstance(exc, UpstreamTimeout):
                        outcome = Outcome.TIMEOUT
                        self._log_failure(head, failure)
                        return self._fail(x, 504, "gateway timeout")
                    stale = reused and conn.received == 0
                    outcome = Outcome.NEUTRAL if stale else Outcome.BROKEN
                    if conn.received == 0 and idempotent and x.replay is not None:
                        if reused:
                            # Most likely a keep-alive connection the backend was
                            # closing: try again on a new one.
                            fresh_only = True
                        else:
                            tried.add(backend.index)
                        continue
                    self._log_failure(head, failure)
                    return self._fail(x, 502, "bad gateway")
                except BaseException:
                    # Cancelled (the client left) or a bug: the exchange on this
                    # connection is in an unknown state.
                    conn.abort()
                    raise
            finally:
                upstreams.finish(backend, outcome, loop.time())

    async def _attempt(self, x: _Exchange, conn: UpstreamConnection,
                       upstreams: Upstreams) -> bool:
        """Send the request on ``conn`` and relay the response.

        Raises ``UpstreamError`` only while nothing was sent to the client; a
        failure after that closes the client connection instead.
        """
        head = x.head
        settings = self._settings
        loop = self._loop
        fill = x.fill
        sent = head if fill is None else fill.request_head
        conn.begin(sent.method == b"HEAD")
        out = [upstream_request_head(sent, self._client_ip, conn.backend.label_bytes,
                                     request_id=x.request_id)]
        if x.replay:
            out.append(bytes(x.replay))
        if not x.body_done:
            if not x.continue_sent:
                x.continue_sent = True
                assert self._transport is not None
                self._transport.write(CONTINUE)
            self._relay_queued(x, out)
        conn.writelines(out)
        if not x.body_done:
            x.pump = loop.create_task(self._pump(x, conn))
        sent_at = loop.time()
        response = await conn.next_event(settings.read_timeout)
        x.apptime = loop.time() - sent_at
        assert isinstance(response, ResponseHead)
        x.upstream_status = response.status
        capturing = False
        if fill is not None:
            if response.status >= 500 and x.cache_req is not None:
                stale = fill.serve_stale()
                if stale is not None:  # stale-if-error: the old page beats an error
                    conn.abort()
                    return self._serve_cached(x, x.cache_req, stale)
            capturing = fill.on_head(response)
        plan = plan_response(
            head, response, request_body_done=x.body_done, stopping=self._server.stopping
        )
        x.status = response.status
        x.responded = True
        transport = self._transport
        assert transport is not None
        chunked = plan.chunked
        client_head = client_response_head(response, plan, head)
        pieces = [client_head if fill is None else with_x_cache(client_head)]
        size = 0
        try:
            while True:
                event = conn.pop_ready()
                if event is None:
                    transport.writelines(pieces)
                    pieces = []
                    if self._write_paused:
                        await self._drain()
                    event = await conn.next_event(settings.read_timeout)
                if type(event) is BodyData:
                    data = event.data
                    size += len(data)
                    if capturing:
                        capturing = fill.on_body(data)  # type: ignore[union-attr]
                    if chunked:
                        pieces += (chunk_size_line(len(data)), data, b"\r\n")
                    else:
                        pieces.append(data)
                else:
                    break
        except ClientGone:
            x.size = size  # what the client got before it stopped reading or left
            raise
        except UpstreamError as exc:
            log.warning(
                "%s %s: %s: %s after the response started",
                head.method.decode(),
                head.path.decode("latin-1"),
                conn.backend.label,
                exc,
            )
            x.size = size
            x.cut = True
            conn.abort()
            self._cut_client()
            return False
        if chunked:
            pieces.append(LAST_CHUNK)
        transport.writelines(pieces)
        x.size = size
        if capturing:
            fill.on_end()  # type: ignore[union-attr]
        if x.pump is not None and not x.pump.done():
            await self._stop_pump(x)
        if x.body_done:
            upstreams.release(conn, loop.time())
        else:
            conn.close()
        return plan.keep_alive and not self._lost

    # ---- request body ---------------------------------------------------------

    def _relay_queued(self, x: _Exchange, out: list[bytes]) -> None:
        """Move the body bytes already received into ``out`` (no waiting)."""
        while not x.body_done:
            event = self._pop()
            if event is None:
                return
            self._frame_body(x, event, out)

    def _frame_body(self, x: _Exchange, event: RequestEvent, out: list[bytes]) -> None:
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
            if len(replay) + sum(len(p) for p in pieces) > _REPLAY_LIMIT:
                x.replay = None
            else:
                for piece in pieces:
                    replay += piece

    async def _pump(self, x: _Exchange, conn: UpstreamConnection) -> None:
        """Relay the rest of the request body as it arrives, at the backend's pace."""
        timeout = self._settings.client_idle_timeout
        try:
            while not x.body_done:
                event = self._pop()
                if event is None:
                    if self._lost:
                        raise ClientGone("client closed during the request body", _CLIENT_CLOSED)
                    if self._eof:
                        raise ClientGone("client ended the connection inside the request body")
                    if not await self._wait(timeout) and not self._events:
                        raise ClientGone("request body not received in time", 408)
                    continue
                out: list[bytes] = []
                self._frame_body(x, event, out)
                conn.writelines(out)
                try:
                    await asyncio.wait_for(conn.drain(), self._settings.send_timeout)
                except TimeoutError:
                    # The backend reads nothing: give up on it (the answer is a 502).
                    conn.abort()
                    return
        except ClientGone as exc:
            x.body_error = exc
            if not x.responded:
                # Wakes the task waiting for the backend's answer.
                conn.abort()
        except UpstreamError:
            pass  # the task waiting for the response sees the same failure

    async def _stop_pump(self, x: _Exchange) -> None:
        pump = x.pump
        if pump is None:
            return
        x.pump = None
        if not pump.done():
            pump.cancel()
        try:
            await pump
        except asyncio.CancelledError:
            if not pump.cancelled():
                raise

    # ---- answers of the proxy itself ------------------------------------------

    def _answer(self, x: _Exchange, status: int, message: str, *, extra: bytes = b"",
                body: bytes | None = None) -> bool:
        """Send the proxy's own error response; True if the connection stays usable."""
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
            and not self._server.stopping
            and status not in (400, 408, 413)
        )
        head_only = x.head.method == b"HEAD"
        response = error_response(
            status, message, keep_alive=keep_alive, head_only=head_only, extra=extra, body=body
        )
        assert self._transport is not None
        self._transport.write(response)
        x.status = status
        x.responded = True
        x.size = 0 if head_only else len(message) + 1 if body is None else len(body)
        return keep_alive

    @staticmethod
    def _log_failure(head: RequestHead, failure: str) -> None:
        log.warning("%s %s: %s", head.method.decode(), head.path.decode("latin-1"), failure)

    def _close_after_failure(self) -> None:
        if not self._lost:
            self._linger()

    def _cut_client(self) -> None:
        # The response is cut short; closing is the only signal HTTP/1.1 has.
        if self._transport is not None:
            self._transport.close()
