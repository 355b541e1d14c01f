"""The one-node clients against real servers, and against scripted misbehaving ones.

Every case runs on both servers (memcached, started here on an ephemeral
port, and the embedded ``tiers.cache.server``), so the two are held to the
same behaviour, and with both clients (the blocking ``Client`` and
``AsyncClient``, driven through a small synchronous facade), so the two
clients are too. Tests that need memcached skip with the reason when it is
not installed, or fail under TIERS_REQUIRE_ALL=1.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import require
from tests.integration.cachekit import KINDS, Node, ScriptedServer, memcached_binary
from tiers.cache.aio import AsyncClient
from tiers.cache.client import Client
from tiers.cache.errors import (
    CacheKeyError,
    CacheValueError,
    NodeError,
    ProtocolError,
    SerdeError,
    ServerError,
)
from tiers.cache.serde import DefaultSerde, RawSerde

APIS = ("sync", "async")


class Blocking:
    """AsyncClient's coroutines run to completion one by one on a private loop."""

    def __init__(self, client: AsyncClient) -> None:
        self._client = client
        self._runner = asyncio.Runner()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if inspect.iscoroutinefunction(attr):
            return lambda *args, **kwargs: self._runner.run(attr(*args, **kwargs))
        return attr

    def close(self) -> None:
        try:
            self._runner.run(self._client.close())
        finally:
            self._runner.close()


ClientFactory = Callable[..., Any]


@pytest.fixture(params=APIS)
def connect(request: pytest.FixtureRequest) -> Iterator[ClientFactory]:
    """``connect(port, **options)``: a client of the API under test, closed afterwards."""
    made: list[Any] = []

    def make(port: int, **options: Any) -> Any:
        if request.param == "sync":
            client: Any = Client("127.0.0.1", port, **options)
        else:
            client = Blocking(AsyncClient("127.0.0.1", port, **options))
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


def _start(kind: str) -> Node:
    if kind == "memcached":
        require(memcached_binary() is not None, "memcached is not installed")
    return Node(kind).start()


@pytest.fixture(scope="module", params=KINDS)
def shared_node(request: pytest.FixtureRequest) -> Iterator[Node]:
    node = _start(request.param)
    yield node
    node.cleanup()


@pytest.fixture
def node(shared_node: Node) -> Node:
    """A running server, emptied for this test."""
    if shared_node.proc is None or shared_node.proc.poll() is not None:
        shared_node.proc = None
        shared_node.start()
    with Client(shared_node.host, shared_node.port) as admin:
        admin.flush_all()
    return shared_node


@pytest.fixture(params=KINDS)
def own_node(request: pytest.FixtureRequest) -> Iterator[Node]:
    """A server of this test's own, to kill and restart."""
    node = _start(request.param)
    yield node
    node.cleanup()


# --- every command ----------------------------------------------------------


def test_set_get_delete(node: Node, connect: ClientFactory) -> None:
    c = connect(node.port)
    assert c.get("missing") is None
    assert c.get("missing", "dflt") == "dflt"
    assert c.set("k", b"value") is True
    assert c.get("k") == b"value"
    assert c.get(b"k") == b"value"
    assert c.delete("k") is True
    assert c.delete("k") is False
    assert c.get("k") is None


def test_values_keep_their_types(node: Node, connect: ClientFactory) -> None:
    c = connect(node.port)
    values = {"b": b"\x00\r\nEND\r\n", "s": "héllo", "i": 12345, "j": {"a": [1, None]}, "e": b""}
    for key, value in values.items():
        assert c.set(key, value)
    assert {key: c.get(key) for key in values} == values
    assert c.get_many(list(values)) == values


def test_add_and_replace(node: Node, connect: ClientFactory) -> None:
    c = connect(node.port)
    assert c.replace("k", "v") is False
    assert c.add("k", "v1") is True
    assert c.add("k", "v2") is False
    assert c.get("k") == "v1"
    assert c.replace("k", "v3") is True
    assert c.get("k") == "v3"


def test_append_and_prepend(node: Node, connect: ClientFactory) -> None:
    c = connect(node.port)
    assert c.append("k", b"x") is False
    assert c.prepend("k", b"x") is False
    c.set("k", "mid")
    assert c.append("k", b">") is True
    assert c.prepend("k", b"<") is True
    assert c.get("k") == "<mid>"  # the str flag of the first set stays


