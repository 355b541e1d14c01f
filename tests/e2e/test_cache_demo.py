"""The demo through the cache tier, end to end: `tiers up -d` with two cache nodes.

The front page's hot ranking lands in a cache node; a user's rendered stars are
cached after a visit, deleted by that user's star before the redirect, and the
user sees the star at once; `tiers status` shows what each node reports of
itself; an app server's `/_tiers/metrics` shows its cache counters per node to
a scraper on the host, and the same path through the proxy is not served;
killing a cache node under load fails no page.
"""

from __future__ import annotations

import http.cookiejar
import os
import re
import shutil
import signal
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.stackctl import StackHandle, make_handle, tear_down
from tiers.cache.client import Client
from tiers.cache.stampede import unpack

HOT_KEY = "front:hot"


@pytest.fixture(scope="module")
def stack() -> Iterator[StackHandle]:
    root = Path(tempfile.mkdtemp(prefix="tiers-e2e-cache-"))
    root.chmod(0o755)
    handle = make_handle(root, caches=2)
    try:
        handle.tiers("up", "-d")
        yield handle
    finally:
        tear_down(handle)
        shutil.rmtree(root, ignore_errors=True)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class Browser:
    """One person's cookies; posts return the redirect instead of following it."""

    def __init__(self) -> None:
        jar = http.cookiejar.CookieJar()
        self.follow = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        self.stay = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar),
                                                _NoRedirect())

    def get(self, url: str) -> str:
        with self.follow.open(url, timeout=10) as response:
            assert response.status == 200
            return str(response.read().decode())

    def post(self, url: str, fields: dict[str, str]) -> str:
        """The Location of the 303 the POST answers."""
        data = urllib.parse.urlencode(fields).encode()
        try:
            self.stay.open(url, data=data, timeout=10)
        except urllib.error.HTTPError as answer:
            assert answer.code == 303, answer.read()
            location = answer.headers["Location"]
            answer.close()
            return urllib.parse.urljoin(url, location)
        raise AssertionError(f"POST {url} did not redirect")


def held(handle: StackHandle, key: str) -> dict[int, Any]:
    """The value of ``key`` on each cache node that holds it, by port."""
    found = {}
    for port in handle.cache_ports:
        with Client("127.0.0.1", port) as client:
            value = client.get_many([key]).get(key)
        if value is not None:
            found[port] = value
    return found


def new_entry(browser: Browser, base: str, url: str) -> int:
    location = browser.post(f"{base}/bookmarks", {"url": url, "title": f"Title of {url}",
                                                  "user": "alice", "comment": ""})
    return int(location.rsplit("/", 1)[1])


def test_the_hot_ranking_is_stored_in_a_cache_node(stack: StackHandle) -> None:
    browser = Browser()
    new_entry(browser, stack.base_url, "https://example.com/hot")
    page = browser.get(stack.base_url + "/")
    assert "Hot entries" in page
    holders = held(stack, HOT_KEY)
    assert len(holders) == 1  # on its ring owner, and only there
    envelope = unpack(next(iter(holders.values())))
    assert envelope is not None
    assert b"https://example.com/hot" in envelope.value


def test_a_users_stars_are_cached_and_a_star_shows_at_once(stack: StackHandle) -> None:
    base, key = stack.base_url, "user:carol:stars"
    browser = Browser()
    entry_id = new_entry(browser, base, "https://example.com/starred-by-carol")
    assert "No stars yet." in browser.get(f"{base}/users/carol/stars")
    (cached,) = held(stack, key).values()
    assert "No stars yet." in cached["html"]
    location = browser.post(f"{base}/stars", {"user": "carol", "entry_id": str(entry_id)})
    assert location.endswith("/users/carol/stars")
    assert held(stack, key) == {}  # deleted before the redirect was answered
    page = browser.get(location)
    assert "Title of https://example.com/starred-by-carol" in page
    assert "No stars yet." not in page
    (cached,) = held(stack, key).values()
    assert "starred-by-carol" in cached["html"]


