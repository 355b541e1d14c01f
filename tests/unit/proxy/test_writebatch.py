"""The write batch: the first write of a loop iteration at once, the rest at its end, in order."""

from __future__ import annotations

import asyncio
from typing import cast

from tests.unit.proxy.fakes import FakeTransport
from tiers.proxy.__main__ import parse_args
from tiers.proxy.connection import ClientConnection
from tiers.proxy.server import ProxyServer
from tiers.proxy.upstreamconn import UpstreamConnection
from tiers.proxy.writebatch import WriteBatch


def _pair(log: list[tuple[str, bytes]]) -> tuple[asyncio.Transport, asyncio.Transport]:
    return (cast(asyncio.Transport, FakeTransport("a", log)),
            cast(asyncio.Transport, FakeTransport("b", log)))


def test_the_first_write_of_an_iteration_goes_at_once_the_rest_at_its_end() -> None:
    async def scenario() -> None:
        log: list[tuple[str, bytes]] = []
        a, b = _pair(log)
        batch = WriteBatch()
        batch.write(a, b"1")
        assert log == [("a", b"1")]  # a lone request waits for nothing
        batch.write(b, b"2")
        batch.write(a, b"3")
        assert log == [("a", b"1")]
        assert batch.pending == 2
        await asyncio.sleep(0)  # the iteration ends
        assert log == [("a", b"1"), ("b", b"2"), ("a", b"3")]
        assert batch.pending == 0
        batch.write(b, b"4")  # a new iteration: at once again
        assert log[-1] == ("b", b"4")

    asyncio.run(scenario())


def test_flush_sends_what_is_held_back_before_a_direct_write() -> None:
    async def scenario() -> None:
        log: list[tuple[str, bytes]] = []
        a, _ = _pair(log)
        batch = WriteBatch()
        batch.write(a, b"head")
        batch.write(a, b"answer 1")
        batch.flush()
        a.write(b"answer 2")  # what a direct writer does after flush
        await asyncio.sleep(0)
        assert [data for _, data in log] == [b"head", b"answer 1", b"answer 2"]

    asyncio.run(scenario())


def test_a_closed_transport_gets_nothing_and_a_broken_one_does_not_stop_the_others() -> None:
    async def scenario() -> None:
        log: list[tuple[str, bytes]] = []
        a, b = _pair(log)
        c = cast(asyncio.Transport, FakeTransport("c", log))
        batch = WriteBatch()
        batch.write(a, b"first")
        batch.write(a, b"late")
        batch.write(b, b"broken")
        batch.write(c, b"fine")
        cast(FakeTransport, a).closing = True  # closed or aborted meanwhile
        cast(FakeTransport, b).fail = True
        await asyncio.sleep(0)
        assert log == [("a", b"first"), ("c", b"fine")]

    asyncio.run(scenario())


# ---- through the proxy's callback path ---------------------------------------------

_RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n"
             b"Connection: keep-alive\r\n\r\nhello")


def test_a_batched_answer_goes_out_before_the_close_that_follows_it() -> None:
    async def scenario() -> None:
        settings, _ = parse_args(["--listen", "127.0.0.1:0", "--backend", "127.0.0.1:9"])
        loop = asyncio.get_running_loop()
        server = ProxyServer(settings)
        server._loop = loop  # what start() sets, without binding or health checks
        upstreams = server.pools["default"]
        backend = upstreams.pick(())
        assert backend is not None
        log: list[tuple[str, bytes]] = []
        ups = []
        for name in ("up1", "up2"):
            up = UpstreamConnection(backend, loop)
            up.connection_made(cast(asyncio.Transport, FakeTransport(name, log)))
            up.finish(loop.time())
            backend.pool.put(up)
            ups.append(up)
        clients = []
        for name in ("keep", "close"):
            client = ClientConnection(server)
            client.connection_made(cast(asyncio.Transport, FakeTransport(name, log)))
            clients.append(client)
        # One loop iteration: both requests, then both answers. Only the very
        # first write goes out at once; the close answer is batched.
        clients[0].data_received(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\n")
        clients[1].data_received(b"GET /b HTTP/1.0\r\n\r\n")  # no keep-alive
        for up in ups:
            up.data_received(_RESPONSE)
        await asyncio.sleep(0)
        close_log = [data for name, data in log if name == "close"]
        assert len(close_log) == 2
        assert close_log[0].startswith(b"HTTP/1.1 200 OK\r\n") and close_log[0].endswith(b"hello")
        assert close_log[1] == b"<close>"
        keep_log = [data for name, data in log if name == "keep"]
        assert len(keep_log) == 1 and keep_log[0].endswith(b"hello")
        # Each request head went out once, on its own backend connection.
        assert sorted(name for name, _ in log if name.startswith("up")) == ["up1", "up2"]
        assert server.writes.pending == 0

    asyncio.run(scenario())
