"""An embedded memcached-compatible server, for machines without memcached.

    python -m tiers.cache.server --listen 127.0.0.1:PORT [--memory-mb 64]
        [--max-item-size BYTES]

``tiers up`` runs this when ``memcached`` is not installed. It speaks the text
protocol (``tiers.cache.serverproto`` parses and answers; this module stores
and does the I/O): get, gets, gat, gats, set, add, replace, append, prepend,
cas, delete, incr, decr, touch, flush_all, version, verbosity, stats
(plain, ``settings``, ``reset``) and quit, with noreply.

``Store`` keeps items in one LRU list under a memory limit in bytes, counted
as memcached counts them (``serverproto.item_size``). Storing past the limit
evicts least recently used items first (counted in ``evictions``, or in
``reclaimed`` when the item had expired anyway); an item larger than the
whole limit is refused with ``SERVER_ERROR out of memory storing object``,
one larger than ``max_item_size`` (1 MiB) with ``SERVER_ERROR object too
large for cache`` (an append or prepend that would grow an item past it gets
``NOT_STORED``, as from memcached). Reading or writing an item makes it most recently used.

Expiry (memcached's rules): 0 never; up to 30 days, seconds from now; more
than 30 days, a unix time (already past: expired at once); negative, expired
at once. Expired items are dropped when touched by a command or pushed out
by the LRU; until then they count in ``curr_items``, as in memcached.
``flush_all`` without delay drops everything; with a delay, items stored
before that moment become invalid when it comes. The clock is injectable.

Every modification gives the item a new cas unique from one counter
(set, add, replace, append, prepend, cas, incr, decr); touch does not.
incr/decr follow memcached to the byte: the value must start with a decimal
number below 2**64 (after optional spaces), incr wraps at 2**64, decr stops
at 0, and a result shorter than the stored text is padded with spaces.

Statistics follow memcached's names and meanings: cmd_get and get_hits /
get_misses count keys of get/gets (gat counts as cmd_touch and touch_hits /
touch_misses); cmd_set counts storage commands whose data was read;
curr_items, total_items, bytes, evictions, reclaimed, curr_connections,
total_connections, limit_maxbytes and the delete/incr/decr/cas/touch
counters.

Differences from memcached a client could notice: no slab allocator (the
memory limit is exact, so evictions start at a different point), no UDP, no
binary or meta protocol, no SASL, one thread. The process exits 0 after
SIGTERM or SIGINT (connections are closed), 1 when it cannot listen, 2 on
a bad argument; the "listening on HOST:PORT" line on stderr gives the port
chosen for port 0. uvloop is used when installed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import resource
import signal
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import cast

from tiers.cache.serverproto import (
    DEFAULT_MAX_GET_LINE,
    DEFAULT_MAX_ITEM_SIZE,
    NO_MEMORY,
    NON_NUMERIC,
    VERSION,
    Conversation,
    RequestParser,
    Storage,
    item_size,
    strtoull,
)

THIRTY_DAYS = 60 * 60 * 24 * 30
_U64 = 1 << 64
_COUNTERS = (
    "cmd_get", "cmd_set", "cmd_flush", "cmd_touch", "get_hits", "get_misses",
    "delete_misses", "delete_hits", "incr_misses", "incr_hits", "decr_misses", "decr_hits",
    "cas_misses", "cas_hits", "cas_badval", "touch_hits", "touch_misses",
    "store_too_large", "store_no_memory", "total_items", "evictions", "reclaimed",
    "total_connections",
)  # fmt: skip


@dataclass(slots=True, eq=False)
class Item:
    """One stored item. ``expires`` is a clock time (0.0 never); ``stored`` when it was set."""

    data: bytes
    flags: int
    expires: float
    cas: int
    stored: float
    size: int


class Store:
    """The LRU item store behind the embedded server (a ``serverproto.Backend``).

    ``memory_limit`` bounds the sum of item sizes; ``clock`` returns unix
    time in seconds (``time.time`` by default; tests pass their own).
    """

    def __init__(
        self,
        memory_limit: int = 64 << 20,
        *,
        max_item_size: int = DEFAULT_MAX_ITEM_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.memory_limit = memory_limit
        self.max_item_size = max_item_size
        self.clock = clock
        self.started = clock()
        self.curr_connections = 0
        self._items: OrderedDict[bytes, Item] = OrderedDict()
        self._bytes = 0
        self._cas = 0
        self._flush_at: float | None = None
        self.counters = dict.fromkeys(_COUNTERS, 0)

    # --- item life ------------------------------------------------------------

    def _deadline(self, exptime: int, now: float) -> float:
        if exptime == 0:
            return 0.0
        if exptime < 0:
            return -1.0
        if exptime > THIRTY_DAYS:
            return float(exptime) if exptime > now else -1.0
        return now + exptime

    def _live(self, key: bytes, now: float) -> Item | None:
        """The item under ``key`` if it is neither expired nor flushed (dead ones are dropped)."""
        if self._flush_at is not None and now >= self._flush_at:
            self._apply_flush()
        item = self._items.get(key)
        if item is None:
            return None
        if item.expires and item.expires <= now:
            self._unlink(key, item)
            return None
        return item

    def _apply_flush(self) -> None:
        flush_at = self._flush_at
        self._flush_at = None
        assert flush_at is not None
        for key, item in list(self._items.items()):
            if item.stored < flush_at:
                self._unlink(key, item)

    def _unlink(self, key: bytes, item: Item) -> None:
        del self._items[key]
        self._bytes -= item.size

    def _link(self, key: bytes, item: Item) -> bool:
        """Store ``item``, evicting LRU items to make room; False if it can never fit."""
        if item.size > self.memory_limit:
            return False
        old = self._items.pop(key, None)
        if old is not None:
            self._bytes -= old.size
        now = self.clock()
        items = self._items
        while self._bytes + item.size > self.memory_limit:
            _, victim = items.popitem(last=False)
            self._bytes -= victim.size
            expired = victim.expires and victim.expires <= now
            self.counters["reclaimed" if expired else "evictions"] += 1
        items[key] = item
        self._bytes += item.size
        self.counters["total_items"] += 1
        return True

    def _next_cas(self) -> int:
        self._cas += 1
        return self._cas

    # --- serverproto.Backend ---------------------------------------------------

    def fetch(self, key: bytes, touch: int | None) -> tuple[bytes, int, int] | None:
        now = self.clock()
        item = self._live(key, now)
        counters = self.counters
        if touch is None:
            counters["cmd_get"] += 1
            counters["get_hits" if item is not None else "get_misses"] += 1
        else:
            counters["cmd_touch"] += 1
            counters["touch_hits" if item is not None else "touch_misses"] += 1
        if item is None:
            return None
        if touch is not None:
            item.expires = self._deadline(touch, now)
        self._items.move_to_end(key)
        return item.data, item.flags, item.cas

    def store(self, command: Storage) -> bytes:
        assert command.data is not None
        counters = self.counters
        counters["cmd_set"] += 1
        key, name = command.key, command.command
        now = self.clock()
        old = self._live(key, now)
        flags, data, expires = command.flags, command.data, self._deadline(command.exptime, now)
        if name == "add" and old is not None:
            self._items.move_to_end(key)  # memcached bumps the item a failed add hits
            return b"NOT_STORED"
        if name in ("replace", "append", "prepend") and old is None:
            return b"NOT_STORED"
        if name == "cas":
            if old is None:
                counters["cas_misses"] += 1
                return b"NOT_FOUND"
            if old.cas != command.cas_unique:
                counters["cas_badval"] += 1
                return b"EXISTS"
            counters["cas_hits"] += 1
        if name in ("append", "prepend"):
            assert old is not None
            data = old.data + data if name == "append" else data + old.data
            flags, expires = old.flags, old.expires
        size = item_size(len(key), flags, len(data))
        if size > self.max_item_size:
            # Only append/prepend get here (the parser refused larger blocks):
            # memcached answers a failed allocation for the combined item so.
            return b"NOT_STORED"
        if not self._link(key, Item(data, flags, expires, self._next_cas(), now, size)):
            counters["store_no_memory"] += 1
            if name == "set" and key in self._items:
                self._unlink(key, self._items[key])
            return b"SERVER_ERROR out of memory storing object"
        return b"STORED"

    def reject_too_large(self, command: str, key: bytes) -> None:
        self.counters["store_too_large"] += 1
        if command == "set":
            # memcached drops the old value rather than leave it stale
            item = self._items.get(key)
            if item is not None:
                self._unlink(key, item)

    def bad_chunk(self) -> None:
        self.counters["cmd_set"] += 1

    def delete(self, key: bytes) -> bool:
        item = self._live(key, self.clock())
        if item is None:
            self.counters["delete_misses"] += 1
            return False
        self._unlink(key, item)
        self.counters["delete_hits"] += 1
        return True

    def arith(self, key: bytes, incr: bool, delta: int) -> int | None:
        now = self.clock()
        item = self._live(key, now)
        name = "incr" if incr else "decr"
        if item is None:
            self.counters[f"{name}_misses"] += 1
            return None
        current = strtoull(item.data) if item.data else None
        if current is None:
            return NON_NUMERIC
        self.counters[f"{name}_hits"] += 1
        value = (current + delta) % _U64 if incr else max(0, current - delta)
        text = b"%d" % value
        if len(text) <= len(item.data):
            # memcached rewrites in place, padding with spaces
            item.data = text + b" " * (len(item.data) - len(text))
            item.cas = self._next_cas()
            self._items.move_to_end(key)
            return value
        size = item_size(len(key), item.flags, len(text))
        replacement = Item(text, item.flags, item.expires, self._next_cas(), now, size)
        if not self._link(key, replacement):
            return NO_MEMORY
        return value

    def touch(self, key: bytes, exptime: int) -> bool:
        now = self.clock()
        item = self._live(key, now)
        self.counters["cmd_touch"] += 1
        if item is None:
            self.counters["touch_misses"] += 1
            return False
        self.counters["touch_hits"] += 1
        item.expires = self._deadline(exptime, now)
        self._items.move_to_end(key)
        return True

    def flush_all(self, delay: int) -> None:
        self.counters["cmd_flush"] += 1
        now = self.clock()
        if delay > 0:
            self._flush_at = self._deadline(delay, now)
            if self._flush_at > now:
                return
        self._flush_at = None
        self._items.clear()
        self._bytes = 0

    def stats(self) -> list[tuple[str, str]]:
        now = self.clock()
        if self._flush_at is not None and now >= self._flush_at:
            self._apply_flush()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        c = self.counters
        head = [
            ("pid", str(os.getpid())),
            ("uptime", str(int(now - self.started))),
            ("time", str(int(now))),
            ("version", VERSION),
            ("pointer_size", "64"),
            ("rusage_user", f"{usage.ru_utime:.6f}"),
            ("rusage_system", f"{usage.ru_stime:.6f}"),
            ("curr_connections", str(self.curr_connections)),
        ]
        counted = [(name, str(c[name])) for name in _COUNTERS if name != "total_items"]
        tail = [
            ("threads", "1"),
            ("limit_maxbytes", str(self.memory_limit)),
            ("bytes", str(self._bytes)),
            ("curr_items", str(len(self._items))),
            ("total_items", str(c["total_items"])),
        ]
        return head + counted + tail

    def settings(self) -> list[tuple[str, str]]:
        return [
            ("maxbytes", str(self.memory_limit)),
            ("item_size_max", str(self.max_item_size)),
            ("evictions", "on"),
            ("cas_enabled", "yes"),
            ("tcpport", "0"),
            ("num_threads", "1"),
        ]

    def reset_stats(self) -> None:
        for name in _COUNTERS:
            self.counters[name] = 0

    @property
    def bytes(self) -> int:
        """Sum of the sizes of the items held (expired ones not yet dropped included)."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)


