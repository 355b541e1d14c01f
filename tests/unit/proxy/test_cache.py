"""The page cache as the proxy drives it: answers from entries, coalescing, stale serving."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from tiers.config.proxy import CacheConfig, Route, RouteKind
from tiers.proxy.cache import (
    PASS,
    CacheRequest,
    Fill,
    PageCache,
    Serve,
    with_x_cache,
)
from tiers.proxy.coalescer import Coalescer, Lead, Turn
from tiers.proxy.forward import upstream_request_head
from tiers.proxy.http1 import END, BodyData
from tiers.proxy.requestparser import RequestHead, RequestParser
from tiers.proxy.responseparser import ResponseHead, ResponseParser

T0 = 1_700_000_000.0


class Clock:
    """Wall-clock seconds that move only when a test says so."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def request_head(
    target: bytes = b"/page", headers: bytes = b"", method: bytes = b"GET", version: bytes = b"1.1"
) -> RequestHead:
    raw = b"%s %s HTTP/%s\r\nHost: example.test\r\n%s\r\n" % (method, target, version, headers)
    head = RequestParser().feed(raw)[0]
    assert isinstance(head, RequestHead)
    return head


def response_bytes(
    body: bytes = b"page",
    cache_control: bytes = b"max-age=60",
    status: int = 200,
    extra: bytes = b"",
) -> bytes:
    return b"HTTP/1.1 %d Whatever\r\nCache-Control: %s\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status,
        cache_control,
        len(body),
        extra,
        body,
    )


def feed(fill: Fill, raw: bytes) -> bool:
    """Hand a complete backend answer to ``fill`` as the proxy would; True if stored."""
    events = ResponseParser(fill.request_head.method == b"HEAD").feed(raw)
    head = events[0]
    assert isinstance(head, ResponseHead)
    if not fill.on_head(head):
        return False
    for event in events[1:]:
        if isinstance(event, BodyData):
            fill.on_body(event.data)
        elif event is END:
            return fill.on_end()
    return False


def parse_answer(data: bytes, head_request: bool = False) -> tuple[ResponseHead, bytes]:
    """Read back what the cache wrote to a client, with the proxy's own response parser."""
    parser = ResponseParser(head_request)
    events = parser.feed(data)
    head = events[0]
    assert isinstance(head, ResponseHead)
    body = b"".join(e.data for e in events if isinstance(e, BodyData))
    assert events[-1] is END
    return head, body


def field(head: ResponseHead, name: bytes) -> list[bytes]:
    return [v for n, v in head.headers if n.lower() == name]


def new_cache(clock: Clock, **kwargs: object) -> PageCache:
    return PageCache(CacheConfig(), clock=clock, **kwargs)  # type: ignore[arg-type]


def cache_request(cache: PageCache, head: RequestHead | None = None) -> CacheRequest:
    req = cache.request(head or request_head())
    assert req is not None
    return req


async def fill_entry(cache: PageCache, raw: bytes, head: RequestHead | None = None) -> None:
    plan = await cache.prepare(cache_request(cache, head))
    assert isinstance(plan, Fill)
    try:
        assert feed(plan, raw)
    finally:
        plan.close()


async def settle(condition: Callable[[], bool]) -> None:
    """Let the loop run until ``condition`` holds (bounded: it fails if it never does)."""
    for _ in range(200):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


# ---- answers made from entries ---------------------------------------------------


