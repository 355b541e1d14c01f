"""The callback path of the proxy and its hand-overs to the task path, on a real process.

Requests without a body to a pooled backend connection are served by
callbacks; whatever those cannot finish (a response in pieces, chunked or
large, a broken or silent backend, a client that leaves) goes on in a task
from where it stood. These tests drive each hand-over and check that no byte
is lost or doubled, that retries follow the rules, and that the connection
serves on afterwards.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.integration.proxykit import Backend, Proxy, _json, _read_until_closed, _wait
from tests.integration.test_proxy import _read_until_length, _split_responses
from tests.integration.test_proxy_admin import TOKEN, admin_get, start
from tiers.proxy.accesslog import parse_line

Backends = Callable[[int], list[Backend]]


def _records(p: Proxy, uri: bytes) -> list[dict[str, bytes]]:
    data = p.access_log.read_bytes() if p.access_log.exists() else b""
    return [r for r in map(parse_line, data.splitlines()) if r["uri"] == uri]


def _warm(sock: socket.socket) -> None:
    """One request first, so that the proxy holds an idle connection to the backend.

    The next request then goes the callback path; without one it would be
    handed to a task at once, to connect.
    """
    head, _ = _exchange(sock, b"GET /warm HTTP/1.1\r\nHost: t\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")


def _exchange(sock: socket.socket, request: bytes) -> tuple[bytes, bytes]:
    """Send one request on ``sock`` and read its Content-Length framed answer."""
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        piece = sock.recv(65536)
        assert piece, data
        data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        piece = sock.recv(65536)
        assert piece, (head, body)
        body += piece
    assert len(body) == length, (head, body)
    return head, body


def test_a_response_in_several_reads_arrives_whole(backends: Backends, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as sock:
        for _ in range(3):
            head, body = _exchange(
                sock, b"GET /split?pieces=4&gap=0.05 HTTP/1.1\r\nHost: t\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ")
            assert body == b"piece 0;piece 1;piece 2;piece 3;"
        # And the connection goes on with ordinary requests.
        head, body = _exchange(sock, b"GET /after HTTP/1.1\r\nHost: t\r\n\r\n")
        assert _json(body)["path"] == "/after"
    assert p.stop() == 0
    (record, *_) = _records(p, b"/split?pieces=4&gap=0.05")
    assert record["status"] == b"200" and record["size"] == b"32"
    assert float(record["apptime"]) <= float(record["reqtime"])
    assert len({s.connection for s in a.requests("GET")}) == 1  # one pooled connection


def test_chunked_and_large_responses_are_streamed_then_callbacks_resume(
        backends: Backends, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    with socket.create_connection(("127.0.0.1", p.port), timeout=20) as sock:
        sock.sendall(b"GET /chunked HTTP/1.1\r\nHost: t\r\n\r\n")
        data = b""
        while not data.endswith(b"0\r\n\r\n"):
            piece = sock.recv(65536)
            assert piece
            data += piece
        head, _, body = data.partition(b"\r\n\r\n")
        assert b"Transfer-Encoding: chunked" in head
        assert b"first," in body and b"third" in body
        sock.sendall(b"GET /big?mb=2 HTTP/1.1\r\nHost: t\r\n\r\n")
        data = _read_until_length(sock, 2 << 20, 20)
        head, _, body = data.partition(b"\r\n\r\n")
        assert b"Content-Length: 2097152" in head and body == b"b" * (2 << 20)
        head, body = _exchange(sock, b"GET /small HTTP/1.1\r\nHost: t\r\n\r\n")
        assert _json(body)["path"] == "/small"
    assert p.stop() == 0
    assert [r["status"] for r in _records(p, b"/big?mb=2")] == [b"200"]
    assert _records(p, b"/big?mb=2")[0]["size"] == str(2 << 20).encode()


def test_a_reused_connection_the_backend_closed_retries_get_but_never_post(
        backends: Backends, proxy: Any) -> None:
    (a,) = backends(1)
    a.stale = True  # every request after the first on a connection: read, then cut
    # One failure must not take the only backend out: this is about retries.
    p = proxy([a], "--passive-fall", "0")
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as sock:
        for path in (b"/g1", b"/g2", b"/g3"):
            head, body = _exchange(sock, b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)
            assert head.startswith(b"HTTP/1.1 200 ") and _json(body)["path"] == path.decode()
    # Each GET after the first reached the app twice: once on the dying
    # connection, once on a new one.
    assert [s.path for s in a.requests("GET")] == ["/g1", "/g2", "/g2", "/g3", "/g3"]

    statuses = []
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as sock:
        for path in (b"/p1", b"/p2"):
            head, _ = _exchange(
                sock, b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n" % path)
            statuses.append(int(head.split(b" ")[1]))
            if statuses[-1] != 200:
                break
    # A POST without a body is served by callbacks too, and is not sent again.
    assert 502 in statuses
    posts = [s.path for s in a.requests("POST")]
    assert len(posts) == len(set(posts)) == len(statuses)


def test_pipelined_requests_of_every_kind_are_answered_in_order(
        backends: Backends, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    requests = [
        b"GET /q1 HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /q2 HTTP/1.1\r\nHost: t\r\n\r\n",
        b"POST /q3 HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello",
        b"GET /q4 HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /split?pieces=2&gap=0.02 HTTP/1.1\r\nHost: t\r\n\r\n",
        b"HEAD /q6 HTTP/1.1\r\nHost: t\r\n\r\n",
        b"GET /q7 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    ]
    data = p.raw(b"".join(requests), timeout=10)
    responses = _answers(data, head_only={5})
    paths = [_json(body)["path"] for _, body in responses if body.startswith(b"{")]
    assert paths == ["/q1", "/q2", "/q3", "/q4", "/q7"]
    assert responses[4][1] == b"piece 0;piece 1;"
    assert responses[5][0].startswith(b"HTTP/1.1 200 ") and responses[5][1] == b""
    assert b"Connection: close" in responses[6][0]
    assert len(responses) == 7


def _answers(data: bytes, head_only: set[int]) -> list[tuple[bytes, bytes]]:
    """Successive Content-Length framed answers; those at ``head_only`` have no body."""
    answers: list[tuple[bytes, bytes]] = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        if len(answers) in head_only:
            length = 0
        answers.append((head, rest[:length]))
        data = rest[length:]
    return answers


def test_a_backend_silent_past_the_read_timeout_gets_504_then_serving_goes_on(
        backends: Backends, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a], "--read-timeout", "0.3")
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as sock:
        _warm(sock)
        begin = time.monotonic()
        head, body = _exchange(sock, b"GET /slow?s=1.2 HTTP/1.1\r\nHost: t\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 504 ") and body == b"gateway timeout\n"
        assert time.monotonic() - begin < 1.1
        head, body = _exchange(sock, b"GET /next HTTP/1.1\r\nHost: t\r\n\r\n")
        assert _json(body)["path"] == "/next"
    # Silent in the middle of the body: the head went out, so the client is cut.
    data = p.raw(b"GET /stall-body?s=1.2 HTTP/1.1\r\nHost: t\r\n\r\n", timeout=5)
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and body == b"0123456789"
    assert p.stop() == 0
    assert [r["status"] for r in _records(p, b"/slow?s=1.2")] == [b"504"]
    (cut,) = _records(p, b"/stall-body?s=1.2")
    assert cut["size"] == b"10"
    assert len(a.requests("GET", "/slow?s=1.2")) == 1  # a timeout is not retried


def test_a_client_that_leaves_mid_request_frees_the_backend(
        tmp_path: Path, backends: Backends) -> None:
    (a,) = backends(1)
    p, admin_port = start(tmp_path, [a], TOKEN)
    try:
        def active() -> int:
            code, body, _ = admin_get(admin_port, "/status", TOKEN)
            assert code == 200
            return int(json.loads(body)["pools"][0]["servers"][0]["active"])

        sock = socket.create_connection(("127.0.0.1", p.port), timeout=10)
        _warm(sock)
        sock.sendall(b"GET /slow?s=1.0 HTTP/1.1\r\nHost: t\r\n\r\n")
        assert _wait(lambda: a.requests("GET", "/slow?s=1.0") != [], 5)
        # Least connections must see the request in flight.
        assert active() == 1
        sock.close()
        assert _wait(lambda: active() == 0, 2)
        status, body, _ = p.get("/still")
        assert status == 200 and _json(body)["path"] == "/still"
    finally:
        p.stop()
    (left,) = _records(p, b"/slow?s=1.0")
    assert left["status"] == b"499" and float(left["reqtime"]) < 0.9


def test_a_client_that_half_closes_after_its_request_is_abandoned_like_nginx_does(
        backends: Backends, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as sock:
        _warm(sock)
        sock.sendall(b"GET /slow?s=0.5 HTTP/1.1\r\nHost: t\r\n\r\n")
        assert _wait(lambda: a.requests("GET", "/slow?s=0.5") != [], 5)
        sock.shutdown(socket.SHUT_WR)
        assert _read_until_closed(sock, 5) == b""
    assert p.stop() == 0
    assert [r["status"] for r in _records(p, b"/slow?s=0.5")] == [b"499"]


def test_many_clients_at_once_each_get_their_own_answer(backends: Backends, proxy: Any) -> None:
    a, b = backends(2)
    p = proxy([a, b])
    errors: list[str] = []

    def client(n: int) -> None:
        try:
            with socket.create_connection(("127.0.0.1", p.port), timeout=10) as sock:
                for i in range(20):
                    path = f"/c{n}/{i}".encode()
                    _, body = _exchange(sock, b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % path)
                    if _json(body)["path"] != path.decode():
                        errors.append(f"{path!r} got {body[:80]!r}")
        except Exception as exc:  # reported by the assertion below
            errors.append(repr(exc))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert errors == []
    assert len(a.requests("GET")) + len(b.requests("GET")) == 160
    assert p.stop() == 0
    lines = p.access_log.read_bytes().splitlines()
    assert len(lines) == 160
    assert {parse_line(line)["status"] for line in lines} == {b"200"}


def test_pipelined_answers_split_as_expected(backends: Backends, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    data = p.raw(b"".join(b"GET /r%d HTTP/1.1\r\nHost: t\r\n\r\n" % i for i in range(30))
                 + b"GET /last HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", timeout=10)
    responses = _split_responses(data)
    assert [_json(body)["path"] for _, body in responses] == [f"/r{i}" for i in range(30)] + [
        "/last"]


def test_a_backend_that_closes_after_its_answer_is_not_reused(
        backends: Backends, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as sock:
        _warm(sock)
        for _ in range(3):
            head, body = _exchange(sock, b"GET /close-after HTTP/1.1\r\nHost: t\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 ") and body == b"bye"
            assert b"Connection: close" not in head  # the client's connection stays
        head, body = _exchange(sock, b"GET /end HTTP/1.1\r\nHost: t\r\n\r\n")
        assert _json(body)["path"] == "/end"
    closes = a.requests("GET", "/close-after")
    assert len(closes) == 3 and len({s.peer_port for s in closes}) == 3


def test_the_access_log_line_of_a_request_served_by_callbacks(
        backends: Backends, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as sock:
        _warm(sock)
        head, body = _exchange(
            sock, b"GET /fast?x=1 HTTP/1.1\r\nHost: t\r\nUser-Agent: probe/1\r\n"
                  b"Referer: http://r.test/\r\nX-Forwarded-For: 10.1.2.3\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 ") and b"X-Cache: MISS" in head
        seen = {k.lower(): v for k, v in _json(body)["headers"].items()}
    assert p.stop() == 0
    (record,) = _records(p, b"/fast?x=1")
    assert record["method"] == b"GET" and record["protocol"] == b"HTTP/1.1"
    assert record["status"] == b"200" and int(record["size"]) == len(body)
    assert record["ua"] == b"probe/1" and record["referer"] == b"http://r.test/"
    assert record["forwardedfor"] == b"10.1.2.3" and record["host"] == b"127.0.0.1"
    assert record["upstream"] == a.address.encode() and record["cache"] == b"MISS"
    assert record["route"] == b"default" and record["reqsize"] == b"0"
    assert 0 <= float(record["apptime"]) <= float(record["reqtime"])
    # The id in the log is the one the app got, with the forwarding fields.
    assert record["reqid"] == seen["x-request-id"].encode()
    assert seen["x-forwarded-for"] == "10.1.2.3, 127.0.0.1"
    assert seen["x-forwarded-proto"] == "http"


def test_a_5xx_gives_way_to_a_stale_page_on_the_callback_path(
        backends: Backends, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as sock:
        request = b"GET /cacheable?age=1 HTTP/1.1\r\nHost: t\r\n\r\n"
        head, body = _exchange(sock, request)
        assert b"X-Cache: MISS" in head and body == b"page from A #1\n"
        time.sleep(1.3)  # past max-age=1, inside stale-if-error=60
        a.error_paths.add("/cacheable")
        head, body = _exchange(sock, request)
        assert head.startswith(b"HTTP/1.1 200 ") and b"X-Cache: STALE" in head
        assert body == b"page from A #1\n"
        a.error_paths.clear()
        _warm(sock)
    assert len(a.requests("GET", "/cacheable?age=1")) == 2
