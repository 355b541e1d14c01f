"""Forwarding by callbacks: the common request served without a task or a future.

The common request has no body, goes to a pool whose chosen backend has an
idle keep-alive connection, and gets a small answer framed by
Content-Length (or none at all). For it, ``FastPath`` writes the request
head from the client's ``data_received``, is called back by the backend
connection as the response arrives and, once all of it is there, writes it
to the client in one write, frees the backend and logs the exchange.

Anything else hands the exchange to the task path (``tiers.proxy.forwarding``)
exactly where it stands, as a ``Resume``: the slot taken on the backend, the
connection the request went out on, the response as far as it came (still
queued on that connection). No byte is lost or sent twice, and the task
path's rules decide what follows:

    before the request is sent   every server is at max_conns (the task queues);
                                 no idle connection to the backend (the task connects)
    after it was sent            the connection fails or ends, or writing failed
                                 (the task retries or answers 502 by its rules);
                                 the response is chunked, close-delimited or over
                                 ``FAST_BODY_LIMIT`` (the task streams it);
                                 the backend was silent for ``read_timeout``
                                 (the task answers 504 at once, or cuts the
                                 client if the response head had come)

The page cache takes part as on the task path: a response to a request it
fills is judged, stored if it may be, and marked ``X-Cache: MISS``; a 5xx
gives way to a stale page where stale-if-error allows.

A client that leaves (close or EOF) while the request is out abandons it as
the task path does: the backend connection is dropped, 499 is logged, the
backend learns nothing (``Outcome.NEUTRAL``).

Both writes, the request head to the backend and the answer to the client,
go through the server's ``WriteBatch``: at once when first in the event
loop's turn, else at its end (``tiers.proxy.writebatch``). Whatever writes
to or closes a client connection directly sends the batch first
(``ClientIO._flush_batched``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

from tiers.proxy.balancer import BUSY, Outcome
from tiers.proxy.cache import X_CACHE_MISS
from tiers.proxy.errors import UpstreamError
from tiers.proxy.exchange import CLIENT_CLOSED, Exchange, Resume
from tiers.proxy.forward import client_response_head, plan_response, upstream_request_head
from tiers.proxy.forwarding import Forwarding
from tiers.proxy.http1 import Framing
from tiers.proxy.responseparser import ResponseHead
from tiers.proxy.upstream import Backend, Upstreams
from tiers.proxy.upstreamconn import UpstreamConnection

if TYPE_CHECKING:
    from tiers.proxy.server import ProxyServer
    from tiers.proxy.waittimer import Deadline

log = logging.getLogger("tiers.proxy")

# The largest response body gathered before it goes to the client in one
# write; a larger one is streamed by the task path, with flow control.
FAST_BODY_LIMIT: Final = 64 * 1024

_LENGTH: Final = Framing.LENGTH
_OK: Final = Outcome.OK
_SERVER_ERROR: Final = Outcome.SERVER_ERROR


class FastPath(Forwarding):
    """The callback path of a client connection's requests to a pool.

    At most one exchange is in flight (``_fast``); the request flow above
    (``ClientConnection``) says what happens before and after it through
    ``_hand_over`` and ``_exchange_done``.
    """

    # The connection's one timer in callback mode; here it bounds the wait
    # for the backend (made by ClientConnection, which owns its callback).
    _deadline: Deadline

    def __init__(self, server: ProxyServer) -> None:
        super().__init__(server)
        self._fast: Exchange | None = None
        self._fast_pool: Upstreams | None = None
        self._fast_backend: Backend | None = None
        self._fast_conn: UpstreamConnection | None = None
        self._fast_sent_at = 0.0
        self._on_backend_news = self._backend_news  # bound once, not per request

    # ---- what the request flow provides ----------------------------------------

    def _hand_over(self, x: Exchange, work: Callable[[], Awaitable[bool]]) -> None:
        """Have a task finish ``x`` by awaiting ``work()``, then serve on."""
        raise NotImplementedError

    def _exchange_done(self, x: Exchange, keep_alive: bool, now: float) -> None:
        """``x`` was answered in a callback: log it, then serve on or close.

        ``now`` is the loop's time, read at the start of the callback.
        """
        raise NotImplementedError

    # ---- the exchange -------------------------------------------------------------

    def _forward_now(self, x: Exchange, upstreams: Upstreams, now: float) -> None:
        """Forward ``x`` (a request without a body) by callbacks, or hand it to a task."""
        x.request_id = self._shared.request_ids.next()
        found = upstreams.try_acquire((), x.head.path, now)
        if found is BUSY:
            self._hand_over(x, functools.partial(self._forward_pool, x, upstreams))
            return
        if found is None:
            self._end(x, self._fail(x, 503, "no backend is available"), now)
            return
        backend = found
        conn = upstreams.take_idle(backend, now)
        if conn is None:
            resume = Resume(backend)
            self._hand_over(x, functools.partial(self._forward_pool, x, upstreams, resume))
            return
        fill = x.fill
        sent = x.head if fill is None else fill.request_head
        conn.begin(sent.method == b"HEAD")
        x.upstream = backend.label_bytes
        self._fast, self._fast_pool, self._fast_backend = x, upstreams, backend
        self._fast_conn, self._fast_sent_at = conn, now
        conn.listen(self._on_backend_news)
        self._deadline.set(now + self._settings.read_timeout)
        try:
            conn.write_batched(upstream_request_head(sent, self._client_ip, backend.label_bytes,
                                                     request_id=x.request_id),
                               self._shared.writes)
        except UpstreamError:
            # Closed under our feet: the task path finds out and retries by its rules.
            self._fast_hand_over(expired=False)

    def _backend_news(self) -> None:
        """The backend connection has news: the response, more of it, or its end."""
        conn = self._fast_conn
        x = self._fast
        if conn is None or x is None:
            return
        try:
            whole = conn.take_response()
            if whole is not None:
                self._respond(x, conn, whole[0], whole[1])
            else:
                self._partial(x, conn)
        except Exception as exc:  # a bug must cost one connection, not the process
            log.error("client %s: unexpected %s: %s",
                      self._client_ip.decode(), type(exc).__name__, exc)
            if self._fast is not None:
                self._fast_abandon()
            self.abort()

    def _partial(self, x: Exchange, conn: UpstreamConnection) -> None:
        """Part of the response came: wait for the rest, or let a task take it."""
        now = self._loop.time()
        head = conn.queued_head()
        if head is not None:
            if x.apptime is None:
                x.apptime = now - self._fast_sent_at
            if head.framing is not _LENGTH or (head.content_length or 0) > FAST_BODY_LIMIT:
                self._fast_hand_over(expired=False)  # to be streamed
                return
        if conn.failed:
            self._fast_hand_over(expired=False)
            return
        self._deadline.set(now + self._settings.read_timeout)

    def _respond(self, x: Exchange, conn: UpstreamConnection, response: ResponseHead,
                 body: bytes) -> None:
        """Relay a whole response to the client, free the backend, log."""
        upstreams, backend = self._fast_pool, self._fast_backend
        assert upstreams is not None and backend is not None
        conn.listen(None)
        self._fast = self._fast_pool = self._fast_backend = self._fast_conn = None
        # The deadline is set anew by whatever comes next.
        now = self._loop.time()
        if x.apptime is None:
            x.apptime = now - self._fast_sent_at
        status = response.status
        x.upstream_status = status
        try:
            keep_alive = self._relay(x, conn, response, body, now)
            upstreams.release(conn, now)  # back to the idle pool, unless it cannot be reused
        finally:
            # Before anything else is served: least connections must not see
            # this exchange in flight any more.
            upstreams.finish(backend, _SERVER_ERROR if status >= 500 else _OK, now)
        self._end(x, keep_alive, now)

    def _relay(self, x: Exchange, conn: UpstreamConnection, response: ResponseHead,
               body: bytes, now: float) -> bool:
        """Write the response to the client and fill the cache; True if the client stays.

        ``now`` is the loop's time, read at the start of the callback.
        """
        fill = x.fill
        capturing = False
        if fill is not None:
            if response.status >= 500 and x.cache_req is not None:
                stale = fill.serve_stale()
                if stale is not None:  # stale-if-error: the old page beats an error
                    conn.abort()
                    return self._serve_cached(x, x.cache_req, stale)
            capturing = fill.on_head(response, now)
        head = x.head
        plan = plan_response(head, response, request_body_done=True,
                             stopping=self._shared.stopping)
        client_head = client_response_head(response, plan, head,
                                           b"" if x.cache is None else X_CACHE_MISS)
        x.status = response.status
        x.responded = True
        transport = self._transport
        assert transport is not None
        x.size = len(body)
        self._shared.writes.write(transport, client_head + body)
        if capturing:
            assert fill is not None
            if not body or fill.on_body(body):
                fill.on_end()
        return plan.keep_alive and not self._lost

    def _end(self, x: Exchange, keep_alive: bool, now: float) -> None:
        """What the task path does after ``_forward``: close the cache's fill, tell the cache."""
        fill = x.fill
        if fill is not None:
            fill.close()
        self._shared.cache.invalidate(x.head, x.upstream_status)
        self._exchange_done(x, keep_alive, now)

    # ---- leaving the callback path --------------------------------------------------

    def _fast_clear(self, conn: UpstreamConnection) -> None:
        conn.listen(None)
        self._fast = self._fast_pool = self._fast_backend = self._fast_conn = None
        self._deadline.clear()

    def _fast_hand_over(self, *, expired: bool) -> None:
        """Let a task carry on the exchange in flight from where it stands."""
        x, upstreams, backend, conn = (self._fast, self._fast_pool, self._fast_backend,
                                       self._fast_conn)
        assert x is not None and upstreams is not None and backend is not None
        assert conn is not None
        self._fast_clear(conn)
        resume = Resume(backend, conn, self._fast_sent_at, expired=expired)
        self._hand_over(x, functools.partial(self._forward_pool, x, upstreams, resume))

    def _fast_expired(self) -> None:
        """The backend was silent for ``read_timeout``: 504, or a cut if its head came."""
        self._fast_hand_over(expired=True)

    def _fast_abandon(self) -> None:
        """The client left with the request in flight: drop the backend connection, log 499."""
        x, upstreams, backend, conn = (self._fast, self._fast_pool, self._fast_backend,
                                       self._fast_conn)
        assert x is not None and upstreams is not None and backend is not None
        assert conn is not None
        self._fast_clear(conn)
        conn.abort()
        now = self._loop.time()
        upstreams.finish(backend, Outcome.NEUTRAL, now)
        if x.fill is not None:
            x.fill.close()
        x.status = CLIENT_CLOSED
        self._busy = False
        self._log(x, now)
