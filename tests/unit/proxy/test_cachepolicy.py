"""The caching rules and the store: which requests and answers the cache takes, for how long."""

from __future__ import annotations

import email.utils

import pytest

from tiers.proxy.cachepolicy import (
    Freshness,
    RequestRules,
    cache_key,
    may_be_storable,
    not_modified,
    parse_cache_control,
    request_cacheability,
    response_storability,
    url_key,
)
from tiers.proxy.cachestore import MISS, Hit, Stale, Store
from tiers.proxy.httpdate import parse_http_date

T0 = 1_700_000_000.0
Headers = list[tuple[bytes, bytes]]


def http_date(when: float) -> bytes:
    return email.utils.formatdate(when, usegmt=True).encode()


def storable(
    headers: Headers,
    status: int = 200,
    *,
    request_headers: Headers | None = None,
    request_time: float = T0,
    response_time: float = T0,
    swr: float = 0.0,
    sie: float = 0.0,
) -> Freshness | None:
    return response_storability(
        status,
        headers,
        request_headers or [],
        request_time=request_time,
        response_time=response_time,
        stale_while_revalidate=swr,
        stale_if_error=sie,
    )


def rules_for(
    target: bytes = b"/page",
    headers: Headers | None = None,
    *,
    method: bytes = b"GET",
    host: bytes = b"example.test",
) -> RequestRules:
    rules = request_cacheability(method, host, target, headers or [])
    assert rules is not None
    return rules


# ---- Cache-Control and dates -----------------------------------------------------


def test_cache_control_directives_are_parsed_across_fields() -> None:
    directives = parse_cache_control(
        [b'Max-Age=60, no-cache="Set-Cookie, X-A", public', b"s-maxage = 5,, private"]
    )
    assert directives == {
        b"max-age": b"60",
        b"no-cache": b"Set-Cookie, X-A",
        b"public": None,
        b"s-maxage": b"5",
        b"private": None,
    }


def test_the_first_of_a_repeated_directive_wins() -> None:
    assert parse_cache_control([b"max-age=10", b"max-age=99"])[b"max-age"] == b"10"


@pytest.mark.parametrize(
    "text",
    [
        b"Sun, 06 Nov 1994 08:49:37 GMT",
        b"Sunday, 06-Nov-94 08:49:37 GMT",
        b"Sun Nov  6 08:49:37 1994",
    ],
)
def test_the_three_http_date_formats_parse(text: bytes) -> None:
    assert parse_http_date(text) == 784111777.0


@pytest.mark.parametrize("text", [b"0", b"-1", b"tomorrow", b""])
def test_invalid_dates_are_none(text: bytes) -> None:
    assert parse_http_date(text) is None


# ---- keys ------------------------------------------------------------------------


def test_key_has_host_and_full_target_but_not_the_method() -> None:
    get = rules_for(b"/a?x=1", method=b"GET", host=b"Example.TEST:80")
    head = rules_for(b"/a?x=1", method=b"HEAD", host=b"example.test")
    assert get.key == head.key == b"example.test/a?x=1"
    assert head.head_only and not get.head_only
    assert rules_for(b"/a?x=2").key != get.key
    assert rules_for(b"/a?x=1", host=b"other.test").key != get.key
    assert rules_for(b"/a?x=1", host=b"example.test:8080").key != get.key


@pytest.mark.parametrize(
    ("url", "key"),
    [
        (b"http://Example.test/a?b", b"example.test/a?b"),
        (b"HTTPS://example.test:80/a", b"example.test/a"),
        (b"example.test/a/", b"example.test/a/"),
        (b"example.test", b"example.test"),
    ],
)
def test_operator_urls_map_to_keys(url: bytes, key: bytes) -> None:
    assert url_key(url) == key
    assert cache_key(b"EXAMPLE.test", b"/x") == b"example.test/x"


def test_cache_keys_of_hosts_met_again_are_the_same() -> None:
    for _ in range(2):  # the second time from the memo of hosts
        assert cache_key(b"Example.TEST:80", b"/x?y") == b"example.test/x?y"
        assert cache_key(b"example.test:8080", b"/x") == b"example.test:8080/x"
        assert cache_key(None, b"/x") == b"/x"


# ---- requests --------------------------------------------------------------------