# --- asyncio ------------------------------------------------------------------


class _Connection(asyncio.Protocol):
    """One client connection: bytes to the conversation, answers back, with backpressure."""

    def __init__(self, server: CacheServer) -> None:
        self._server = server
        parser = RequestParser(
            max_item_size=server.store.max_item_size, max_get_line=server.max_get_line
        )
        self._conversation = Conversation(server.store, parser)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without deriving from it
        self._transport = cast(asyncio.Transport, transport)
        self._server.connections.add(self)
        store = self._server.store
        store.curr_connections += 1
        store.counters["total_connections"] += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._server.store.curr_connections -= 1
        self._transport = None

    def data_received(self, data: bytes) -> None:
        transport = self._transport
        if transport is None:
            return
        answer, close = self._conversation.receive(data)
        if answer:
            transport.write(answer)
        if close:
            transport.close()

    def pause_writing(self) -> None:
        # A client that pipelines requests without reading answers must not
        # make the server buffer without bound: stop reading from it.
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


class CacheServer:
    """The store served on one TCP address. ``start`` binds; ``close`` stops everything."""

    def __init__(self, store: Store, *, max_get_line: int = DEFAULT_MAX_GET_LINE) -> None:
        self.store = store
        self.max_get_line = max_get_line
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        """Listen; the address actually bound (the chosen port for port 0)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self), host, port, reuse_address=True
        )
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    async def close(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.close()
        if self._server is not None:
            await self._server.wait_closed()


def _listen(text: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or int(port_text) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host, int(port_text)


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tiers.cache.server", description="Embedded memcached-compatible server."
    )
    parser.add_argument("--listen", type=_listen, required=True, help="HOST:PORT (port 0: any)")
    parser.add_argument("--memory-mb", type=_positive, default=64, help="memory limit in MiB")
    parser.add_argument(
        "--max-item-size", type=_positive, default=DEFAULT_MAX_ITEM_SIZE, help="bytes per item"
    )
    return parser


async def serve(host: str, port: int, store: Store) -> int:
    """Serve until SIGTERM or SIGINT; the exit status."""
    server = CacheServer(store)
    try:
        bound = await server.start(host, port)
    except OSError as exc:
        print(f"tiers.cache.server: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    shown = f"[{bound[0]}]" if ":" in bound[0] else bound[0]
    print(f"tiers.cache.server listening on {shown}:{bound[1]}", file=sys.stderr, flush=True)
    try:
        await stop.wait()
    finally:
        await server.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    host, port = args.listen
    store = Store(args.memory_mb << 20, max_item_size=args.max_item_size)
    coroutine = serve(host, port, store)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):  # a ^C before the handlers are in place
        sys.exit(main())
