"""Request routing: the first route whose match fits a request decides it.

``Router.compile`` turns the config's ``Route`` values into ``CompiledRoute``
rules once (regular expressions compiled, hosts normalised, networks parsed),
raising ``tiers.errors.ConfigError`` for anything that cannot be compiled.
``Router.route`` is then pure and allocation-light: it takes the parts of a
parsed request head and returns the first rule that matches, or None (the
server answers 404).

How each part of a ``Match`` is compared:

- hosts: the request's host without its port, lower-cased, without a
  trailing dot; IPv6 literals (``[::1]:8080``) compared by address, so
  ``[0::1]`` is ``[::1]`` (``tiers.proxy.normalize``). ``*.example.com``
  matches ``a.example.com`` and ``a.b.example.com`` but not ``example.com``
  itself (as in nginx). A request without a host (HTTP/1.0) matches no host
  list.
- paths: compared on the normalised path (``tiers.proxy.normalize``: query
  removed, percent-encoded unreserved characters decoded, other escapes
  upper-cased, ``.`` and ``..`` segments resolved, repeated slashes merged),
  so ``/%61dmin`` and ``//admin/.`` cannot slip past a rule written for
  ``/admin``. A prefix matches on segment boundaries only: ``/static``
  matches ``/static``, ``/static/`` and ``/static/a.css`` but not
  ``/staticfoo``; ``/static/`` matches what lies under it and not
  ``/static`` itself. ``path_regex`` is searched in the same normalised
  path, as bytes, so it must be written against the percent-encoded form for
  characters outside ASCII.
- methods: exact, upper-case; GET also admits HEAD (a HEAD is a GET without
  the body, RFC 9110 9.3.2, and must be answered by the same rule).
- headers: the regular expression is searched in each field line of that
  name; one hit is enough, a missing header does not match.
- user_agent: searched case-insensitively (``tiers.proxy.matchers``); a
  missing User-Agent does not match.
- networks: the client address, IPv4 or IPv6 (``tiers.proxy.matchers``); an
  IPv4-mapped IPv6 address (``::ffff:10.0.0.1``) is treated as the IPv4
  address it carries, and a network given in that form as the IPv4 network.

Checks run cheapest first (method, host, path prefix, network, then the
regular expressions), and each per-request derived value (normalised host,
path, address, header table) is computed at most once per call and only if
some rule needs it.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Final
from urllib.parse import quote, unquote_to_bytes

from tiers.config.proxy import Match, Route, RouteKind
from tiers.errors import ConfigError
from tiers.proxy.matchers import Networks, UserAgentPattern, parse_address
from tiers.proxy.normalize import normalize_host, normalize_path, normalize_target
from tiers.proxy.requestparser import RequestHead

__all__ = [
    "CRAWLER_NAMES",
    "CRAWLER_USER_AGENTS",
    "CompiledRoute",
    "Router",
    "crawler_route",
    "default_routes",
]

# Well-known crawlers, fetchers of link previews and AI training/search bots,
# by a token of their User-Agent that no browser carries. Matched
# case-insensitively (Match.user_agent), so this can be used as it is.
CRAWLER_NAMES: Final[tuple[str, ...]] = (
    # search engines
    "Googlebot",
    "Google-InspectionTool",
    "GoogleOther",
    "Storebot-Google",
    "AdsBot-Google",
    "Mediapartners-Google",
    "FeedFetcher-Google",
    "bingbot",
    "BingPreview",
    "msnbot",
    "adidxbot",
    "Slurp",
    "DuckDuckBot",
    "Baiduspider",
    "YandexBot",
    "YandexImages",
    "YandexMobileBot",
    "Sogou web spider",
    "Yeti/",
    "Daumoa",
    "SeznamBot",
    "Qwantbot",
    "coccocbot",
    "MojeekBot",
    "Applebot",
    "Amazonbot",
    "PetalBot",
    "Bytespider",
    "ia_archiver",
    "archive.org_bot",
    # link previews
    "facebookexternalhit",
    "facebookcatalog",
    "meta-externalagent",
    "Twitterbot",
    "LinkedInBot",
    "Pinterestbot",
    "Slackbot",
    "Discordbot",
    "TelegramBot",
    # SEO tools
    "AhrefsBot",
    "SemrushBot",
    "MJ12bot",
    "DotBot",
    "BLEXBot",
    "DataForSeoBot",
    "serpstatbot",
    # AI crawlers
    "GPTBot",
    "ChatGPT-User",
    "OAI-SearchBot",
    "ClaudeBot",
    "Claude-Web",
    "Claude-User",
    "anthropic-ai",
    "CCBot",
    "PerplexityBot",
    "cohere-ai",
    "Diffbot",
    "ImagesiftBot",
    "Timpibot",
    "YouBot",
)
CRAWLER_USER_AGENTS: Final[str] = "|".join(re.escape(name) for name in CRAWLER_NAMES)

_SOURCE: Final = "proxy.routes"
_UA_CACHE_SIZE: Final = 4096
_UA_CACHE_KEY_MAX: Final = 512
_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
_NO_BODY_STATUSES: Final = frozenset({204, 304})



# ---- compiled routes -------------------------------------------------------------

_HOST_LABEL_RE: Final = re.compile(r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?")
_TOKEN_RE: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_LOCATION_RE: Final = re.compile(r"[\x21-\x7e]+")


class CompiledRoute:
    """One route, compiled: what the server needs to act on it, read-only.

    ``route`` is the original config value; ``name``, ``kind``, ``pool``,
    ``root``, ``status``, ``cache`` and ``cache_private_requests`` are copied
    from it, ``body`` is the RESPOND body as UTF-8 bytes. Per-request values
    are derived by ``static_path`` (STATIC) and ``location`` (REDIRECT).
    """

    __slots__ = (
        "_exact_hosts",
        "_headers",
        "_location",
        "_methods",
        "_networks",
        "_path_regex",
        "_prefix",
        "_prefix_under",
        "_strip",
        "_ua_bit",
        "_user_agent",
        "_wild_hosts",
        "body",
        "cache",
        "cache_private_requests",
        "kind",
        "label",
        "name",
        "pool",
        "root",
        "route",
        "status",
    )

    def __init__(self, route: Route, index: int, source: str) -> None:
        self.route = route
        self.name = route.name
        self.label = route.name.encode()  # for the access log, encoded once
        self.kind = route.kind
        self.pool = route.pool
        self.root: Path | None = route.root
        self.status = route.status
        self.body = route.body.encode()
        self.cache = route.cache
        self.cache_private_requests = route.cache_private_requests
        key = f"routes[{index}]"
        _check_action(route, key, source)
        match = route.match
        self._methods = _compile_methods(match.methods, f"{key}.match.methods", source)
        self._exact_hosts, self._wild_hosts = _compile_hosts(
            match.hosts, f"{key}.match.hosts", source
        )
        self._prefix, self._prefix_under = _compile_prefix(
            match.path_prefix, f"{key}.match.path_prefix", source
        )
        self._networks = (
            Networks.parse(match.networks, source, f"{key}.match.networks")
            if match.networks
            else None
        )
        self._path_regex = _compile_regex(match.path_regex, 0, f"{key}.match.path_regex", source)
        self._user_agent: UserAgentPattern | None = None
        if match.user_agent is not None:
            try:
                self._user_agent = UserAgentPattern((match.user_agent,))
            except re.error as exc:
                raise ConfigError(
                    source, f"{key}.match.user_agent", f"not a valid regular expression: {exc}"
                ) from exc
        # This route's bit in the router's memo of User-Agent results (0: no user_agent).
        self._ua_bit = 0
        self._headers = _compile_headers(match.headers, f"{key}.match.headers", source)
        # STATIC: how much of the normalised path to drop before the file lookup.
        self._strip = 0
        if route.kind is RouteKind.STATIC and route.strip_prefix and self._prefix_under:
            self._strip = len(self._prefix_under) - 1
        self._location: tuple[bytes, ...] = ()
        if route.kind is RouteKind.REDIRECT and route.location is not None:
            self._location = tuple(part.encode("ascii") for part in route.location.split("$uri"))

    def __repr__(self) -> str:
        return f"CompiledRoute({self.name!r}, {self.kind.name})"

    @property
    def header_names(self) -> frozenset[bytes]:
        """The lower-case header names this route's match looks at."""
        return frozenset(name for name, _ in self._headers)

    def static_path(self, target: bytes) -> str | None:
        """For a STATIC route: the file to serve, relative to ``root``, for ``target``.

        ``target`` is the origin-form request target this route matched. The
        matched ``path_prefix`` is removed when ``strip_prefix`` is set; the
        rest is percent-decoded segment by segment and decoded as a file
        name (UTF-8, undecodable bytes kept as surrogates, as ``os.fsdecode``
        does). The result has no leading slash, keeps a trailing one (a
        directory was asked for) and is ``""`` for the root itself. Returns
        None when the path cannot name a file under ``root``: it is not
        under ``path_prefix`` once normalised, or a segment decodes to ``.``
        or ``..`` or contains ``/`` or NUL; answer 404.
        """
        path = normalize_target(target)
        if path[:1] != b"/":
            return None
        under = self._prefix_under
        if under and not path.startswith(under) and path != self._prefix:
            return None  # not a path this route matched (``..`` led out of the prefix)
        rest = path[self._strip :]
        parts = rest.split(b"/")
        names: list[str] = []
        for raw in parts:
            if not raw:
                continue
            segment = unquote_to_bytes(raw) if b"%" in raw else raw
            if segment in (b".", b"..") or b"/" in segment or b"\x00" in segment:
                return None
            names.append(segment.decode("utf-8", "surrogateescape"))
        if not names:
            return ""
        relative = "/".join(names)
        return relative + "/" if rest.endswith(b"/") else relative

    def location(self, target: bytes) -> bytes:
        """For a REDIRECT route: the Location to answer, with ``$uri`` replaced by ``target``.

        ``target`` is the origin-form request target as sent, path and query
        (``RequestHead.path``), so ``https://example.com$uri`` keeps both.
        """
        parts = self._location
        if len(parts) == 1:
            return parts[0]
        return target.join(parts)