REQUEST_CASES: list[tuple[str, bytes, Headers, bool, tuple[bool, float | None, float] | None]] = [
    # id, method, headers, private_ok, None (bypass) or (reload, max_age, min_fresh)
    ("plain get", b"GET", [], False, (False, None, 0.0)),
    ("head", b"HEAD", [], False, (False, None, 0.0)),
    ("post", b"POST", [], False, None),
    ("put", b"PUT", [], False, None),
    ("options", b"OPTIONS", [], False, None),
    ("cookie", b"GET", [(b"Cookie", b"s=1")], False, None),
    ("authorization", b"GET", [(b"authorization", b"Bearer t")], False, None),
    ("cookie, private route", b"GET", [(b"Cookie", b"s=1")], True, (False, None, 0.0)),
    ("auth, private route", b"GET", [(b"Authorization", b"Basic x")], True, (False, None, 0.0)),
    ("no-store", b"GET", [(b"Cache-Control", b"no-store")], False, None),
    ("no-cache", b"GET", [(b"Cache-Control", b"no-cache")], False, (True, None, 0.0)),
    ("max-age=0", b"GET", [(b"Cache-Control", b"max-age=0")], False, (True, None, 0.0)),
    ("max-age=30", b"GET", [(b"cache-control", b"Max-Age=30")], False, (False, 30.0, 0.0)),
    ("max-age invalid", b"GET", [(b"Cache-Control", b"max-age=x")], False, (False, None, 0.0)),
    ("min-fresh", b"GET", [(b"Cache-Control", b"min-fresh=10")], False, (False, None, 10.0)),
    ("max-stale ignored", b"GET", [(b"Cache-Control", b"max-stale=99")], False, (False, None, 0.0)),
    ("pragma", b"GET", [(b"Pragma", b"no-cache")], False, (True, None, 0.0)),
    (
        "pragma under cache-control",
        b"GET",
        [(b"Pragma", b"no-cache"), (b"Cache-Control", b"max-age=10")],
        False,
        (False, 10.0, 0.0),
    ),
    ("range", b"GET", [(b"Range", b"bytes=0-9")], False, None),
    ("if-range", b"GET", [(b"If-Range", b'"x"')], False, None),
    ("if-match", b"GET", [(b"If-Match", b'"x"')], False, None),
    ("if-unmodified-since", b"GET", [(b"If-Unmodified-Since", http_date(T0))], False, None),
    ("if-none-match", b"GET", [(b"If-None-Match", b'"x"')], False, (False, None, 0.0)),
    ("other fields", b"GET", [(b"Accept", b"*/*"), (b"X-Cookie", b"y")], False, (False, None, 0.0)),
]


@pytest.mark.parametrize(
    ("method", "headers", "private_ok", "expected"),
    [case[1:] for case in REQUEST_CASES],
    ids=[case[0] for case in REQUEST_CASES],
)
def test_request_cacheability(
    method: bytes,
    headers: Headers,
    private_ok: bool,
    expected: tuple[bool, float | None, float] | None,
) -> None:
    rules = request_cacheability(method, b"h.test", b"/", headers, private_ok=private_ok)
    if expected is None:
        assert rules is None
        return
    assert rules is not None
    assert (rules.reload, rules.max_age, rules.min_fresh) == expected


def test_request_validators_are_kept_for_answering_from_the_cache() -> None:
    rules = rules_for(
        headers=[
            (b"If-None-Match", b'"a"'),
            (b"if-none-match", b'W/"b"'),
            (b"If-Modified-Since", http_date(T0)),
        ]
    )
    assert rules.if_none_match == b'"a", W/"b"'
    assert rules.if_modified_since == http_date(T0)


# ---- responses -------------------------------------------------------------------

