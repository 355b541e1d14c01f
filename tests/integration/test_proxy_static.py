"""Static files on the wire: ``plan_static`` and ``send_static`` behind a real socket.

A small asyncio server in a thread of this process parses requests with the
proxy's own codec, plans each with ``plan_static`` and answers with
``send_static``; clients are plain blocking sockets on 127.0.0.1 that check
the bytes received. Every test runs on asyncio's own loop (where the body
goes out with the sendfile system call) and on uvloop (whose loops have no
sendfile, so the body is read and written in pieces).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import cast

import pytest
import uvloop

from tiers.proxy.errors import ClientGone, StaticFileError
from tiers.proxy.filesender import send_static
from tiers.proxy.http1 import END
from tiers.proxy.requestparser import RequestEvent, RequestHead, RequestParser
from tiers.proxy.static import StaticPlan, StaticRoot, plan_static

BIG = 5 * 1024 * 1024
SMALL = b"hello, static world\n"
_TIMEOUT = 10.0


def _pattern(size: int) -> bytes:
    """Bytes whose every 4-byte word tells its offset, so a shifted slice cannot pass."""
    return b"".join(i.to_bytes(4, "big") for i in range(size // 4))


# ---- the server ---------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    def __init__(self, server: _Server) -> None:
        self.server = server
        self.loop = server.loop
        self.parser = RequestParser()
        self.events: deque[RequestEvent] = deque()
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task[None] | None = None
        self.waiter: asyncio.Future[None] | None = None
        self.drain_waiter: asyncio.Future[None] | None = None
        self.paused = False
        self.eof = False
        self.lost = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.server.connections.add(self)
        self.task = self.loop.create_task(self.serve())

    def data_received(self, data: bytes) -> None:
        self.events.extend(self.parser.feed(data))
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._wake()
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.drain_waiter is not None and not self.drain_waiter.done():
            self.drain_waiter.set_result(None)

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def drain(self) -> None:
        while self.paused and not self.lost:
            self.drain_waiter = self.loop.create_future()
            await asyncio.wait_for(self.drain_waiter, _TIMEOUT)
        if self.lost:
            raise ClientGone("client closed the connection", 499)

    async def next_event(self) -> RequestEvent | None:
        deadline = self.loop.time() + _TIMEOUT
        while not self.events:
            remaining = deadline - self.loop.time()
            if self.lost or self.eof or remaining <= 0:
                return None
            self.waiter = self.loop.create_future()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.waiter, remaining)
        return self.events.popleft()

    async def serve(self) -> None:
        transport = self.transport
        assert transport is not None
        try:
            for _ in range(1000):
                head = await self.next_event()
                if not isinstance(head, RequestHead):
                    return
                event: RequestEvent | None = head
                while event is not END:  # a body is read and dropped
                    event = await self.next_event()
                    if event is None:
                        return
                plan = plan_static(
                    self.server.root, head.method, head.path, head.headers, time.time()
                )
                self.server.plans.append(plan)
                if self.server.before_send is not None:
                    self.server.before_send(plan)
                try:
                    sent = await send_static(
                        self.loop,
                        transport,
                        plan,
                        self.drain,
                        keep_alive=head.keep_alive,
                        version=head.version,
                    )
                except (ClientGone, StaticFileError) as exc:
                    self.server.outcomes.append(exc)
                    return
                self.server.outcomes.append(sent)
                if not head.keep_alive:
                    return
        finally:
            transport.close()
            self.server.connections.discard(self)


class _Server:
    """The test server on its own event loop in a thread."""

    def __init__(self, root: StaticRoot, new_loop: Callable[[], asyncio.AbstractEventLoop]):
        self.root = root
        self.loop = new_loop()
        self.plans: list[StaticPlan] = []
        self.outcomes: list[int | Exception] = []
        self.connections: set[_Connection] = set()
        # Runs between the plan and the send: lets a test change the file meanwhile.
        self.before_send: Callable[[StaticPlan], None] | None = None
        self.listener = self.loop.run_until_complete(
            self.loop.create_server(lambda: _Connection(self), "127.0.0.1", 0)
        )
        self.port = int(self.listener.sockets[0].getsockname()[1])
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(_TIMEOUT)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(_TIMEOUT)
        self.loop.close()

    async def _stop(self) -> None:
        self.listener.close()
        tasks = []
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
            if conn.task is not None:
                tasks.append(conn.task)
        if tasks:
            await asyncio.wait(tasks, timeout=_TIMEOUT)
        await self.listener.wait_closed()

    def wait_outcomes(self, count: int) -> list[int | Exception]:
        for _ in range(int(_TIMEOUT / 0.02)):
            if len(self.outcomes) >= count:
                break
            time.sleep(0.02)
        return list(self.outcomes)

    def files_closed(self) -> bool:
        """Whether every planned file was closed, once every send has finished."""
        # A client may read the last bytes before the server thread gets past the send.
        self.wait_outcomes(len(self.plans))
        return all(plan.file is None for plan in self.plans)


LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture
def tree(open_tmp: Path) -> Path:
    root = open_tmp / "root"
    root.mkdir()
    (root / "big.bin").write_bytes(_pattern(BIG))
    (root / "a.txt").write_bytes(SMALL)
    (root / "docs").mkdir()
    (root / "docs" / "index.html").write_bytes(b"<h1>docs</h1>\n")
    (open_tmp / "secret.txt").write_bytes(b"secret\n")
    return root


@pytest.fixture(params=sorted(LOOPS))
def server(request: pytest.FixtureRequest, tree: Path) -> Iterator[_Server]:
    made = _Server(StaticRoot(tree), LOOPS[request.param])
    try:
        yield made
    finally:
        made.close()


# ---- the client ---------------------------------------------------------------------


class _Client:
    def __init__(self, port: int, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.settimeout(_TIMEOUT)
        self.sock.connect(("127.0.0.1", port))
        self.buffer = bytearray()

    def close(self) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _fill(self) -> None:
        piece = self.sock.recv(1 << 20)
        if not piece:
            raise AssertionError(f"connection closed; {len(self.buffer)} bytes unparsed")
        self.buffer += piece

    def response(self, *, bodiless: bool = False) -> tuple[bytes, dict[str, str], bytes]:
        """The next response: raw head (with its blank line), fields, body."""
        while (end := self.buffer.find(b"\r\n\r\n")) == -1:
            self._fill()
        head = bytes(self.buffer[: end + 4])
        del self.buffer[: end + 4]
        fields: dict[str, str] = {}
        for line in head.decode("latin-1").split("\r\n")[1:-2]:
            name, _, value = line.partition(": ")
            fields[name.lower()] = value
        status = int(head.split(b" ", 2)[1])
        length = 0 if bodiless or status == 304 else int(fields.get("content-length", "0"))
        while len(self.buffer) < length:
            self._fill()
        body = bytes(self.buffer[:length])
        del self.buffer[:length]
        return head, fields, body

    def at_eof(self) -> bool:
        """True if the server closed the connection with nothing more to read."""
        return not self.buffer and self.sock.recv(1) == b""


@pytest.fixture
def client(server: _Server) -> Iterator[Callable[..., _Client]]:
    made: list[_Client] = []

    def connect(rcvbuf: int | None = None) -> _Client:
        made.append(_Client(server.port, rcvbuf))
        return made[-1]

    yield connect
    for c in made:
        c.close()


def _get(path: str, *fields: str, method: str = "GET") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: static.test", *fields, "", ""]
    return "\r\n".join(lines).encode()


# ---- tests --------------------------------------------------------------------------


def test_big_file_is_sent_intact(server: _Server, client: Callable[..., _Client]) -> None:
    c = client()
    c.send(_get("/big.bin"))
    head, fields, body = c.response()
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert fields["content-length"] == str(BIG)
    assert fields["content-type"] == "application/octet-stream"
    assert fields["accept-ranges"] == "bytes"
    assert body == _pattern(BIG)
    # The connection stays usable after the body.
    c.send(_get("/a.txt"))
    _, fields, body = c.response()
    assert body == SMALL
    assert fields["content-type"] == "text/plain; charset=utf-8"
    assert server.wait_outcomes(2) == [BIG, len(SMALL)]
    assert server.files_closed()


def test_range_slices(server: _Server, client: Callable[..., _Client]) -> None:
    data = _pattern(BIG)
    c = client()
    for spec, first, last in [
        ("bytes=1000000-3999999", 1_000_000, 3_999_999),  # large: sendfile or pieces
        ("bytes=10-19", 10, 19),  # small: written with the head
        ("bytes=-100", BIG - 100, BIG - 1),
        (f"bytes={BIG - 5}-{BIG * 2}", BIG - 5, BIG - 1),
    ]:
        c.send(_get("/big.bin", f"Range: {spec}"))
        head, fields, body = c.response()
        assert head.startswith(b"HTTP/1.1 206 Partial Content\r\n"), spec
        assert fields["content-range"] == f"bytes {first}-{last}/{BIG}"
        assert body == data[first : last + 1]
    c.send(_get("/big.bin", "Range: bytes=-0"))
    head, fields, body = c.response()
    assert head.startswith(b"HTTP/1.1 416 ")
    assert fields["content-range"] == f"bytes */{BIG}"
    assert server.files_closed()


def test_head_sends_only_the_head(server: _Server, client: Callable[..., _Client]) -> None:
    c = client()
    # Pipelined: any body byte after the HEAD answer would show up before the next head.
    c.send(_get("/big.bin", method="HEAD") + _get("/a.txt"))
    head, fields, _ = c.response(bodiless=True)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert fields["content-length"] == str(BIG)
    while len(c.buffer) < 17:
        c._fill()
    assert c.buffer.startswith(b"HTTP/1.1 200 OK\r\n")
    _, _, body = c.response()
    assert body == SMALL
    assert server.wait_outcomes(2) == [0, len(SMALL)]


def test_answers_without_a_file_body(server: _Server, client: Callable[..., _Client]) -> None:
    c = client()
    c.send(_get("/a.txt"))
    _, fields, _ = c.response()
    etag = fields["etag"]
    c.send(
        _get("/a.txt", f"If-None-Match: {etag}")
        + _get("/a.txt", f"If-Modified-Since: {fields['last-modified']}")
        + _get("/missing.txt")
        + _get("/%2e%2e/secret.txt")
        + _get("/docs")
        + _get("/docs/")
        + b"POST /a.txt HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
        + _get("/a.txt")
    )
    head, fields, body = c.response()
    assert head.startswith(b"HTTP/1.1 304 Not Modified\r\n")
    assert fields["etag"] == etag and "content-length" not in fields
    head, _, _ = c.response()
    assert head.startswith(b"HTTP/1.1 304 ")
    head, _, body = c.response()
    assert head.startswith(b"HTTP/1.1 404 ") and body == b"not found\n"
    head, _, body = c.response()
    assert head.startswith(b"HTTP/1.1 403 ") and b"secret" not in body
    head, fields, _ = c.response()
    assert head.startswith(b"HTTP/1.1 301 ") and fields["location"] == "/docs/"
    _, _, body = c.response()
    assert body == b"<h1>docs</h1>\n"
    head, fields, _ = c.response()
    assert head.startswith(b"HTTP/1.1 405 ") and fields["allow"] == "GET, HEAD"
    _, _, body = c.response()
    assert body == SMALL
    assert server.files_closed()


def test_http10_connection_is_closed(server: _Server, client: Callable[..., _Client]) -> None:
    c = client()
    c.send(b"GET /big.bin HTTP/1.0\r\n\r\n")
    _, fields, body = c.response()
    assert fields["connection"] == "close"
    assert body == _pattern(BIG)
    assert c.at_eof()


def test_http10_keep_alive_is_confirmed(server: _Server, client: Callable[..., _Client]) -> None:
    c = client()
    c.send(b"GET /a.txt HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    _, fields, body = c.response()
    assert fields["connection"] == "keep-alive"
    assert body == SMALL
    c.send(b"GET /a.txt HTTP/1.0\r\n\r\n")
    _, fields, body = c.response()
    assert body == SMALL and fields["connection"] == "close"
    assert c.at_eof()


def test_client_leaving_mid_body_closes_the_file(
    server: _Server, client: Callable[..., _Client], tree: Path
) -> None:
    # Larger than every socket buffer between the two ends together.
    size = 48 * 1024 * 1024
    with (tree / "huge.bin").open("wb") as out:
        block = _pattern(1024 * 1024)
        for _ in range(size // len(block)):
            out.write(block)
    c = client(rcvbuf=4096)
    c.send(_get("/huge.bin"))
    _, fields, _ = c.response(bodiless=True)
    assert fields["content-length"] == str(size)
    c.close()  # unread bytes make the kernel reset the connection
    outcomes = server.wait_outcomes(1)
    assert len(outcomes) == 1
    assert isinstance(outcomes[0], ClientGone)
    assert server.files_closed()


@pytest.mark.parametrize("size", [1000, 1024 * 1024])
def test_file_shrinking_after_the_plan_cuts_the_connection(
    server: _Server, client: Callable[..., _Client], tree: Path, size: int
) -> None:
    path = tree / "shrinks.bin"
    path.write_bytes(_pattern(size))
    server.before_send = lambda plan: os.truncate(path, size // 2)
    c = client()
    c.send(_get("/shrinks.bin"))
    received = bytearray()
    for _ in range(size):  # until EOF; every pass reads at least one byte
        piece = c.sock.recv(1 << 20)
        if not piece:
            break
        received += piece
    outcomes = server.wait_outcomes(1)
    assert len(outcomes) == 1
    assert isinstance(outcomes[0], StaticFileError)
    # Never a complete response: a short body is cut by closing, not passed off as whole.
    head, _, body = bytes(received).partition(b"\r\n\r\n")
    if head:
        assert f"Content-Length: {size}".encode() in head
        assert len(body) < size
    assert server.files_closed()
