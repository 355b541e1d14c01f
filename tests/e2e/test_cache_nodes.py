"""The cache tier's nodes in the stack: real memcached when installed, else tiers' own server.

One small stack per engine (no replica, one app server): each cache node is
ready, answers the memcached protocol through tiers' client, and its process
is the engine asked for; `down` leaves none of them behind.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import psutil
import pytest

from tests.conftest import require
from tests.e2e.stackctl import make_handle, tear_down
from tiers.cache.client import Client


@pytest.mark.parametrize("engine", ["embedded", "memcached"])
def test_cache_nodes_run_the_engine_asked_for(open_tmp: Path, engine: str) -> None:
    if engine == "memcached":
        require(shutil.which("memcached") is not None, "memcached is not installed")
    handle = make_handle(open_tmp, apps=1, replicas=0, caches=2,
                         cache_extra=f'engine = "{engine}"\nmemory_mb = 8')
    try:
        handle.tiers("up", "-d")
        services = {s["name"]: s for s in handle.status()["services"]}
        processes = []
        for name, port in zip(("cache1", "cache2"), handle.cache_ports, strict=True):
            assert services[name]["role"] == "cache" and services[name]["state"] == "ready"
            process = psutil.Process(services[name]["pid"])
            command = " ".join(process.cmdline())
            if engine == "embedded":
                assert "tiers.cache.server" in command
            else:
                assert process.name() == "memcached"
            processes.append(process)
            with Client("127.0.0.1", port) as client:
                assert client.set("greeting", f"hello from {name}")
                assert client.get("greeting") == f"hello from {name}"
        handle.tiers("down")
        assert [p for p in processes if p.is_running() and p.status() != "zombie"] == []
    finally:
        tear_down(handle)


def test_an_unknown_engine_is_a_configuration_error(open_tmp: Path) -> None:
    handle = make_handle(open_tmp, apps=1, replicas=0, cache_extra='engine = "redis"')
    done = handle.tiers("up", "-d", check=False)
    assert done.returncode == 2
    assert "cache.engine: must be one of auto, memcached, embedded" in done.stderr