def test_a_hit_carries_age_x_cache_and_length_and_no_hop_by_hop_fields() -> None:
    async def scenario() -> None:
        clock = Clock()
        cache = new_cache(clock)
        await fill_entry(
            cache,
            response_bytes(
                b"hello",
                extra=b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n"
                b"Age: 2\r\nX-Cache: HIT from elsewhere\r\nContent-Type: text/plain\r\n",
            ),
        )
        clock.now += 10
        req = cache_request(cache)
        plan = await cache.prepare(req)
        assert isinstance(plan, Serve)
        answer = plan.response(req, keep_alive=True)
        assert answer.status == 200 and answer.body == b"hello"
        head, body = parse_answer(answer.head + answer.body)
        assert body == b"hello"
        assert head.reason == b"Whatever"
        assert field(head, b"age") == [b"12"]  # the backend's Age 2, then 10 s stored
        assert field(head, b"x-cache") == [b"HIT"]
        assert field(head, b"content-length") == [b"5"]
        assert field(head, b"content-type") == [b"text/plain"]
        for dropped in (b"connection", b"x-hop", b"keep-alive"):
            assert field(head, dropped) == []

        head_req = cache_request(cache, request_head(method=b"HEAD"))
        head_plan = await cache.prepare(head_req)
        assert isinstance(head_plan, Serve)
        head_answer = head_plan.response(head_req, keep_alive=False)
        assert head_answer.body == b""
        parsed, _ = parse_answer(head_answer.head, head_request=True)
        assert field(parsed, b"content-length") == [b"5"]
        assert field(parsed, b"connection") == [b"close"]

        old_req = cache_request(cache, request_head(version=b"1.0"))
        old_plan = await cache.prepare(old_req)
        assert isinstance(old_plan, Serve)
        parsed, _ = parse_answer(old_plan.response(old_req, keep_alive=True).head, True)
        assert field(parsed, b"connection") == [b"keep-alive"]

    asyncio.run(scenario())


def test_matching_validators_get_a_304_from_the_entry() -> None:
    async def scenario() -> None:
        cache = new_cache(Clock())
        await fill_entry(
            cache,
            response_bytes(b"v1", extra=b'ETag: "v1"\r\nContent-Type: text/plain\r\nVary: X-A\r\n'),
        )
        req = cache_request(cache, request_head(headers=b'If-None-Match: W/"v1"\r\n'))
        plan = await cache.prepare(req)
        assert isinstance(plan, Serve)
        answer = plan.response(req, keep_alive=True)
        assert answer.status == 304 and answer.body == b""
        head, _ = parse_answer(answer.head)
        assert head.status == 304
        assert field(head, b"etag") == [b'"v1"']
        assert field(head, b"vary") == [b"X-A"]
        assert field(head, b"cache-control") == [b"max-age=60"]
        assert field(head, b"content-type") == []
        assert field(head, b"x-cache") == [b"HIT"]

        other = cache_request(cache, request_head(headers=b'If-None-Match: "v0"\r\n'))
        plan = await cache.prepare(other)
        assert isinstance(plan, Serve)
        assert plan.response(other, keep_alive=True).status == 200

    asyncio.run(scenario())


def test_a_204_entry_has_neither_length_nor_body() -> None:
    async def scenario() -> None:
        cache = new_cache(Clock())
        await fill_entry(
            cache, b"HTTP/1.1 204 No Content\r\nCache-Control: max-age=60\r\nX-A: a\r\n\r\n"
        )
        req = cache_request(cache)
        plan = await cache.prepare(req)
        assert isinstance(plan, Serve)
        answer = plan.response(req, keep_alive=True)
        assert answer.status == 204 and answer.body == b""
        assert b"content-length" not in answer.head.lower()
        assert answer.head.endswith(b"X-Cache: HIT\r\n\r\n")

    asyncio.run(scenario())


def test_with_x_cache_adds_the_field_to_a_relayed_head() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert with_x_cache(head) == b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nX-Cache: MISS\r\n\r\n"


# ---- which requests the cache takes ------------------------------------------------


def test_the_cache_stays_out_where_config_route_or_request_say_so() -> None:
    cache = PageCache(CacheConfig())
    plain = request_head()
    assert cache.request(plain) is not None
    assert PageCache(CacheConfig(enabled=False)).request(plain) is None
    pool = Route("app", RouteKind.POOL, pool="app")
    assert cache.request(plain, pool) is not None
    assert cache.request(plain, Route("app", RouteKind.POOL, pool="app", cache=False)) is None
    assert cache.request(plain, Route("files", RouteKind.STATIC, root=Path("/srv"))) is None
    with_cookie = request_head(headers=b"Cookie: s=1\r\n")
    assert cache.request(with_cookie, pool) is None
    private = Route("app", RouteKind.POOL, pool="app", cache_private_requests=True)
    assert cache.request(with_cookie, private) is not None
    assert cache.request(request_head(headers=b"Content-Length: 3\r\n")) is None
    assert cache.request(request_head(headers=b"Content-Length: 0\r\n")) is not None
    assert cache.request(request_head(method=b"POST")) is None


