"""Real cache nodes for the cache tests: memcached, or ``python -m tiers.cache.server``.

Each node is a process of its own on an ephemeral port of 127.0.0.1 that a
test can kill and start again on the same port. memcached is started as
``memcached -p PORT -l 127.0.0.1 -U 0 -m 64`` (with ``-u nobody``, or
``-u root`` when there is no such user, when the tests run as root, since
memcached refuses to run as root without ``-u``). The embedded server is
started on port 0 and reports the port it chose on stderr.

``ScriptedServer`` is the third kind of node: a listener in the test process
that answers each connection with canned bytes (or never answers), for the
failure paths a healthy server never takes. ``node_state`` reads one node's
status out of a cluster's stats.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tiers.cache.cluster import CacheCluster
from tiers.cache.ring import NodeSpec

# Ports other services of this machine may own; an ephemeral port never is one,
# but a test must not even try them.
FORBIDDEN_PORTS = frozenset({5432, 3306, 6379, 5672, 1883, 4222, 11211, 15432, 15433,
                             *range(8400, 8410)})  # fmt: skip
KINDS = ("memcached", "embedded")


def memcached_binary() -> str | None:
    return shutil.which("memcached")


def free_port() -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in FORBIDDEN_PORTS:
            return port


def _connectable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
    except OSError:
        return False
    return True


class Node:
    """A cache server process on 127.0.0.1:port, restartable on the same port."""

    def __init__(self, kind: str, memory_mb: int = 64) -> None:
        assert kind in KINDS
        self.kind = kind
        self.memory_mb = memory_mb
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self._log = Path(tempfile.mkstemp(prefix="tiers-cache-node-", suffix=".log")[1])

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> Node:
        """Start (again): on a fresh port the first time, on the same port after that."""
        assert self.proc is None, "already running"
        for _ in range(5):
            if self.kind == "memcached":
                port = self.port or free_port()
                self.proc = self._spawn_memcached(port)
                if self._wait_until(lambda p=port: _connectable(p)):  # type: ignore[misc]
                    self.port = port
                    return self
            else:
                self.proc = self._spawn_embedded(self.port)
                port = self._wait_for_port()
                if port:
                    self.port = port
                    return self
            self.kill()  # the port was taken meanwhile, or the server died: try again
            if self.port:
                time.sleep(0.2)
        raise RuntimeError(f"{self.kind} did not start: {self._log.read_text()[-2000:]}")

    def _spawn_memcached(self, port: int) -> subprocess.Popen[bytes]:
        binary = memcached_binary()
        assert binary is not None
        args = [binary, "-p", str(port), "-l", "127.0.0.1", "-U", "0", "-m", str(self.memory_mb)]
        if os.geteuid() == 0:
            try:
                pwd.getpwnam("nobody")
                args += ["-u", "nobody"]
            except KeyError:
                args += ["-u", "root"]
        with self._log.open("ab") as log:
            return subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def _spawn_embedded(self, port: int) -> subprocess.Popen[bytes]:
        self._log.write_bytes(b"")
        args = [sys.executable, "-m", "tiers.cache.server", "--listen", f"127.0.0.1:{port}",
                "--memory-mb", str(self.memory_mb)]  # fmt: skip
        with self._log.open("ab") as log:
            return subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def _wait_until(self, ready: Callable[[], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is None or self.proc.poll() is not None:
                return False
            if ready():
                return True
            time.sleep(0.02)
        return False

    def _wait_for_port(self) -> int:
        found: list[int] = []

        def ready() -> bool:
            match = re.search(rb"listening on 127\.0\.0\.1:(\d+)", self._log.read_bytes())
            if match:
                found.append(int(match.group(1)))
            return bool(found)

        return found[0] if self._wait_until(ready) else 0

    def signal(self, signum: int) -> int:
        """Send a signal and wait for the exit status."""
        assert self.proc is not None
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=10)
        finally:
            self.proc = None

    def kill(self) -> None:
        """SIGKILL, as a crash would; the port can be started again."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait(timeout=10)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)

    def cleanup(self) -> None:
        self.stop()
        self._log.unlink(missing_ok=True)

    def log(self) -> str:
        return self._log.read_text(errors="replace")


@contextlib.contextmanager
def running(kind: str, memory_mb: int = 64) -> Iterator[Node]:
    node = Node(kind, memory_mb)
    try:
        yield node.start()
    finally:
        node.cleanup()


def talk(port: int, data: bytes, wait: float = 0.3, until: bytes | None = None,
         times: int = 1) -> bytes:
    """Send raw bytes on a new connection; what is answered until it ends with ``until``
    holding it ``times`` times in all (when given) or ``wait`` seconds pass in silence.

    A closed connection shows as a trailing ``<closed>``.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(data)
        sock.settimeout(wait if until is None else 10)
        out = b""
        try:
            while until is None or not out.endswith(until) or out.count(until) < times:
                chunk = sock.recv(65536)
                if not chunk:
                    return out + b"<closed>"
                out += chunk
        except TimeoutError:
            return out
        except ConnectionResetError:
            return out + b"<closed>"
        return out


class ScriptedServer:
    """A listener whose connections get ``answer(request_bytes)`` (None: stay silent).

    ``answer`` sees each chunk received on a connection, and what it returns
    (bytes to send, ``CLOSE`` to close after sending, or None) happens at once.
    Connections accepted are counted in ``accepted``.
    """

    CLOSE = object()

    def __init__(self, answer: Callable[[bytes], object]) -> None:
        self._answer = answer
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self.accepted = 0
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        self._listener.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(0.05)
        while not self._stop.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not data:
                return
            reply = self._answer(data)
            try:
                if isinstance(reply, tuple):
                    conn.sendall(reply[0])
                    reply = reply[1]
                if isinstance(reply, bytes):
                    conn.sendall(reply)
                if reply is ScriptedServer.CLOSE:
                    conn.close()
                    return
            except OSError:
                return

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(timeout=5)
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.close()


def node_state(cluster: CacheCluster, spec: NodeSpec) -> dict[str, Any]:
    """The status of node ``spec`` in ``cluster.stats()``."""
    nodes = cluster.stats()["nodes"]
    assert isinstance(nodes, dict)
    found = nodes[spec.address]
    assert isinstance(found, dict)
    return found