DATE = (b"Date", http_date(T0))
RESPONSE_CASES: list[tuple[str, int, Headers, tuple[float, float, float] | None]] = [
    # id, status, headers, None (not stored) or (lifetime, swr, sie) with defaults swr=5, sie=100
    ("no freshness at all", 200, [DATE], None),
    ("public only", 200, [(b"Cache-Control", b"public")], None),
    ("last-modified only (no heuristics)", 200, [(b"Last-Modified", http_date(T0 - 9e5))], None),
    ("max-age", 200, [(b"Cache-Control", b"max-age=60")], (60, 5, 100)),
    ("s-maxage over max-age", 200, [(b"Cache-Control", b"max-age=60, s-maxage=30")], (30, 0, 0)),
    (
        "s-maxage keeps explicit windows",
        200,
        [(b"Cache-Control", b"s-maxage=30, stale-while-revalidate=7, stale-if-error=9")],
        (30, 7, 9),
    ),
    (
        "max-age over expires",
        200,
        [DATE, (b"Expires", http_date(T0 + 9999)), (b"Cache-Control", b"max-age=60")],
        (60, 5, 100),
    ),
    ("expires minus date", 200, [DATE, (b"Expires", http_date(T0 + 120))], (120, 5, 100)),
    ("expires without date", 200, [(b"Expires", http_date(T0 + 50))], (50, 5, 100)),
    ("expires in the past", 200, [DATE, (b"Expires", http_date(T0 - 10))], None),
    ("invalid expires", 200, [DATE, (b"Expires", b"0")], None),
    ("max-age=0", 200, [(b"Cache-Control", b"max-age=0")], None),
    ("invalid max-age", 200, [(b"Cache-Control", b"max-age=soon")], None),
    ("no-store", 200, [(b"Cache-Control", b"max-age=60, no-store")], None),
    ("private", 200, [(b"Cache-Control", b"private, max-age=60")], None),
    ("private with fields", 200, [(b"Cache-Control", b'max-age=60, private="X-A"')], None),
    ("no-cache", 200, [(b"Cache-Control", b"no-cache, max-age=60")], None),
    ("no-cache with fields", 200, [(b"Cache-Control", b'no-cache="Set-Cookie", max-age=60')], None),
    (
        "restrictive in a second line",
        200,
        [(b"cache-control", b"max-age=60"), (b"CACHE-CONTROL", b"Private")],
        None,
    ),
    (
        "quoted comma is not a split",
        200,
        [(b"Cache-Control", b'ext="a, private", max-age=60')],
        (60, 5, 100),
    ),
    ("set-cookie", 200, [(b"Cache-Control", b"max-age=60"), (b"Set-Cookie", b"s=1")], None),
    ("vary star", 200, [(b"Cache-Control", b"max-age=60"), (b"Vary", b"Accept, *")], None),
    (
        "explicit windows",
        200,
        [(b"Cache-Control", b"max-age=60, stale-while-revalidate=10, stale-if-error=20")],
        (60, 10, 20),
    ),
    (
        "invalid window falls back",
        200,
        [(b"Cache-Control", b"max-age=60, stale-if-error=x")],
        (60, 5, 100),
    ),
    (
        "must-revalidate",
        200,
        [(b"Cache-Control", b"max-age=60, must-revalidate, stale-if-error=20")],
        (60, 0, 0),
    ),
    ("proxy-revalidate", 200, [(b"Cache-Control", b"max-age=60, proxy-revalidate")], (60, 0, 0)),
    (
        "stale on arrival, kept by its own swr",
        200,
        [(b"Cache-Control", b"max-age=0, stale-while-revalidate=30")],
        (0, 30, 100),
    ),
    (
        "stale on arrival, defaults do not keep it",
        200,
        [(b"Cache-Control", b"max-age=10"), (b"Age", b"10")],
        None,
    ),
    ("203", 203, [(b"Cache-Control", b"max-age=60")], (60, 5, 100)),
    ("204", 204, [(b"Cache-Control", b"max-age=60")], (60, 5, 100)),
    ("300", 300, [(b"Cache-Control", b"max-age=60")], (60, 5, 100)),
    ("301", 301, [(b"Cache-Control", b"max-age=60")], (60, 5, 100)),
    ("404", 404, [(b"Cache-Control", b"max-age=60")], (60, 5, 100)),
    ("410", 410, [(b"Cache-Control", b"max-age=60")], (60, 5, 100)),
    ("302", 302, [(b"Cache-Control", b"max-age=60")], None),
    ("206", 206, [(b"Cache-Control", b"max-age=60")], None),
    ("304", 304, [(b"Cache-Control", b"max-age=60")], None),
    ("500", 500, [(b"Cache-Control", b"max-age=60")], None),
    ("503", 503, [(b"Cache-Control", b"max-age=60")], None),
]