def test_admit_takes_the_route_rules_as_given() -> None:
    """What the proxy calls with its compiled route's flags: the request's own rules still hold."""
    cache = PageCache(CacheConfig())
    pool = Route("app", RouteKind.POOL, pool="app")
    with_cookie = request_head(headers=b"Cookie: s=1\r\n")
    assert cache.admit(with_cookie, pool, b"-", private_ok=False) is None
    req = cache.admit(with_cookie, pool, b"10.0.0.1", private_ok=True)
    assert req is not None and req.route is pool and req.client_ip == b"10.0.0.1"
    assert cache.admit(request_head(method=b"POST"), pool, b"-", private_ok=True) is None
    assert cache.admit(request_head(headers=b"Content-Length: 3\r\n"), pool, b"-",
                       private_ok=True) is None
    assert PageCache(CacheConfig(enabled=False)).admit(request_head(), pool, b"-",
                                                       private_ok=True) is None


# ---- miss, store, hit ------------------------------------------------------------


def test_a_miss_is_stored_and_then_served_as_a_hit() -> None:
    async def scenario() -> None:
        cache = new_cache(Clock())
        conditional = request_head(headers=b'If-None-Match: "old"\r\nIf-Modified-Since: x\r\n')
        req = cache_request(cache, conditional)
        plan = await cache.prepare(req)
        assert isinstance(plan, Fill) and plan.leading
        # The fetch asks for the whole answer, so it can be stored.
        names = {n.lower() for n, _ in plan.request_head.headers}
        assert b"if-none-match" not in names and b"if-modified-since" not in names
        assert {n.lower() for n, _ in conditional.headers} >= {b"if-none-match"}
        try:
            assert feed(plan, response_bytes(b"fresh", extra=b'ETag: "new"\r\n'))
        finally:
            plan.close()
        hit = await cache.prepare(req)
        assert isinstance(hit, Serve) and hit.label == b"HIT"
        metrics = cache.metrics()
        assert metrics["misses"] == 1 and metrics["hits"] == 1 and metrics["stores"] == 1
        assert metrics["entries"] == 1 and metrics["bytes"] > len(b"fresh")

    asyncio.run(scenario())


def test_head_misses_go_to_the_app_as_head_and_store_nothing() -> None:
    async def scenario() -> None:
        cache = new_cache(Clock())
        req = cache_request(cache, request_head(method=b"HEAD"))
        plan = await cache.prepare(req)
        assert isinstance(plan, Fill) and not plan.leading
        assert plan.request_head.method == b"HEAD"
        assert not feed(plan, response_bytes(b""))
        plan.close()
        assert cache.metrics()["entries"] == 0

    asyncio.run(scenario())


def test_head_waits_for_a_get_in_flight_and_is_served_from_its_entry() -> None:
    async def scenario() -> None:
        cache = new_cache(Clock())
        leader = await cache.prepare(cache_request(cache))
        assert isinstance(leader, Fill) and leader.leading
        head_req = cache_request(cache, request_head(method=b"HEAD"))
        waiter = asyncio.create_task(cache.prepare(head_req))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        assert feed(leader, response_bytes(b"body"))
        leader.close()
        served = await waiter
        assert isinstance(served, Serve)
        assert served.response(head_req, keep_alive=True).body == b""

    asyncio.run(scenario())


# ---- coalescing --------------------------------------------------------------------

Fetch = Callable[[Fill], Awaitable[None]]


async def client(cache: PageCache, fetch: Fetch, head: RequestHead | None = None) -> bytes:
    """One request through the cache: X-Cache and body of a stored answer, else what happened."""
    req = cache_request(cache, head)
    plan = await cache.prepare(req)
    if isinstance(plan, Serve):
        return plan.label + b":" + plan.response(req, keep_alive=True).body
    try:
        await fetch(plan)
    except OSError:
        stale = plan.serve_stale()
        return b"stale:" + stale.entry.body if stale is not None else b"error"
    finally:
        plan.close()
    return b"fetched"