def test_cas(node: Node, connect: ClientFactory) -> None:
    c = connect(node.port)
    assert c.gets("k") is None
    c.set("k", "v1")
    value, unique = c.gets("k")
    assert value == "v1"
    assert c.cas("k", "v2", unique) is True
    assert c.cas("k", "v3", unique) is False
    assert c.get("k") == "v2"
    c.delete("k")
    assert c.cas("k", "v4", unique) is None
    c.set("a", 1)
    c.set("b", 2)
    both = c.gets_many(["a", "b", "nope"])
    assert {k: v for k, (v, _) in both.items()} == {"a": 1, "b": 2}
    assert c.cas("a", 10, both["a"][1]) is True


def test_incr_and_decr(node: Node, connect: ClientFactory) -> None:
    c = connect(node.port)
    assert c.incr("n") is None
    assert c.decr("n") is None
    c.set("n", 100)
    assert c.incr("n", 5) == 105
    assert c.decr("n", 6) == 99
    assert c.get("n") == 99  # stored as "99 " after an in-place decr; still an int
    assert c.decr("n", 1000) == 0
    c.set("n", 2**64 - 1)
    assert c.incr("n", 2) == 1
    c.set("s", "text")
    with pytest.raises(ServerError) as info:
        c.incr("s")
    assert info.value.kind == "CLIENT_ERROR"
    assert "non-numeric" in info.value.text
    assert c.get("s") == "text"  # the connection is still in step


def test_touch_and_gat(node: Node, connect: ClientFactory) -> None:
    c = connect(node.port)
    assert c.touch("k", 100) is False
    assert c.gat("k", 100) is None
    c.set("k", "v", 100)
    assert c.touch("k", 200) is True
    assert c.gat("k", 300) == "v"
    assert c.touch("k", -1) is True
    assert c.get("k") is None


def test_expiry_in_the_past(node: Node, connect: ClientFactory) -> None:
    c = connect(node.port)
    assert c.set("neg", "v", -1) is True
    assert c.get("neg") is None
    assert c.set("abs", "v", 1_000_000_000) is True  # a unix time in 2001
    assert c.get("abs") is None


def test_get_many(node: Node, connect: ClientFactory) -> None:
    c = connect(node.port)
    assert c.get_many([]) == {}
    keys = [f"key:{i}" for i in range(250)]  # three request lines, one round trip
    for i, key in enumerate(keys[::2]):
        c.set(key, i)
    found = c.get_many(keys)
    assert found == {key: i for i, key in enumerate(keys[::2])}
    c.set(b"raw", "x")
    assert c.get_many([b"raw", "raw", "nope"]) == {"raw": "x"}


def test_version_stats_flush(node: Node, connect: ClientFactory) -> None:
    c = connect(node.port)
    assert c.version()
    c.set("k", "v")
    stats = c.stats()
    assert int(stats["curr_items"]) >= 1
    assert "cmd_get" in stats
    assert "maxbytes" in c.stats("settings")
    c.flush_all()
    assert c.get("k") is None
    c.set("k", "v")
    c.flush_all(noreply=True)
    assert c.get("k") is None


def test_keys_are_checked_before_sending(node: Node, connect: ClientFactory) -> None:
    c = connect(node.port)
    for bad in ("", "has space", "x" * 251, "new\nline"):
        with pytest.raises(CacheKeyError):
            c.set(bad, "v")
        with pytest.raises(CacheKeyError):
            c.get_many(["ok", bad])
    assert not c.connected  # nothing was sent
    assert c.set("x" * 250, "v") is True
    assert c.get("x" * 250) == "v"
    assert c.set("ключ", "v") is True
    assert c.get("ключ") == "v"


def test_serde_options(node: Node, connect: ClientFactory) -> None:
    plain = connect(node.port)
    pickling = connect(node.port, serde=DefaultSerde(pickle=True))
    raw = connect(node.port, serde=RawSerde())
    pickling.set("obj", {1, 2})
    assert pickling.get("obj") == {1, 2}
    with pytest.raises(SerdeError, match="refusing to unpickle"):
        plain.get("obj")
    assert plain.get("obj2") is None
    plain.set("n", 5)
    assert raw.get("n") == b"5"
    with pytest.raises(SerdeError):
        plain.set("obj", {1, 2})


# --- noreply ----------------------------------------------------------------


def test_noreply(node: Node, connect: ClientFactory) -> None:
    c = connect(node.port)
    assert c.set("a", "1", noreply=True) is True
    assert c.add("a", "2", noreply=True) is True  # sent; the node did not store it
    assert c.add("b", "2", noreply=True) is True
    assert c.replace("b", "3", noreply=True) is True
    assert c.append("b", b"4", noreply=True) is True
    assert c.prepend("b", b"2", noreply=True) is True
    c.set("n", 10)
    assert c.incr("n", 5, noreply=True) is None
    assert c.decr("n", 1, noreply=True) is None
    assert c.touch("a", 100, noreply=True) is True
    _, unique = c.gets("a")
    assert c.cas("a", "9", unique, noreply=True) is True
    assert c.get_many(["a", "b", "n"]) == {"a": "9", "b": "234", "n": 14}
    assert c.delete("a", noreply=True) is True
    assert c.get("a") is None


