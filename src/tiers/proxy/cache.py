"""The page cache: stored answers, request coalescing, stale serving (Squid/Varnish style).

Three layers, the lower ones usable alone:

    Store       (``tiers.proxy.cachestore``, sans-I/O) entries under a memory
                budget, variants per URL, purge; lookup -> Hit, Stale or MISS.
    Coalescer   (``tiers.proxy.coalescer``, asyncio) at most one fetch per key
                at a time; concurrent misses wait for its outcome, for a
                bounded time; keys whose answer was uncacheable pass a while.
    PageCache   what the proxy calls, per request:

        req = cache.request(head, route, client_ip)     # None: bypass the cache
        plan = await cache.prepare(req)                 # Serve, Fill or PASS
                                                        # (prepare_nowait: the same
                                                        # unless it would wait: None)
        Serve: write plan.response(req, keep_alive=...) (X-Cache HIT or STALE)
        Fill:  forward plan.request_head to the app; feed the response to
               plan.on_head / on_body / on_end; on a failure try
               plan.serve_stale(); always plan.close()
        PASS:  forward the request as it is; mark the answer X-Cache: MISS

What the rules of RFC 9111 admit is decided in ``tiers.proxy.cachepolicy``;
this module adds the clock and the event loop.

Coalescing (Varnish's busy object and hit-for-miss): the first miss of a key
leads a fetch; later misses of the key wait for it. When the leader stores
the answer, the waiters look the store up again and are served from it. When
the answer turns out uncacheable (Set-Cookie, private, too large, ...), the
waiters each go to the app themselves, and the key is marked "pass" for
``pass_ttl`` seconds so the next misses go straight to the app instead of
queueing; a later cacheable answer clears the mark. Within a second of the
mark being set or renewed, such a miss gets PASS: there is nothing to
judge, as the mark is renewed at most once a second; the first miss after
that second gets a Fill again, whose answer renews or clears the mark.
When the leader fails
(no answer, a 5xx, its client gone), the waiters are woken: those holding an
entry inside its stale-if-error window serve it, the others start over and
one of them leads the next fetch. A waiter never waits longer than
``wait_timeout`` in all; then it fetches by itself. HEAD requests never lead
(their answer has no body to store) but do wait for a GET in flight.

Stale entries: inside the stale-while-revalidate window an entry is served at
once (X-Cache: STALE) and one background refresh per key runs through the
``fetch`` callable the proxy provides. Past it, the request fetches in the
foreground; if that fetch fails and the entry is inside its stale-if-error
window, ``Fill.serve_stale`` gives it back to serve instead of an error.

Errors: nothing here raises on bad input. A background refresh that fails is
logged and leaves the stale entry in place.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final

from tiers.config.proxy import CacheConfig, Route, RouteKind
from tiers.errors import TiersError
from tiers.proxy.cachepolicy import (
    Freshness,
    RequestRules,
    cache_key,
    may_be_storable,
    not_modified,
    request_cacheability,
    response_storability,
    url_key,
)
from tiers.proxy.cachestore import Entry, Hit, Stale, Store
from tiers.proxy.coalescer import Coalescer, Lead, Turn
from tiers.proxy.http1 import Framing
from tiers.proxy.requestparser import RequestHead
from tiers.proxy.responseparser import ResponseHead

log = logging.getLogger("tiers.proxy")

HIT: Final = b"HIT"
MISS_LABEL: Final = b"MISS"
STALE: Final = b"STALE"

_CONDITIONAL: Final = frozenset({b"if-none-match", b"if-modified-since"})
_POOL: Final = RouteKind.POOL
_NO_BODY: Final = Framing.NONE
_GET_HEAD: Final = frozenset({b"GET", b"HEAD"})
_SAFE_METHODS: Final = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE"})
# Rounds of lookup and wait in one prepare(): each round ends with a fetch
# that finished, so a handful covers a few Vary variants in a row.
_MAX_ROUNDS: Final = 8
_MAX_REFRESHES: Final = 256
_PASS_TURN: Final = Turn.PASS


# ---- answers made from entries -----------------------------------------------------


class CachedResponse:
    """An answer made from an entry: ``head`` and ``body`` bytes ready to write.

    Plain classes here and for ``Serve`` (not dataclasses): one of each is made
    per cached request, and in the compiled build a dataclass's generated
    ``__init__`` stays interpreted.
    """

    __slots__ = ("body", "head", "status")

    def __init__(self, status: int, head: bytes, body: bytes) -> None:
        self.status = status
        self.head = head
        self.body = body


def cached_response(
    entry: Entry,
    age: float,
    label: bytes,
    rules: RequestRules,
    *,
    keep_alive: bool,
    version: bytes = b"1.1",
) -> CachedResponse:
    """The client answer for ``entry``, with ``Age`` and ``X-Cache: label``.

    A HEAD gets the head only; a request whose validators match gets a 304.
    ``keep_alive`` and the client's HTTP ``version`` decide the Connection
    field as ``tiers.proxy.forward`` does; the body length is always known.
    """
    if keep_alive:
        connection = b"Connection: keep-alive\r\n" if version == b"1.0" else b""
    else:
        connection = b"Connection: close\r\n"
    status = entry.status
    if (rules.if_none_match is not None or rules.if_modified_since is not None) and (
        status in (200, 203) and not_modified(rules, entry.etag, entry.last_modified)
    ):
        head = b"HTTP/1.1 304 Not Modified\r\n%sAge: %d\r\nX-Cache: %s\r\n%s\r\n" % (
            entry.fields_304,
            age,
            label,
            connection,
        )
        return CachedResponse(304, head, b"")
    length = b"" if status == 204 else b"Content-Length: %d\r\n" % len(entry.body)
    head = b"%s%sAge: %d\r\nX-Cache: %s\r\n%s%s\r\n" % (
        entry.status_line,
        entry.fields,
        age,
        label,
        length,
        connection,
    )
    body = b"" if rules.head_only or status == 204 else entry.body
    return CachedResponse(status, head, body)


# The field a response relayed while filling the cache carries (see
# ``forward.client_response_head``'s ``extra``).
X_CACHE_MISS: Final = b"X-Cache: " + MISS_LABEL


def with_x_cache(head: bytes, label: bytes = MISS_LABEL) -> bytes:
    """``head`` (a complete response head) with ``X-Cache: label`` added."""
    return b"%sX-Cache: %s\r\n\r\n" % (head[:-2], label)


# ---- the proxy's interface -------------------------------------------------------


class CacheRequest:
    """A request the cache may answer: its rules, head, route and client address."""

    __slots__ = ("client_ip", "head", "route", "rules")

    def __init__(
        self, rules: RequestRules, head: RequestHead, route: Route | None, client_ip: bytes
    ) -> None:
        self.rules = rules
        self.head = head
        self.route = route
        self.client_ip = client_ip


class Pass:
    """Forward without the cache: the key passes and was judged under a second ago.

    The answer is relayed marked X-Cache: MISS; there is nothing to feed,
    close or serve stale. ``PASS`` is the one instance.
    """

    __slots__ = ()


PASS: Final = Pass()


class Serve:
    """Answer from the store: ``label`` is HIT or STALE."""

    __slots__ = ("age", "entry", "label")

    def __init__(self, entry: Entry, age: float, label: bytes) -> None:
        self.entry = entry
        self.age = age
        self.label = label

    def response(self, req: CacheRequest, *, keep_alive: bool) -> CachedResponse:
        """The bytes to write to the client (see ``cached_response``)."""
        return cached_response(
            self.entry,
            self.age,
            self.label,
            req.rules,
            keep_alive=keep_alive,
            version=req.head.version,
        )


# Fetches one request from the app for a background refresh, feeding the Fill.
Fetcher = Callable[[CacheRequest, "Fill"], Awaitable[None]]


class Fill:
    """One fetch from the app on behalf of the cache, and what it learns.

    Forward ``request_head`` (the client's head without If-None-Match and
    If-Modified-Since when the answer may be stored, so the app sends the
    whole answer; for a background refresh a GET). Then call ``on_head``
    with the response head; if it returns True, pass every body piece to
    ``on_body`` and call ``on_end`` after the last. ``close`` must follow in
    every case (a ``finally``): a fetch closed without ``on_end`` counts as
    failed and wakes the requests waiting for it.
    """

    # Set per fetch only when it learns something (most never do); a fetch
    # starts with these.
    _response: ResponseHead | None = None
    _freshness: Freshness | None = None
    _chunks: list[bytes] | None = None
    _size = 0

    def __init__(
        self,
        cache: PageCache,
        request: CacheRequest,
        lead: Lead | None,
        stale: Entry | None,
        *,
        background: bool = False,
    ) -> None:
        self._cache = cache
        self.request = request
        self._lead = lead
        # The entry that may stand in for a failed fetch (stale-if-error).
        self.stale = stale
        rules = request.rules
        stores = self._stores = background or not rules.head_only
        head = request.head
        if stores:
            if rules.if_none_match is not None or rules.if_modified_since is not None:
                kept = [(n, v) for n, v in head.headers if n.lower() not in _CONDITIONAL]
                head = head.changed(headers=kept, names=())
            if head.method != b"GET":
                head = head.changed(method=b"GET")
        self.request_head = head
        self._request_time = cache.clock()

    @property
    def leading(self) -> bool:
        """Other requests wait for this fetch."""
        return self._lead is not None

    def on_head(self, response: ResponseHead, now: float | None = None) -> bool:
        """Judge the response head; True if its body should be fed to the cache.

        ``now`` is the event loop's time, if the caller has it (it times a
        pass mark, see ``Coalescer``).
        """
        if self._response is not None or not self._stores:
            return False
        self._response = response
        cache = self._cache
        config = cache.config
        if not may_be_storable(response.headers, response.names):
            freshness = None
        else:
            freshness = response_storability(
                response.status,
                response.headers,
                self.request.rules.headers,
                request_time=self._request_time,
                response_time=cache.clock(),
                stale_while_revalidate=config.stale_while_revalidate,
                stale_if_error=config.stale_if_error,
            )
        length = response.content_length
        if freshness is None or (length is not None and length > cache.store.max_object):
            status = response.status
            # A 5xx or a 304 says nothing about what the next answer will be.
            self._uncached(passing=status < 500 and status != 304, now=now)
            return False
        self._freshness = freshness
        self._chunks = []
        return True

    def on_body(self, data: bytes) -> bool:
        """Keep a piece of the body; False once the answer grew too large to store."""
        chunks = self._chunks
        if chunks is None:
            return False
        self._size += len(data)
        if self._size > self._cache.store.max_object:
            self._chunks = None
            self._uncached(passing=True)
            return False
        chunks.append(data)
        return True

    def on_end(self) -> bool:
        """The body is complete: store the answer. True if stored."""
        chunks = self._chunks
        response = self._response
        freshness = self._freshness
        if chunks is None or response is None or freshness is None:
            return False
        self._chunks = None
        cache = self._cache
        entry = cache.store.store(
            self.request.rules,
            freshness,
            status=response.status,
            reason=response.reason,
            headers=response.headers,
            body=b"".join(chunks),
            connection=response.connection,
        )
        if entry is None:
            self._uncached(passing=True)
            return False
        if self._lead is not None:
            self._lead.stored()
        else:
            cache.coalescer.clear_pass(self.request.rules.key)
        return True

    def serve_stale(self) -> Serve | None:
        """The entry to serve instead of a failed fetch (connect error, timeout, 5xx), if any.

        Only inside the entry's stale-if-error window, and only while it is
        still stored (a purge is not undone by an outage).
        """
        return self._cache._serve_stale(self.stale)

    def close(self) -> None:
        """End the fetch; if it stored nothing yet, the waiters hear it failed."""
        self._chunks = None
        if self._lead is not None:
            self._lead.failed()

    def _uncached(self, *, passing: bool, now: float | None = None) -> None:
        lead = self._lead
        if passing:
            if lead is not None:
                lead.uncacheable()
            else:
                self._cache.coalescer.mark_pass(self.request.rules.key, now)
        elif lead is not None:
            lead.failed()


class PageCache:
    """The proxy's shared page cache for GET and HEAD.

    ``fetch`` runs background refreshes (stale-while-revalidate); without
    it, stale entries are refreshed in the foreground. ``wait_timeout``
    bounds how long a miss waits for another request's fetch,
    ``refresh_timeout`` how long a background refresh may take. ``clock``
    gives seconds since the epoch (compared with Date and Expires).
    """

    def __init__(
        self,
        config: CacheConfig,
        *,
        fetch: Fetcher | None = None,
        wait_timeout: float = 10.0,
        refresh_timeout: float = 30.0,
        pass_ttl: float = 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._enabled = config.enabled  # read per request: config is not compiled
        self.clock = clock
        self.store = Store(config.memory, config.max_object)
        self.coalescer = Coalescer(pass_ttl=pass_ttl)
        self._fetch = fetch
        self._wait_timeout = wait_timeout
        self._refresh_timeout = refresh_timeout
        self._tasks: set[asyncio.Task[None]] = set()
        # Told the key of every target an unsafe request changed, so that
        # other processes' caches can drop it too (set by the proxy's workers).
        self.on_invalidate: Callable[[bytes], None] | None = None

    def request(
        self, head: RequestHead, route: Route | None = None, client_ip: bytes = b"-"
    ) -> CacheRequest | None:
        """The request as the cache sees it, or None when the cache must stay out of it.

        None when the cache is disabled, the route is not a caching pool
        route, the request has a body, or the rules of
        ``cachepolicy.request_cacheability`` say so. ``route`` None means a
        pool route with the defaults.
        """
        if route is not None and (route.kind is not _POOL or not route.cache):
            return None
        return self.admit(head, route, client_ip,
                          private_ok=route is not None and route.cache_private_requests)

    def admit(
        self, head: RequestHead, route: Route | None, client_ip: bytes, *, private_ok: bool
    ) -> CacheRequest | None:
        """``request`` for a pool route known to cache, whose private-request rule is given.

        The proxy's compiled routes carry both, so it need not read them from
        the route's configuration for every request.
        """
        method = head.method
        if method not in _GET_HEAD or not self._enabled or head.framing is not _NO_BODY:
            return None
        rules = request_cacheability(
            method, head.host, head.path, head.headers, private_ok=private_ok, names=head.names
        )
        if rules is None:
            return None
        return CacheRequest(rules, head, route, client_ip)

    def prepare_nowait(
        self, req: CacheRequest, now: float | None = None
    ) -> Serve | Fill | Pass | None:
        """``prepare`` as far as it goes without waiting.

        None when another request's fetch of the key is in flight: then
        ``prepare`` waits for it. Returning None changes nothing, so the
        caller may go on with ``prepare``. ``now`` is the event loop's time,
        if the caller has it (it times pass marks, see ``Coalescer``).
        """
        rules = req.rules
        found = self._look(req, rules.reload, None) if self.store.holds(rules.key) else None
        if isinstance(found, Serve):
            return found
        turn = self.coalescer.try_join(rules.key, may_lead=not rules.head_only, now=now)
        if turn is None:
            return None
        self.store.stats.misses += 1
        if turn is _PASS_TURN and found is None:
            return PASS
        return Fill(self, req, turn if type(turn) is Lead else None, found)

    async def prepare(self, req: CacheRequest) -> Serve | Fill | Pass:
        """Decide how to answer ``req``: from the store (Serve) or from the app (Fill, PASS).

        May wait, at most ``wait_timeout`` in all, for another request's
        fetch of the same key. A Fill whose ``leading`` is true makes others
        wait for it, so it must be closed promptly.
        """
        plan = self.prepare_nowait(req)
        if plan is not None:
            return plan
        rules = req.rules
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_timeout
        reload = rules.reload
        waited_from: int | None = None
        stale: Entry | None = None
        for _ in range(_MAX_ROUNDS):
            found = self._look(req, reload, waited_from)
            if isinstance(found, Serve):
                return found
            stale = found
            waited_from = self.store.serial
            turn = await self.coalescer.join(
                rules.key, deadline - loop.time(), may_lead=not rules.head_only
            )
            if type(turn) is Lead:
                self.store.stats.misses += 1
                return Fill(self, req, turn, stale)
            if turn is Turn.FETCH or turn is Turn.PASS:
                break
            if turn is Turn.FAILED:
                fallback = self._serve_stale(stale)
                if fallback is not None:
                    return fallback
            else:
                reload = False  # the answer just stored is as new as a reload gets
        self.store.stats.misses += 1
        return Fill(self, req, None, stale)

    def _look(
        self, req: CacheRequest, reload: bool, waited_from: int | None
    ) -> Serve | Entry | None:
        """One look in the store: what to serve, else the entry kept for stale-if-error, if any.

        ``waited_from`` is the store's serial when this request began to wait
        for another's fetch (None if it did not).
        """
        stats = self.store.stats
        found = self.store.lookup(req.rules, self.clock(), reload=reload)
        if type(found) is Hit or (
            # Stored by the fetch this request waited for: nothing newer exists.
            type(found) is Stale
            and waited_from is not None
            and found.entry.serial > waited_from
        ):
            stats.hits += 1
            if waited_from is not None:
                stats.coalesced += 1
            return Serve(found.entry, found.age, HIT)
        if type(found) is Stale:
            if found.background and self._fetch is not None:
                self._refresh(req)
                stats.stale += 1
                return Serve(found.entry, found.age, STALE)
            if found.on_error:
                return found.entry
        return None

    def _serve_stale(self, entry: Entry | None) -> Serve | None:
        if entry is None or not entry.live:
            return None
        freshness = entry.freshness
        age = freshness.age(self.clock())
        if age >= freshness.lifetime + freshness.stale_if_error:
            return None
        self.store.stats.stale += 1
        return Serve(entry, age, STALE)

    def _refresh(self, req: CacheRequest) -> None:
        """Start the one background refresh of ``req``'s key, unless a fetch is in flight."""
        if len(self._tasks) >= _MAX_REFRESHES:
            return
        lead = self.coalescer.lead(req.rules.key)
        if lead is None:
            return
        fill = Fill(self, req, lead, None, background=True)
        task = asyncio.get_running_loop().create_task(self._run_refresh(fill))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.store.stats.refreshes += 1

    async def _run_refresh(self, fill: Fill) -> None:
        fetch = self._fetch
        assert fetch is not None
        try:
            async with asyncio.timeout(self._refresh_timeout):
                await fetch(fill.request, fill)
        except (TiersError, OSError) as exc:  # TimeoutError is an OSError
            log.warning(
                "cache refresh of %s failed: %s",
                fill.request.rules.key.decode("latin-1"),
                exc or type(exc).__name__,
            )
        except Exception:  # a bug must cost one refresh, not the stale entry's users
            log.exception("cache refresh of %s failed", fill.request.rules.key.decode("latin-1"))
        finally:
            fill.close()

    def invalidate(self, head: RequestHead, status: int) -> int:
        """Drop the stored answers for the target of an unsafe request that succeeded.

        RFC 9111 4.4: after a 2xx or 3xx answer to POST, PUT, DELETE, ...
        the target URI is no longer trusted. Returns the entries removed.
        """
        if head.method in _SAFE_METHODS or not 200 <= status < 400:
            return 0
        key = cache_key(head.host, head.path)
        if self.on_invalidate is not None:
            self.on_invalidate(key)
        return self.store.purge(key)

    def purge(self, url: bytes, *, prefix: bool = False) -> int:
        """Remove the entries of ``url`` (``http://host/path``, or ``host/path``).

        With ``prefix``, every URL starting with it. Returns the count removed.
        """
        return self.store.purge(url_key(url), prefix=prefix)

    def metrics(self) -> dict[str, int]:
        """Counters and gauges for the metrics endpoint."""
        store = self.store
        counters = dataclasses.asdict(store.stats)
        counters["bytes"] = store.bytes
        counters["entries"] = store.entries
        counters["wait_timeouts"] = self.coalescer.timeouts
        return counters

    async def close(self) -> None:
        """Cancel the background refreshes still running."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