def test_fifty_concurrent_misses_make_exactly_one_fetch() -> None:
    async def scenario() -> None:
        cache = new_cache(Clock())
        gate = asyncio.Event()
        fetches = 0

        async def fetch(fill: Fill) -> None:
            nonlocal fetches
            fetches += 1
            await gate.wait()
            assert feed(fill, response_bytes(b"the page"))

        tasks = [asyncio.create_task(client(cache, fetch)) for _ in range(50)]
        await settle(lambda: fetches == 1)
        await asyncio.sleep(0.01)
        gate.set()
        bodies = await asyncio.gather(*tasks)
        assert fetches == 1
        assert sorted(bodies) == [b"HIT:the page"] * 49 + [b"fetched"]
        metrics = cache.metrics()
        assert metrics["misses"] == 1
        assert metrics["hits"] == 49 and metrics["coalesced"] == 49
        assert cache.coalescer.in_flight == 0

    asyncio.run(scenario())


def test_a_failed_leader_wakes_the_waiters_and_one_of_them_leads_again() -> None:
    async def scenario() -> None:
        cache = new_cache(Clock())
        gate = asyncio.Event()
        fetches = 0

        async def fetch(fill: Fill) -> None:
            nonlocal fetches
            fetches += 1
            if fetches == 1:
                await gate.wait()
                raise OSError("backend reset")
            assert feed(fill, response_bytes(b"second try"))

        tasks = [asyncio.create_task(client(cache, fetch)) for _ in range(10)]
        await settle(lambda: fetches == 1)
        gate.set()
        bodies = await asyncio.gather(*tasks)
        assert fetches == 2
        assert sorted(bodies) == [b"HIT:second try"] * 8 + [b"error", b"fetched"]

    asyncio.run(scenario())


def test_a_cancelled_leader_wakes_the_waiters() -> None:
    async def scenario() -> None:
        cache = new_cache(Clock())
        fetches = 0
        forever = asyncio.Event()

        async def fetch(fill: Fill) -> None:
            nonlocal fetches
            fetches += 1
            if fetches == 1:
                await forever.wait()  # the leader's client goes away meanwhile
            assert feed(fill, response_bytes(b"by the next leader"))

        leader = asyncio.create_task(client(cache, fetch))
        await settle(lambda: fetches == 1)
        waiters = [asyncio.create_task(client(cache, fetch)) for _ in range(5)]
        await asyncio.sleep(0.01)
        leader.cancel()
        bodies = await asyncio.gather(*waiters)
        assert fetches == 2
        assert sorted(bodies) == [b"HIT:by the next leader"] * 4 + [b"fetched"]
        assert leader.cancelled()

    asyncio.run(scenario())


def test_waiters_fetch_by_themselves_after_the_wait_timeout() -> None:
    async def scenario() -> None:
        cache = new_cache(Clock(), wait_timeout=0.05)
        leader = await cache.prepare(cache_request(cache))
        assert isinstance(leader, Fill) and leader.leading
        plans = await asyncio.gather(*(cache.prepare(cache_request(cache)) for _ in range(5)))
        assert all(isinstance(p, Fill) and not p.leading for p in plans)
        assert cache.metrics()["wait_timeouts"] == 5
        # Their answers are stored like any other.
        first = plans[0]
        assert isinstance(first, Fill)
        assert feed(first, response_bytes(b"from a waiter"))
        for plan in plans:
            assert isinstance(plan, Fill)
            plan.close()
        leader.close()
        hit = await cache.prepare(cache_request(cache))
        assert isinstance(hit, Serve) and hit.entry.body == b"from a waiter"

    asyncio.run(scenario())