@pytest.mark.parametrize(
    ("status", "headers", "expected"),
    [case[1:] for case in RESPONSE_CASES],
    ids=[case[0] for case in RESPONSE_CASES],
)
def test_response_storability(
    status: int, headers: Headers, expected: tuple[float, float, float] | None
) -> None:
    freshness = storable(headers, status, swr=5.0, sie=100.0)
    if expected is None:
        assert freshness is None
        return
    assert freshness is not None
    assert (
        freshness.lifetime,
        freshness.stale_while_revalidate,
        freshness.stale_if_error,
    ) == expected


def test_age_counts_the_age_field_the_date_and_the_round_trip() -> None:
    cc = (b"Cache-Control", b"max-age=600")
    with_age = storable([cc, (b"Age", b"30")], request_time=T0 - 2, response_time=T0)
    assert with_age is not None and with_age.initial_age == 32
    old_date = storable([cc, (b"Date", http_date(T0 - 100))], response_time=T0)
    assert old_date is not None and old_date.initial_age == 100
    # A Date in the future (clock skew) does not make the answer younger than zero.
    future = storable([cc, (b"Date", http_date(T0 + 100))])
    assert future is not None and future.initial_age == 0
    assert future.age(T0 + 50) == 50
    assert future.age(T0 - 50) == 0


def test_vary_records_the_request_values() -> None:
    freshness = storable(
        [
            (b"Cache-Control", b"max-age=60"),
            (b"Vary", b"Accept-Encoding, accept-language"),
            (b"vary", b"X-A"),
        ],
        request_headers=[
            (b"Accept-Encoding", b"gzip"),
            (b"Accept-Language", b"ja"),
            (b"accept-language", b"en"),
        ],
    )
    assert freshness is not None
    assert freshness.vary == (
        (b"accept-encoding", b"gzip"),
        (b"accept-language", b"ja, en"),
        (b"x-a", None),
    )


# ---- validators ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("if_none_match", "etag", "expected"),
    [
        (b'"v1"', b'"v1"', True),
        (b'W/"v1"', b'"v1"', True),
        (b'"v1"', b'W/"v1"', True),
        (b'"v0", "v1"', b'"v1"', True),
        (b'"v2"', b'"v1"', False),
        (b"*", b'"v1"', True),
        (b'"v1"', None, False),
    ],
)
def test_if_none_match_uses_weak_comparison(
    if_none_match: bytes, etag: bytes | None, expected: bool
) -> None:
    rules = rules_for(headers=[(b"If-None-Match", if_none_match)])
    assert not_modified(rules, etag, None) is expected


def test_if_modified_since_and_precedence() -> None:
    since = rules_for(headers=[(b"If-Modified-Since", http_date(T0))])
    assert not_modified(since, None, T0 - 10)
    assert not_modified(since, None, T0)
    assert not not_modified(since, None, T0 + 1)
    assert not not_modified(since, None, None)
    both = rules_for(headers=[(b"If-Modified-Since", http_date(T0)), (b"If-None-Match", b'"x"')])
    # If-None-Match decides alone when present.
    assert not not_modified(both, b'"y"', T0 - 10)


# ---- the store -------------------------------------------------------------------


def fresh(
    lifetime: float = 60.0,
    *,
    at: float = T0,
    swr: float = 0.0,
    sie: float = 0.0,
    vary: tuple[tuple[bytes, bytes | None], ...] = (),
) -> Freshness:
    return Freshness(lifetime, 0.0, at, swr, sie, vary)


def put(
    store: Store,
    rules: RequestRules,
    body: bytes = b"body",
    freshness: Freshness | None = None,
    headers: Headers | None = None,
) -> bool:
    entry = store.store(
        rules,
        freshness or fresh(),
        status=200,
        reason=b"OK",
        headers=headers if headers is not None else [(b"Content-Type", b"text/plain")],
        body=body,
    )
    return entry is not None


def body_of(store: Store, rules: RequestRules, now: float = T0) -> bytes | None:
    found = store.lookup(rules, now)
    return found.entry.body if isinstance(found, Hit) else None


def test_store_then_hit_with_age_then_head_from_the_get_entry() -> None:
    store = Store(1 << 20, 1 << 16)
    get = rules_for(b"/p")
    assert put(store, get, b"hello")
    found = store.lookup(get, T0 + 7)
    assert isinstance(found, Hit)
    assert found.entry.body == b"hello" and found.age == 7
    head = rules_for(b"/p", method=b"HEAD")
    assert isinstance(store.lookup(head, T0 + 8), Hit)
    assert store.lookup(rules_for(b"/other"), T0) is MISS


