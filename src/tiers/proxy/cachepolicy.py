"""The sans-I/O core of the page cache: the HTTP caching rules (RFC 9111).

Nothing here reads a clock or touches a socket: times are passed in as seconds
since the epoch (they are compared with Date and Expires, which are wall-clock
values). ``tiers.proxy.cachestore`` keeps what these rules admit, and
``tiers.proxy.cache`` drives both from asyncio (coalescing, refreshes).

    request_cacheability   may the cache answer this request, under which key
    response_storability   may this answer be stored, and how long is it good
    vary_matches           does a request select a stored variant (Vary)
    not_modified           do a request's validators let a 304 answer it

The cache is a shared cache that stores only what the origin explicitly
allows, and refuses what it cannot prove safe:

Requests (``request_cacheability``)
    Only GET and HEAD without a body. A request with Cookie or Authorization
    bypasses the cache unless its route allows private requests. A request
    with Range, If-Match, If-Unmodified-Since or If-Range bypasses it too (the
    cache does not build partial or precondition-failed answers). Request
    ``no-store`` bypasses the cache. ``no-cache``, ``max-age=0`` and (with no
    Cache-Control at all) ``Pragma: no-cache`` ask for an end-to-end reload:
    the cache goes to the origin and stores the answer. ``max-age=N`` and
    ``min-fresh=N`` narrow which stored answers are good enough.
    ``max-stale`` and ``only-if-cached`` are ignored.

Responses (``response_storability``)
    Stored only with status 200, 203, 204, 300, 301, 404 or 410 and explicit
    freshness (``s-maxage`` over ``max-age`` over ``Expires`` minus ``Date``):
    no heuristic freshness. Never stored: ``no-store``, ``private`` (with or
    without field names), ``no-cache`` (with or without field names: the
    cache does not revalidate with conditional requests, so an answer that
    must be revalidated before every use is not worth keeping), a Set-Cookie
    field, ``Vary: *``. An answer that is already stale on arrival is stored
    only if its own ``stale-while-revalidate``/``stale-if-error`` still
    covers it.

Stale windows
    ``stale-while-revalidate=N`` and ``stale-if-error=N`` in the response win;
    without them the configured defaults apply, except after ``s-maxage``
    (which implies proxy-revalidate). ``must-revalidate`` and
    ``proxy-revalidate`` forbid every stale use, explicit or default.

Errors: none are raised; malformed values count as the most restrictive
reading (an invalid ``max-age`` means already stale, an invalid ``Expires``
means expired).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from tiers.proxy.http1 import remember
from tiers.proxy.httpdate import parse_http_date

Headers = Sequence[tuple[bytes, bytes]]

# Statuses a shared cache may store when the origin gives explicit freshness.
CACHEABLE_STATUSES: Final = frozenset({200, 203, 204, 300, 301, 404, 410})
# RFC 9111 1.2.2: delta-seconds beyond what can be represented count as 2^31.
_MAX_DELTA: Final = 2**31

_DIRECTIVE: Final = re.compile(
    rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+)[ \t]*(?:=[ \t]*(?:\"((?:[^\"\\]|\\.)*)\"|([^ \t,\"]*)))?"
)
_QUOTED_PAIR: Final = re.compile(rb"\\(.)")
_ENTITY_TAG: Final = re.compile(rb'(?:W/)?"([^"]*)"')

# What a request header field means to the cache (see request_cacheability).
_PRIVATE: Final = 1
_CACHE_CONTROL: Final = 2
_PRAGMA: Final = 3
_BYPASS: Final = 4
_IF_NONE_MATCH: Final = 5
_IF_MODIFIED_SINCE: Final = 6
_REQUEST_FIELDS: Final = {
    b"cookie": _PRIVATE,
    b"authorization": _PRIVATE,
    b"cache-control": _CACHE_CONTROL,
    b"pragma": _PRAGMA,
    b"range": _BYPASS,
    b"if-range": _BYPASS,
    b"if-match": _BYPASS,
    b"if-unmodified-since": _BYPASS,
    b"if-none-match": _IF_NONE_MATCH,
    b"if-modified-since": _IF_MODIFIED_SINCE,
}
_REQUEST_FIELD_NAMES: Final = frozenset(_REQUEST_FIELDS)
_CACHEABLE_METHODS: Final = frozenset({b"GET", b"HEAD"})


def parse_cache_control(values: Iterable[bytes]) -> dict[bytes, bytes | None]:
    """The directives of one or more Cache-Control field values.

    Names are lower-cased; a directive without ``=`` maps to None, a quoted
    value is unquoted. When a directive repeats, its first value is kept.
    """
    directives: dict[bytes, bytes | None] = {}
    for value in values:
        for match in _DIRECTIVE.finditer(value):
            name = match.group(1).lower()
            if name in directives:
                continue
            quoted = match.group(2)
            if quoted is not None:
                directives[name] = _QUOTED_PAIR.sub(rb"\1", quoted)
            else:
                directives[name] = match.group(3)
    return directives


def delta_seconds(value: bytes | None) -> int | None:
    """A delta-seconds value (RFC 9111 1.2.2), or None when missing or invalid."""
    if value is None or not value.isdigit():
        return None
    return min(int(value), _MAX_DELTA)


# The Date field of consecutive answers repeats within a second: one parse serves them.
_last_date: list[tuple[bytes, float | None]] = [(b"", None)]


def _parse_date(value: bytes) -> float | None:
    last, parsed = _last_date[0]
    if value != last:
        parsed = parse_http_date(value)
        _last_date[0] = (value, parsed)
    return parsed


def header_value(headers: Headers, lname: bytes) -> bytes | None:
    """The value of field ``lname`` (lower-case), repeated lines joined by ", "; None if absent."""
    found: bytes | None = None
    for name, value in headers:
        if len(name) == len(lname) and name.lower() == lname:
            stripped = value.strip(b" \t")
            found = stripped if found is None else found + b", " + stripped
    return found


def cache_key(host: bytes | None, target: bytes) -> bytes:
    """The key of a URL in the cache: lower-cased host (default port dropped) and target.

    ``target`` is the origin-form target (path and query). The key does not
    depend on the method, so a HEAD is answered from what a GET stored.
    """
    if host is None:
        return target
    key_host = _key_hosts.get(host)
    if key_host is None:
        key_host = host.lower()
        if key_host.endswith(b":80"):
            key_host = key_host[:-3]
        remember(_key_hosts, host, key_host)
    return key_host + target


# Host as sent -> host as keyed; a site is served under few names.
_key_hosts: Final[dict[bytes, bytes]] = {}


def url_key(url: bytes) -> bytes:
    """The cache key (or key prefix) for a URL written by an operator.

    Accepts ``http://host/path?query``, ``https://...`` and ``host/path``.
    """
    lowered = url[:8].lower()
    if lowered.startswith(b"http://"):
        url = url[7:]
    elif lowered.startswith(b"https://"):
        url = url[8:]
    slash = url.find(b"/")
    if slash == -1:
        return cache_key(url, b"")
    return cache_key(url[:slash], url[slash:])


class RequestRules:
    """What the cache needs to know of one cacheable request.

    ``reload``: the client asked for an end-to-end reload (no stored answer
    may be served without going to the origin first). ``max_age`` and
    ``min_fresh``: the client's own limits on a stored answer's age and
    remaining freshness. ``headers`` are the request's fields (for Vary).
    The optional fields start as the class attributes below and are set only
    when the request says something (one object is made per request).
    """

    reload = False
    max_age: float | None = None
    min_fresh = 0.0
    if_none_match: bytes | None = None
    if_modified_since: bytes | None = None

    def __init__(self, key: bytes, head_only: bool, headers: Headers) -> None:
        self.key = key
        self.head_only = head_only
        self.headers = headers


def request_cacheability(
    method: bytes,
    host: bytes | None,
    target: bytes,
    headers: Headers,
    *,
    private_ok: bool = False,
    names: Sequence[bytes] = (),
) -> RequestRules | None:
    """How the cache may serve a request, or None when it must bypass the cache.

    ``target`` is origin-form (path and query); ``private_ok`` is the route's
    ``cache_private_requests``; ``names`` may give the lower-cased names of
    ``headers`` (as the parser does), which spares looking at each field of
    a request that has none the cache cares about. The caller has already
    checked that the request has no body and that its route caches at all.
    """
    if method not in _CACHEABLE_METHODS:
        return None
    if len(names) == len(headers) and _REQUEST_FIELD_NAMES.isdisjoint(names):
        return RequestRules(cache_key(host, target), method == b"HEAD", headers)
    cache_control: list[bytes] | None = None
    pragma_no_cache = False
    if_none_match: bytes | None = None
    if_modified_since: bytes | None = None
    fields = _REQUEST_FIELDS
    for name, value in headers:
        meaning = fields.get(name.lower())
        if meaning is None:
            continue
        if meaning == _PRIVATE:
            if not private_ok:
                return None
        elif meaning == _CACHE_CONTROL:
            if cache_control is None:
                cache_control = [value]
            else:
                cache_control.append(value)
        elif meaning == _PRAGMA:
            pragma_no_cache = pragma_no_cache or b"no-cache" in value.lower()
        elif meaning == _BYPASS:
            return None
        elif meaning == _IF_NONE_MATCH:
            if_none_match = value if if_none_match is None else if_none_match + b", " + value
        else:
            if_modified_since = value
    rules = RequestRules(cache_key(host, target), method == b"HEAD", headers)
    if if_none_match is not None:
        rules.if_none_match = if_none_match
    if if_modified_since is not None:
        rules.if_modified_since = if_modified_since
    if cache_control is not None:
        directives = parse_cache_control(cache_control)
        if b"no-store" in directives:
            return None
        if b"no-cache" in directives:
            rules.reload = True
        elif b"max-age" in directives:
            # An invalid value is ignored: the request then asks nothing special.
            seconds = delta_seconds(directives[b"max-age"])
            if seconds == 0:
                rules.reload = True
            elif seconds is not None:
                rules.max_age = float(seconds)
        min_fresh = delta_seconds(directives.get(b"min-fresh"))
        if min_fresh is not None:
            rules.min_fresh = float(min_fresh)
    elif pragma_no_cache:
        # RFC 9111 5.4: Pragma counts only when Cache-Control is absent.
        rules.reload = True
    return rules


@dataclass(frozen=True, slots=True)
class Freshness:
    """How long a stored response may be used, per RFC 9111 4.2.

    ``initial_age`` is the corrected initial age at ``response_time``;
    ``vary`` pairs each lower-cased field name the response varies on with
    the request's value of it (None when the request had none).
    """

    lifetime: float
    initial_age: float
    response_time: float
    stale_while_revalidate: float
    stale_if_error: float
    vary: tuple[tuple[bytes, bytes | None], ...] = ()

    def age(self, now: float) -> float:
        """The response's current age at ``now``."""
        resident = now - self.response_time
        return self.initial_age + (resident if resident > 0 else 0.0)

    @property
    def usable_for(self) -> float:
        """Age beyond which the response is of no use at all."""
        return self.lifetime + max(self.stale_while_revalidate, self.stale_if_error)