def test_an_uncacheable_answer_sends_waiters_to_the_app_and_marks_the_key_pass() -> None:
    async def scenario() -> None:
        cache = new_cache(Clock())
        gate = asyncio.Event()
        fetches = 0

        async def fetch(fill: Fill) -> None:
            nonlocal fetches
            fetches += 1
            await gate.wait()
            feed(fill, response_bytes(b"mine", extra=b"Set-Cookie: s=1\r\n"))

        tasks = [asyncio.create_task(client(cache, fetch)) for _ in range(6)]
        await settle(lambda: fetches == 1)
        await asyncio.sleep(0.01)
        gate.set()
        bodies = await asyncio.gather(*tasks)
        assert fetches == 6 and bodies == [b"fetched"] * 6
        # Hit-for-pass: the next miss does not lead, so nobody would queue behind it;
        # within a second of the mark it has no answer to judge either.
        assert await cache.prepare(cache_request(cache)) is PASS
        assert cache.prepare_nowait(cache_request(cache)) is PASS
        # Past that second, a miss judges its answer again (to renew the mark, or end it).
        later = time.monotonic() + 1.5
        plan = cache.prepare_nowait(cache_request(cache), now=later)
        assert isinstance(plan, Fill) and not plan.leading
        # A cacheable answer on that path is stored and ends the pass.
        assert feed(plan, response_bytes(b"now public"))
        plan.close()
        assert not cache.coalescer.passing(cache_request(cache).rules.key)
        served = await cache.prepare(cache_request(cache))
        assert isinstance(served, Serve) and served.entry.body == b"now public"

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("raw", "passing"),
    [
        (response_bytes(b"oops", status=503), False),
        (response_bytes(b"x", cache_control=b"private"), True),
        (response_bytes(b"x" * 5000), True),  # over max_object by Content-Length
        (
            b"HTTP/1.1 200 OK\r\nCache-Control: max-age=60\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"fa0\r\n" + b"y" * 4000 + b"\r\n0\r\n\r\n",
            True,  # over max_object while the body arrives
        ),
    ],
    ids=["5xx", "private", "too large", "too large chunked"],
)
def test_what_an_unstored_answer_means_for_the_next_requests(raw: bytes, passing: bool) -> None:
    async def scenario() -> None:
        cache = PageCache(CacheConfig(max_object=3000), clock=Clock())
        leader = await cache.prepare(cache_request(cache))
        assert isinstance(leader, Fill)
        waiter = asyncio.create_task(cache.prepare(cache_request(cache)))
        await asyncio.sleep(0.01)
        assert not feed(leader, raw)
        # The waiter is woken as soon as the head (or body) settles it.
        plan = await waiter
        assert isinstance(plan, Fill)
        # After a 5xx it leads the next try; after an uncacheable answer it passes.
        assert plan.leading is not passing
        assert cache.coalescer.passing(cache_request(cache).rules.key) is passing
        plan.close()
        leader.close()
        assert cache.metrics()["entries"] == 0

    asyncio.run(scenario())


def test_a_renewed_pass_mark_is_the_last_to_go() -> None:
    clock = Clock(0.0)
    coalescer = Coalescer(pass_ttl=10.0, max_marks=3, clock=clock)
    for key in (b"a", b"b", b"c"):
        coalescer.mark_pass(key)
    clock.now = 2.0
    coalescer.mark_pass(b"a")  # renewed: now the newest
    coalescer.mark_pass(b"d")  # one too many: the oldest, b, goes
    assert [coalescer.passing(k) for k in (b"a", b"b", b"c", b"d")] == [True, False, True, True]
    coalescer.mark_pass(b"e")
    assert [coalescer.passing(k) for k in (b"a", b"c", b"d", b"e")] == [True, False, True, True]


def test_a_reading_of_the_clock_given_stands_for_the_clock() -> None:
    clock = Clock(1000.0)  # what the coalescer would read: far from the times given
    coalescer = Coalescer(pass_ttl=10.0, clock=clock)
    coalescer.mark_pass(b"k", now=0.0)  # until 10.0
    assert coalescer.passing(b"k", now=9.9)
    assert coalescer.try_join(b"k", now=9.9) is Turn.FETCH
    coalescer.mark_pass(b"k", now=5.0)  # renewed: until 15.0
    assert coalescer.passing(b"k", now=14.9)
    assert isinstance(coalescer.try_join(b"k", now=15.0), Lead)  # expired: this one leads
    coalescer.mark_pass(b"j", now=0.0)
    assert not coalescer.passing(b"j")  # by the clock itself, long expired


