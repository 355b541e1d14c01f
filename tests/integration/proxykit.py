"""Real HTTP backends and a real ``python -m tiers.proxy`` process, for proxy tests.

Each backend is a small threaded HTTP/1.1 server in the test process, on an
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
from typing import Any, Protocol, TypeVar

HEALTH = "/_tiers/health"
FAST_HEALTH = ["--health-interval", "0.1", "--health-timeout", "0.3"]


# ---- backends ----------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    connection: int  # id() of the socket: unique among the connections open at once
    headers: dict[str, str]
    body: bytes
    peer_port: int = 0  # the proxy's end of the connection: unique while the test runs


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
            Seen(self.command, self.path, id(self.connection), dict(self.headers.items()), body,
                 self.client_address[1])
        )
        if backend.stale and self.served > 1:
            # A keep-alive connection the server closes just as it is reused.
            self._cut()
            return
        if path in backend.cut_paths:
            self._cut()
            return
        if path in backend.error_paths:
            self._send(500, b"broken\n")
            return
        if path == "/cacheable":
            params = dict(part.split("=", 1) for part in query.split("&") if "=" in part)
            time.sleep(float(params.get("s", "0")))
            control = f"public, max-age={params.get('age', '60')}, stale-if-error=60"
            count = len(backend.requests(path=self.path))
            self._send(200, f"page from {backend.name} #{count}\n".encode(),
                       (("Cache-Control", control),))
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
        if path == "/split":
            # One Content-Length answer in several sends, with pauses between.
            params = dict(part.split("=", 1) for part in query.split("&") if "=" in part)
            pieces = int(params.get("pieces", "3"))
            gap = float(params.get("gap", "0.05"))
            body = b"".join(b"piece %d;" % i for i in range(pieces))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.flush()
            for i in range(pieces):
                time.sleep(gap)
                self.wfile.write(b"piece %d;" % i)
            return
        if path == "/stall-body":
            # The head and a tenth of the body, then silence.
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"0123456789")
            time.sleep(float(query.split("=")[1]))
            with contextlib.suppress(OSError):
                self.wfile.write(b"x" * 90)
            return
        if path == "/chunked":
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in (b"first,", b"second,", b"third"):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")
            return
        if path == "/close-after":
            # A whole answer, then the server closes its side.
            self.close_connection = True
            self._send(200, b"bye", (("Connection", "close"),))
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
    error_paths: set[str] = field(default_factory=set)  # answered 500
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




class _Startable(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


S = TypeVar("S", bound=_Startable)


def start_backends(make_one: Callable[[str], S]) -> Iterator[Callable[[int], list[S]]]:
    """The body of a ``backends`` fixture: a factory of started backends named A, B, ...

    Every backend it made is stopped when the fixture ends, whatever the test did.
    """
    started: list[S] = []

    def make(count: int) -> list[S]:
        made = [make_one(chr(ord("A") + len(started) + i)) for i in range(count)]
        for backend in made:
            backend.start()
            started.append(backend)
        return made

    yield make
    for backend in started:
        backend.stop()
