"""What `tiers status` and `tiers cache status` show of cache nodes."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tiers.cache.client import Client
from tiers.cache.server import CacheServer, Store
from tiers.cli import inspect
from tiers.cli.inspect import CACHE_STATS, cache_node_stats
from tiers.cli.main import cli


@pytest.fixture
def node() -> Iterator[str]:
    """An embedded cache node on an ephemeral port, served from a thread."""
    loop = asyncio.new_event_loop()
    server = CacheServer(Store(memory_limit=1 << 20))
    ready = threading.Event()
    bound: list[tuple[str, int]] = []

    async def start() -> None:
        bound.append(await server.start("127.0.0.1", 0))
        ready.set()

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop)
    assert ready.wait(10)
    host, port = bound[0]
    try:
        yield f"{host}:{port}"
    finally:
        asyncio.run_coroutine_threadsafe(server.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def test_a_node_reports_its_own_counters(node: str) -> None:
    host, port = node.rsplit(":", 1)
    with Client(host, int(port)) as client:
        client.set("a", "x" * 100)
        client.get("a")
        client.get("missing")
    stats = cache_node_stats(node)
    assert list(stats) == list(CACHE_STATS)
    assert stats["curr_items"] == 1
    assert (stats["get_hits"], stats["get_misses"], stats["evictions"]) == (1, 1, 0)
    assert stats["bytes"] > 100 and stats["limit_maxbytes"] == 1 << 20


def test_a_node_that_does_not_answer_shows_the_error() -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        port = holder.getsockname()[1]  # bound, not listening: refused
        stats = cache_node_stats(f"127.0.0.1:{port}")
    assert list(stats) == ["error"]
    assert f"127.0.0.1:{port}" in stats["error"]


def test_the_detail_column_reads_like_a_sentence() -> None:
    stats = {"curr_items": 3, "get_hits": 10, "get_misses": 2, "evictions": 0,
             "bytes": 1572864, "limit_maxbytes": 67108864}
    assert inspect._cache_detail(stats) == (
        "items 3, hits 10, misses 2, evictions 0, 1.5 of 64.0 MB")
    assert inspect._cache_detail({"curr_items": None, "bytes": None}) == (
        "items ?, hits ?, misses ?, evictions ?, ? of ? MB")
    assert inspect._cache_detail({"error": "refused"}) == "stats: refused"


def test_only_live_cache_nodes_are_asked(node: str) -> None:
    services = [
        {"name": "cache1", "role": "cache", "address": node, "state": "ready"},
        {"name": "cache2", "role": "cache", "address": "127.0.0.1:1", "state": "stopped"},
        {"name": "app1", "role": "app", "address": "127.0.0.1:2", "state": "ready"},
    ]
    inspect._add_cache_stats(services)
    assert services[0]["cache"]["limit_maxbytes"] == 1 << 20
    assert "cache" not in services[1] and "cache" not in services[2]


def test_cache_status_without_a_stack(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--state-dir", str(tmp_path / "state"), "cache", "status"])
    assert result.exit_code == 0
    assert "no stack is running" in result.output
    listed = CliRunner().invoke(cli, ["--state-dir", str(tmp_path / "state"), "cache", "status",
                                      "--json"])
    assert listed.exit_code == 0 and json.loads(listed.output) == []