def test_coalescer_pass_marks_expire_and_are_bounded() -> None:
    async def scenario() -> None:
        clock = Clock(0.0)
        coalescer = Coalescer(pass_ttl=10.0, max_marks=3, clock=clock)
        coalescer.mark_pass(b"k")
        assert await coalescer.join(b"k", 1.0) is Turn.PASS  # marked under a second ago
        clock.now = 1.5
        assert await coalescer.join(b"k", 1.0) is Turn.FETCH  # its answer is to be judged
        clock.now = 10.0
        lead = await coalescer.join(b"k", 1.0)
        assert isinstance(lead, Lead)
        assert coalescer.lead(b"k") is None
        assert await coalescer.join(b"k", 0.0) is Turn.FETCH  # no time left to wait
        lead.stored()
        assert coalescer.in_flight == 0
        for key in (b"a", b"b", b"c", b"d"):
            coalescer.mark_pass(key)
        assert not coalescer.passing(b"a")
        assert coalescer.passing(b"d")
        # Another uncacheable answer renews a mark, at most once a second.
        clock.now = 10.5
        coalescer.mark_pass(b"d")  # marked at 10.0: not renewed
        clock.now = 11.5
        coalescer.mark_pass(b"c")  # renewed: until 21.5
        clock.now = 20.2
        assert not coalescer.passing(b"d")
        assert coalescer.passing(b"c")
        assert await coalescer.join(b"x", 1.0, may_lead=False) is Turn.FETCH

    asyncio.run(scenario())


# ---- stale-while-revalidate and stale-if-error -----------------------------------------


def test_stale_while_revalidate_serves_stale_and_refreshes_once() -> None:
    async def scenario() -> None:
        clock = Clock()
        gate = asyncio.Event()
        refreshes = 0
        seen: list[bytes] = []

        async def refresh(req: CacheRequest, fill: Fill) -> None:
            nonlocal refreshes
            refreshes += 1
            seen.append(fill.request_head.method)
            await gate.wait()
            assert feed(fill, response_bytes(b"v2", b"max-age=10, stale-while-revalidate=60"))

        cache = new_cache(clock, fetch=refresh)
        await fill_entry(cache, response_bytes(b"v1", b"max-age=10, stale-while-revalidate=60"))
        clock.now += 20
        heads = [request_head(method=b"HEAD")] + [request_head()] * 19
        plans = await asyncio.gather(*(cache.prepare(cache_request(cache, h)) for h in heads))
        for plan in plans:
            assert isinstance(plan, Serve)
            assert plan.label == b"STALE" and plan.entry.body == b"v1"
        await asyncio.sleep(0.01)
        assert refreshes == 1
        assert seen == [b"GET"]  # refreshed with a GET even when a HEAD found it stale
        gate.set()
        await settle(lambda: cache.coalescer.in_flight == 0)
        served = await cache.prepare(cache_request(cache))
        assert isinstance(served, Serve)
        assert served.label == b"HIT" and served.entry.body == b"v2"
        metrics = cache.metrics()
        assert metrics["stale"] == 20 and metrics["refreshes"] == 1
        await cache.close()

    asyncio.run(scenario())


