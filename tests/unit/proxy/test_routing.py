"""Route matching, normalisation of hosts, paths and addresses, and compile errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tiers.config.proxy import Match, Route, RouteKind
from tiers.errors import ConfigError, TiersError
from tiers.proxy.matchers import Networks, UserAgentPattern, parse_address
from tiers.proxy.normalize import normalize_host, normalize_path
from tiers.proxy.requestparser import RequestHead, RequestParser
from tiers.proxy.routing import (
    CRAWLER_NAMES,
    CRAWLER_USER_AGENTS,
    CompiledRoute,
    Router,
    crawler_route,
    default_routes,
)

BROWSER = b"Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0"


def _pool(name: str, match: Match | None = None) -> Route:
    return Route(name=name, kind=RouteKind.POOL, pool=name, match=match or Match())


def _router(*matches: Match) -> Router:
    """One pool route per match, named r0, r1, ..., in order."""
    return Router.compile([_pool(f"r{i}", m) for i, m in enumerate(matches)])


def _name(
    router: Router,
    *,
    method: bytes = b"GET",
    host: bytes | None = b"example.com",
    target: bytes = b"/",
    headers: list[tuple[bytes, bytes]] | None = None,
    client_ip: bytes = b"192.0.2.1",
    user_agent: bytes | None = BROWSER,
) -> str | None:
    route = router.route(method, host, target, headers or [], client_ip, user_agent=user_agent)
    return None if route is None else route.name


def _matches(match: Match, **request: object) -> bool:
    return _name(_router(match), **request) == "r0"  # type: ignore[arg-type]


# ---- hosts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("patterns", "host", "expected"),
    [
        (("example.com",), b"example.com", True),
        (("example.com",), b"EXAMPLE.Com", True),
        (("Example.COM",), b"example.com", True),
        (("example.com",), b"example.com:8080", True),
        (("example.com",), b"example.com.", True),
        (("example.com.",), b"example.com", True),
        (("example.com",), b"www.example.com", False),
        (("example.com",), b"example.co", False),
        (("example.com",), b"example.com.evil.test", False),
        (("example.com",), None, False),
        (("a.test", "b.test"), b"b.test", True),
        (("*.example.com",), b"www.example.com", True),
        (("*.example.com",), b"a.b.example.com:80", True),
        (("*.example.com",), b"WWW.EXAMPLE.COM", True),
        (("*.example.com",), b"example.com", False),
        (("*.example.com",), b".example.com", False),
        (("*.example.com",), b"badexample.com", False),
        (("*.example.com",), b"example.com.evil.test", False),
        (("example.com", "*.example.com"), b"example.com", True),
        (("127.0.0.1",), b"127.0.0.1:8400", True),
        (("::1",), b"[::1]", True),
        (("[::1]",), b"[::1]:8080", True),
        (("[0:0::1]",), b"[0000::0001]:80", True),
        (("2001:db8::1",), b"[2001:DB8:0::1]", True),
        (("::1",), b"[::2]", False),
        (("::ffff:192.0.2.1",), b"[::ffff:c000:201]", True),
        (("bücher.example",), b"xn--bcher-kva.example", True),
    ],
)
def test_host_matching(patterns: tuple[str, ...], host: bytes | None, expected: bool) -> None:
    assert _matches(Match(hosts=patterns), host=host) is expected


@pytest.mark.parametrize(
    ("host", "normal"),
    [
        (b"Example.COM:80", b"example.com"),
        (b"example.com.", b"example.com"),
        (b"[::1]:8080", b"::1"),
        (b"[2001:DB8::0:1]", b"2001:db8::1"),
        (b"10.0.0.1:443", b"10.0.0.1"),
        (b"", None),
        (None, None),
    ],
)
def test_normalize_host(host: bytes | None, normal: bytes | None) -> None:
    assert normalize_host(host) == normal


# ---- paths -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "target", "expected"),
    [
        ("/static/", b"/static/app.css", True),
        ("/static/", b"/static/", True),
        ("/static/", b"/static/?v=1", True),
        ("/static/", b"/static", False),
        ("/static/", b"/staticfoo", False),
        ("/static/", b"/stat", False),
        ("/static", b"/static", True),
        ("/static", b"/static?v=1", True),
        ("/static", b"/static/", True),
        ("/static", b"/static/a/b.png", True),
        ("/static", b"/staticfoo", False),
        ("/static", b"/static.css", False),
        ("/static", b"/other/static", False),
        ("/", b"/anything/at/all", True),
        ("/", b"*", False),
        # Compared on the normalised path.
        ("/static/", b"/%73tatic/a.css", True),
        ("/static/", b"//static//a.css", True),
        ("/static/", b"/x/../static/a.css", True),
        ("/static/", b"/static/../admin", False),
        ("/admin", b"/%61dmin", True),
        ("/admin", b"/./admin/.", True),
        ("/admin", b"/admin%2F", False),
        # A prefix written with characters a request must escape.
        ("/files/a b/", b"/files/a%20b/x", True),
        ("/日本/", b"/%E6%97%A5%E6%9C%AC/x", True),
        ("/日本/", b"/%e6%97%a5%e6%9c%ac/x", True),
    ],
)
def test_path_prefix(prefix: str, target: bytes, expected: bool) -> None:
    assert _matches(Match(path_prefix=prefix), target=target) is expected


@pytest.mark.parametrize(
    ("pattern", "target", "expected"),
    [
        (r"\.php$", b"/index.php", True),
        (r"\.php$", b"/index.php?x=.html", True),
        (r"\.php$", b"/index.php5", False),
        (r"^/user/\d+$", b"/user/42", True),
        (r"^/user/\d+$", b"/user/42/edit", False),
        (r"^/user/\d+$", b"/user/x", False),
        (r"query", b"/p?query=1", False),
        (r"^/a/b$", b"/a/./b", True),
    ],
)
def test_path_regex(pattern: str, target: bytes, expected: bool) -> None:
    assert _matches(Match(path_regex=pattern), target=target) is expected


@pytest.mark.parametrize(
    ("path", "normal"),
    [
        (b"/a/b", b"/a/b"),
        (b"/", b"/"),
        (b"*", b"*"),
        (b"/a//b", b"/a/b"),
        (b"/a/./b/", b"/a/b/"),
        (b"/a/b/..", b"/a/"),
        (b"/a/b/../c", b"/a/c"),
        (b"/../../etc", b"/etc"),
        (b"/..", b"/"),
        (b"/%7Euser/%41%2d%5f%2e", b"/~user/A-_."),
        (b"/a%2fb%3a", b"/a%2Fb%3A"),
        (b"/%2e%2E/x", b"/x"),
        (b"/100%", b"/100%"),
        (b"/%zz", b"/%zz"),
    ],
)
def test_normalize_path(path: bytes, normal: bytes) -> None:
    assert normalize_path(path) == normal


def test_a_normal_path_is_returned_without_a_copy() -> None:
    path = b"/entry/123/comments.json"
    assert normalize_path(path) is path


# ---- methods, headers, user agents -------------------------------------------------


@pytest.mark.parametrize(
    ("methods", "method", "expected"),
    [
        (("GET",), b"GET", True),
        (("GET",), b"HEAD", True),
        (("GET",), b"POST", False),
        (("HEAD",), b"GET", False),
        (("post", "PUT"), b"POST", True),
        (("POST",), b"post", False),
        (("DELETE",), b"DELETE", True),
    ],
)
def test_methods(methods: tuple[str, ...], method: bytes, expected: bool) -> None:
    assert _matches(Match(methods=methods), method=method) is expected


@pytest.mark.parametrize(
    ("conditions", "headers", "expected"),
    [
        ((("x-debug", "^1$"),), [(b"X-Debug", b"1")], True),
        ((("x-debug", "^1$"),), [(b"x-debug", b"10")], False),
        ((("x-debug", "^1$"),), [(b"X-Other", b"1")], False),
        ((("x-debug", "^1$"),), [], False),
        ((("x-debug", ""),), [(b"X-DEBUG", b"")], True),
        ((("X-Debug", "on"),), [(b"x-debug", b"on")], True),
        # Any one field line of the name is enough.
        (
            (("accept", "json"),),
            [(b"Accept", b"text/html"), (b"Accept", b"application/json")],
            True,
        ),
        # Values are case-sensitive unless the pattern says otherwise.
        ((("accept", "JSON"),), [(b"Accept", b"application/json")], False),
        ((("accept", "(?i)JSON"),), [(b"Accept", b"application/json")], True),
        # Every condition must hold.
        ((("a", "1"), ("b", "2")), [(b"A", b"1"), (b"B", b"2")], True),
        ((("a", "1"), ("b", "2")), [(b"A", b"1")], False),
    ],
)
def test_headers(
    conditions: tuple[tuple[str, str], ...], headers: list[tuple[bytes, bytes]], expected: bool
) -> None:
    assert _matches(Match(headers=conditions), headers=headers) is expected


REAL_CRAWLERS = [
    b"Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
    b"Mozilla/5.0 (Linux; Android 6.0.1; Nexus 5X Build/MMB29P) AppleWebKit/537.36 (KHTML, "
    b"like Gecko) Chrome/126.0.6478.126 Mobile Safari/537.36 (compatible; Googlebot/2.1; "
    b"+http://www.google.com/bot.html)",
    b"Googlebot-Image/1.0",
    b"Mozilla/5.0 (compatible; bingbot/2.0; +http://www.bing.com/bingbot.htm)",
    b"Mozilla/5.0 (compatible; Baiduspider/2.0; +http://www.baidu.com/search/spider.html)",
    b"Mozilla/5.0 (compatible; YandexBot/3.0; +http://yandex.com/bots)",
    b"DuckDuckBot/1.1; (+http://duckduckgo.com/duckduckbot.html)",
    b"Mozilla/5.0 (compatible; Yahoo! Slurp; http://help.yahoo.com/help/us/ysearch/slurp)",
    b"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_5) AppleWebKit/605.1.15 (KHTML, like Gecko)"
    b" Version/13.1.1 Safari/605.1.15 (Applebot/0.1; +http://www.apple.com/go/applebot)",
    b"facebookexternalhit/1.1 (+http://www.facebook.com/externalhit_uatext.php)",
    b"Mozilla/5.0 (compatible; AhrefsBot/7.0; +http://ahrefs.com/robot/)",
    b"Mozilla/5.0 (compatible; SemrushBot/7~bl; +http://www.semrush.com/bot.html)",
    b"Mozilla/5.0 (compatible; MJ12bot/v1.4.8; http://mj12bot.com/)",
    b"Mozilla/5.0 (Linux; Android 7.0;) AppleWebKit/537.36 (KHTML, like Gecko) Mobile "
    b"Safari/537.36 (compatible; PetalBot;+https://webmaster.petalsearch.com/site/petalbot)",
    b"Mozilla/5.0 (Linux; Android 5.0) AppleWebKit/537.36 (KHTML, like Gecko) Mobile "
    b"Safari/537.36 (compatible; Bytespider; spider-feedback@bytedance.com)",
    b"Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; GPTBot/1.2; "
    b"+https://openai.com/gptbot)",
    b"Mozilla/5.0 AppleWebKit/537.36 (KHTML, like Gecko; compatible; ClaudeBot/1.0; "
    b"+claudebot@anthropic.com)",
    b"CCBot/2.0 (https://commoncrawl.org/faq/)",
    b"MOZILLA/5.0 (COMPATIBLE; GOOGLEBOT/2.1)",
]
REAL_BROWSERS = [
    BROWSER,
    b"Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:127.0) Gecko/20100101 Firefox/127.0",
    b"Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, "
    b"like Gecko) Version/17.5 Mobile/15E148 Safari/604.1",
    b"Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) "
    b"Chrome/126.0.0.0 Mobile Safari/537.36",
    b"Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15_7) AppleWebKit/537.36 (KHTML, like Gecko) "
    b"Chrome/126.0.0.0 Safari/537.36 Edg/126.0.0.0",
    b"curl/8.5.0",
    b"",
]


@pytest.mark.parametrize("agent", REAL_CRAWLERS)
def test_crawler_pattern_matches_crawlers(agent: bytes) -> None:
    router = Router.compile(default_routes("app", crawler_pool="crawler"))
    assert _name(router, user_agent=agent) == "crawlers"


@pytest.mark.parametrize("agent", REAL_BROWSERS)
def test_crawler_pattern_leaves_browsers(agent: bytes) -> None:
    router = Router.compile(default_routes("app", crawler_pool="crawler"))
    assert _name(router, user_agent=agent) == "default"


def test_crawler_pattern_agrees_with_a_plain_case_insensitive_search() -> None:
    plain = re.compile(CRAWLER_USER_AGENTS.encode(), re.IGNORECASE)
    fast = UserAgentPattern((CRAWLER_USER_AGENTS,))
    samples = REAL_CRAWLERS + REAL_BROWSERS + [name.encode().upper() for name in CRAWLER_NAMES]
    samples += [b"x" + name.encode()[:-1] for name in CRAWLER_NAMES]
    for sample in samples:
        assert fast.search(sample) is (plain.search(sample) is not None), sample


@pytest.mark.parametrize(
    ("pattern", "agent", "expected"),
    [
        ("curl", b"CURL/8.0", True),
        ("(?i)curl|wget", b"Wget/1.21", True),
        (r"curl/\d+\.", b"curl/8.5.0", True),
        (r"curl/\d+\.", b"curl/x", False),
        (r"^$", b"", True),
        (r"^Mozilla", b"Opera Mozilla", False),
        (r"a\.b|c\|d", b"xx C|D yy", True),
        (r"a\.b|c\|d", b"axb", False),
        ("bot", None, False),
        (r"^$", None, False),
    ],
)
def test_user_agent(pattern: str, agent: bytes | None, expected: bool) -> None:
    assert _matches(Match(user_agent=pattern), user_agent=agent) is expected


def test_user_agent_results_stay_right_past_the_memo_bound() -> None:
    router = Router.compile(
        [_pool("bots", Match(user_agent="bot")), _pool("spiders", Match(user_agent=r"spider\d"))]
    )
    for i in range(10_000):
        assert _name(router, user_agent=b"agent %d bot" % i) == "bots"
        assert _name(router, user_agent=b"agent %d spider%d" % (i, i % 10)) == "spiders"
        assert _name(router, user_agent=b"agent %d" % i) is None
    # The memo of User-Agent results is bounded; only the bound is checked here.
    assert len(router._ua_cache) <= 4096


# ---- networks and addresses --------------------------------------------------------


@pytest.mark.parametrize(
    ("networks", "client_ip", "expected"),
    [
        (("10.0.0.0/8",), b"10.1.2.3", True),
        (("10.0.0.0/8",), b"11.1.2.3", False),
        (("10.0.0.0/8",), b"::ffff:10.1.2.3", True),
        (("192.0.2.7",), b"192.0.2.7", True),
        (("192.0.2.7",), b"192.0.2.8", False),
        (("192.0.2.7/24",), b"192.0.2.200", True),
        (("2001:db8::/32",), b"2001:db8:1::5", True),
        (("2001:db8::/32",), b"2001:db9::5", False),
        (("::1/128",), b"::1", True),
        (("::ffff:10.0.0.0/104",), b"10.9.9.9", True),
        (("::ffff:10.0.0.0/104",), b"::ffff:10.9.9.9", True),
        (("::ffff:10.0.0.0/104",), b"11.9.9.9", False),
        (("::/0",), b"10.1.2.3", False),
        (("::/0",), b"2001:db8::1", True),
        (("0.0.0.0/0",), b"2001:db8::1", False),
        (("0.0.0.0/0",), b"203.0.113.9", True),
        (("fe80::/10",), b"fe80::1%eth0", True),
        (("10.0.0.0/8", "2001:db8::/32"), b"2001:db8::9", True),
        (("10.0.0.0/8",), b"-", False),
        (("10.0.0.0/8",), b"10.1.2", False),
    ],
)
def test_networks(networks: tuple[str, ...], client_ip: bytes, expected: bool) -> None:
    assert _matches(Match(networks=networks), client_ip=client_ip) is expected


@pytest.mark.parametrize(
    ("ip", "same_as"),
    [
        (b"::ffff:192.0.2.1", b"192.0.2.1"),
        (b"::FFFF:c000:0201", b"192.0.2.1"),
        (b"2001:DB8::1", b"2001:db8:0:0::1"),
        (b"fe80::1%eth0", b"fe80::1"),
    ],
)
def test_parse_address_normalises(ip: bytes, same_as: bytes) -> None:
    assert parse_address(ip) == parse_address(same_as) is not None


@pytest.mark.parametrize("ip", [b"-", b"", b"1.2.3", b"01.2.3.4", b"::g", b"1.2.3.4 ", b"\xff"])
def test_parse_address_refuses_what_is_not_an_address(ip: bytes) -> None:
    assert parse_address(ip) is None


def test_a_long_network_list_is_matched_exactly() -> None:
    singles = [f"10.{i // 256}.{i % 256}.1" for i in range(10_000)]
    nets = Networks.parse([*singles, "172.16.0.0/12", "2001:db8:ff::/48"], "t", "k")
    assert parse_address(b"10.3.7.1") in nets  # type: ignore[operator]
    assert parse_address(b"10.3.7.2") not in nets  # type: ignore[operator]
    assert parse_address(b"172.31.255.255") in nets  # type: ignore[operator]
    assert parse_address(b"172.32.0.0") not in nets  # type: ignore[operator]
    assert parse_address(b"2001:db8:ff:1::1") in nets  # type: ignore[operator]
    assert parse_address(b"2001:db8:fe::1") not in nets  # type: ignore[operator]
    assert not Networks()


# ---- order and combination ---------------------------------------------------------


def test_first_matching_route_wins() -> None:
    router = _router(
        Match(path_prefix="/api/", methods=("POST",)),
        Match(path_prefix="/api/"),
        Match(hosts=("*.example.com",)),
        Match(),
        Match(path_prefix="/never/reached"),
    )
    cases = [
        (b"POST", b"example.com", b"/api/x", "r0"),
        (b"GET", b"example.com", b"/api/x", "r1"),
        (b"GET", b"www.example.com", b"/", "r2"),
        (b"POST", b"www.example.com", b"/api/", "r0"),
        (b"GET", b"other.test", b"/never/reached", "r3"),
    ]
    for method, host, target, expected in cases:
        assert _name(router, method=method, host=host, target=target) == expected


def test_every_part_of_a_match_must_hold() -> None:
    match = Match(
        hosts=("api.example.com",),
        path_prefix="/v1/",
        path_regex=r"/items/\d+$",
        methods=("PUT",),
        headers=(("content-type", "json"),),
        user_agent="client",
        networks=("10.0.0.0/8",),
    )
    good: dict[str, object] = {
        "method": b"PUT",
        "host": b"api.example.com",
        "target": b"/v1/items/7",
        "headers": [(b"Content-Type", b"application/json")],
        "client_ip": b"10.0.0.5",
        "user_agent": b"Client/1.0",
    }
    assert _matches(match, **good)
    spoilers: dict[str, object] = {
        "method": b"POST",
        "host": b"www.example.com",
        "target": b"/v2/items/7",
        "headers": [(b"Content-Type", b"text/plain")],
        "client_ip": b"192.0.2.1",
        "user_agent": b"other",
    }
    for part, bad in spoilers.items():
        assert not _matches(match, **{**good, part: bad}), part
    assert not _matches(match, **{**good, "target": b"/v1/items/x"})


def test_no_match_is_none_and_no_routes_match_nothing() -> None:
    assert _name(_router(Match(path_prefix="/a")), target=b"/b") is None
    assert _name(Router.compile([]), target=b"/") is None


def test_route_head_reads_a_parsed_request() -> None:
    router = Router.compile(
        [
            _pool("crawler", Match(user_agent=CRAWLER_USER_AGENTS)),
            _pool("api", Match(hosts=("api.example.com",), headers=(("x-api", "^v2$"),))),
            _pool("app"),
        ]
    )
    raw = (
        b"GET http://API.example.com:8080/x?y HTTP/1.1\r\nHost: ignored\r\nX-API: v2\r\n"
        b"User-Agent: " + BROWSER + b"\r\n\r\n"
    )
    head = RequestParser().feed(raw)[0]
    assert isinstance(head, RequestHead)
    route = router.route_head(head, b"192.0.2.1")
    assert route is not None
    assert route.name == "api"
    bot = RequestParser().feed(b"GET / HTTP/1.1\r\nHost: a\r\nUser-Agent: GPTBot/1.0\r\n\r\n")[0]
    assert isinstance(bot, RequestHead)
    assert router.route_head(bot, b"192.0.2.1") is router.routes[0]


# ---- what a route tells the server -------------------------------------------------


def _static(prefix: str | None, strip: bool = True) -> CompiledRoute:
    route = Route(
        name="static",
        kind=RouteKind.STATIC,
        root=Path("/srv/static"),
        strip_prefix=strip,
        match=Match(path_prefix=prefix),
    )
    return Router.compile([route]).routes[0]


@pytest.mark.parametrize(
    ("prefix", "strip", "target", "expected"),
    [
        ("/static/", True, b"/static/css/app.css?v=3", "css/app.css"),
        ("/static", True, b"/static/css/app.css", "css/app.css"),
        ("/static", True, b"/static", ""),
        ("/static/", True, b"/static/", ""),
        ("/static/", True, b"/static/img/", "img/"),
        ("/static/", False, b"/static/app.js", "static/app.js"),
        (None, True, b"/favicon.ico", "favicon.ico"),
        ("/static/", True, b"/static//a//b.css", "a/b.css"),
        ("/static/", True, b"/static/a%20b.txt", "a b.txt"),
        ("/static/", True, b"/static/%E6%97%A5.txt", "日.txt"),
        ("/static/", True, b"/static/%ff.bin", "\udcff.bin"),
        # Nothing can climb out of the root.
        ("/static/", True, b"/static/../../etc/passwd", None),
        ("/", True, b"/../../etc/passwd", "etc/passwd"),
        ("/static/", True, b"/static/..%2f..%2fetc/passwd", None),
        ("/static/", True, b"/static/a%2Fb", None),
        ("/static/", True, b"/static/a%00.txt", None),
        ("/static/", True, b"/static/%2e%2e/x", None),
    ],
)
def test_static_path(prefix: str | None, strip: bool, target: bytes, expected: str | None) -> None:
    assert _static(prefix, strip).static_path(target) == expected


def test_redirect_location_substitutes_the_request_uri() -> None:
    routes = [
        Route(
            name="https",
            kind=RouteKind.REDIRECT,
            status=301,
            location="https://example.com$uri",
            match=Match(hosts=("example.com",)),
        ),
        Route(name="moved", kind=RouteKind.REDIRECT, status=308, location="/new"),
    ]
    router = Router.compile(routes)
    first = router.route(b"GET", b"example.com", b"/a/b?c=d", [], b"192.0.2.1", user_agent=None)
    assert first is not None
    assert first.status == 301
    assert first.location(b"/a/b?c=d") == b"https://example.com/a/b?c=d"
    second = router.route(b"GET", b"other.test", b"/x", [], b"192.0.2.1", user_agent=None)
    assert second is not None
    assert second.location(b"/x") == b"/new"


def test_respond_and_pool_routes_carry_their_values() -> None:
    routes = [
        Route(
            name="gone",
            kind=RouteKind.RESPOND,
            status=410,
            body="gone for good ✓",
            match=Match(path_prefix="/old"),
        ),
        Route(name="app", kind=RouteKind.POOL, pool="app", cache=False),
    ]
    router = Router.compile(routes, pools={"app"})
    gone, app = router.routes
    assert (gone.kind, gone.status, gone.body) == (
        RouteKind.RESPOND,
        410,
        "gone for good ✓".encode(),
    )
    assert (app.kind, app.pool, app.cache, app.route) == (RouteKind.POOL, "app", False, routes[1])


def test_ready_made_routes() -> None:
    assert Router.compile(default_routes("app")).routes[0].route == Route(
        name="default", kind=RouteKind.POOL, pool="app"
    )
    route = crawler_route("crawler", name="bots")
    assert (route.name, route.pool, route.match.user_agent) == (
        "bots",
        "crawler",
        CRAWLER_USER_AGENTS,
    )


# ---- bad config --------------------------------------------------------------------

_BAD: list[tuple[Route | list[Route], str]] = [
    (_pool("p", Match(path_regex="(unclosed")), "routes[0].match.path_regex"),
    (_pool("p", Match(user_agent="[a-")), "routes[0].match.user_agent"),
    (_pool("p", Match(headers=(("x-a", "ok"), ("x-b", "*bad")))), "routes[0].match.headers[1]"),
    (_pool("p", Match(headers=(("bad name", "x"),))), "routes[0].match.headers[0]"),
    (_pool("p", Match(networks=("10.0.0.0/8", "10.0.0.0/33"))), "routes[0].match.networks[1]"),
    (_pool("p", Match(networks=("not-a-network",))), "routes[0].match.networks[0]"),
    (_pool("p", Match(hosts=("ok.test", "bad host"))), "routes[0].match.hosts[1]"),
    (_pool("p", Match(hosts=("*",))), "routes[0].match.hosts[0]"),
    (_pool("p", Match(hosts=("a.*.test",))), "routes[0].match.hosts[0]"),
    (_pool("p", Match(hosts=("*.",))), "routes[0].match.hosts[0]"),
    (_pool("p", Match(hosts=("example.com:80",))), "routes[0].match.hosts[0]"),
    (_pool("p", Match(hosts=("",))), "routes[0].match.hosts[0]"),
    (_pool("p", Match(hosts=("-bad.test",))), "routes[0].match.hosts[0]"),
    (_pool("p", Match(path_prefix="static/")), "routes[0].match.path_prefix"),
    (_pool("p", Match(path_prefix="/a?b")), "routes[0].match.path_prefix"),
    (_pool("p", Match(methods=("GE T",))), "routes[0].match.methods[0]"),
    (Route(name="p", kind=RouteKind.POOL), "routes[0].pool"),
    (Route(name="s", kind=RouteKind.STATIC), "routes[0].root"),
    (Route(name="r", kind=RouteKind.REDIRECT, status=302), "routes[0].location"),
    (Route(name="r", kind=RouteKind.REDIRECT, location="/x"), "routes[0].status"),
    (Route(name="r", kind=RouteKind.REDIRECT, status=301, location="/a b"), "routes[0].location"),
    (Route(name="r", kind=RouteKind.REDIRECT, status=301, location="/ü"), "routes[0].location"),
    (Route(name="x", kind=RouteKind.RESPOND, status=99), "routes[0].status"),
    (Route(name="x", kind=RouteKind.RESPOND, status=204, body="no"), "routes[0].body"),
    (Route(name="", kind=RouteKind.POOL, pool="a"), "routes[0].name"),
    ([_pool("a"), _pool("b"), _pool("a")], "routes[2].name"),
    ([_pool("a"), _pool("b", Match(path_regex="+"))], "routes[1].match.path_regex"),
]


@pytest.mark.parametrize(("routes", "key"), _BAD)
def test_bad_config_names_the_key(routes: Route | list[Route], key: str) -> None:
    given = routes if isinstance(routes, list) else [routes]
    with pytest.raises(ConfigError) as caught:
        Router.compile(given)
    assert caught.value.key == key
    assert caught.value.source == "proxy.routes"
    assert isinstance(caught.value, TiersError)
    assert key in str(caught.value)


def test_unknown_pool_is_an_error_only_when_pools_are_given() -> None:
    routes = [_pool("app"), _pool("missing")]
    assert len(Router.compile(routes).routes) == 2
    with pytest.raises(ConfigError) as caught:
        Router.compile(routes, pools={"app"}, source="tiers.toml")
    assert (caught.value.source, caught.value.key) == ("tiers.toml", "routes[1].pool")
