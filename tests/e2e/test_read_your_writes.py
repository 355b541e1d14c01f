"""Read-your-writes through the whole stack while the replica replays nothing.

With WAL replay paused on the replica, 100 cycles of POST then the page the
redirect leads to (two app servers behind the proxy, so the two requests of a
cycle often land on different ones) each show the new bookmark: the signed
causal-token cookie sends those reads to the primary. A visitor without the
cookie is served by the replica, which does not have the entries yet.
"""

from __future__ import annotations

import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.e2e.stackctl import StackHandle, make_handle, tear_down
from tests.e2e.test_stack import browser, post_bookmark
from tiers.db import embedded


@pytest.fixture(scope="module")
def stack() -> Iterator[StackHandle]:
    root = Path(tempfile.mkdtemp(prefix="tiers-ryw-"))
    root.chmod(0o755)
    handle = make_handle(root, apps=2, replicas=1)
    try:
        handle.tiers("up", "-d")
        yield handle
    finally:
        tear_down(handle)
        shutil.rmtree(root, ignore_errors=True)


def _replay(port: int, action: str) -> None:
    with psycopg.connect(embedded.conninfo(port, "postgres"), connect_timeout=2,
                         autocommit=True) as conn:
        conn.execute(f"SELECT pg_wal_replay_{action}()")


def _status_of(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_100_posts_each_seen_on_the_next_page_while_the_replica_lags(
        stack: StackHandle) -> None:
    replica_port = stack.db_ports[1]
    # A commit replayed just before the pause: replay lag in seconds counts from the
    # last replayed commit, and an idle stack's last one may be long past.
    final_url, _ = post_bookmark(browser(), stack.base_url, "https://example.com/fresh", "x")
    stack.wait_for(lambda: _status_of(final_url) == 200, 30, "the replica to replay a commit")
    _replay(replica_port, "pause")
    try:
        client = browser()
        pages = []
        # First, while the pause is fresh: a visitor without the cookie reads the replica.
        final_url, page = post_bookmark(client, stack.base_url, "https://example.com/first",
                                        "before the loop")
        assert "before the loop" in page
        assert _status_of(final_url) == 404
        for n in range(100):
            url = f"https://example.com/lagging/{n}"
            final_url, page = post_bookmark(client, stack.base_url, url, f"cycle {n}")
            assert url in page and f"cycle {n}" in page, f"cycle {n}: {final_url}"
            pages.append(final_url)
        # Served from both app servers (the access log's upstream field names them).
        access = (stack.state_dir / "logs" / "access.log").read_text()
        upstreams = {f"127.0.0.1:{port}" for port in stack.app_ports}
        assert all(f"upstream:{u}" in access for u in upstreams)
        # Without the cookie the same pages come from the replica, which lacks them.
        assert {_status_of(page) for page in pages[-5:]} == {404}
    finally:
        _replay(replica_port, "resume")
    stack.wait_for(lambda: _status_of(pages[-1]) == 200, 30, "the replica to catch up")