def test_a_failed_refresh_keeps_the_stale_entry(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        clock = Clock()

        async def refresh(req: CacheRequest, fill: Fill) -> None:
            raise TimeoutError

        cache = new_cache(clock, fetch=refresh)
        await fill_entry(cache, response_bytes(b"v1", b"max-age=10, stale-while-revalidate=60"))
        clock.now += 20
        first = await cache.prepare(cache_request(cache))
        assert isinstance(first, Serve) and first.label == b"STALE"
        await settle(lambda: cache.coalescer.in_flight == 0)
        again = await cache.prepare(cache_request(cache))
        assert isinstance(again, Serve) and again.entry.body == b"v1"
        await settle(lambda: cache.coalescer.in_flight == 0)
        assert cache.metrics()["refreshes"] == 2

    with caplog.at_level(logging.WARNING, logger="tiers.proxy"):
        asyncio.run(scenario())
    assert "cache refresh of example.test/page failed" in caplog.text


def test_close_cancels_a_hanging_refresh() -> None:
    async def scenario() -> None:
        clock = Clock()
        started = asyncio.Event()

        async def refresh(req: CacheRequest, fill: Fill) -> None:
            started.set()
            await asyncio.Event().wait()

        cache = new_cache(clock, fetch=refresh)
        await fill_entry(cache, response_bytes(b"v1", b"max-age=10, stale-while-revalidate=60"))
        clock.now += 20
        assert isinstance(await cache.prepare(cache_request(cache)), Serve)
        await asyncio.wait_for(started.wait(), 5)
        await cache.close()
        assert cache.coalescer.in_flight == 0

    asyncio.run(scenario())


def test_without_a_fetcher_a_stale_entry_is_refreshed_in_the_foreground() -> None:
    async def scenario() -> None:
        clock = Clock()
        cache = new_cache(clock)
        await fill_entry(cache, response_bytes(b"v1", b"max-age=10, stale-while-revalidate=60"))
        clock.now += 20
        plan = await cache.prepare(cache_request(cache))
        assert isinstance(plan, Fill) and plan.leading
        plan.close()

    asyncio.run(scenario())


def test_stale_if_error_stands_in_for_a_failed_fetch_within_its_window() -> None:
    async def scenario() -> None:
        clock = Clock()
        cache = new_cache(clock)
        await fill_entry(cache, response_bytes(b"v1", b"max-age=10, stale-if-error=100"))
        clock.now += 50
        gate = asyncio.Event()
        fetches = 0

        async def failing(fill: Fill) -> None:
            nonlocal fetches
            fetches += 1
            await gate.wait()
            # A 5xx head: the proxy serves the stale entry instead of relaying it.
            assert fill.serve_stale() is not None
            raise OSError("503 from the app")

        tasks = [asyncio.create_task(client(cache, failing)) for _ in range(5)]
        await settle(lambda: fetches == 1)
        await asyncio.sleep(0.01)
        gate.set()
        bodies = await asyncio.gather(*tasks)
        # The leader and every waiter holding the entry serve it; nobody retries.
        assert fetches == 1
        assert sorted(bodies) == [b"STALE:v1"] * 4 + [b"stale:v1"]
        # Four waiters, and the leader twice (inside the fetch, then after it failed).
        assert cache.metrics()["stale"] == 6

        clock.now += 100  # past max-age + stale-if-error
        plan = await cache.prepare(cache_request(cache))
        assert isinstance(plan, Fill) and plan.stale is None
        assert plan.serve_stale() is None
        plan.close()

    asyncio.run(scenario())


def test_a_purged_entry_is_not_served_on_error() -> None:
    async def scenario() -> None:
        clock = Clock()
        cache = new_cache(clock)
        await fill_entry(cache, response_bytes(b"v1", b"max-age=10, stale-if-error=100"))
        clock.now += 50
        plan = await cache.prepare(cache_request(cache))
        assert isinstance(plan, Fill) and plan.stale is not None
        assert cache.purge(b"http://example.test/page") == 1
        assert plan.serve_stale() is None
        plan.close()

    asyncio.run(scenario())


def test_a_reload_goes_to_the_app_but_may_still_fall_back_on_error() -> None:
    async def scenario() -> None:
        cache = new_cache(Clock())
        await fill_entry(cache, response_bytes(b"v1", b"max-age=60"))
        req = cache_request(cache, request_head(headers=b"Cache-Control: no-cache\r\n"))
        plan = await cache.prepare(req)
        assert isinstance(plan, Fill) and plan.leading
        fallback = plan.serve_stale()
        assert fallback is not None and fallback.entry.body == b"v1"
        assert feed(plan, response_bytes(b"v2"))
        plan.close()
        served = await cache.prepare(cache_request(cache))
        assert isinstance(served, Serve) and served.entry.body == b"v2"

    asyncio.run(scenario())


# ---- invalidation and purge ------------------------------------------------------------


def test_a_successful_unsafe_request_invalidates_its_target() -> None:
    async def scenario() -> None:
        cache = new_cache(Clock())
        await fill_entry(cache, response_bytes(b"v1"))
        assert cache.invalidate(request_head(), 200) == 0
        assert cache.invalidate(request_head(method=b"POST"), 403) == 0
        assert cache.invalidate(request_head(method=b"POST"), 303) == 1
        assert cache.metrics()["entries"] == 0

    asyncio.run(scenario())


def test_purge_by_url_prefix() -> None:
    async def scenario() -> None:
        cache = new_cache(Clock())
        for target in (b"/a/1", b"/a/2", b"/b"):
            await fill_entry(cache, response_bytes(target), request_head(target))
        assert cache.purge(b"http://example.test/a/", prefix=True) == 2
        assert cache.purge(b"example.test/b") == 1
        assert cache.metrics()["entries"] == 0

    asyncio.run(scenario())


# ---- over real sockets ---------------------------------------------------------------


def test_coalescing_and_refresh_over_real_connections() -> None:
    """A backend on 127.0.0.1 sees one request for fifty clients, then one refresh."""

    async def scenario() -> None:
        clock = Clock()
        gate = asyncio.Event()
        requests: list[bytes] = []

        async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            requests.append(head)
            await gate.wait()
            body = b"version %d" % len(requests)
            writer.write(response_bytes(body, b"max-age=10, stale-while-revalidate=60"))
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(backend, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        async def fetch_from_backend(fill: Fill) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(upstream_request_head(fill.request_head, b"127.0.0.1", b"b"))
                parser = ResponseParser(fill.request_head.method == b"HEAD")
                capturing = False
                for _ in range(100):
                    data = await asyncio.wait_for(reader.read(65536), 5)
                    events = parser.feed(data) if data else parser.feed_eof()
                    for event in events:
                        if isinstance(event, ResponseHead):
                            capturing = fill.on_head(event)
                        elif isinstance(event, BodyData) and capturing:
                            fill.on_body(event.data)
                        elif event is END and capturing:
                            fill.on_end()
                    if parser.done:
                        return
                raise AssertionError("response never ended")
            finally:
                writer.close()
                await writer.wait_closed()

        async def refresh(req: CacheRequest, fill: Fill) -> None:
            await fetch_from_backend(fill)

        cache = new_cache(clock, fetch=refresh)

        async def one_client() -> bytes:
            req = cache_request(cache)
            plan = await cache.prepare(req)
            if isinstance(plan, Serve):
                return plan.response(req, keep_alive=True).body
            try:
                await fetch_from_backend(plan)
            finally:
                plan.close()
            hit = await cache.prepare(req)
            assert isinstance(hit, Serve)
            return hit.entry.body

        try:
            tasks = [asyncio.create_task(one_client()) for _ in range(50)]
            await settle(lambda: len(requests) == 1)
            await asyncio.sleep(0.01)
            gate.set()
            bodies = await asyncio.gather(*tasks)
            assert bodies == [b"version 1"] * 50
            assert len(requests) == 1
            assert requests[0].startswith(b"GET /page HTTP/1.1\r\nHost: example.test\r\n")

            clock.now += 20  # stale, inside stale-while-revalidate
            stale = await asyncio.gather(*(one_client() for _ in range(10)))
            assert stale == [b"version 1"] * 10
            await settle(lambda: cache.coalescer.in_flight == 0)
            assert len(requests) == 2
            assert await one_client() == b"version 2"
        finally:
            await cache.close()
            server.close()
            await server.wait_closed()

    asyncio.run(scenario())


# ---- deciding without waiting ---------------------------------------------------------


def test_prepare_nowait_decides_what_needs_no_waiting_and_leaves_the_rest_untouched() -> None:
    async def scenario() -> None:
        cache = new_cache(Clock())
        leader = cache.prepare_nowait(cache_request(cache))
        assert isinstance(leader, Fill) and leader.leading
        # A fetch of the key is in flight: only prepare() may wait for it.
        before = cache.metrics()
        assert cache.prepare_nowait(cache_request(cache)) is None
        assert cache.metrics() == before and cache.coalescer.in_flight == 1
        waiter = asyncio.ensure_future(cache.prepare(cache_request(cache)))
        await asyncio.sleep(0)
        assert feed(leader, response_bytes(b"stored"))
        leader.close()
        served = await waiter
        assert isinstance(served, Serve) and served.entry.body == b"stored"
        hit = cache.prepare_nowait(cache_request(cache))
        assert isinstance(hit, Serve) and hit.label == b"HIT"

    asyncio.run(scenario())


def test_a_passing_key_gets_a_fill_at_once_and_an_answer_without_freshness_is_not_stored(
) -> None:
    async def scenario() -> None:
        cache = new_cache(Clock())
        now = time.monotonic()
        first = cache.prepare_nowait(cache_request(cache), now)
        assert isinstance(first, Fill)
        plain = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\npage"
        assert not feed(first, plain)
        first.close()
        assert cache.coalescer.passing(cache_request(cache).rules.key)
        assert cache.prepare_nowait(cache_request(cache), now + 0.5) is PASS
        again = cache.prepare_nowait(cache_request(cache), now + 1.5)
        assert isinstance(again, Fill) and not again.leading
        assert feed(again, response_bytes(b"now fresh"))  # and it still may be stored
        again.close()
        assert not cache.coalescer.passing(cache_request(cache).rules.key)

    asyncio.run(scenario())
