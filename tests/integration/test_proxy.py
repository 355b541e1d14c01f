"""The proxy as a real process in front of real HTTP servers.

Each backend is a small threaded HTTP/1.1 server in this process, on an
ephemeral port, that records every request it receives (so a test can count
how often a POST reached an app) and can be stopped and started again on the
same port. The proxy runs as ``python -m tiers.proxy`` so that signals,
exit statuses and stderr are the real ones.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tiers.proxy.accesslog import parse_line

HEALTH = "/_tiers/health"
FAST_HEALTH = ["--health-interval", "0.1", "--health-timeout", "0.3"]


# ---- backends ----------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    connection: int
    headers: dict[str, str]
    body: bytes


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.served = 0
        self.server.backend.track(self.connection)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.backend.untrack(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        self._serve()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _cut(self) -> None:
        # Vanish without a byte of response, as a crashing app server would.
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.shutdown(socket.SHUT_RDWR)

    def _send(self, status: int, body: bytes, headers: tuple[tuple[str, str], ...] = ()) -> None:
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _serve(self) -> None:
        backend = self.server.backend
        path, _, query = self.path.partition("?")
        if path == HEALTH:
            self._read_body()
            self._send(200 if backend.healthy else 503, b"ok\n")
            return
        self.served += 1
        if path == "/stall":
            time.sleep(float(query.split("=")[1]))
        body = self._read_body()
        backend.record(
            Seen(self.command, self.path, id(self.connection), dict(self.headers.items()), body)
        )
        if backend.stale and self.served > 1:
            # A keep-alive connection the server closes just as it is reused.
            self._cut()
            return
        if path in backend.cut_paths:
            self._cut()
            return
        if path == "/slow":
            time.sleep(float(query.split("=")[1]))
        if path == "/truncate":
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"0123456789")
            self.wfile.flush()
            self._cut()
            return
        if path == "/big":
            size = int(query.split("=")[1]) << 20
            self.send_response(200)
            self.send_header("Content-Length", str(size))
            self.end_headers()
            chunk = b"b" * (1 << 20)
            for _ in range(size >> 20):
                self.wfile.write(chunk)
                with backend._lock:
                    backend.progress += len(chunk)
            return
        if path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (b"first,", b"second,", b"third"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            return
        if path == "/until-close":
            self.close_connection = True
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(b"read until the connection closes")
            return
        if path == "/hop":
            self._send(
                200,
                b"hop",
                (
                    ("Connection", "X-Internal"),
                    ("X-Internal", "secret"),
                    ("Keep-Alive", "timeout=5"),
                    ("Proxy-Connection", "keep-alive"),
                    ("Trailer", "X-T"),
                    ("Upgrade", "h2c"),
                    ("X-Visible", "yes"),
                ),
            )
            return
        reply = {
            "backend": backend.name,
            "method": self.command,
            "path": self.path,
            "headers": dict(self.headers.items()),
            "body_length": len(body),
            "body_sum": sum(body) % 65521,
        }
        self._send(200, json.dumps(reply).encode(), (("Content-Type", "application/json"),))


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    backend: Backend

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # connections cut on purpose end in OSErrors


@dataclass
class Backend:
    """A threaded HTTP/1.1 server that can die and come back on the same port."""

    name: str
    port: int = 0
    healthy: bool = True
    stale: bool = False
    cut_paths: set[str] = field(default_factory=set)
    progress: int = 0  # response bytes written by /big
    seen: list[Seen] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _conns: set[socket.socket] = field(default_factory=set)
    _server: _Server | None = None
    _thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        server = _Server(("127.0.0.1", self.port), _Handler)
        server.backend = self
        self.port = server.server_address[1]
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop listening and cut every open connection, like a killed process."""
        server = self._server
        if server is None:
            return
        self._server = None
        server.shutdown()
        server.server_close()
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)

    def track(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.add(conn)

    def untrack(self, conn: socket.socket) -> None:
        with self._lock:
            self._conns.discard(conn)

    def record(self, seen: Seen) -> None:
        with self._lock:
            self.seen.append(seen)

    def requests(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        with self._lock:
            return [
                s
                for s in self.seen
                if (method is None or s.method == method) and (path is None or s.path == path)
            ]


@pytest.fixture
def backends() -> Iterator[Callable[[int], list[Backend]]]:
    started: list[Backend] = []

    def make(count: int) -> list[Backend]:
        made = [Backend(name=chr(ord("A") + len(started) + i)) for i in range(count)]
        for backend in made:
            backend.start()
            started.append(backend)
        return made

    yield make
    for backend in started:
        backend.stop()


# ---- the proxy process -----------------------------------------------------------


class Proxy:
    """A ``python -m tiers.proxy`` process; its stderr is collected line by line."""

    def __init__(self, args: list[str], access_log: Path) -> None:
        self.access_log = access_log
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tiers.proxy", "--listen", "127.0.0.1:0", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=env,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        match = self.wait_for(r"listening on 127\.0\.0\.1:(\d+)", timeout=15)
        self.port = int(match.group(1))

    def _read(self) -> None:
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str]:
        """The first stderr line from index ``start`` on that matches ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    found = regex.search(line)
                    if found:
                        return found
                left = deadline - time.monotonic()
                if left <= 0 or (self.process.poll() is not None and not self._reader.is_alive()):
                    raise AssertionError(f"no stderr line matches {pattern!r}: {self.lines}")
                self._changed.wait(min(left, 0.1))

    def connection(self, timeout: float = 10) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def get(self, path: str, **headers: str) -> tuple[int, bytes, http.client.HTTPResponse]:
        conn = self.connection()
        try:
            conn.request("GET", path, headers=headers)
            response = conn.getresponse()
            return response.status, response.read(), response
        finally:
            conn.close()

    def raw(self, data: bytes, timeout: float = 5) -> bytes:
        """Send ``data`` on a new connection and read until the proxy closes it."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
            sock.sendall(data)
            return _read_until_closed(sock, timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        try:
            return self.process.wait(timeout)
        finally:
            self.kill()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(5)
        if self.process.stderr is not None:
            self.process.stderr.close()


def _read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    return data


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


def _json(body: bytes) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(body)
    return result


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# ---- tests ---------------------------------------------------------------------


def test_round_robin_and_keep_alive_reuse(backends: Any, proxy: Any) -> None:
    a, b = backends(2)
    p = proxy([a, b])
    conn = p.connection()
    names = []
    for i in range(20):
        conn.request("GET", f"/item/{i}")
        response = conn.getresponse()
        assert response.status == 200
        names.append(_json(response.read())["backend"])
    conn.close()
    assert names.count("A") == 10 and names.count("B") == 10
    for backend in (a, b):
        seen = backend.requests("GET")
        assert len(seen) == 10
        # Ten sequential requests ride on one pooled connection.
        assert len({s.connection for s in seen}) == 1


def test_forwarding_headers(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    status, body, _ = p.get(
        "/h",
        **{
            "X-Forwarded-For": "203.0.113.7",
            "X-Forwarded-Proto": "https",
            "Connection": "keep-alive, X-Secret",
            "X-Secret": "hop",
            "Keep-Alive": "timeout=9",
            "Proxy-Connection": "keep-alive",
            "TE": "trailers",
            "X-Kept": "end-to-end",
        },
    )
    assert status == 200
    headers = {k.lower(): v for k, v in _json(body)["headers"].items()}
    assert headers["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"
    assert headers["x-kept"] == "end-to-end"
    for hop in ("connection", "x-secret", "keep-alive", "proxy-connection", "te"):
        assert hop not in headers, hop

    status, body, response = p.get("/hop")
    assert status == 200 and body == b"hop"
    names = {name.lower() for name, _ in response.getheaders()}
    assert "x-visible" in names
    for hop in ("x-internal", "keep-alive", "proxy-connection", "trailer", "upgrade"):
        assert hop not in names, hop


def test_response_framings_and_bodies(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    conn = p.connection()
    conn.request("GET", "/chunked")
    response = conn.getresponse()
    assert response.read() == b"first,second,third"
    conn.request("GET", "/until-close")
    response = conn.getresponse()
    # Re-chunked for the client, so this connection stays usable.
    assert response.getheader("Transfer-Encoding") == "chunked"
    assert response.read() == b"read until the connection closes"
    conn.request("HEAD", "/anything")
    response = conn.getresponse()
    assert response.status == 200 and response.read() == b""
    assert int(response.getheader("Content-Length") or 0) > 0
    body = bytes(range(256)) * 4096  # 1 MiB each way, streamed
    conn.request("POST", "/upload", body=body)
    reply = _json(conn.getresponse().read())
    assert reply["body_length"] == len(body) and reply["body_sum"] == sum(body) % 65521
    conn.request("PUT", "/chunked-up", body=iter([body[:1000], body[1000:]]))
    reply = _json(conn.getresponse().read())
    assert reply["body_length"] == len(body)
    assert a.requests("PUT")[0].headers.get("Transfer-Encoding") == "chunked"
    conn.close()


def test_slow_peers_slow_the_other_side_instead_of_filling_memory(
    backends: Any, proxy: Any
) -> None:
    (a,) = backends(1)
    p = proxy([a])
    size = 64 << 20
    chunk = b"u" * (1 << 20)
    # The backend waits 1.5 s before reading a 64 MiB upload.
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as sock:
        sock.sendall(b"POST /stall?s=1.5 HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % size)
        sent = [0]

        def upload() -> None:
            with contextlib.suppress(OSError):
                while sent[0] < size:
                    sent[0] += sock.send(chunk)

        uploader = threading.Thread(target=upload)
        uploader.start()
        time.sleep(1.0)
        # Only socket buffers and the proxy's bounded buffer hold the bytes.
        assert sent[0] < size // 2
        uploader.join(20)
        assert sent[0] == size
        reply = b""
        while b"}" not in reply:
            piece = sock.recv(65536)
            assert piece
            reply += piece
    assert b"HTTP/1.1 200 " in reply
    assert _json(reply.partition(b"\r\n\r\n")[2])["body_length"] == size

    # A client that does not read holds back a 64 MiB download at the backend.
    with socket.create_connection(("127.0.0.1", p.port), timeout=10) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.sendall(b"GET /big?mb=64 HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(1.0)
        with a._lock:
            assert a.progress < size // 2
        received = len(_read_until_length(sock, size, 20).partition(b"\r\n\r\n")[2])
    assert received == size


def _split_responses(data: bytes) -> list[tuple[bytes, bytes]]:
    """Successive Content-Length framed responses as (head, body) pairs."""
    responses = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        found = re.search(rb"Content-Length: (\d+)", head)
        assert found is not None, head
        length = int(found.group(1))
        responses.append((head, rest[:length]))
        data = rest[length:]
    return responses


def _read_until_length(sock: socket.socket, body_size: int, timeout: float) -> bytes:
    sock.settimeout(timeout)
    data = bytearray()
    while True:
        head, sep, _ = bytes(data[:4096]).partition(b"\r\n\r\n")
        if sep and len(data) - len(head) - 4 >= body_size:
            return bytes(data)
        piece = sock.recv(1 << 20)
        if not piece:
            return bytes(data)
        data += piece


def test_pipelined_and_http10_requests(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    data = p.raw(
        b"GET /p1 HTTP/1.1\r\nHost: t\r\n\r\n"
        b"POST /p2 HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\nabc"
        b"GET /p3 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    )
    responses = _split_responses(data)
    assert [head.split(b" ")[1] for head, _ in responses] == [b"200"] * 3
    assert [_json(body)["path"] for _, body in responses] == ["/p1", "/p2", "/p3"]
    data = p.raw(b"GET /old HTTP/1.0\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in head
    assert _json(body)["headers"]["Host"] == a.address


def test_expect_continue_is_answered_by_the_proxy(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as sock:
        sock.sendall(
            b"PUT /e HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n"
        )
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        sock.sendall(b"data")
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200 ")
    assert a.requests("PUT")[0].body == b"data"


def test_killed_backend_loses_no_get_and_comes_back(backends: Any, proxy: Any) -> None:
    a, b = backends(2)
    p = proxy([a, b])
    conn = p.connection()
    statuses = []
    for i in range(60):
        if i == 20:
            killed_at = len(p.lines)
            a.stop()
        conn.request("GET", f"/n/{i}")
        response = conn.getresponse()
        response.read()
        statuses.append(response.status)
    assert statuses == [200] * 60
    p.wait_for(rf"backend {a.address} is down", timeout=2, start=killed_at)
    served_by_b = len(b.requests("GET"))
    assert served_by_b >= 40

    returned_at = len(p.lines)
    a.start()
    begin = time.monotonic()
    p.wait_for(rf"backend {a.address} is up", timeout=3, start=returned_at)
    assert time.monotonic() - begin < 2.5
    before = len(a.requests("GET"))
    for i in range(10):
        conn.request("GET", f"/back/{i}")
        response = conn.getresponse()
        response.read()
        assert response.status == 200
    conn.close()
    assert len(a.requests("GET")) - before == 5


def test_dead_backend_is_detected_by_health_checks_alone(backends: Any, proxy: Any) -> None:
    a, b = backends(2)
    # The default check timings, which promise detection within about a second.
    p = proxy([a, b], "--health-interval", "0.25", "--health-timeout", "0.5")
    mark = len(p.lines)
    begin = time.monotonic()
    a.stop()
    p.wait_for(rf"backend {a.address} is down", timeout=3, start=mark)
    assert time.monotonic() - begin < 1.5
    # An app that answers but reports itself unhealthy is taken out as well.
    mark = len(p.lines)
    b.healthy = False
    p.wait_for(rf"backend {b.address} is down", timeout=3, start=mark)
    status, body, response = p.get("/x")
    assert status == 503 and b"no backend" in body
    assert response.getheader("Content-Type", "").startswith("text/plain")


def test_all_down_answers_503_quickly(backends: Any, proxy: Any) -> None:
    a, b = backends(2)
    p = proxy([a, b], "--connect-timeout", "2")
    mark = len(p.lines)
    a.stop()
    b.stop()
    p.wait_for(rf"backend {a.address} is down", timeout=3, start=mark)
    p.wait_for(rf"backend {b.address} is down", timeout=3, start=mark)
    for _ in range(5):
        begin = time.monotonic()
        status, body, _ = p.get("/x")
        assert status == 503
        assert body == b"no backend is available\n"
        assert time.monotonic() - begin < 1.0


def test_post_is_never_sent_twice(backends: Any, proxy: Any) -> None:
    a, b = backends(2)
    a.cut_paths.add("/flaky")
    p = proxy([a, b])
    post_statuses = []
    for i in range(6):
        conn = p.connection()
        conn.request("POST", "/flaky", body=f"payment {i}".encode())
        response = conn.getresponse()
        response.read()
        post_statuses.append(response.status)
        conn.close()
    posts = a.requests("POST", "/flaky") + b.requests("POST", "/flaky")
    # Every POST reached exactly one app, once, whatever its fate.
    assert sorted(s.body for s in posts) == sorted(f"payment {i}".encode() for i in range(6))
    assert post_statuses.count(502) == len(a.requests("POST", "/flaky")) >= 1
    assert post_statuses.count(200) == len(b.requests("POST", "/flaky"))

    # The same failure on a GET is retried on the other backend.
    for _ in range(4):
        status, body, _ = p.get("/flaky")
        assert status == 200 and _json(body)["backend"] == "B"
    assert len(a.requests("GET", "/flaky")) >= 1


def test_post_cut_on_every_backend_is_a_502_not_a_retry(backends: Any, proxy: Any) -> None:
    a, b = backends(2)
    a.cut_paths.add("/boom")
    b.cut_paths.add("/boom")
    p = proxy([a, b])
    conn = p.connection()
    conn.request("POST", "/boom", body=b"once")
    response = conn.getresponse()
    assert response.status == 502
    assert len(a.requests("POST") + b.requests("POST")) == 1
    status, _, _ = p.get("/boom")
    assert status == 502
    # A GET is tried on each backend once, then given up.
    assert len(a.requests("GET") + b.requests("GET")) == 2


def test_stale_pooled_connection_does_not_fail_a_get(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    a.stale = True
    p = proxy([a])
    for i in range(5):
        status, body, _ = p.get(f"/s/{i}")
        assert status == 200, body
    # Each reuse of a pooled connection was refused and the GET sent again.
    assert len(a.requests("GET")) == 9


def test_failure_after_the_response_started_closes_the_client(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    data = p.raw(b"GET /truncate HTTP/1.1\r\nHost: t\r\n\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 100" in head
    assert body == b"0123456789"  # then the connection closed


def test_malformed_requests_get_400_and_close(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    smuggle = (
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nGET /admin HTTP/1.1\r\nHost: t\r\n\r\n"
    )
    for raw, status in [
        (smuggle, 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: t\r\nX: a\r\n b\r\n\r\n", 400),
        (b"GET /" + b"a" * 10000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 40000 + b"\r\n\r\n", 431),
    ]:
        data = p.raw(raw)
        assert data.startswith(b"HTTP/1.1 %d " % status), data[:100]
        assert b"Connection: close" in data.partition(b"\r\n\r\n")[0]
        assert data.count(b"HTTP/1.1") == 1
    assert a.requests() == []


def test_slow_request_head_gets_408(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a], "--header-timeout", "0.5", "--client-idle-timeout", "0.8")
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as sock:
        begin = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n")
        data = _read_until_closed(sock, 5)
        elapsed = time.monotonic() - begin
    assert data.startswith(b"HTTP/1.1 408 ")
    assert 0.4 < elapsed < 3
    # An idle keep-alive connection is closed without a word.
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        begin = time.monotonic()
        data = _read_until_closed(sock, 5)
        elapsed = time.monotonic() - begin
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Connection: close" not in head
    assert _json(body)["path"] == "/"
    assert 0.7 < elapsed < 3


def test_backend_read_timeout_gives_504(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a], "--read-timeout", "0.3")
    begin = time.monotonic()
    status, body, _ = p.get("/slow?s=1.5")
    assert status == 504 and body == b"gateway timeout\n"
    assert time.monotonic() - begin < 1.4
    # The 504 was not retried.
    assert len(a.requests("GET", "/slow?s=1.5")) == 1


def test_access_log_lines(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    conn = p.connection()
    conn.request(
        "GET", "/logged?q=1", headers={"User-Agent": "tab\there", "X-Forwarded-For": "10.9.8.7"}
    )
    conn.getresponse().read()
    conn.request("POST", "/logged", body=b"12345")
    conn.getresponse().read()
    conn.close()
    p.raw(b"GET / HTTP/1.1\r\n\r\n")
    with socket.create_connection(("127.0.0.1", p.port), timeout=5) as sock:
        sock.sendall(b"GET /slow?s=1.0 HTTP/1.1\r\nHost: t\r\n\r\n")
        time.sleep(0.2)
    assert p.stop() == 0
    lines = p.access_log.read_bytes().splitlines()
    records = [parse_line(line) for line in lines]
    labels = ["time", "host", "forwardedfor", "method", "uri", "protocol", "status", "size",
              "reqtime", "apptime", "upstream", "ua"]  # fmt: skip
    assert all(list(r) == labels for r in records)
    get, post, bad, left = records
    assert get["method"] == b"GET" and get["uri"] == b"/logged?q=1"
    assert get["status"] == b"200" and get["protocol"] == b"HTTP/1.1"
    assert get["ua"] == b"tab\there" and b"\\t" in lines[0]
    assert get["forwardedfor"] == b"10.9.8.7" and get["host"] == b"127.0.0.1"
    assert get["upstream"] == a.address.encode()
    assert int(get["size"]) > 0 and float(get["reqtime"]) >= float(get["apptime"]) >= 0
    assert re.fullmatch(rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", get["time"])
    assert post["method"] == b"POST" and post["status"] == b"200"
    assert bad["status"] == b"400" and bad["upstream"] == b"-" and bad["apptime"] == b"-"
    # The client left before the slow answer: nginx's 499, and no waiting for the backend.
    assert left["status"] == b"499" and left["uri"] == b"/slow?s=1.0"
    assert float(left["reqtime"]) < 0.9


def test_sigterm_finishes_the_request_in_flight(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    idle = p.connection()
    idle.request("GET", "/warm")
    idle.getresponse().read()
    result: dict[str, Any] = {}

    def slow_request() -> None:
        try:
            result["answer"] = p.get("/slow?s=1.0")[:2]
        except Exception as exc:  # reported by the assertion below
            result["error"] = exc

    client = threading.Thread(target=slow_request)
    client.start()
    assert _wait(lambda: a.requests("GET", "/slow?s=1.0") != [], 5)
    begin = time.monotonic()
    p.process.send_signal(signal.SIGTERM)
    p.wait_for("stopping", timeout=5)
    # No longer accepting.
    assert _wait(lambda: _refused(p.port), 2)
    assert p.process.wait(15) == 0
    client.join(5)
    assert "error" not in result, result
    assert result["answer"][0] == 200
    assert time.monotonic() - begin < 5
    # The idle keep-alive connection was closed, not left hanging.
    with pytest.raises((http.client.HTTPException, OSError)):
        idle.request("GET", "/after")
        idle.getresponse().read()
    idle.close()


def test_sigint_on_an_idle_proxy_exits_0(backends: Any, proxy: Any) -> None:
    (a,) = backends(1)
    p = proxy([a])
    assert p.stop(signal.SIGINT) == 0
    assert any("stopped" in line for line in p.lines)


def test_bad_arguments_and_busy_port_fail_clearly(backends: Any, tmp_path: Path) -> None:
    bad = subprocess.run(
        [sys.executable, "-m", "tiers.proxy", "--backend", "nonsense"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert bad.returncode == 2
    assert b"HOST:PORT" in bad.stderr
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        busy = subprocess.run(
            [sys.executable, "-m", "tiers.proxy", "--listen", f"127.0.0.1:{port}",
             "--backend", "127.0.0.1:9"],
            capture_output=True,
            timeout=30,
            check=False,
        )  # fmt: skip
    assert busy.returncode == 1
    assert b"cannot listen on" in busy.stderr
    assert len(busy.stderr.strip().splitlines()) == 1


def _refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return False
    except OSError:
        return True
