"""asyncio memcached client for one node.

``AsyncClient`` has the methods of ``tiers.cache.client.Client``, as
coroutines, with the same results and the same errors; both are thin I/O
loops around ``tiers.cache.codec`` (requests, reply parser and the mapping
from reply to result), so they cannot disagree on the protocol.

Differences in I/O only:

* ``timeout`` bounds each whole exchange (send and complete reply), not each
  socket operation and not the wait for another task's call to finish;
  ``connect_timeout`` bounds connecting. Either expiring raises ``NodeError``.
* Tasks share one client through an ``asyncio.Lock``: calls run one at a
  time on its single connection. Use several clients for parallel calls to
  one node.
* A call cancelled while its request is in flight drops the connection (the
  reply would otherwise be read by the next call), like any other failure.

Errors: ``NodeError`` (connect, send, receive, timeout, closed; chained with
``raise ... from``), ``ProtocolError`` (malformed or mismatched reply; the
connection is dropped), ``ServerError`` (an error line; the connection stays
unless noreply commands were outstanding), and the argument errors
``CacheKeyError``, ``CacheValueError`` and ``SerdeError`` before anything is
sent. noreply behaves as in the blocking client.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Container, Iterable
from typing import Any, TypeVar

from tiers.cache.client import node_name
from tiers.cache.codec import (
    DEFAULT_MAX_LINE,
    DEFAULT_MAX_VALUE,
    END,
    OK,
    RESET,
    ErrorReply,
    Event,
    Key,
    ReplyParser,
    Stat,
    Value,
    cas_result,
    decr_request,
    delete_request,
    delete_result,
    encode_key,
    flush_all_request,
    incr_request,
    line_count,
    number_result,
    ok_result,
    retrieval_request,
    stats_request,
    storage_result,
    store_request,
    touch_request,
    touch_result,
    unexpected,
    version_request,
    version_result,
)
from tiers.cache.errors import NodeError, ProtocolError, ServerError
from tiers.cache.serde import DEFAULT_SERDE, Serde

T = TypeVar("T")

_RECV_SIZE = 65536


class AsyncClient:
    """A connection to one memcached node, for asyncio; see the module docstring."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        connect_timeout: float = 1.0,
        timeout: float = 1.0,
        serde: Serde = DEFAULT_SERDE,
        max_value: int = DEFAULT_MAX_VALUE,
        max_line: int = DEFAULT_MAX_LINE,
    ) -> None:
        if not (timeout > 0 and connect_timeout > 0):
            raise ValueError("timeouts must be positive numbers of seconds")
        self.host = host
        self.port = port
        self.node = node_name(host, port)
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.serde = serde
        self.max_value = max_value
        self._max_line = max_line
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._parser = ReplyParser(max_value=max_value, max_line=max_line)
        self._quiet = False

    def __repr__(self) -> str:
        state = "connected" if self._writer is not None else "idle"
        return f"<AsyncClient {self.node} {state}>"

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """Whether a connection is open now (it may still turn out to be dead)."""
        return self._writer is not None

    async def close(self) -> None:
        """Close the connection; the next call opens a new one."""
        async with self._lock:
            writer = self._writer
            self._drop()
            if writer is not None:
                with contextlib.suppress(OSError):
                    await writer.wait_closed()

    # --- connection -----------------------------------------------------------

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port)
        except TimeoutError as exc:
            raise NodeError(
                self.node, f"connect failed: timed out after {self.connect_timeout}s", sent=False
            ) from exc
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise NodeError(self.node, f"connect failed: {reason}", sent=False) from exc
        self._reader, self._writer = reader, writer
        self._parser = ReplyParser(max_value=self.max_value, max_line=self._max_line)
        self._quiet = False
        return reader, writer

    def _drop(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        self._quiet = False
        if writer is not None:
            # abort, not close: whatever is buffered either way belongs to a
            # request that has failed.
            writer.transport.abort()

    def _node_error(self, exc: OSError) -> NodeError:
        self._drop()
        if isinstance(exc, TimeoutError):
            return NodeError(self.node, f"no complete reply within {self.timeout}s")
        return NodeError(self.node, exc.strerror or str(exc) or type(exc).__name__)

    def _protocol_error(self, exc: ProtocolError) -> ProtocolError:
        self._drop()
        return ProtocolError(exc.reason, self.node)

    def _server_error(self, event: ErrorReply, more_pending: bool) -> ServerError:
        if self._quiet or more_pending:
            self._drop()
        return ServerError(event.kind, event.text, self.node)

    async def _fill(self, reader: asyncio.StreamReader) -> None:
        parser = self._parser
        data = await reader.read(max(_RECV_SIZE, parser.wanted))
        if not data:
            middle = " in the middle of a reply" if parser.pending else ""
            raise ConnectionResetError(f"connection closed by the node{middle}")
        parser.feed(data)

    # --- exchanges ------------------------------------------------------------

    async def _call(self, request: bytes, accept: Callable[[Event], T]) -> T:
        async with self._lock:
            reader, writer = (
                (self._reader, self._writer)
                if self._reader is not None and self._writer is not None
                else await self._connect()
            )
            try:
                async with asyncio.timeout(self.timeout):
                    writer.write(request)
                    await writer.drain()
                    parser = self._parser
                    event = parser.next_event()
                    while event is None:
                        await self._fill(reader)
                        event = parser.next_event()
                if type(event) is ErrorReply:
                    raise self._server_error(event, False)
                self._quiet = False
                return accept(event)
            except OSError as exc:
                raise self._node_error(exc) from exc
            except ProtocolError as exc:
                raise self._protocol_error(exc) from exc
            except ServerError:
                raise
            except BaseException:
                self._drop()
                raise

    async def _send(self, request: bytes) -> None:
        async with self._lock:
            writer = self._writer if self._writer is not None else (await self._connect())[1]
            try:
                async with asyncio.timeout(self.timeout):
                    writer.write(request)
                    await writer.drain()
            except OSError as exc:
                raise self._node_error(exc) from exc
            except BaseException:
                self._drop()
                raise
            self._quiet = True

    async def _collect(
        self, request: bytes, lines: int, keys: Container[bytes] | None
    ) -> list[Any]:
        async with self._lock:
            reader, writer = (
                (self._reader, self._writer)
                if self._reader is not None and self._writer is not None
                else await self._connect()
            )
            try:
                async with asyncio.timeout(self.timeout):
                    writer.write(request)
                    await writer.drain()
                    parser = self._parser
                    values: list[Value] = []
                    stats: list[Stat] = []
                    while True:
                        event = parser.take_values(values)
                        if event is None:
                            await self._fill(reader)
                        elif event is END:
                            lines -= 1
                            if not lines:
                                break
                        elif type(event) is Stat and keys is None:
                            stats.append(event)
                        elif (event is RESET or event is OK) and keys is None and not stats:
                            break  # "stats reset", "stats detail on": one word, no END
                        elif type(event) is ErrorReply:
                            raise self._server_error(event, lines > 1)
                        else:
                            raise unexpected(event, "get" if keys is not None else "stats")
                if keys is None:
                    if values:
                        raise unexpected(values[0], "stats")
                    self._quiet = False
                    return stats
                for value in values:
                    if value.key not in keys:
                        raise ProtocolError(f"reply has a value for {value.key!r}, not asked for")
                self._quiet = False
                return values
            except OSError as exc:
                raise self._node_error(exc) from exc
            except ProtocolError as exc:
                raise self._protocol_error(exc) from exc
            except ServerError:
                raise
            except BaseException:
                self._drop()
                raise

    # --- retrieval ------------------------------------------------------------

    async def get(self, key: Key, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default`` if there is none."""
        k = encode_key(key)
        found = await self._collect(b"get " + k + b"\r\n", 1, (k,))
        if not found:
            return default
        value: Value = found[-1]
        return self.serde.loads(value.value, value.flags)

    async def get_many(self, keys: Iterable[Key]) -> dict[Key, Any]:
        """The keys that have values, mapped to them (keys as given); one round trip."""
        wanted = {encode_key(k): k for k in keys}
        if not wanted:
            return {}
        encoded = list(wanted)
        request = retrieval_request(b"get", encoded)
        found = await self._collect(request, line_count(len(encoded)), wanted)
        loads = self.serde.loads
        return {wanted[v.key]: loads(v.value, v.flags) for v in found}

    async def gets(self, key: Key) -> tuple[Any, int] | None:
        """``(value, cas_unique)`` for ``key``, or None."""
        k = encode_key(key)
        found = await self._collect(b"gets " + k + b"\r\n", 1, (k,))
        if not found:
            return None
        value: Value = found[-1]
        if value.cas is None:
            raise ProtocolError("gets reply without a cas unique", self.node)
        return self.serde.loads(value.value, value.flags), value.cas

    async def gets_many(self, keys: Iterable[Key]) -> dict[Key, tuple[Any, int]]:
        """Like ``get_many``, each value paired with its cas unique."""
        wanted = {encode_key(k): k for k in keys}
        if not wanted:
            return {}
        encoded = list(wanted)
        request = retrieval_request(b"gets", encoded)
        found = await self._collect(request, line_count(len(encoded)), wanted)
        loads = self.serde.loads
        out: dict[Key, tuple[Any, int]] = {}
        for v in found:
            if v.cas is None:
                raise ProtocolError("gets reply without a cas unique", self.node)
            out[wanted[v.key]] = (loads(v.value, v.flags), v.cas)
        return out

    async def gat(self, key: Key, expire: int, default: Any = None) -> Any:
        """Get ``key`` and give it a new expiry; ``default`` if there is none."""
        k = encode_key(key)
        found = await self._collect(retrieval_request(b"gat", [k], expire), 1, (k,))
        if not found:
            return default
        value: Value = found[-1]
        return self.serde.loads(value.value, value.flags)

    # --- storage --------------------------------------------------------------

    async def _store(
        self, command: str, key: Key, data: bytes, flags: int, expire: int, *, noreply: bool
    ) -> bool:
        request = store_request(
            command,
            key,
            data,
            flags=flags,
            exptime=expire,
            noreply=noreply,
            max_value=self.max_value,
        )
        if noreply:
            await self._send(request)
            return True
        return await self._call(request, storage_result)

    async def set(self, key: Key, value: Any, expire: int = 0, *, noreply: bool = False) -> bool:
        """Store ``value`` under ``key``; True when stored."""
        data, flags = self.serde.dumps(value)
        return await self._store("set", key, data, flags, expire, noreply=noreply)

    async def add(self, key: Key, value: Any, expire: int = 0, *, noreply: bool = False) -> bool:
        """Store only if ``key`` has no value; False if it has one."""
        data, flags = self.serde.dumps(value)
        return await self._store("add", key, data, flags, expire, noreply=noreply)

    async def replace(
        self, key: Key, value: Any, expire: int = 0, *, noreply: bool = False
    ) -> bool:
        """Store only if ``key`` has a value; False if it has none."""
        data, flags = self.serde.dumps(value)
        return await self._store("replace", key, data, flags, expire, noreply=noreply)

    async def append(self, key: Key, data: bytes, *, noreply: bool = False) -> bool:
        """Add ``data`` after the stored bytes; False if there is no item."""
        return await self._store("append", key, data, 0, 0, noreply=noreply)

    async def prepend(self, key: Key, data: bytes, *, noreply: bool = False) -> bool:
        """Add ``data`` before the stored bytes; False if there is no item."""
        return await self._store("prepend", key, data, 0, 0, noreply=noreply)

    async def cas(
        self, key: Key, value: Any, cas_unique: int, expire: int = 0, *, noreply: bool = False
    ) -> bool | None:
        """Store if unchanged since ``gets``: True stored, False changed, None gone."""
        data, flags = self.serde.dumps(value)
        request = store_request(
            "cas",
            key,
            data,
            flags=flags,
            exptime=expire,
            cas_unique=cas_unique,
            noreply=noreply,
            max_value=self.max_value,
        )
        if noreply:
            await self._send(request)
            return True
        return await self._call(request, cas_result)

    # --- other commands -------------------------------------------------------

    async def delete(self, key: Key, *, noreply: bool = False) -> bool:
        """Remove ``key``; True if it existed."""
        request = delete_request(key, noreply=noreply)
        if noreply:
            await self._send(request)
            return True
        return await self._call(request, delete_result)

    async def incr(self, key: Key, delta: int = 1, *, noreply: bool = False) -> int | None:
        """Add ``delta`` to a stored decimal number; the new value, or None if no item."""
        request = incr_request(key, delta, noreply=noreply)
        if noreply:
            await self._send(request)
            return None
        return await self._call(request, number_result)

    async def decr(self, key: Key, delta: int = 1, *, noreply: bool = False) -> int | None:
        """Subtract ``delta``, stopping at 0; the new value, or None if no item."""
        request = decr_request(key, delta, noreply=noreply)
        if noreply:
            await self._send(request)
            return None
        return await self._call(request, number_result)

    async def touch(self, key: Key, expire: int, *, noreply: bool = False) -> bool:
        """Give ``key`` a new expiry; False if there is no item."""
        request = touch_request(key, expire, noreply=noreply)
        if noreply:
            await self._send(request)
            return True
        return await self._call(request, touch_result)

    async def version(self) -> str:
        """The node's version string."""
        return await self._call(version_request(), version_result)

    async def flush_all(self, delay: int = 0, *, noreply: bool = False) -> None:
        """Invalidate every item on the node, now or after ``delay`` seconds."""
        request = flush_all_request(delay, noreply=noreply)
        if noreply:
            await self._send(request)
            return
        await self._call(request, ok_result)

    async def stats(self, *args: str) -> dict[str, str]:
        """``stats [args]`` as name to value; empty for one-word answers (``stats reset``)."""
        found = await self._collect(stats_request(*args), 1, None)
        return {stat.name: stat.value for stat in found}
