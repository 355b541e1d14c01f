"""A backend connection driven by callbacks (``listen``) and handed back to waiting."""

from __future__ import annotations

import asyncio

import pytest

from tiers.config.model import Address
from tiers.config.proxy import Pool, Server
from tiers.proxy.balancer import BUSY, Outcome
from tiers.proxy.errors import UpstreamClosed, UpstreamProtocolError
from tiers.proxy.http1 import END, BodyData
from tiers.proxy.responseparser import ResponseHead
from tiers.proxy.upstream import Upstreams, UpstreamSettings
from tiers.proxy.upstreamconn import UpstreamConnection

HEAD = b"HTTP/1.1 200 OK\r\nServer: t\r\nContent-Length: 10\r\nConnection: keep-alive\r\n\r\n"


class FakeTransport:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.reading = True

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writelines(self, data: list[bytes]) -> None:
        self.written.extend(data)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


def _connection(loop: asyncio.AbstractEventLoop) -> tuple[UpstreamConnection, FakeTransport]:
    upstreams = Upstreams([Address("127.0.0.1", 9)], UpstreamSettings())
    conn = UpstreamConnection(upstreams.backends[0], loop)
    transport = FakeTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    return conn, transport


def test_a_listener_is_called_as_the_response_arrives_and_takes_it_whole() -> None:
    async def scenario() -> None:
        conn, _ = _connection(asyncio.get_running_loop())
        news: list[int] = []
        conn.begin(False)
        conn.listen(lambda: news.append(len(news)))
        conn.data_received(HEAD[:20])
        assert news == [] and conn.queued_head() is None  # not even a head yet
        conn.data_received(HEAD[20:] + b"01234")
        assert news == [0]
        head = conn.queued_head()
        assert isinstance(head, ResponseHead) and head.content_length == 10
        assert conn.take_response() is None  # not all of it: nothing taken
        assert conn.queued_head() is head
        conn.data_received(b"56789")
        taken = conn.take_response()
        assert taken is not None
        assert taken[0] is head and taken[1] == b"0123456789"
        assert conn.take_response() is None
        conn.listen(None)
        assert conn.reusable

    asyncio.run(scenario())


def test_a_response_whole_in_one_read_is_taken_as_it_came() -> None:
    async def scenario() -> None:
        conn, _ = _connection(asyncio.get_running_loop())
        news: list[int] = []
        conn.begin(False)
        conn.listen(lambda: news.append(len(news)))
        conn.data_received(HEAD + b"0123456789")
        assert news == [0] and conn.received == len(HEAD) + 10
        head = conn.queued_head()
        assert isinstance(head, ResponseHead) and head.status == 200
        assert conn.take_response() == (head, b"0123456789")
        assert conn.take_response() is None and conn.queued_head() is None
        conn.listen(None)
        assert conn.reusable
        # The next exchange on the connection starts clean.
        conn.begin(True)
        conn.data_received(HEAD)
        taken = conn.take_response()
        assert taken is not None and taken[0].status == 200 and taken[1] == b""
        conn.listen(None)
        assert conn.reusable

    asyncio.run(scenario())


def test_a_whole_response_not_taken_waits_for_next_event() -> None:
    async def scenario() -> None:
        conn, _ = _connection(asyncio.get_running_loop())
        conn.begin(False)
        conn.listen(lambda: None)
        conn.data_received(HEAD + b"0123456789")
        conn.listen(None)
        head = await conn.next_event(1.0)
        assert isinstance(head, ResponseHead) and head.content_length == 10
        body = await conn.next_event(1.0)
        assert isinstance(body, BodyData) and body.data == b"0123456789"
        assert await conn.next_event(1.0) is END
        assert conn.reusable
        # Bytes after the response ended make the connection unfit, as ever.
        conn.listen(lambda: None)
        conn.data_received(b"HTTP/1.1 200 OK\r\n")
        assert not conn.reusable

    asyncio.run(scenario())


def test_going_back_to_waiting_loses_nothing_already_parsed() -> None:
    async def scenario() -> None:
        conn, _ = _connection(asyncio.get_running_loop())
        conn.begin(False)
        conn.listen(lambda: None)
        conn.data_received(HEAD + b"01234")
        conn.listen(None)
        head = await conn.next_event(1.0)
        assert isinstance(head, ResponseHead)
        body = await conn.next_event(1.0)
        assert isinstance(body, BodyData) and body.data == b"01234"
        waiting = asyncio.ensure_future(conn.next_event(1.0))
        await asyncio.sleep(0)
        conn.data_received(b"56789")
        body = await waiting
        assert isinstance(body, BodyData) and body.data == b"56789"
        assert await conn.next_event(1.0) is END

    asyncio.run(scenario())


@pytest.mark.parametrize("how", ["eof", "lost", "garbage"])
def test_a_failing_connection_is_news_too(how: str) -> None:
    async def scenario() -> None:
        conn, _ = _connection(asyncio.get_running_loop())
        news: list[bool] = []
        conn.begin(False)
        conn.listen(lambda: news.append(conn.failed))
        if how == "eof":
            conn.eof_received()
        elif how == "lost":
            conn.connection_lost(ConnectionResetError("reset"))
        else:
            conn.data_received(b"NOT HTTP\r\n\r\n")
        assert news == [True]
        assert conn.received == (0 if how != "garbage" else 12)
        conn.listen(None)
        with pytest.raises((UpstreamClosed, UpstreamProtocolError)):
            await conn.next_event(1.0)

    asyncio.run(scenario())


def test_try_acquire_takes_a_slot_or_says_busy_without_taking_one() -> None:
    pool = Pool(name="p", servers=(Server(Address("127.0.0.1", 1)),), max_conns=1, queue=4)
    upstreams = Upstreams(pool, UpstreamSettings())
    backend = upstreams.try_acquire((), b"/", 0.0)
    assert backend is upstreams.backends[0]
    assert upstreams.try_acquire((), b"/", 0.0) is BUSY
    assert upstreams.stats().servers[0].active == 1
    upstreams.finish(upstreams.backends[0], Outcome.OK, 0.0)
    assert upstreams.stats().servers[0].active == 0
    assert upstreams.try_acquire((0,), b"/", 0.0) is None  # every server excluded