def test_status_shows_what_each_cache_node_reports(stack: StackHandle) -> None:
    Browser().get(stack.base_url + "/")
    nodes = [s for s in stack.status()["services"] if s["role"] == "cache"]
    assert [n["name"] for n in nodes] == ["cache1", "cache2"]
    for node in nodes:
        stats = node["cache"]
        assert set(stats) == {"curr_items", "get_hits", "get_misses", "evictions", "bytes",
                              "limit_maxbytes"}
        assert all(isinstance(value, int) for value in stats.values())
        assert stats["limit_maxbytes"] > 0
    assert sum(n["cache"]["curr_items"] for n in nodes) >= 1
    assert sum(n["cache"]["get_hits"] + n["cache"]["get_misses"] for n in nodes) >= 1
    text = stack.tiers("status").stdout
    assert re.search(r"^cache1 .*items \d+, hits \d+, misses \d+, evictions \d+, [\d.]+ of "
                     r"[\d.]+ MB$", text, re.MULTILINE), text
    listed = stack.tiers("cache", "status").stdout
    assert "CURR_ITEMS" in listed and "cache2" in listed


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_tiers/metrics",
                                timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return str(response.read().decode())


def cache_requests(text: str) -> dict[str, float]:
    """Hits plus misses per node in one scrape."""
    seen: dict[str, float] = {}
    for match in re.finditer(r'^tiers_cache_(?:hits|misses)_total\{[^}]*node="([^"]+)"\} (\S+)$',
                             text, re.MULTILINE):
        seen[match.group(1)] = seen.get(match.group(1), 0.0) + float(match.group(2))
    return seen


def test_an_app_server_shows_its_cache_counters_per_node(stack: StackHandle) -> None:
    port = stack.app_ports[0]
    addresses = {f"127.0.0.1:{p}" for p in stack.cache_ports}
    worked = None
    # Each gunicorn worker answers for itself: ask until a worker that has
    # served a page answers (any worker that served one has counted requests).
    for _ in range(30):
        Browser().get(f"http://127.0.0.1:{port}/")
        text = scrape(port)
        counts = cache_requests(text)
        assert set(counts) == addresses, text
        assert re.search(r'worker="\d+"', text) and 'server="app1"' in text
        if sum(counts.values()) > 0:
            worked = text
            break
    assert worked is not None, "no worker showed a cache request"
    assert 'tiers_cache_node_state{server="app1"' in worked
    assert "tiers_cache_request_duration_seconds_bucket{" in worked


def test_the_metrics_path_is_not_served_through_the_proxy(stack: StackHandle) -> None:
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(stack.base_url + "/_tiers/metrics", timeout=10)
    assert refused.value.code in (403, 404)
    assert b"tiers_cache" not in refused.value.read()
    refused.value.close()


def test_killing_a_cache_node_fails_no_page(stack: StackHandle) -> None:
    base = stack.base_url
    browser = Browser()
    entry_id = new_entry(browser, base, "https://example.com/survives")
    browser.post(f"{base}/stars", {"user": "dave", "entry_id": str(entry_id)})
    browser.get(base + "/")
    # The node holding the hot ranking: its lease and value go with it.
    (port,) = held(stack, HOT_KEY)
    victim = next(s for s in stack.status()["services"]
                  if s["role"] == "cache" and s["address"] == f"127.0.0.1:{port}")
    failures = []
    for index in range(200):
        if index == 40:
            os.kill(victim["pid"], signal.SIGKILL)
        path = "/" if index % 2 else "/users/dave/stars"
        try:
            # With the cookie of the star: a lagging replica must not hide it.
            with browser.follow.open(base + path, timeout=10) as response:
                body = response.read()
                if response.status != 200:
                    failures.append((index, response.status))
                elif path != "/" and b"survives" not in body:
                    failures.append((index, "the star is missing"))
        except (urllib.error.URLError, OSError) as exc:
            failures.append((index, repr(exc)))
    assert failures == []