def test_noreply_burst_then_read(node: Node, connect: ClientFactory) -> None:
    c = connect(node.port)
    for i in range(500):
        c.set(f"k{i}", i, noreply=True)
    assert c.get("k499") == 499
    assert c.get_many([f"k{i}" for i in range(500)]) == {f"k{i}": i for i in range(500)}


def test_noreply_errors_are_silent(node: Node, connect: ClientFactory) -> None:
    c = connect(node.port)
    c.set("s", "text")
    c.incr("s", 1, noreply=True)  # CLIENT_ERROR non-numeric, which noreply silences
    assert c.get("s") == "text"


# --- sizes ------------------------------------------------------------------


def test_large_values(node: Node, connect: ClientFactory) -> None:
    c = connect(node.port)
    half = os.urandom(512 * 1024)
    assert c.set("half", half) is True
    assert c.get("half") == half
    largest = os.urandom(1048516)  # the largest value memcached -I 1m takes under "k"
    assert c.set("k", largest) is True
    assert c.get("k") == largest
    assert c.get_many(["half", "k"]) == {"half": half, "k": largest}


def test_value_too_large_for_the_node(node: Node, connect: ClientFactory) -> None:
    c = connect(node.port)
    c.set("k", b"old")
    with pytest.raises(ServerError, match="object too large for cache") as info:
        c.set("k", b"x" * (1 << 20))
    assert info.value.kind == "SERVER_ERROR"
    assert c.get("k") is None  # memcached drops the old value of a failed set
    assert c.set("k", b"fits") is True  # the connection is still in step


def test_value_too_large_for_the_client(node: Node, connect: ClientFactory) -> None:
    c = connect(node.port, max_value=1000)
    with pytest.raises(CacheValueError):
        c.set("k", b"x" * 1001)
    assert not c.connected
    assert c.set("k", b"x" * 1000) is True


# --- failures ---------------------------------------------------------------


def test_connection_refused(connect: ClientFactory) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
        c = connect(port)
        with pytest.raises(NodeError, match="connect failed") as info:
            c.get("k")
    assert info.value.sent is False
    assert info.value.node == f"127.0.0.1:{port}"
    assert isinstance(info.value.__cause__, OSError)


def test_connect_timeout(connect: ClientFactory) -> None:
    # A listener with a full accept queue drops further SYNs: connects hang.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))
    try:
        c = connect(port, connect_timeout=0.3)
        with pytest.raises(NodeError, match="connect failed") as info:
            c.get("k")
        assert info.value.sent is False
    finally:
        filler.close()
        listener.close()


def test_silent_node_times_out(connect: ClientFactory, scripted: Any) -> None:
    server = scripted(lambda data: None)
    c = connect(server.port, timeout=0.3)
    with pytest.raises(NodeError, match=r"within 0\.3s") as info:
        c.get("k")
    assert info.value.sent is True
    assert not c.connected


def test_half_read_reply_is_never_read_by_the_next_call(
    connect: ClientFactory, scripted: Any
) -> None:
    calls = []

    def answer(data: bytes) -> object:
        calls.append(data)
        if len(calls) == 1:
            return b"VALUE k 0 5\r\nhel"  # and the rest never comes on this connection
        return b"VALUE k 0 5\r\nworld\r\nEND\r\n"

    server = scripted(answer)
    c = connect(server.port, timeout=0.3)
    with pytest.raises(NodeError):
        c.get("k")
    assert c.get("k") == b"world"
    assert server.accepted == 2


def test_node_closing_mid_reply(connect: ClientFactory, scripted: Any) -> None:
    server = scripted(lambda data: (b"VALUE k 0 5\r\nhe", ScriptedServer.CLOSE))
    c = connect(server.port)
    with pytest.raises(NodeError, match="in the middle of a reply"):
        c.get("k")
    assert not c.connected


@pytest.mark.parametrize(
    "reply",
    [b"HELLO\r\n", b"VALUE k 0 5\r\nabc\r\nEND\r\n", b"VALUE other 0 1\r\nx\r\nEND\r\n",
     b"STORED\r\n", b"VALUE k 0 1\r\nx\r\nSTORED\r\n"],
)  # fmt: skip
def test_malformed_or_mismatched_reply(connect: ClientFactory, scripted: Any, reply: bytes) -> None:
    server = scripted(lambda data: reply if data.startswith(b"get") else b"VERSION 1\r\n")
    c = connect(server.port)
    with pytest.raises(ProtocolError) as info:
        c.get("k")
    assert info.value.node == f"127.0.0.1:{server.port}"
    assert not c.connected
    assert c.version() == "1"
    assert server.accepted == 2