def _check_action(route: Route, key: str, source: str) -> None:
    kind = route.kind
    if kind is RouteKind.POOL:
        if not route.pool:
            raise ConfigError(source, f"{key}.pool", "a pool route needs a pool name")
    elif kind is RouteKind.STATIC:
        if route.root is None:
            raise ConfigError(source, f"{key}.root", "a static route needs a root directory")
    elif kind is RouteKind.REDIRECT:
        if route.status not in _REDIRECT_STATUSES:
            raise ConfigError(
                source,
                f"{key}.status",
                f"a redirect status must be one of 301, 302, 303, 307, 308 (got {route.status})",
            )
        if not route.location:
            raise ConfigError(source, f"{key}.location", "a redirect route needs a location")
        if _LOCATION_RE.fullmatch(route.location) is None:
            raise ConfigError(
                source,
                f"{key}.location",
                "must be printable ASCII without spaces (percent-encode other characters)",
            )
    elif kind is RouteKind.RESPOND:
        if not 200 <= route.status <= 599:
            raise ConfigError(source, f"{key}.status", f"must be 200-599 (got {route.status})")
        if route.body and route.status in _NO_BODY_STATUSES:
            raise ConfigError(source, f"{key}.body", f"a {route.status} answer has no body")


def _compile_methods(methods: Sequence[str], key: str, source: str) -> frozenset[bytes] | None:
    if not methods:
        return None
    found: set[bytes] = set()
    for i, method in enumerate(methods):
        if _TOKEN_RE.fullmatch(method) is None:
            raise ConfigError(source, f"{key}[{i}]", f"not an HTTP method: {method!r}")
        found.add(method.upper().encode("ascii"))
    if b"GET" in found:
        found.add(b"HEAD")
    return frozenset(found)


