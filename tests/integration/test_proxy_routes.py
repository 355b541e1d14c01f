"""Routing, static files, redirects, abuse limits and body limits through a real proxy."""

from __future__ import annotations

import http.client
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.proxykit import Backend, Proxy, _json
from tiers.proxy.routing import CRAWLER_USER_AGENTS

GOOGLEBOT = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)"
BROWSER = "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0"


@pytest.fixture
def routed(tmp_path: Path, backends: Callable[[int], list[Backend]]) -> Iterator[
        tuple[Proxy, list[Backend], Path]]:
    users_a, users_b, crawler = backends(3)
    static = tmp_path / "static"
    static.mkdir()
    (static / "app.css").write_text("body { color: #222 }\n" * 100)
    (tmp_path / "secret.txt").write_text("outside the root\n")
    (static / "escape").symlink_to(tmp_path / "secret.txt")
    topology = tmp_path / "tiers.toml"
    crawler_pattern = CRAWLER_USER_AGENTS.replace("\\", "\\\\")
    topology.write_text(f"""
[app]
port = 1
[proxy]
max_body_size = 1000
[proxy.admin]
listen = false
[proxy.pools.users]
servers = ["{users_a.address}", "{users_b.address}"]
[proxy.pools.crawlers]
servers = ["{crawler.address}"]
[proxy.abuse]
rate = 5
burst = 10
block_for = 30
exempt_networks = []
deny_user_agents = ["(?i)evilscanner"]

[[proxy.routes]]
name = "crawlers"
user_agent = "{crawler_pattern}"
pool = "crawlers"

[[proxy.routes]]
name = "static"
path_prefix = "/static/"
static = "{static}"

[[proxy.routes]]
name = "old"
path_prefix = "/old/"
redirect = "/new$uri"
status = 301

[[proxy.routes]]
name = "admin-block"
path_prefix = "/internal/"
respond = 403
body = "not here\\n"

[[proxy.routes]]
name = "users"
pool = "users"
""")
    proxy = Proxy(["--topology", str(topology), "--access-log", str(tmp_path / "access.log")],
                  tmp_path / "access.log")
    yield proxy, [users_a, users_b, crawler], static
    proxy.kill()


def request(proxy: Proxy, method: str, path: str, headers: dict[str, str] | None = None,
            body: bytes | None = None) -> tuple[int, bytes, http.client.HTTPResponse]:
    conn = proxy.connection()
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), response
    finally:
        conn.close()


def test_crawlers_reach_only_the_crawler_pool(
        routed: tuple[Proxy, list[Backend], Path]) -> None:
    proxy, (users_a, users_b, crawler), _ = routed
    for _ in range(4):
        status, body, _ = request(proxy, "GET", "/page", {"User-Agent": GOOGLEBOT})
        assert status == 200 and _json(body)["backend"] == crawler.name
    for _ in range(4):
        status, body, _ = request(proxy, "GET", "/page", {"User-Agent": BROWSER})
        assert status == 200 and _json(body)["backend"] in (users_a.name, users_b.name)
    assert len(crawler.requests("GET")) == 4
    assert len(users_a.requests("GET")) + len(users_b.requests("GET")) == 4


def test_static_files_with_304_and_range_never_touch_an_app(
        routed: tuple[Proxy, list[Backend], Path]) -> None:
    proxy, servers, static = routed
    full = (static / "app.css").read_bytes()
    status, body, response = request(proxy, "GET", "/static/app.css")
    assert status == 200 and body == full
    assert response.getheader("Content-Type") == "text/css; charset=utf-8"
    etag = response.getheader("ETag")
    assert etag is not None
    status, body, _ = request(proxy, "GET", "/static/app.css", {"If-None-Match": etag})
    assert status == 304 and body == b""
    status, body, response = request(proxy, "GET", "/static/app.css", {"Range": "bytes=5-14"})
    assert status == 206 and body == full[5:15]
    assert response.getheader("Content-Range") == f"bytes 5-14/{len(full)}"
    # Dot segments are resolved before routing (so /static/../x is /x, an app's
    # business); what stays under /static/ never leaves the root.
    for escape in ("/static/../secret.txt", "/static/%2e%2e/secret.txt",
                   "/static/..%2fsecret.txt", "/static/escape", "/static/%2fsecret.txt"):
        status, body, _ = request(proxy, "GET", escape)
        assert b"outside the root" not in body, escape
        if not escape.startswith(("/static/..", "/static/%2e%2e")):
            assert status in (403, 404), escape
    assert not [s for backend in servers for s in backend.requests()
                if s.path.startswith("/static/app.css")]


def test_redirect_and_fixed_answers(routed: tuple[Proxy, list[Backend], Path]) -> None:
    proxy, _, _ = routed
    status, _, response = request(proxy, "GET", "/old/page?x=1")
    assert status == 301 and response.getheader("Location") == "/new/old/page?x=1"
    status, body, _ = request(proxy, "GET", "/internal/stats")
    assert status == 403 and body == b"not here\n"


def test_denied_user_agent_and_large_body(routed: tuple[Proxy, list[Backend], Path]) -> None:
    proxy, servers, _ = routed
    status, _, _ = request(proxy, "GET", "/", {"User-Agent": "EvilScanner/1.0"})
    assert status == 403
    status, _, _ = request(proxy, "POST", "/upload", body=b"x" * 5000)
    assert status == 413
    assert not any(s.requests("POST") for s in servers)


def test_a_client_over_the_rate_limit_is_blocked_with_429(
        routed: tuple[Proxy, list[Backend], Path]) -> None:
    proxy, _, _ = routed
    statuses = [request(proxy, "GET", f"/r/{i}")[0] for i in range(30)]
    assert statuses[:10] == [200] * 10  # the burst
    assert 429 in statuses
    blocked_from = statuses.index(429)
    assert set(statuses[blocked_from:]) == {429}  # blocked, not just slowed
    _, _, response = request(proxy, "GET", "/after")
    assert response.status == 429 and int(response.getheader("Retry-After") or 0) >= 1


def test_access_log_names_the_route(routed: tuple[Proxy, list[Backend], Path]) -> None:
    proxy, _, _ = routed
    request(proxy, "GET", "/page", {"User-Agent": GOOGLEBOT})
    request(proxy, "GET", "/static/app.css")
    assert proxy.stop() == 0
    from tiers.proxy.accesslog import parse_line

    routes = [parse_line(line)["route"] for line in proxy.access_log.read_bytes().splitlines()]
    assert routes == [b"crawlers", b"static"]
