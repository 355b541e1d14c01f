"""In-memory memcached nodes for tests: ``FakeNodes`` is a node factory for ``CacheCluster``.

Each address gets one ``FakeServer`` (a dict of items with memcached's TTL
rules, shared by every client of that address) and each factory call a new
``FakeClient`` on it, as a real factory opens a new connection. Tests steer
the servers: ``kill`` makes every call fail with ``NodeError`` as a refused
connection does (``wipe`` drops the items, as a restart would), ``revive``
brings the node back, ``hook`` runs before each call (to block, count or
fail it), and ``calls`` records every call as ``(operation, keys)``.

TTLs follow memcached: 0 never expires, a negative TTL expires at once,
more than 30 days is a Unix time, anything else is seconds from now on the
server's ``clock`` (``time.time`` unless one is given). Invalid keys (empty,
longer than 250 bytes, with spaces or control characters) raise
``CacheKeyError``; ``incr`` of a value that is not a decimal number raises
``ServerError`` (CLIENT_ERROR) as memcached does.

Everything is guarded by one lock per server, so clients may be used from
many threads; one ``add`` wins a race, as on a real node.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from tiers.cache.errors import CacheKeyError, NodeError, ServerError
from tiers.cache.ring import NodeSpec

_THIRTY_DAYS = 60 * 60 * 24 * 30
_MAX_KEY = 250
_U64 = 1 << 64


def _check_key(key: str) -> None:
    data = key.encode()
    if not data:
        raise CacheKeyError(key, "empty")
    if len(data) > _MAX_KEY:
        raise CacheKeyError(key, f"longer than {_MAX_KEY} bytes")
    if any(b <= 0x20 or b == 0x7F for b in data):
        raise CacheKeyError(key, "contains whitespace or control bytes")


class FakeServer:
    """One in-memory memcached node (see the module notes)."""

    def __init__(self, address: str, clock: Callable[[], float] = time.time) -> None:
        self.address = address
        self.clock = clock
        self.alive = True
        self.calls: list[tuple[str, tuple[str, ...]]] = []
        # Runs before every call, outside the lock: may sleep, wait or raise.
        self.hook: Callable[[str, tuple[str, ...]], object] | None = None
        self._items: dict[str, tuple[Any, float | None]] = {}
        self._lock = threading.Lock()

    # ---- steering ----------------------------------------------------------------

    def kill(self, *, wipe: bool = False) -> None:
        """Refuse every call from now on; ``wipe`` forgets the items too."""
        with self._lock:
            self.alive = False
            if wipe:
                self._items.clear()

    def revive(self) -> None:
        """Answer calls again, with whatever items survived."""
        with self._lock:
            self.alive = True

    def items(self) -> dict[str, Any]:
        """The live items (expired ones left out), for assertions."""
        with self._lock:
            now = self.clock()
            return {k: v for k, (v, until) in self._items.items() if until is None or until > now}

    def count(self, operation: str) -> int:
        """How many calls of ``operation`` this server received."""
        with self._lock:
            return sum(1 for op, _ in self.calls if op == operation)

    # ---- what clients call ---------------------------------------------------------

    def enter(self, operation: str, keys: tuple[str, ...]) -> None:
        for key in keys:
            _check_key(key)
        hook = self.hook
        if hook is not None:
            hook(operation, keys)
        with self._lock:
            self.calls.append((operation, keys))
            if not self.alive:
                raise NodeError(self.address, "connection refused", sent=False)

    def _until(self, ttl: int) -> float | None:
        if ttl == 0:
            return None
        if ttl < 0:
            return float("-inf")
        if ttl > _THIRTY_DAYS:
            return float(ttl)
        return self.clock() + ttl

    def _live(self, key: str) -> tuple[Any, float | None] | None:
        item = self._items.get(key)
        if item is None:
            return None
        until = item[1]
        if until is not None and until <= self.clock():
            del self._items[key]
            return None
        return item

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {}
            for key in keys:
                item = self._live(key)
                if item is not None:
                    out[key] = item[0]
            return out

    def store(self, mode: str, key: str, value: Any, ttl: int) -> bool:
        with self._lock:
            present = self._live(key) is not None
            if (mode == "add" and present) or (mode == "replace" and not present):
                return False
            self._items[key] = (value, self._until(ttl))
            return True

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._live(key) is not None and self._items.pop(key) is not None

    def incr(self, key: str, delta: int) -> int | None:
        with self._lock:
            item = self._live(key)
            if item is None:
                return None
            value, until = item
            text = value.decode() if isinstance(value, bytes) else str(value)
            if not text.strip().isdigit():
                raise ServerError(
                    "CLIENT_ERROR", "cannot increment or decrement non-numeric value", self.address
                )
            number = (int(text) + delta) % _U64
            self._items[key] = (number, until)
            return number

    def touch(self, key: str, ttl: int) -> bool:
        with self._lock:
            item = self._live(key)
            if item is None:
                return False
            self._items[key] = (item[0], self._until(ttl))
            return True


class FakeClient:
    """A connection to a ``FakeServer``; fits ``tiers.cache.nodes.CacheNode``."""

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.closed = False

    def get_many(self, keys: Iterable[str], /) -> dict[str | bytes, Any]:
        wanted = tuple(keys)
        self.server.enter("get_many", wanted)
        found: dict[str | bytes, Any] = {}
        found.update(self.server.get_many(wanted))
        return found

    def set(self, key: str, value: Any, ttl: int = 0, /) -> bool:
        self.server.enter("set", (key,))
        return self.server.store("set", key, value, ttl)

    def add(self, key: str, value: Any, ttl: int = 0, /) -> bool:
        self.server.enter("add", (key,))
        return self.server.store("add", key, value, ttl)

    def delete(self, key: str, /) -> bool:
        self.server.enter("delete", (key,))
        return self.server.delete(key)

    def incr(self, key: str, delta: int = 1, /) -> int | None:
        self.server.enter("incr", (key,))
        return self.server.incr(key, delta)

    def touch(self, key: str, ttl: int, /) -> bool:
        self.server.enter("touch", (key,))
        return self.server.touch(key, ttl)

    def close(self) -> None:
        self.closed = True


class FakeNodes:
    """A node factory over in-memory servers, one per address, made on first use."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.servers: dict[str, FakeServer] = {}
        self.opened = 0  # clients made, as connections would be
        self._lock = threading.Lock()

    def __call__(self, spec: NodeSpec, *, connect_timeout: float, timeout: float) -> FakeClient:
        server = self.server(spec)
        with self._lock:
            self.opened += 1
        return FakeClient(server)

    def server(self, node: NodeSpec | str) -> FakeServer:
        """The server of ``node`` (a spec or ``host:port``), created if new."""
        address = node.address if isinstance(node, NodeSpec) else node
        with self._lock:
            server = self.servers.get(address)
            if server is None:
                server = self.servers[address] = FakeServer(address, self.clock)
            return server

    def kill(self, node: NodeSpec | str, *, wipe: bool = False) -> None:
        self.server(node).kill(wipe=wipe)

    def revive(self, node: NodeSpec | str) -> None:
        self.server(node).revive()

    def holders(self, key: str) -> list[str]:
        """The addresses whose servers hold ``key`` now."""
        with self._lock:
            servers = list(self.servers.values())
        return [s.address for s in servers if key in s.items()]