def test_server_error_keeps_the_connection(connect: ClientFactory, scripted: Any) -> None:
    replies = iter([b"SERVER_ERROR out of memory storing object\r\n", b"STORED\r\n"])
    server = scripted(lambda data: next(replies))
    c = connect(server.port)
    with pytest.raises(ServerError, match="out of memory") as info:
        c.set("k", "v")
    assert (info.value.kind, info.value.text) == ("SERVER_ERROR", "out of memory storing object")
    assert c.set("k", "v") is True
    assert server.accepted == 1


def test_error_after_noreply_drops_the_connection(connect: ClientFactory, scripted: Any) -> None:
    def answer(data: bytes) -> object:
        if b"set b" not in data:  # the noreply set may arrive alone or with the next
            return None
        return b"CLIENT_ERROR bad data chunk\r\nSTORED\r\n"

    server = scripted(answer)
    c = connect(server.port)
    c.set("a", "v", noreply=True)
    with pytest.raises(ServerError):
        c.set("b", "v")
    assert not c.connected  # which command the error answered cannot be known


def test_node_killed_and_restarted(own_node: Node, connect: ClientFactory) -> None:
    c = connect(own_node.port, timeout=2)
    c.set("k", "v")
    assert c.get("k") == "v"
    own_node.kill()
    with pytest.raises(NodeError) as info:
        c.get("k")
    assert info.value.node == own_node.address
    with pytest.raises(NodeError, match="connect failed"):
        c.get("k")
    own_node.start()
    assert own_node.port == int(info.value.node.rsplit(":", 1)[1])
    assert c.get("k") is None  # a new process: empty, and the client reconnected
    assert c.set("k", "again") is True
    assert c.get("k") == "again"


# --- blocking client only -----------------------------------------------------


def test_threads_share_one_client(node: Node) -> None:
    client = Client(node.host, node.port)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for i in range(200):
                key = f"t{n}:{i}"
                client.set(key, i)
                assert client.get(key) == i
            assert client.get_many([f"t{n}:{i}" for i in range(50)]) == {
                f"t{n}:{i}": i for i in range(50)
            }
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client.close()
    assert errors == []


def test_interrupted_read_drops_the_connection(scripted: Any) -> None:
    server = scripted(lambda data: b"VALUE k 0 1\r\nx\r\nEND\r\n")
    client = Client("127.0.0.1", server.port)
    assert client.get("k") == b"x"
    real = client._sock
    assert real is not None

    class Interrupting:
        def sendall(self, data: bytes) -> None:
            real.sendall(data)

        def recv(self, size: int) -> bytes:
            raise KeyboardInterrupt

        def setsockopt(self, *args: Any) -> None:
            real.setsockopt(*args)

        def close(self) -> None:
            real.close()

    client._sock = Interrupting()  # type: ignore[assignment]
    with pytest.raises(KeyboardInterrupt):
        client.get("k")
    assert not client.connected  # its unread reply went with the connection
    assert client.get("k") == b"x"
    assert server.accepted == 2
    client.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_forked_child_opens_its_own_connection(node: Node) -> None:
    client = Client(node.host, node.port)
    client.set("k", "parent")
    pid = os.fork()
    if pid == 0:  # the child: the parent's connection must not be used
        status = 1
        try:
            status = 0 if not client.connected and client.get("k") == "parent" else 3
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert client.connected
    assert client.get("k") == "parent"
    client.close()


# --- asyncio client only ----------------------------------------------------


def test_async_tasks_share_one_client(node: Node) -> None:
    async def main() -> None:
        async with AsyncClient(node.host, node.port) as client:
            await asyncio.gather(*(client.set(f"a{i}", i) for i in range(100)))
            got = await asyncio.gather(*(client.get(f"a{i}") for i in range(100)))
            assert got == list(range(100))

    asyncio.run(main())


def test_async_cancelled_call_drops_the_connection(scripted: Any) -> None:
    calls = []

    def answer(data: bytes) -> object:
        calls.append(data)
        return None if len(calls) == 1 else b"VALUE k 0 1\r\ny\r\nEND\r\n"

    server = scripted(answer)

    async def main() -> None:
        client = AsyncClient("127.0.0.1", server.port, timeout=5)
        task = asyncio.create_task(client.get("k"))
        while not calls:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not client.connected
        assert await client.get("k") == b"y"
        await client.close()

    asyncio.run(main())
    assert server.accepted == 2
