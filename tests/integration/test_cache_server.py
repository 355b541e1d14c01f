"""``python -m tiers.cache.server`` as a process, and side by side with memcached.

The conversation table of the unit tests (``tests/unit/cache/test_serverproto.py``)
holds memcached's answers; here each conversation goes over TCP to the
embedded server and, when it is installed, to a real memcached, and both
must answer exactly that (cas uniques aside, which differ by history).
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.conftest import require
from tests.integration.cachekit import Node, memcached_binary, running, talk
from tests.unit.cache.test_serverproto import CONVERSATIONS
from tiers.cache.client import Client

# Where memcached's answer depends on how bytes arrive in its buffer, the
# embedded server picks one behaviour; these are not compared with memcached.
EMBEDDED_ONLY = {
    # memcached closes on a 2048-byte line only if no LF is in its buffer yet
    "answers_before_a_long_line_are_kept",
}
# History-dependent numbers: cas uniques, and the "1" of a fresh store.
_CAS = re.compile(rb"(VALUE \S+ \d+ \d+) \d+\r\n")


def _normalize(answer: bytes) -> bytes:
    answer = re.sub(rb"VERSION \S+", b"VERSION x", answer)
    return _CAS.sub(rb"\1 CAS\r\n", answer)


@pytest.fixture(scope="module")
def embedded() -> Iterator[Node]:
    with running("embedded") as node:
        yield node


@pytest.fixture(scope="module")
def memcached() -> Iterator[Node]:
    require(memcached_binary() is not None, "memcached is not installed")
    with running("memcached") as node:
        yield node


def _converse(node: Node, request: bytes, closes: bool) -> tuple[bytes, bool]:
    with Client(node.host, node.port) as admin:
        admin.flush_all()
    if request.endswith(b"\n") and not closes:
        # "mn" (a no-op both servers answer "MN") marks the end of the answers;
        # a request may hold "mn" itself, and its answer may arrive alone.
        answer = talk(node.port, request + b"mn\r\n", until=b"MN\r\n",
                      times=request.count(b"mn\r\n") + 1)
        if answer.endswith(b"MN\r\n"):
            return answer.removesuffix(b"MN\r\n"), False
    else:
        answer = talk(node.port, request)
    closed = answer.endswith(b"<closed>")
    return answer.removesuffix(b"<closed>"), closed


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_embedded_conversation_over_tcp(embedded: Node, name: str) -> None:
    request, answer, closed = CONVERSATIONS[name]
    got, got_closed = _converse(embedded, request, closed)
    assert (_normalize(got), got_closed) == (_normalize(answer), closed)


@pytest.mark.parametrize("name", sorted(set(CONVERSATIONS) - EMBEDDED_ONLY))
def test_memcached_answers_the_same(memcached: Node, name: str) -> None:
    request, answer, closed = CONVERSATIONS[name]
    got, got_closed = _converse(memcached, request, closed)
    assert (_normalize(got), got_closed) == (_normalize(answer), closed)


def _workload(client: Client) -> None:
    client.flush_all()
    client.stats("reset")
    client.set("a", "1")
    client.set("b", b"x" * 100, 100)
    client.add("a", "2")
    client.replace("nope", "2")
    client.get_many(["a", "b", "c"])
    client.gets("a")
    client.gat("b", 200)
    client.gat("nope", 200)
    client.touch("a", 300)
    client.touch("nope", 300)
    client.set("n", 5)
    client.incr("n", 10)
    client.decr("n", 100)
    client.incr("nope")
    client.decr("nope")
    unique = client.gets("a")
    assert unique is not None
    client.cas("a", "3", unique[1])
    client.cas("a", "4", unique[1])
    client.cas("nope", "4", 1)
    client.delete("b")
    client.delete("b")


def test_statistics_match_memcached(embedded: Node, memcached: Node) -> None:
    names = ["cmd_get", "get_hits", "get_misses", "cmd_set", "cmd_touch", "touch_hits",
             "touch_misses", "incr_hits", "incr_misses", "decr_hits", "decr_misses",
             "cas_hits", "cas_misses", "cas_badval", "delete_hits", "delete_misses",
             "curr_items", "bytes"]  # fmt: skip
    seen = {}
    for node in (embedded, memcached):
        with Client(node.host, node.port) as client:
            _workload(client)
            stats = client.stats()
            seen[node.kind] = {name: stats[name] for name in names}
    assert seen["embedded"] == seen["memcached"]


def test_memory_limit_evicts_least_recently_used() -> None:
    with running("embedded", memory_mb=1) as node, Client(node.host, node.port) as client:
        value = b"v" * 10_000
        for i in range(300):  # about 3 MB into 1 MiB
            client.set(f"k{i}", value)
            if i % 10 == 0:
                assert client.get("k0") == value  # kept in use: never the LRU victim
        stats = client.stats()
        assert int(stats["evictions"]) > 0
        assert int(stats["bytes"]) <= int(stats["limit_maxbytes"]) == 1 << 20
        assert client.get("k0") == value
        assert client.get("k1") is None
        assert client.get("k299") == value


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signals_stop_cleanly(signum: int) -> None:
    node = Node("embedded").start()
    try:
        conn = socket.create_connection((node.host, node.port))
        conn.sendall(b"version\r\n")
        assert conn.recv(100).startswith(b"VERSION ")
        assert node.signal(signum) == 0
        conn.settimeout(5)
        assert conn.recv(100) == b""  # open connections are closed, not left hanging
        conn.close()
        assert "Traceback" not in node.log()
    finally:
        node.cleanup()


def test_pipelined_requests_without_reading() -> None:
    with running("embedded") as node, Client(node.host, node.port) as client:
        client.set("k", b"x" * 1000)
        count = 3000
        with socket.create_connection((node.host, node.port)) as sock:
            # about 3 MB of answers are owed before the client reads a byte
            sock.sendall(b"get k\r\n" * count)
            expected = (b"VALUE k 0 1000\r\n" + b"x" * 1000 + b"\r\nEND\r\n") * count
            received = bytearray()
            sock.settimeout(10)
            while len(received) < len(expected):
                chunk = sock.recv(1 << 20)
                assert chunk
                received += chunk
            assert bytes(received) == expected
        assert client.version()


def _run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tiers.cache.server", *args],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_bad_arguments_exit_2() -> None:
    for args in (["--listen", "nonsense"], ["--listen", "127.0.0.1:1", "--memory-mb", "0"], []):
        result = _run_module(*args)
        assert result.returncode == 2, args


def test_address_in_use_exits_1() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = _run_module("--listen", f"127.0.0.1:{taken.getsockname()[1]}")
    assert result.returncode == 1
    assert "cannot listen" in result.stderr
