"""Forwarding one request to a pool in a task: any body, any response, retries.

The task path serves whatever the callback path (``tiers.proxy.fastpath``)
does not: requests with a body, responses that stream (chunked, close-
delimited or large), waits for a slot in the pool's queue, new backend
connections, failures. It also carries on an exchange the callback path
started (a ``Resume``) from where that one stopped.

- The request body is relayed as it arrives. Reading from the client pauses
  while too much waits unsent, and a relay that the backend does not read
  waits for it (``drain``), so a slow backend slows the client instead of
  filling memory. The same holds for responses.
- Retries follow one rule: a request is sent again only when it provably did
  not reach an app (the connection failed), or when it is idempotent, its
  whole body is still known, and the backend answered not a single byte. A
  POST that may have reached an app is never sent twice.
- Status of failures: no backend up 503, backend unreachable or broken 502,
  backend silent past the read timeout 504 (or a stale page where the page
  cache's stale-if-error allows). After the response head went to the
  client, a failure can only be signalled by closing the connection.
"""

from __future__ import annotations

import asyncio
import logging

from tiers.proxy.balancer import Outcome, outcome_for_status
from tiers.proxy.cache import X_CACHE_MISS, CacheRequest, Serve
from tiers.proxy.client import ClientIO
from tiers.proxy.errors import ClientGone, ConnectFailed, UpstreamError, UpstreamTimeout
from tiers.proxy.exchange import CLIENT_CLOSED, Exchange, Resume
from tiers.proxy.forward import (
    CONTINUE,
    IDEMPOTENT_METHODS,
    LAST_CHUNK,
    chunk_size_line,
    client_response_head,
    plan_response,
    upstream_request_head,
)
from tiers.proxy.http1 import BodyData
from tiers.proxy.responseparser import ResponseHead
from tiers.proxy.upstream import PoolBusy, Upstreams
from tiers.proxy.upstreamconn import UpstreamConnection

log = logging.getLogger("tiers.proxy")