def test_stored_fields_lose_hop_by_hop_framing_and_age() -> None:
    store = Store(1 << 20, 1 << 16)
    rules = rules_for()
    entry = store.store(
        rules,
        fresh(),
        status=200,
        reason=b"OK",
        headers=[
            (b"Connection", b"X-Private"),
            (b"X-Private", b"p"),
            (b"Keep-Alive", b"timeout=5"),
            (b"Transfer-Encoding", b"chunked"),
            (b"Content-Length", b"4"),
            (b"Age", b"3"),
            (b"ETag", b'"e"'),
            (b"Content-Type", b"text/html"),
        ],
        body=b"body",
        connection=frozenset({b"x-private"}),
    )
    assert entry is not None
    assert entry.fields == b'ETag: "e"\r\nContent-Type: text/html\r\n'
    assert entry.fields_304 == b'ETag: "e"\r\n'
    assert entry.etag == b'"e"'


def test_lru_evicts_the_least_recently_used_within_the_budget() -> None:
    one = Store(1 << 20, 1 << 20)
    put(one, rules_for(b"/probe"), b"x" * 1000)
    size = one.bytes  # every key below has the same length, so every entry this size
    store = Store(3 * size, size)
    a, b, c, d = (rules_for(p) for p in (b"/aaaaa", b"/bbbbb", b"/ccccc", b"/ddddd"))
    for rules in (a, b, c):
        assert put(store, rules, b"x" * 1000)
    assert store.entries == 3 and store.bytes == 3 * size
    body_of(store, a)  # a is now the most recently used
    assert put(store, d, b"x" * 1000)
    assert store.entries == 3 and store.bytes == 3 * size
    assert store.stats.evictions == 1
    assert body_of(store, b) is None
    assert body_of(store, a) is not None
    assert body_of(store, c) is not None
    assert body_of(store, d) is not None


def test_objects_over_max_object_are_refused() -> None:
    store = Store(1 << 20, 2000)
    assert not put(store, rules_for(), b"x" * 2001)
    assert store.entries == 0 and store.bytes == 0
    assert put(store, rules_for(), b"x" * 1500)
    # max_object never exceeds the whole budget.
    assert Store(1000, 5000).max_object == 1000


def test_vary_keeps_one_variant_per_request_value() -> None:
    store = Store(1 << 20, 1 << 16)
    gzip = rules_for(headers=[(b"Accept-Encoding", b"gzip")])
    plain = rules_for(headers=[])
    vary_gzip = fresh(vary=((b"accept-encoding", b"gzip"),))
    vary_plain = fresh(vary=((b"accept-encoding", None),))
    put(store, gzip, b"zipped", vary_gzip)
    put(store, plain, b"plain", vary_plain)
    assert store.entries == 2
    assert body_of(store, gzip) == b"zipped"
    assert body_of(store, plain) == b"plain"
    assert body_of(store, rules_for(headers=[(b"accept-encoding", b"br")])) is None
    # A new answer replaces the variant the same request selects, and only it.
    put(store, gzip, b"zipped2", vary_gzip)
    assert store.entries == 2
    assert body_of(store, gzip) == b"zipped2"
    assert body_of(store, plain) == b"plain"


def test_a_url_keeps_at_most_sixteen_variants() -> None:
    store = Store(1 << 20, 1 << 16)
    for n in range(20):
        lang = b"l%d" % n
        put(
            store,
            rules_for(headers=[(b"Accept-Language", lang)]),
            lang,
            fresh(vary=((b"accept-language", lang),)),
        )
    assert store.entries == 16
    assert body_of(store, rules_for(headers=[(b"Accept-Language", b"l3")])) is None
    assert body_of(store, rules_for(headers=[(b"Accept-Language", b"l19")])) == b"l19"


def test_purge_by_key_and_by_prefix() -> None:
    store = Store(1 << 20, 1 << 16)
    for target in (b"/a?x=1", b"/ab", b"/b"):
        put(store, rules_for(target))
    put(store, rules_for(b"/a"), b"v", fresh(vary=((b"x-v", None),)))
    put(store, rules_for(b"/a", [(b"X-V", b"1")]), b"v", fresh(vary=((b"x-v", b"1"),)))
    assert store.purge(b"example.test/a") == 2  # both variants of /a
    assert store.purge(b"example.test/a", prefix=True) == 2  # /a?x=1 and /ab
    assert store.purge(b"example.test/nothing") == 0
    assert store.entries == 1
    assert body_of(store, rules_for(b"/b")) == b"body"
    assert store.purge(b"", prefix=True) == 1
    assert store.bytes == 0