def _host_pattern(pattern: str, key: str, source: str) -> bytes:
    """A hostname of the config in the form ``normalize_host`` gives requests."""
    name = pattern.strip().lower()
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    if ":" in name:
        try:
            return ipaddress.IPv6Address(name).compressed.encode()
        except ValueError as exc:
            raise ConfigError(
                source, key, f"not a host name or IPv6 address (no port here): {pattern!r}"
            ) from exc
    name = name.removesuffix(".")
    try:
        # Internationalised names arrive as punycode (xn--...).
        encoded = name.encode("idna") if not name.isascii() else name.encode()
    except UnicodeError as exc:
        raise ConfigError(source, key, f"not a valid host name: {pattern!r}") from exc
    labels = encoded.decode().split(".")
    if not name or not all(_HOST_LABEL_RE.fullmatch(label) for label in labels):
        raise ConfigError(
            source, key, f"not a host name, *.suffix wildcard or IP address: {pattern!r}"
        )
    return encoded


def _compile_hosts(
    hosts: Sequence[str], key: str, source: str
) -> tuple[frozenset[bytes] | None, tuple[bytes, ...]]:
    if not hosts:
        return None, ()
    exact: set[bytes] = set()
    wild: list[bytes] = []
    for i, pattern in enumerate(hosts):
        stripped = pattern.strip()
        if stripped.startswith("*."):
            wild.append(b"." + _host_pattern(stripped[2:], f"{key}[{i}]", source))
        elif "*" in stripped:
            raise ConfigError(
                source,
                f"{key}[{i}]",
                f"a wildcard may only be a leading '*.' label: {pattern!r}"
                " (leave hosts empty to match any host)",
            )
        else:
            exact.add(_host_pattern(stripped, f"{key}[{i}]", source))
    return frozenset(exact), tuple(wild)


