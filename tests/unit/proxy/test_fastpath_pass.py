"""A page that passes the cache, through the proxy's callback path."""

from __future__ import annotations

import asyncio
from typing import cast

from tests.unit.proxy.fakes import FakeTransport
from tiers.proxy.__main__ import parse_args
from tiers.proxy.connection import ClientConnection
from tiers.proxy.server import ProxyServer
from tiers.proxy.upstreamconn import UpstreamConnection

_UNCACHEABLE = (b"HTTP/1.1 200 OK\r\nContent-Length: 7\r\nSet-Cookie: s=1\r\n\r\nprivate")
_CACHEABLE = (b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nCache-Control: public, max-age=60\r\n"
              b"\r\npublic")
_REQUEST = b"GET /page HTTP/1.1\r\nHost: site.test\r\n\r\n"


def test_within_a_second_of_its_pass_mark_a_page_goes_by_unjudged_but_marked_miss() -> None:
    async def scenario() -> None:
        settings, _ = parse_args(["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9"])
        loop = asyncio.get_running_loop()
        server = ProxyServer(settings)
        server._loop = loop  # what start() sets, without binding or health checks
        backend = server.pools["default"].pick(())
        assert backend is not None
        upstream_side = FakeTransport()
        upstream = UpstreamConnection(backend, loop)
        upstream.connection_made(cast(asyncio.Transport, upstream_side))
        upstream.finish(loop.time())
        backend.pool.put(upstream)
        client_side = FakeTransport()
        client = ClientConnection(server)
        client.connection_made(cast(asyncio.Transport, client_side))

        async def exchange(response: bytes) -> bytes:
            sent = len(upstream_side.written())
            client.data_received(_REQUEST)
            await asyncio.sleep(0)
            assert len(upstream_side.written()) == sent + 1  # the request went to the backend
            answered = len(client_side.written())
            upstream.data_received(response)
            await asyncio.sleep(0)
            assert len(client_side.written()) == answered + 1
            return client_side.written()[-1]

        # Judged: uncacheable, so the page passes from now on.
        assert b"\r\nX-Cache: MISS\r\n" in await exchange(_UNCACHEABLE)
        assert server.cache.coalescer.passing(b"site.test/page")
        # Within the second: not judged, so even a cacheable answer is not stored,
        # and the next request goes to the backend again; still marked MISS.
        assert b"\r\nX-Cache: MISS\r\n" in await exchange(_CACHEABLE)
        assert server.cache.metrics()["entries"] == 0
        assert (await exchange(_CACHEABLE)).endswith(b"public")
        client.connection_lost(None)

    asyncio.run(scenario())