class Forwarding(ClientIO):
    """The task path of a client connection's requests to a pool."""

    async def _forward_pool(self, x: Exchange, upstreams: Upstreams,
                            resume: Resume | None = None) -> bool:
        """Forward ``x`` (filling the page cache if ``x.fill``); True if the client stays."""
        fill = x.fill
        try:
            return await self._forward(x, upstreams, resume)
        finally:
            if fill is not None:
                fill.close()
            # After a successful POST, PUT, DELETE, ...: by what the backend
            # answered, even if the client left before reading all of it.
            self._shared.cache.invalidate(x.head, x.upstream_status)

    def _serve_cached(self, x: Exchange, req: CacheRequest, serve: Serve) -> bool:
        keep_alive = x.head.keep_alive and not self._shared.stopping and not self._lost
        answer = serve.response(req, keep_alive=keep_alive)
        assert self._transport is not None
        self._shared.writes.write(self._transport,
                                  answer.head + answer.body if answer.body else answer.head)
        x.status, x.size, x.responded, x.cache = answer.status, len(answer.body), True, serve.label
        return keep_alive

    def _fail(self, x: Exchange, status: int, message: str) -> bool:
        """Answer a failure to reach the app, or a stale page where stale-if-error allows."""
        fill = x.fill
        if fill is not None and x.cache_req is not None:
            stale = fill.serve_stale()
            if stale is not None:
                return self._serve_cached(x, x.cache_req, stale)
        return self._answer(x, status, message)

    async def _forward(self, x: Exchange, upstreams: Upstreams,
                       resume: Resume | None = None) -> bool:
        head = x.head
        if x.request_id is None:
            x.request_id = self._shared.request_ids.next()
        idempotent = head.method in IDEMPOTENT_METHODS
        tried: set[int] = set()
        fresh_only = False
        failure = "no backend reachable"
        loop = self._loop
        while True:
            if resume is not None:
                backend = resume.backend
            else:
                try:
                    found = await upstreams.acquire(tried, key=head.path)
                except PoolBusy as busy:
                    self._log_failure(head, f"pool {upstreams.name}: {busy}")
                    return self._fail(x, 503, "service unavailable: all servers busy")
                if found is None:
                    if not tried:
                        return self._fail(x, 503, "no backend is available")
                    self._log_failure(head, failure)
                    return self._fail(x, 502, "bad gateway")
                backend = found
            outcome = Outcome.NEUTRAL
            # Every way out of this attempt returns or raises, but for a retry:
            # the loop then goes on to the next one (``continue`` is not used
            # inside try/finally, which the compiled build does not support).
            try:
                resumed = resume if resume is not None and resume.conn is not None else None
                if resume is not None:
                    conn = resume.conn
                    resume = None
                else:
                    conn = None if fresh_only else upstreams.take_idle(backend, loop.time())
                reused = conn is not None
                if conn is None:
                    try:
                        conn = await upstreams.connect(backend)
                    except ConnectFailed as refused:
                        # The request never left the proxy: any method may go elsewhere.
                        tried.add(backend.index)
                        failure = str(refused)
                if conn is not None:
                    x.upstream = backend.label_bytes
                    try:
                        keep_alive = await self._attempt(x, conn, upstreams, resumed)
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
                        if not (conn.received == 0 and idempotent and x.replay is not None):
                            self._log_failure(head, failure)
                            return self._fail(x, 502, "bad gateway")
                        if reused:
                            # Most likely a keep-alive connection the backend was
                            # closing: try again on a new one.
                            fresh_only = True
                        else:
                            tried.add(backend.index)
                    except BaseException:
                        # Cancelled (the client left) or a bug: the exchange on this
                        # connection is in an unknown state.
                        conn.abort()
                        raise
            finally:
                upstreams.finish(backend, outcome, loop.time())

    def _silent(self, conn: UpstreamConnection) -> UpstreamTimeout:
        timeout = self._settings.read_timeout
        return UpstreamTimeout(f"{conn.backend.label} sent nothing for {timeout:g} s")

    async def _attempt(self, x: Exchange, conn: UpstreamConnection, upstreams: Upstreams,
                       resumed: Resume | None = None) -> bool:
        """Send the request on ``conn`` and relay the response.

        With ``resumed``, the request went out already and the response is
        taken from where the callback path left it. Raises ``UpstreamError``
        only while nothing was sent to the client; a failure after that
        closes the client connection instead.
        """
        head = x.head
        timeout = self._settings.read_timeout
        loop = self._loop
        fill = x.fill
        if resumed is None:
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
                    self._flush_batched()
                    self._transport.write(CONTINUE)
                self._relay_queued(x, out)
            conn.writelines(out)
            if not x.body_done:
                x.pump = loop.create_task(self._pump(x, conn))
            sent_at = loop.time()
            expired = False
        else:
            sent_at = resumed.sent_at
            # The backend was silent for the whole timeout already: the next
            # wait for it fails at once.
            expired = resumed.expired
        response = conn.pop_ready()
        if response is None:
            if expired:
                raise self._silent(conn)
            response = await conn.next_event(timeout)
        if x.apptime is None:
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
            head, response, request_body_done=x.body_done, stopping=self._shared.stopping
        )
        x.status = response.status
        x.responded = True
        transport = self._transport
        assert transport is not None
        chunked = plan.chunked
        pieces = [client_response_head(response, plan, head,
                                       b"" if x.cache is None else X_CACHE_MISS)]
        size = 0
        try:
            while True:
                event = conn.pop_ready()
                if event is None:
                    self._flush_batched()
                    transport.writelines(pieces)
                    pieces = []
                    if self._write_paused:
                        await self._drain()
                    if expired:
                        raise self._silent(conn)
                    event = await conn.next_event(timeout)
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
        self._flush_batched()
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

    async def _pump(self, x: Exchange, conn: UpstreamConnection) -> None:
        """Relay the rest of the request body as it arrives, at the backend's pace."""
        timeout = self._settings.client_idle_timeout
        try:
            while not x.body_done:
                event = self._pop()
                if event is None:
                    if self._lost:
                        raise ClientGone("client closed during the request body", CLIENT_CLOSED)
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

    async def _stop_pump(self, x: Exchange) -> None:
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