def _compile_prefix(prefix: str | None, key: str, source: str) -> tuple[bytes | None, bytes]:
    """(the path equal to the prefix or None, the start of every path under it)."""
    if prefix is None:
        return None, b""
    if not prefix.startswith("/") or "?" in prefix or "#" in prefix:
        raise ConfigError(
            source, key, f"must be a path starting with '/', without query: {prefix!r}"
        )
    # Written as a request would send it, then normalised the same way.
    encoded = normalize_path(quote(prefix, safe="/%!$&'()*+,;=:@~").encode("ascii"))
    if encoded.endswith(b"/"):
        return None, encoded
    return encoded, encoded + b"/"


def _compile_regex(
    pattern: str | None, flags: int, key: str, source: str
) -> re.Pattern[bytes] | None:
    if pattern is None:
        return None
    try:
        return re.compile(pattern.encode(), flags)
    except re.error as exc:
        raise ConfigError(source, key, f"not a valid regular expression: {exc}") from exc


def _compile_headers(
    headers: Sequence[tuple[str, str]], key: str, source: str
) -> tuple[tuple[bytes, re.Pattern[bytes]], ...]:
    compiled = []
    for i, (name, pattern) in enumerate(headers):
        if _TOKEN_RE.fullmatch(name) is None:
            raise ConfigError(source, f"{key}[{i}]", f"not a header name: {name!r}")
        regex = _compile_regex(pattern, 0, f"{key}[{i}]", source)
        assert regex is not None
        compiled.append((name.lower().encode("ascii"), regex))
    return tuple(compiled)


# ---- the router ------------------------------------------------------------------


