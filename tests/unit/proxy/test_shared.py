"""The server's per-request parts live in one Shared object that its connections read."""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import replace
from typing import cast

from tests.unit.proxy.fakes import FakeTransport
from tiers.proxy.__main__ import parse_args
from tiers.proxy.accesslog import AccessLog
from tiers.proxy.connection import ClientConnection
from tiers.proxy.routing import Router
from tiers.proxy.server import ProxyServer


def _server() -> ProxyServer:
    settings, _ = parse_args(["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9"])
    return ProxyServer(settings)


def test_the_server_attributes_are_the_shared_ones() -> None:
    server = _server()
    shared = server.shared
    assert server.cache is shared.cache and server.pools is shared.pools
    assert server.router is shared.router and server.writes is shared.writes
    log = AccessLog("/dev/null")
    server.access_log = log
    assert shared.access_log is log
    router = Router.compile(server.settings.policy.routes, pools={"default"})
    server.router = router
    assert shared.router is router
    server.stopping = True
    assert shared.stopping
    log.close()


def test_the_class_itself_can_be_looked_through() -> None:
    assert ProxyServer.cache is ProxyServer.__dict__["cache"]  # the descriptor itself
    assert "cache" in dict(inspect.getmembers(ProxyServer))


def test_the_body_limit_follows_the_settings() -> None:
    server = _server()
    assert server.shared.max_body_size == server.settings.policy.max_body_size
    settings = server.settings
    server.settings = replace(settings, policy=replace(settings.policy, max_body_size=10))
    assert server.shared.settings is server.settings
    assert server.shared.max_body_size == 10


def test_an_open_connection_sees_settings_swapped_under_it() -> None:
    """What reload does: a connection made before it applies the new limit."""

    async def scenario() -> bytes:
        server = _server()
        server._loop = asyncio.get_running_loop()  # what start() sets, without binding
        client = ClientConnection(server)
        transport = FakeTransport()
        client.connection_made(cast(asyncio.Transport, transport))
        settings = server.settings
        server.settings = replace(settings, policy=replace(settings.policy, max_body_size=10))
        client.data_received(b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 20\r\n\r\n")
        for _ in range(20):
            if transport.written():
                break
            await asyncio.sleep(0.01)
        client.connection_lost(None)
        await asyncio.sleep(0)
        return b"".join(transport.written())

    assert asyncio.run(scenario()).startswith(b"HTTP/1.1 413 ")
