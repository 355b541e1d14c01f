"""The page cache on the request path of a real proxy: coalescing, stale-if-error, purge."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tests.e2e.stackctl import free_ports
from tests.integration.proxykit import Backend, Proxy
from tests.integration.test_proxy_admin import TOKEN, admin_get


def fetch(proxy: Proxy, path: str, headers: dict[str, str] | None = None
          ) -> tuple[int, bytes, str | None]:
    conn = proxy.connection()
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read(), response.getheader("X-Cache")
    finally:
        conn.close()


def test_concurrent_misses_make_exactly_one_app_request(
        backends: Callable[[int], list[Backend]], proxy: Callable[..., Proxy]) -> None:
    (a,) = backends(1)
    p = proxy([a])
    results: list[tuple[int, bytes, str | None]] = []
    lock = threading.Lock()

    def one() -> None:
        answer = fetch(p, "/cacheable?s=0.5")
        with lock:
            results.append(answer)

    threads = [threading.Thread(target=one) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert len(results) == 20
    assert len(a.requests("GET", "/cacheable?s=0.5")) == 1
    assert {(status, body) for status, body, _ in results} == {(200, b"page from A #1\n")}
    labels = sorted(label or "-" for _, _, label in results)
    assert labels.count("MISS") == 1 and labels.count("HIT") == 19
    # And afterwards it is simply a hit.
    assert fetch(p, "/cacheable?s=0.5")[2] == "HIT"
    assert len(a.requests("GET", "/cacheable?s=0.5")) == 1


def test_a_stale_page_is_served_while_the_app_is_down(
        backends: Callable[[int], list[Backend]], proxy: Callable[..., Proxy]) -> None:
    (a,) = backends(1)
    p = proxy([a])
    assert fetch(p, "/cacheable?age=1") == (200, b"page from A #1\n", "MISS")
    time.sleep(1.3)  # past max-age=1, inside stale-if-error=60
    a.stop()
    status, body, label = fetch(p, "/cacheable?age=1")
    assert (status, body, label) == (200, b"page from A #1\n", "STALE")


def test_requests_with_cookies_bypass_the_cache(
        backends: Callable[[int], list[Backend]], proxy: Callable[..., Proxy]) -> None:
    (a,) = backends(1)
    p = proxy([a])
    for _ in range(2):
        status, _, label = fetch(p, "/cacheable", {"Cookie": "session=1"})
        assert status == 200 and label is None
    assert len(a.requests("GET", "/cacheable")) == 2


def test_purge_through_the_admin_listener(
        tmp_path: Path, backends: Callable[[int], list[Backend]]) -> None:
    (a,) = backends(1)
    (admin_port,) = free_ports(1)
    topology = tmp_path / "tiers.toml"
    topology.write_text(f'[app]\nport = 1\n[proxy.pools.web]\nservers = ["{a.address}"]\n'
                        f'[[proxy.routes]]\npool = "web"\n'
                        f'[proxy.admin]\nlisten = "127.0.0.1:{admin_port}"\ntoken = "{TOKEN}"\n')
    p = Proxy(["--topology", str(topology)], tmp_path / "unused.log")
    try:
        assert fetch(p, "/cacheable")[2] == "MISS"
        assert fetch(p, "/cacheable")[2] == "HIT"
        prefix = f"http://127.0.0.1:{p.port}/cache"
        code, body, _ = admin_get(admin_port, f"/cache/purge?url={prefix}", TOKEN,
                                  method="POST")
        assert code == 200 and body == b'{"purged": 1}\n'
        assert fetch(p, "/cacheable") == (200, b"page from A #2\n", "MISS")
        conn = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
        conn.request("GET", "/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
        text = conn.getresponse().read().decode()
        conn.close()
        assert 'tiers_proxy_cache_lookups_total{result="hits"} 1' in text
    finally:
        p.stop()