def response_storability(
    status: int,
    headers: Headers,
    request_headers: Headers,
    *,
    request_time: float,
    response_time: float,
    stale_while_revalidate: float = 0.0,
    stale_if_error: float = 0.0,
) -> Freshness | None:
    """The freshness of a response the cache may store, or None when it must not.

    ``request_time`` is when the request went to the origin and
    ``response_time`` when the response head came back; the two stale
    windows are the configured defaults.
    """
    if status not in CACHEABLE_STATUSES:
        return None
    cache_control: list[bytes] = []
    vary_values: list[bytes] = []
    expires: bytes | None = None
    date: bytes | None = None
    age: bytes | None = None
    for name, value in headers:
        lname = name.lower()
        if lname == b"cache-control":
            cache_control.append(value)
        elif lname == b"set-cookie":
            return None
        elif lname == b"expires":
            expires = value if expires is None else expires
        elif lname == b"date":
            date = value if date is None else date
        elif lname == b"age":
            age = value if age is None else age
        elif lname == b"vary":
            vary_values.append(value)
    if not cache_control and expires is None:
        return None  # no explicit freshness, and no heuristic freshness here
    directives = parse_cache_control(cache_control)
    if b"no-store" in directives or b"private" in directives or b"no-cache" in directives:
        return None
    shared_max_age = b"s-maxage" in directives
    if not shared_max_age and b"max-age" not in directives and expires is None:
        return None
    # Dates are parsed only for an answer that may be stored.
    date_value = _parse_date(date) if date is not None else None
    if date_value is None:
        date_value = response_time
    if shared_max_age:
        lifetime = float(delta_seconds(directives[b"s-maxage"]) or 0)
    elif b"max-age" in directives:
        lifetime = float(delta_seconds(directives[b"max-age"]) or 0)
    else:
        assert expires is not None
        expires_value = parse_http_date(expires)
        lifetime = 0.0 if expires_value is None else max(0.0, expires_value - date_value)

    apparent_age = max(0.0, response_time - date_value)
    response_delay = max(0.0, response_time - request_time)
    initial_age = max(apparent_age, float(delta_seconds(age) or 0) + response_delay)

    explicit_swr = delta_seconds(directives.get(b"stale-while-revalidate"))
    explicit_sie = delta_seconds(directives.get(b"stale-if-error"))
    if b"must-revalidate" in directives or b"proxy-revalidate" in directives:
        swr = sie = explicit = 0.0
    else:
        # s-maxage implies proxy-revalidate (RFC 9111 5.2.2.10): no default windows.
        swr = _window(explicit_swr, 0.0 if shared_max_age else stale_while_revalidate)
        sie = _window(explicit_sie, 0.0 if shared_max_age else stale_if_error)
        explicit = float(max(explicit_swr or 0, explicit_sie or 0))
    # Stale on arrival: only the origin's own stale directives make it worth keeping.
    if initial_age >= lifetime + explicit:
        return None

    vary: tuple[tuple[bytes, bytes | None], ...] = ()
    if vary_values:
        names: list[bytes] = []
        for value in vary_values:
            for token in value.split(b","):
                lname = token.strip(b" \t").lower()
                if lname == b"*":
                    return None
                if lname and lname not in names:
                    names.append(lname)
        vary = tuple((lname, header_value(request_headers, lname)) for lname in names)
    return Freshness(lifetime, initial_age, response_time, swr, sie, vary)


