"""Fixtures shared by the integration tests: backends, proxy processes, scripted cache nodes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.integration.cachekit import ScriptedServer
from tests.integration.proxykit import FAST_HEALTH, Backend, Proxy, start_backends


@pytest.fixture
def jobs_dsn(fresh_database: str) -> str:
    """A database of its own with the job queue's schema installed."""
    from tiers.jobs.store import install_schema

    install_schema(fresh_database)
    return fresh_database


@pytest.fixture
def backends() -> Iterator[Callable[[int], list[Backend]]]:
    yield from start_backends(lambda name: Backend(name=name))



@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    started: list[Proxy] = []

    def start(servers: list[Backend], *extra: str) -> Proxy:
        args = [arg for b in servers for arg in ("--backend", b.address)]
        log = tmp_path / f"access-{len(started)}.log"
        p = Proxy([*args, "--access-log", str(log), *FAST_HEALTH, *extra], log)
        started.append(p)
        return p

    yield start
    for p in started:
        p.kill()


@pytest.fixture
def scripted() -> Iterator[Callable[[Callable[[bytes], object]], ScriptedServer]]:
    """Makes scripted cache nodes (``cachekit.ScriptedServer``), closed after the test."""
    servers: list[ScriptedServer] = []

    def make(answer: Callable[[bytes], object]) -> ScriptedServer:
        server = ScriptedServer(answer)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.close()
