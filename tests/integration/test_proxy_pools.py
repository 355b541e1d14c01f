"""Backend pools against real HTTP servers: slots and queue, passive health, slow start.

The backends are small threaded HTTP/1.1 servers in this process on
ephemeral ports. The tests drive ``Upstreams`` and ``Pools`` directly on an
asyncio loop, the way the proxy's server does for each request: acquire a
slot, connect, exchange, release the connection, finish the slot.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.integration.proxykit import start_backends
from tiers.config.model import Address
from tiers.config.proxy import Balance, Pool, Server
from tiers.proxy.balancer import Outcome, outcome_for_status
from tiers.proxy.errors import ConnectFailed
from tiers.proxy.http1 import BodyData
from tiers.proxy.poolstate import PoolStats, ServerStats
from tiers.proxy.responseparser import ResponseHead
from tiers.proxy.upstream import (
    PoolBusy,
    Pools,
    QueueFull,
    QueueTimeout,
    Upstreams,
    UpstreamSettings,
)

HEALTH = "/health"


# ---- backends ------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        backend = self.server.backend
        path, _, query = self.path.partition("?")
        if path == HEALTH:
            self._send(200 if backend.healthy else 503, b"health\n")
            return
        backend.enter(self.path)
        try:
            if path == "/stall":
                time.sleep(float(query.partition("=")[2]))
            self._send(500 if path == "/fail" else 200, backend.name.encode())
        finally:
            backend.leave()

    def _send(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    backend: Backend


@dataclass
class Backend:
    """An HTTP server that records the order of requests and how many ran at once."""

    name: str
    healthy: bool = True
    arrivals: list[str] = field(default_factory=list)
    running: int = 0
    most_running: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _server: _Server | None = None
    _thread: threading.Thread | None = None

    @property
    def address(self) -> Address:
        assert self._server is not None
        return Address("127.0.0.1", self._server.server_address[1])

    def start(self) -> None:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.backend = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def enter(self, path: str) -> None:
        with self._lock:
            self.arrivals.append(path)
            self.running += 1
            self.most_running = max(self.most_running, self.running)

    def leave(self) -> None:
        with self._lock:
            self.running -= 1


@pytest.fixture
def backends() -> Iterator[Callable[[int], list[Backend]]]:
    yield from start_backends(lambda name: Backend(name=name))


def _run(test: Coroutine[Any, Any, None], limit: float = 30.0) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(limit):
            await test

    asyncio.run(bounded())


def _settings(interval: float = 0.1, rise: int = 2) -> UpstreamSettings:
    return UpstreamSettings(
        health_path=HEALTH,
        health_interval=interval,
        health_timeout=1.0,
        health_fall=2,
        health_rise=rise,
        connect_timeout=1.0,
    )


def _pool(servers: list[Backend], **options: Any) -> Pool:
    return Pool("app", tuple(Server(b.address) for b in servers), **options)


def _server(stats: PoolStats, backend: Backend) -> ServerStats:
    (found,) = [s for s in stats.servers if s.address == str(backend.address)]
    return found


async def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)


async def _request(
    upstreams: Upstreams, path: str, exclude: frozenset[int] = frozenset()
) -> tuple[int, str]:
    """One GET through the pool, as the proxy makes it: (status, backend answering)."""
    loop = asyncio.get_running_loop()
    backend = await upstreams.acquire(exclude, key=path.encode())
    assert backend is not None, "no backend available"
    outcome = Outcome.NEUTRAL
    try:
        conn = upstreams.take_idle(backend, loop.time()) or await upstreams.connect(backend)
        conn.begin(head_request=False)
        conn.write(f"GET {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        head = await conn.next_event(10.0)
        assert isinstance(head, ResponseHead)
        body = b""
        while True:
            event = await conn.next_event(10.0)
            if not isinstance(event, BodyData):
                break
            body += event.data
        upstreams.release(conn, loop.time())
        outcome = outcome_for_status(head.status)
        return head.status, body.decode()
    finally:
        upstreams.finish(backend, outcome, loop.time())


# ---- connection limit and queue --------------------------------------------------------


def test_full_servers_queue_requests_then_refuse_and_time_out(backends: Any) -> None:
    (a,) = backends(1)

    async def test() -> None:
        pool = _pool([a], max_conns=1, queue=1, queue_timeout=0.4)
        upstreams = Upstreams(pool, _settings())
        upstreams.start()
        try:
            holder = asyncio.create_task(_request(upstreams, "/stall?s=1.5"))
            await _until(lambda: a.running == 1, 5, "the first request reaches the backend")
            assert _server(upstreams.stats(), a).active == 1

            waiter = asyncio.create_task(_request(upstreams, "/queued"))
            await _until(lambda: upstreams.stats().queued == 1, 5, "a request queues")
            # The queue holds one: the next request is refused at once.
            with pytest.raises(QueueFull):
                await _request(upstreams, "/refused")
            began = time.monotonic()
            with pytest.raises(QueueTimeout):
                await waiter
            assert time.monotonic() - began < 1.4  # it gave up before the slot came free
            assert await holder == (200, "A")
            stats = upstreams.stats()
            assert (stats.queued, stats.queue_full, stats.queue_timeouts) == (0, 1, 1)
            assert _server(stats, a).active == 0
            # Neither refused request reached the app.
            assert a.arrivals == ["/stall?s=1.5"]
            assert a.most_running == 1
            assert issubclass(QueueFull, PoolBusy) and issubclass(QueueTimeout, PoolBusy)
        finally:
            await upstreams.close()

    _run(test())


def test_a_freed_slot_goes_to_the_head_of_the_queue(backends: Any) -> None:
    (a,) = backends(1)

    async def test() -> None:
        upstreams = Upstreams(_pool([a], max_conns=1, queue=8, queue_timeout=10.0), _settings())
        upstreams.start()
        try:
            holder = asyncio.create_task(_request(upstreams, "/stall?s=0.3"))
            await _until(lambda: a.running == 1, 5, "the backend is busy")
            waiters = []
            for n in range(4):
                waiters.append(asyncio.create_task(_request(upstreams, f"/w{n}")))
                await _until(lambda: upstreams.stats().queued == len(waiters), 5, "queued")
            results = await asyncio.gather(holder, *waiters)
            assert results == [(200, "A")] * 5
            # One request at a time, the queue served in its order.
            assert a.arrivals == ["/stall?s=0.3", "/w0", "/w1", "/w2", "/w3"]
            assert a.most_running == 1
            stats = upstreams.stats()
            assert (stats.queued, stats.queue_timeouts, stats.queue_full) == (0, 0, 0)
            assert _server(stats, a).requests == 5
        finally:
            await upstreams.close()

    _run(test())


def test_least_conn_counts_requests_in_flight(backends: Any) -> None:
    a, b = backends(2)

    async def test() -> None:
        pool = _pool([a, b], balance=Balance.LEAST_CONN)
        upstreams = Upstreams(pool, _settings())
        upstreams.start()
        try:
            # A long request on one server sends the next ones to the other.
            slow = asyncio.create_task(_request(upstreams, "/stall?s=0.5"))
            await _until(lambda: a.running + b.running == 1, 5, "the slow request runs")
            busy = a if a.running else b
            other = b if busy is a else a
            answers = [await _request(upstreams, f"/quick/{n}") for n in range(6)]
            assert {name for _, name in answers} == {other.name}
            assert await slow == (200, busy.name)
        finally:
            await upstreams.close()

    _run(test())


def test_a_cancelled_waiter_leaves_no_slot_taken(backends: Any) -> None:
    (a,) = backends(1)

    async def test() -> None:
        upstreams = Upstreams(_pool([a], max_conns=1, queue=4), _settings())
        upstreams.start()
        try:
            holder = asyncio.create_task(_request(upstreams, "/stall?s=0.3"))
            await _until(lambda: a.running == 1, 5, "the backend is busy")
            gone = asyncio.create_task(_request(upstreams, "/gone"))
            await _until(lambda: upstreams.stats().queued == 1, 5, "a request queues")
            gone.cancel()
            with pytest.raises(asyncio.CancelledError):
                await gone
            assert upstreams.stats().queued == 0
            await holder
            assert await _request(upstreams, "/next") == (200, "A")
            assert _server(upstreams.stats(), a).active == 0
            assert "/gone" not in a.arrivals
        finally:
            await upstreams.close()

    _run(test())


def test_slots_survive_waiters_cancelled_around_a_grant(backends: Any) -> None:
    (a,) = backends(1)

    async def test() -> None:
        upstreams = Upstreams(_pool([a], max_conns=1, queue=4), _settings())
        upstreams.start()
        loop = asyncio.get_running_loop()
        try:
            holder = await upstreams.acquire()
            assert holder is not None
            first = asyncio.create_task(upstreams.acquire(key=b"/1"))
            second = asyncio.create_task(upstreams.acquire(key=b"/2"))
            await _until(lambda: upstreams.stats().queued == 2, 5, "two wait")
            # Cancelled, but its task has not run yet when the slot frees:
            # the slot must go on to the next waiter.
            first.cancel()
            upstreams.finish(holder, Outcome.OK, loop.time())
            got = await second
            assert got is holder
            with pytest.raises(asyncio.CancelledError):
                await first
            third = asyncio.create_task(upstreams.acquire(key=b"/3"))
            await _until(lambda: upstreams.stats().queued == 1, 5, "one waits")
            # Granted, then cancelled before it could take the slot: the slot
            # must not stay taken.
            upstreams.finish(got, Outcome.OK, loop.time())
            third.cancel()
            with pytest.raises(asyncio.CancelledError):
                await third
            assert _server(upstreams.stats(), a).active == 0
            assert await upstreams.acquire() is holder
            upstreams.finish(holder, Outcome.NEUTRAL, loop.time())
        finally:
            await upstreams.close()

    _run(test())


def test_closing_a_pool_fails_its_waiters(backends: Any) -> None:
    (a,) = backends(1)

    async def test() -> None:
        upstreams = Upstreams(_pool([a], max_conns=1, queue=4), _settings())
        upstreams.start()
        assert await upstreams.acquire() is not None
        waiter = asyncio.create_task(upstreams.acquire())
        await _until(lambda: upstreams.stats().queued == 1, 5, "one waits")
        await upstreams.close()
        with pytest.raises(QueueTimeout, match="closing"):
            await waiter

    _run(test())


# ---- passive health ----------------------------------------------------------------------


def test_consecutive_5xx_take_a_server_out_until_checks_pass(
    backends: Any, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = backends(2)

    async def test() -> None:
        # Checks every 0.5 s with rise 2: a server taken out stays out about a second.
        upstreams = Upstreams(_pool([a, b], passive_fall=3), _settings(interval=0.5))
        upstreams.start()
        only_a = frozenset({1})
        try:
            assert await _request(upstreams, "/fail", only_a) == (500, "A")
            assert await _request(upstreams, "/ok", only_a) == (200, "A")  # the streak ends
            for _ in range(2):
                assert await _request(upstreams, "/fail", only_a) == (500, "A")
            assert _server(upstreams.stats(), a).state == "up"
            assert await _request(upstreams, "/fail", only_a) == (500, "A")
            # Out at once, though its health checks still pass.
            stats = _server(upstreams.stats(), a)
            assert (stats.state, stats.server_errors, stats.downs) == ("down", 4, 1)
            assert stats.last_check_ok is True
            assert await upstreams.acquire(only_a) is None
            for n in range(4):
                assert await _request(upstreams, f"/n/{n}") == (200, "B")
            await _until(lambda: _server(upstreams.stats(), a).state == "up", 5, "A returns")
            names = {(await _request(upstreams, f"/m/{n}"))[1] for n in range(4)}
            assert names == {"A", "B"}
        finally:
            await upstreams.close()

    with caplog.at_level("INFO", logger="tiers.proxy"):
        _run(test())
    messages = [r.getMessage() for r in caplog.records]
    down = f"pool app: backend {a.address} is down (3 failed requests in a row, last: server_error)"
    assert down in messages
    assert f"pool app: backend {a.address} is up" in messages


def test_refused_connections_take_a_server_out_before_checks_notice(backends: Any) -> None:
    a, b = backends(2)

    async def test() -> None:
        pool = _pool([a, b], passive_fall=2)
        a.stop()
        # Checks are too rare to notice within the test: only traffic can tell.
        upstreams = Upstreams(pool, _settings(interval=60.0))
        upstreams.start()
        try:
            (backend_a,) = [x for x in upstreams.backends if x.address == a.address]
            for expected_up in (True, False):
                with pytest.raises(ConnectFailed):
                    await upstreams.connect(backend_a)
                assert backend_a.up is expected_up
            stats = _server(upstreams.stats(), a)
            assert (stats.state, stats.connect_errors) == ("down", 2)
            assert {(await _request(upstreams, f"/{n}"))[1] for n in range(4)} == {"B"}
        finally:
            await upstreams.close()

    _run(test())


# ---- slow start ---------------------------------------------------------------------------


def test_a_returning_server_ramps_up_under_slow_start(backends: Any) -> None:
    a, b = backends(2)

    async def test() -> None:
        upstreams = Upstreams(_pool([a, b], slow_start=4.0), _settings(interval=0.1))
        upstreams.start()
        try:
            a.healthy = False
            await _until(lambda: _server(upstreams.stats(), a).state == "down", 5, "A is out")
            a.healthy = True
            await _until(lambda: _server(upstreams.stats(), a).state != "down", 5, "A is back")
            first = _server(upstreams.stats(), a)
            assert first.state == "slow_start"
            assert first.effective_weight < 0.5
            early = [(await _request(upstreams, f"/e/{n}"))[1] for n in range(20)]
            # Equal weights would split 10/10; a ramping A gets far fewer.
            assert early.count("A") * 2 < early.count("B")
            later = _server(upstreams.stats(), a)
            assert later.effective_weight > first.effective_weight
            await _until(lambda: _server(upstreams.stats(), a).state == "up", 8, "ramp ends")
            assert _server(upstreams.stats(), a).effective_weight == 1
            settled = [(await _request(upstreams, f"/s/{n}"))[1] for n in range(20)]
            assert 9 <= settled.count("A") <= 11
        finally:
            await upstreams.close()

    _run(test())


# ---- backups and pools ----------------------------------------------------------------------


def test_backup_takes_over_only_while_every_primary_is_down(backends: Any) -> None:
    a, b, spare = backends(3)

    async def test() -> None:
        servers = (Server(a.address), Server(b.address), Server(spare.address, backup=True))
        upstreams = Upstreams(Pool("app", servers), _settings(interval=0.1))
        upstreams.start()
        try:
            assert {(await _request(upstreams, f"/{n}"))[1] for n in range(6)} == {"A", "B"}
            a.healthy = b.healthy = False
            await _until(
                lambda: all(s.state == "down" for s in upstreams.stats().servers[:2]),
                5,
                "primaries out",
            )
            assert {(await _request(upstreams, f"/{n}"))[1] for n in range(4)} == {"C"}
            b.healthy = True
            await _until(lambda: _server(upstreams.stats(), b).state == "up", 5, "B is back")
            assert {(await _request(upstreams, f"/{n}"))[1] for n in range(4)} == {"B"}
            assert _server(upstreams.stats(), spare).state == "backup"
        finally:
            await upstreams.close()

    _run(test())


def test_pools_check_each_address_once_and_share_the_result(backends: Any) -> None:
    a, shared, c = backends(3)

    async def test() -> None:
        pools = Pools(
            [
                _pool([a, shared]),
                Pool(
                    "images",
                    (Server(shared.address), Server(c.address)),
                    balance=Balance.URI_HASH,
                ),
            ],
            _settings(interval=0.1),
        )
        pools.start()
        try:
            assert len(pools) == 2 and pools.checked_addresses == 3
            assert [u.name for u in pools] == ["app", "images"]
            images = pools["images"]
            # The same URI always lands on the same image server.
            owners = {(await _request(images, "/img/42.png"))[1] for _ in range(5)}
            assert len(owners) == 1
            shared.healthy = False

            def shared_down() -> bool:
                return all(_server(s, shared).state == "down" for s in pools.stats())

            await _until(shared_down, 5, "the shared server is out of both pools")
            assert {(await _request(pools["app"], f"/{n}"))[1] for n in range(4)} == {"A"}
            assert {(await _request(images, f"/img/{n}"))[1] for n in range(8)} == {"C"}
            assert pools.get("missing") is None
            with pytest.raises(KeyError):
                pools["missing"]
        finally:
            await pools.close()

    _run(test())


def test_pools_refuse_two_pools_of_one_name(backends: Any) -> None:
    (a,) = backends(1)
    with pytest.raises(ValueError, match="two pools are named app"):
        Pools([_pool([a]), _pool([a])], _settings())