def test_an_entry_past_every_window_is_dropped() -> None:
    store = Store(1 << 20, 1 << 16)
    rules = rules_for()
    put(store, rules, freshness=fresh(10, swr=5, sie=20))
    assert isinstance(store.lookup(rules, T0 + 9), Hit)
    assert store.lookup(rules, T0 + 30) is MISS
    assert store.entries == 0 and store.bytes == 0


def test_stale_while_revalidate_then_stale_if_error_windows() -> None:
    store = Store(1 << 20, 1 << 16)
    rules = rules_for()
    put(store, rules, freshness=fresh(10, swr=5, sie=20))
    in_swr = store.lookup(rules, T0 + 12)
    assert isinstance(in_swr, Stale)
    assert in_swr.background and in_swr.on_error
    past_swr = store.lookup(rules, T0 + 16)
    assert isinstance(past_swr, Stale)
    assert not past_swr.background and past_swr.on_error
    # Without any window a stale entry is useless.
    other = rules_for(b"/other")
    put(store, other, freshness=fresh(10))
    assert store.lookup(other, T0 + 11) is MISS


def test_client_limits_and_reload_turn_hits_into_stale() -> None:
    store = Store(1 << 20, 1 << 16)
    put(store, rules_for(), freshness=fresh(60, swr=30, sie=30))
    reload = rules_for(headers=[(b"Cache-Control", b"no-cache")])
    found = store.lookup(reload, T0 + 1)
    assert isinstance(found, Stale) and not found.background and found.on_error
    # ``reload`` given to lookup overrides the request's own.
    assert isinstance(store.lookup(reload, T0 + 1, reload=False), Hit)
    young = rules_for(headers=[(b"Cache-Control", b"max-age=20")])
    assert isinstance(store.lookup(young, T0 + 20), Hit)
    too_old = store.lookup(young, T0 + 21)
    assert isinstance(too_old, Stale) and not too_old.background
    lasting = rules_for(headers=[(b"Cache-Control", b"min-fresh=30")])
    assert isinstance(store.lookup(lasting, T0 + 30), Hit)
    assert isinstance(store.lookup(lasting, T0 + 31), Stale)
    # A client limit also rules out serving inside stale-while-revalidate.
    limited = store.lookup(young, T0 + 70)
    assert isinstance(limited, Stale) and not limited.background


def test_may_be_storable_rules_out_answers_without_explicit_freshness() -> None:
    plain = [(b"Content-Type", b"text/html"), (b"Content-Length", b"3")]
    names = [b"content-type", b"content-length"]
    assert not may_be_storable(plain, names)
    assert may_be_storable([*plain, (b"Cache-Control", b"no-store")],
                           [*names, b"cache-control"])
    assert may_be_storable([*plain, (b"EXPIRES", b"0")], [*names, b"expires"])
    # Names that do not match the fields are not trusted.
    assert may_be_storable(plain, [])


@pytest.mark.parametrize(
    "headers",
    [
        [(b"Host", b"a.test")],
        [(b"Host", b"a.test"), (b"Accept", b"*/*"), (b"User-Agent", b"x")],
        [(b"Host", b"a.test"), (b"Cookie", b"s=1")],
        [(b"Host", b"a.test"), (b"Cache-Control", b"max-age=5"), (b"If-None-Match", b'"e"')],
        [(b"Host", b"a.test"), (b"Range", b"bytes=0-1")],
    ],
)
def test_request_rules_are_the_same_with_the_parsers_lowered_names(
    headers: list[tuple[bytes, bytes]],
) -> None:
    names = [name.lower() for name, _ in headers]
    plain = request_cacheability(b"GET", b"a.test", b"/p", headers)
    named = request_cacheability(b"GET", b"a.test", b"/p", headers, names=names)
    if plain is None:
        assert named is None
        return
    assert named is not None
    fields = ("key", "head_only", "reload", "max_age", "min_fresh", "if_none_match",
              "if_modified_since")
    assert [getattr(named, f) for f in fields] == [getattr(plain, f) for f in fields]
    assert named.headers is headers