def may_be_storable(headers: Headers, names: Sequence[bytes]) -> bool:
    """False when ``response_storability`` is sure to refuse a response, found cheaply.

    ``names`` are the lower-cased names of ``headers`` (as the parser gives
    them; anything else, such as an empty sequence, is not trusted). A
    response without Cache-Control and without Expires has no explicit
    freshness, and nothing else makes a response storable.
    """
    if len(names) != len(headers):
        return True
    return b"cache-control" in names or b"expires" in names


def _window(explicit: int | None, default: float) -> float:
    return float(explicit) if explicit is not None else max(0.0, default)


def vary_matches(vary: tuple[tuple[bytes, bytes | None], ...], headers: Headers) -> bool:
    """True if a request with ``headers`` selects a response stored with ``vary``."""
    return all(header_value(headers, lname) == value for lname, value in vary)


def not_modified(rules: RequestRules, etag: bytes | None, last_modified: float | None) -> bool:
    """True if the request's validators match, so a 304 answers it (RFC 9110 13.2.2).

    If-None-Match (weak comparison) takes precedence over If-Modified-Since.
    """
    if rules.if_none_match is not None:
        if etag is None:
            return False
        if rules.if_none_match.strip(b" \t") == b"*":
            return True
        stored = _ENTITY_TAG.match(etag.strip(b" \t"))
        if stored is None:
            return False
        opaque = stored.group(1)
        return any(tag == opaque for tag in _ENTITY_TAG.findall(rules.if_none_match))
    if rules.if_modified_since is not None and last_modified is not None:
        since = parse_http_date(rules.if_modified_since)
        return since is not None and last_modified <= since
    return False