class Router:
    """Routes, in order, compiled once; ``route`` picks the first that matches a request.

    ``Router(routes, ...)`` is the same as ``Router.compile(routes, ...)``.
    """

    __slots__ = ("_header_names", "_rules", "_ua_cache", "_ua_rules")

    def __init__(
        self,
        routes: Sequence[Route],
        *,
        pools: Collection[str] | None = None,
        source: str = _SOURCE,
    ) -> None:
        seen: set[str] = set()
        rules = []
        for i, route in enumerate(routes):
            if not route.name:
                raise ConfigError(source, f"routes[{i}].name", "a route needs a name")
            if route.name in seen:
                raise ConfigError(source, f"routes[{i}].name", f"repeated name {route.name!r}")
            seen.add(route.name)
            rule = CompiledRoute(route, i, source)
            if pools is not None and route.kind is RouteKind.POOL and route.pool not in pools:
                raise ConfigError(source, f"routes[{i}].pool", f"no pool named {route.pool!r}")
            rules.append(rule)
        self._rules = tuple(rules)
        names: set[bytes] = set()
        ua_rules: list[tuple[int, UserAgentPattern]] = []
        for rule in self._rules:
            names |= rule.header_names
            if rule._user_agent is not None:
                rule._ua_bit = 1 << len(ua_rules)
                ua_rules.append((rule._ua_bit, rule._user_agent))
        self._header_names = frozenset(names)
        self._ua_rules = tuple(ua_rules)
        # User-Agent -> bits of the routes whose user_agent it matches. A few
        # browsers send most requests, so this saves a regex search on nearly
        # all of them; bounded in entries and in key size.
        self._ua_cache: dict[bytes, int] = {}

    @classmethod
    def compile(
        cls,
        routes: Sequence[Route],
        *,
        pools: Collection[str] | None = None,
        source: str = _SOURCE,
    ) -> Router:
        """Compile ``routes`` in order.

        Raises ConfigError (with ``source`` and a key such as
        ``routes[2].match.path_regex``) for an invalid regular expression,
        network, host pattern, path prefix, method or header name, an empty
        or repeated route name, a route lacking what its kind needs (POOL: a
        pool, STATIC: a root, REDIRECT: a location and a 3xx status), a
        RESPOND status outside 200-599, and, when ``pools`` is given, a pool
        route naming a pool not in it. The filesystem is not consulted.
        """
        return cls(routes, pools=pools, source=source)

    @property
    def routes(self) -> tuple[CompiledRoute, ...]:
        """The compiled routes, in order."""
        return self._rules

    def route(
        self,
        method: bytes,
        host: bytes | None,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        client_ip: bytes,
        *,
        user_agent: bytes | None,
    ) -> CompiledRoute | None:
        """The first route matching the request, or None (answer 404).

        ``method``, ``host``, ``headers`` and ``user_agent`` are as
        ``RequestHead`` holds them; ``target`` is the origin-form target
        (``RequestHead.path``: path and query); ``client_ip`` the peer address
        as text. Never raises: a value that cannot be parsed (no host, an
        address that is not one) just fails the parts of a match that need it.
        """
        hostname: bytes | None = None
        host_done = False
        path = b""
        path_done = False
        address: int | None = None
        address_done = False
        found: dict[bytes, list[bytes]] | None = None
        ua_bits = -1
        for rule in self._rules:
            methods = rule._methods
            if methods is not None and method not in methods:
                continue
            exact = rule._exact_hosts
            if exact is not None:
                if not host_done:
                    hostname = normalize_host(host)
                    host_done = True
                if hostname is None:
                    continue
                if hostname not in exact:
                    wild = rule._wild_hosts
                    # The label before the suffix must not be empty.
                    if not wild or not hostname.endswith(wild) or hostname[0] == 0x2E:
                        continue
            under = rule._prefix_under
            if under or rule._path_regex is not None:
                if not path_done:
                    path = normalize_target(target)
                    path_done = True
                if under and not path.startswith(under) and path != rule._prefix:
                    continue
            networks = rule._networks
            if networks is not None:
                if not address_done:
                    address = parse_address(client_ip)
                    address_done = True
                if address is None or address not in networks:
                    continue
            regex = rule._path_regex
            if regex is not None and regex.search(path) is None:
                continue
            bit = rule._ua_bit
            if bit:
                if user_agent is None:
                    continue
                if ua_bits < 0:
                    ua_bits = self._user_agent_bits(user_agent)
                if not ua_bits & bit:
                    continue
            if rule._headers:
                if found is None:
                    found = self._collect(headers)
                if not _headers_match(rule._headers, found):
                    continue
            return rule
        return None

    def route_head(self, head: RequestHead, client_ip: bytes) -> CompiledRoute | None:
        """``route`` for a parsed request head."""
        return self.route(
            head.method, head.host, head.path, head.headers, client_ip, user_agent=head.user_agent
        )

    def _user_agent_bits(self, user_agent: bytes) -> int:
        cache = self._ua_cache
        bits = cache.get(user_agent)
        if bits is None:
            bits = 0
            for bit, pattern in self._ua_rules:
                if pattern.search(user_agent):
                    bits |= bit
            if len(user_agent) <= _UA_CACHE_KEY_MAX:
                if len(cache) >= _UA_CACHE_SIZE:
                    # Cheaper than tracking recency; the common agents come back at once.
                    cache.clear()
                cache[user_agent] = bits
        return bits

    def _collect(self, headers: Sequence[tuple[bytes, bytes]]) -> dict[bytes, list[bytes]]:
        wanted = self._header_names
        found: dict[bytes, list[bytes]] = {}
        for name, value in headers:
            lname = name.lower()
            if lname in wanted:
                values = found.get(lname)
                if values is None:
                    found[lname] = [value]
                else:
                    values.append(value)
        return found


def _headers_match(
    conditions: tuple[tuple[bytes, re.Pattern[bytes]], ...], found: dict[bytes, list[bytes]]
) -> bool:
    for name, regex in conditions:
        values = found.get(name)
        if values is None:
            return False
        for value in values:
            if regex.search(value) is not None:
                break
        else:
            return False
    return True


# ---- ready-made routes -----------------------------------------------------------


def crawler_route(pool: str, name: str = "crawlers") -> Route:
    """A route that sends every request of a known crawler (``CRAWLER_USER_AGENTS``) to ``pool``.

    Put it before the routes it should take crawlers away from.
    """
    return Route(
        name=name, kind=RouteKind.POOL, pool=pool, match=Match(user_agent=CRAWLER_USER_AGENTS)
    )


def default_routes(pool: str, crawler_pool: str | None = None) -> tuple[Route, ...]:
    """Routes for a service with one app pool: everything to ``pool``.

    With ``crawler_pool``, known crawlers go there first, so their load never
    slows the pool that serves people.
    """
    catch_all = Route(name="default", kind=RouteKind.POOL, pool=pool)
    if crawler_pool is None:
        return (catch_all,)
    return (crawler_route(crawler_pool), catch_all)
