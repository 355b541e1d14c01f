"""Blocking memcached client for one node.

``Client(host, port)`` speaks the text protocol (``tiers.cache.codec``) over
one TCP connection to one node; choosing the node for a key is the cluster
layer's business.

Connection: made lazily by the first call, with ``connect_timeout``; every
later socket operation (each send, each receive) waits at most ``timeout``
seconds, so a reply that trickles in may take longer in total. The bound is
set in the kernel (SO_RCVTIMEO/SO_SNDTIMEO) where available, which saves a
poll() per operation. After any failure the connection is closed and the
next call connects again: there is no backoff and no retry here, because
whether and where to retry (and when to stop trying a dead node) is a
cluster decision. TCP_NODELAY is on, except during a run of noreply
commands (see below).

Errors (``tiers.cache.errors``):

* ``NodeError``: connect refused or timed out (``sent`` is False: nothing
  reached the node), a send or receive failed or timed out, or the node
  closed the connection. The cause is chained with ``raise ... from``.
* ``ProtocolError``: the reply is malformed or does not answer the command
  (for example a VALUE for a key that was not asked for).
* ``ServerError``: the node answered ERROR / CLIENT_ERROR / SERVER_ERROR
  (e.g. "object too large for cache"). The connection stays open.
* ``CacheKeyError``, ``CacheValueError``, ``SerdeError``: bad arguments,
  raised before anything is sent; ``SerdeError`` also when a fetched item
  cannot be decoded (the connection is fine: the reply was read whole).

After ``NodeError`` or ``ProtocolError``, and after any exception raised
while a request was in flight (``KeyboardInterrupt`` included), the
connection is dropped, so a half-read reply is never taken as the answer to
the next command. So is a connection on which more bytes arrived than the
reply (``ProtocolError``): they answer nothing that was asked, and nothing is
ever left buffered between two exchanges.

``noreply``: the storage, delete, incr/decr and touch methods can send
without waiting. Nothing is then known about the outcome: storage, delete
and touch return True ("sent"), incr/decr return None. memcached stays silent
even on errors for such commands; should an error line arrive anyway while
noreply commands are outstanding, it cannot be attributed, so the
connection is dropped and the ``ServerError`` raised to the current call.

Threads: one instance may be shared by threads. A lock held for the whole
exchange serializes them, so calls on one client are one at a time; for
parallel calls to one node use several clients (one per thread, or a pool).
After ``os.fork`` the child forgets the parent's connections (they are
closed in the child only) and connects on first use.

``get_many`` sends every key in one request (one line per 100 keys, all
written at once) and reads one reply: one round trip. The whole request is
written before anything is read, so a batch whose keys and answers overflow
both sides' socket buffers (hundreds of thousands of keys) ends in a
timeout: split such batches.

Pipelined rounds: ``client.prepare(operation, *args)`` builds the exchange
``operation`` would make (``get_many``, ``set``, ``add``, ``replace``,
``delete``, ``incr``, ``decr``, ``touch``; invalid keys and values raise
there, before anything is sent), and ``tiers.cache.rounds.exchange_all``
(also importable from here) runs one such exchange on each of several
clients in one round trip of latency. It drives the clients' own steps of
an exchange, so each exchange ends as the blocking call would, by the rules
above.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import weakref
from collections.abc import Callable, Container, Iterable
from typing import Any, TypeVar

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
from tiers.cache.rounds import Exchange, exchange_all, prepare_exchange
from tiers.cache.serde import DEFAULT_SERDE, Serde

__all__ = ["Client", "Exchange", "exchange_all", "node_name"]

T = TypeVar("T")

_RECV_SIZE = 65536

_clients: weakref.WeakSet[Client] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(_clients):
        client._forget()


os.register_at_fork(after_in_child=_after_fork_in_child)


def node_name(host: str, port: int) -> str:
    """``host:port``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Client:
    """A connection to one memcached node; see the module docstring for semantics."""

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
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._parser = ReplyParser(max_value=max_value, max_line=max_line)
        # noreply commands were sent since the last reply was read
        self._quiet = False
        _clients.add(self)

    def __repr__(self) -> str:
        state = "connected" if self._sock is not None else "idle"
        return f"<Client {self.node} {state}>"

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """Whether a connection is open now (it may still turn out to be dead)."""
        return self._sock is not None

    def close(self) -> None:
        """Close the connection; the next call opens a new one."""
        with self._lock:
            self._drop()

    # --- connection -----------------------------------------------------------

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as exc:
            reason = (
                f"timed out after {self.connect_timeout}s"
                if isinstance(exc, TimeoutError)
                else _describe(exc)
            )
            raise NodeError(self.node, f"connect failed: {reason}", sent=False) from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _set_io_timeout(sock, self.timeout)
        except OSError as exc:
            sock.close()
            raise NodeError(self.node, f"connect failed: {_describe(exc)}", sent=False) from exc
        self._sock = sock
        self._parser = ReplyParser(max_value=self.max_value, max_line=self._max_line)
        self._quiet = False
        return sock

    def _drop(self) -> None:
        sock, self._sock = self._sock, None
        self._quiet = False
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def _forget(self) -> None:
        # In a forked child: the parent may be mid-exchange on this socket and
        # may have held the lock at fork time; start over with neither.
        self._lock = threading.Lock()
        self._drop()

    def _node_error(self, exc: OSError) -> NodeError:
        self._drop()
        if isinstance(exc, TimeoutError | BlockingIOError):
            return NodeError(self.node, f"no reply within {self.timeout}s")
        return NodeError(self.node, _describe(exc))

    def _protocol_error(self, exc: ProtocolError) -> ProtocolError:
        self._drop()
        return ProtocolError(exc.reason, self.node)

    def _server_error(self, event: ErrorReply, more_pending: bool) -> ServerError:
        if self._quiet or more_pending or self._parser.pending:
            # The error may answer an earlier noreply command, or more replies
            # are still on the wire: the stream cannot be trusted in step.
            self._drop()
        return ServerError(event.kind, event.text, self.node)

    # The steps of an exchange, shared by the blocking calls below and by the
    # pipelined rounds of tiers.cache.rounds; the caller holds the lock.

    def _request(self, sock: socket.socket, request: bytes) -> None:
        """Send a command that wants a reply."""
        if self._quiet:
            # After noreply commands (see _send): pushes anything Nagle still holds.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(request)

    def _receive(self, sock: socket.socket, size: int = 0) -> None:
        """Wait for bytes of the reply and give them to the parser.

        At most ``size`` bytes; by default as many as the event being parsed
        still needs, and at least ``_RECV_SIZE``.
        """
        parser = self._parser
        data = sock.recv(size or max(_RECV_SIZE, parser.wanted))
        if not data:
            raise _closed(parser)
        parser.feed(data)

    def _next(self, sock: socket.socket) -> Event:
        # The parser holds nothing between exchanges (a connection with bytes
        # left over is dropped), so the reply's first bytes are still to come.
        parser = self._parser
        size = _RECV_SIZE  # what an empty parser wants
        while True:
            self._receive(sock, size)
            event = parser.next_event()
            if event is not None:
                return event
            size = 0  # as much as the event being parsed still needs

    def _answer(self, event: Event, accept: Callable[[Event], T]) -> T:
        """The result of the one-event reply ``event``, mapped by ``accept``."""
        if type(event) is ErrorReply:
            raise self._server_error(event, False)
        if self._parser.pending:
            raise _out_of_step(self._parser)
        self._quiet = False
        return accept(event)

    def _take_values(self, values: list[Value], lines: int, keys: Container[bytes]) -> int:
        """Move the parsed part of a retrieval reply into ``values``.

        ``lines`` END lines are still to come (one per request line); returns
        how many are still to come after what the parser holds. At 0 the reply
        is complete and checked: nothing follows it, and every value is for a
        key in ``keys``.
        """
        parser = self._parser
        while True:
            event = parser.take_values(values)
            if event is None:
                return lines
            if event is END:
                lines -= 1
                if not lines:
                    break
            elif type(event) is ErrorReply:
                raise self._server_error(event, lines > 1)
            else:
                raise unexpected(event, "get")
        if parser.pending:
            raise _out_of_step(parser)
        for value in values:
            if value.key not in keys:
                raise ProtocolError(f"reply has a value for {value.key!r}, not asked for")
        self._quiet = False
        return 0

    # --- exchanges ------------------------------------------------------------

    def _call(self, request: bytes, accept: Callable[[Event], T]) -> T:
        """Send, read one event, map it with ``accept`` (which may raise ProtocolError)."""
        with self._lock:
            sock = self._sock or self._connect()
            try:
                self._request(sock, request)
                return self._answer(self._next(sock), accept)
            except OSError as exc:
                raise self._node_error(exc) from exc
            except ProtocolError as exc:
                raise self._protocol_error(exc) from exc
            except ServerError:
                raise
            except BaseException:
                self._drop()
                raise

    def _send(self, request: bytes) -> None:
        """Send a noreply command."""
        with self._lock:
            sock = self._sock or self._connect()
            try:
                if not self._quiet:
                    # A burst of noreply commands coalesces into few segments
                    # (Nagle); the next command that wants a reply turns
                    # TCP_NODELAY back on, which pushes anything held at once,
                    # so it never waits for a delayed ACK.
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)
                    self._quiet = True
                sock.sendall(request)
            except OSError as exc:
                raise self._node_error(exc) from exc
            except BaseException:
                self._drop()
                raise

    def _collect(self, request: bytes, lines: int, keys: Container[bytes] | None) -> list[Any]:
        """Send; read the reply up to its ``lines``-th END.

        With ``keys``: the Value events, each for a key in ``keys``. Without:
        the Stat events of a stats reply (``lines`` is 1).
        """
        with self._lock:
            sock = self._sock or self._connect()
            try:
                self._request(sock, request)
                if keys is None:
                    return self._read_stats(sock)
                values: list[Value] = []
                # Nothing is buffered between exchanges (see _next): wait for bytes first.
                self._receive(sock, _RECV_SIZE)
                while lines := self._take_values(values, lines, keys):
                    self._receive(sock)
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

    def _read_stats(self, sock: socket.socket) -> list[Stat]:
        """The Stat events of a stats reply, read up to its END."""
        parser = self._parser
        stats: list[Stat] = []
        while True:
            event = parser.next_event()
            if event is None:
                self._receive(sock)
            elif type(event) is Stat:
                stats.append(event)
            elif event is END:
                break
            elif (event is RESET or event is OK) and not stats:
                break  # "stats reset", "stats detail on": one word, no END
            elif type(event) is ErrorReply:
                raise self._server_error(event, False)
            else:
                raise unexpected(event, "stats")
        if parser.pending:
            raise _out_of_step(parser)
        self._quiet = False
        return stats

    # --- pipelined rounds (tiers.cache.rounds) --------------------------------

    def prepare(self, operation: str, *args: Any) -> Exchange:
        """The exchange ``operation(*args)`` would make, to be run by ``exchange_all``
        (``tiers.cache.rounds``).

        ``operation`` is ``get_many``, ``set``, ``add``, ``replace``, ``delete``,
        ``incr``, ``decr`` or ``touch``, with that method's positional arguments
        (no ``noreply``). Nothing is sent; bad keys and values raise here, as
        the method would raise them.
        """
        return prepare_exchange(self, operation, *args)

    # --- retrieval ------------------------------------------------------------

    def get(self, key: Key, default: Any = None) -> Any:
        """The value stored under ``key``, or ``default`` if there is none."""
        k = encode_key(key)
        found = self._collect(b"get " + k + b"\r\n", 1, (k,))
        if not found:
            return default
        value: Value = found[-1]
        return self.serde.loads(value.value, value.flags)

    def get_many(self, keys: Iterable[Key]) -> dict[Key, Any]:
        """The keys that have values, mapped to them (keys as given); one round trip."""
        wanted = {encode_key(k): k for k in keys}
        if not wanted:
            return {}
        encoded = list(wanted)
        loads = self.serde.loads
        found = self._collect(retrieval_request(b"get", encoded), line_count(len(encoded)), wanted)
        return {wanted[v.key]: loads(v.value, v.flags) for v in found}

    def gets(self, key: Key) -> tuple[Any, int] | None:
        """``(value, cas_unique)`` for ``key``, or None; pass the number to ``cas``."""
        k = encode_key(key)
        found = self._collect(b"gets " + k + b"\r\n", 1, (k,))
        if not found:
            return None
        value: Value = found[-1]
        return self.serde.loads(value.value, value.flags), _cas_of(value, self.node)

    def gets_many(self, keys: Iterable[Key]) -> dict[Key, tuple[Any, int]]:
        """Like ``get_many``, each value paired with its cas unique."""
        wanted = {encode_key(k): k for k in keys}
        if not wanted:
            return {}
        encoded = list(wanted)
        loads = self.serde.loads
        found = self._collect(retrieval_request(b"gets", encoded), line_count(len(encoded)), wanted)
        return {wanted[v.key]: (loads(v.value, v.flags), _cas_of(v, self.node)) for v in found}

    def gat(self, key: Key, expire: int, default: Any = None) -> Any:
        """Get ``key`` and give it a new expiry (``expire`` as in ``set``); ``default`` if none."""
        k = encode_key(key)
        found = self._collect(retrieval_request(b"gat", [k], expire), 1, (k,))
        if not found:
            return default
        value: Value = found[-1]
        return self.serde.loads(value.value, value.flags)

    # --- storage --------------------------------------------------------------

    def _store_request(
        self, command: str, key: Key, value: Any, expire: int, noreply: bool
    ) -> bytes:
        data, flags = self.serde.dumps(value)
        return store_request(
            command,
            key,
            data,
            flags=flags,
            exptime=expire,
            noreply=noreply,
            max_value=self.max_value,
        )

    def _store(self, command: str, key: Key, value: Any, expire: int, noreply: bool) -> bool:
        request = self._store_request(command, key, value, expire, noreply)
        if noreply:
            self._send(request)
            return True
        return self._call(request, storage_result)

    def set(self, key: Key, value: Any, expire: int = 0, *, noreply: bool = False) -> bool:
        """Store ``value`` under ``key``. ``expire``: 0 never, up to 30 days relative
        seconds, above that a unix time, negative already expired. True when stored."""
        return self._store("set", key, value, expire, noreply)

    def add(self, key: Key, value: Any, expire: int = 0, *, noreply: bool = False) -> bool:
        """Store only if ``key`` has no value; False if it has one."""
        return self._store("add", key, value, expire, noreply)

    def replace(self, key: Key, value: Any, expire: int = 0, *, noreply: bool = False) -> bool:
        """Store only if ``key`` has a value; False if it has none."""
        return self._store("replace", key, value, expire, noreply)

    def append(self, key: Key, data: bytes, *, noreply: bool = False) -> bool:
        """Add ``data`` after the stored bytes (flags and expiry kept); False if no item."""
        request = store_request("append", key, data, noreply=noreply, max_value=self.max_value)
        if noreply:
            self._send(request)
            return True
        return self._call(request, storage_result)

    def prepend(self, key: Key, data: bytes, *, noreply: bool = False) -> bool:
        """Add ``data`` before the stored bytes; False if no item."""
        request = store_request("prepend", key, data, noreply=noreply, max_value=self.max_value)
        if noreply:
            self._send(request)
            return True
        return self._call(request, storage_result)

    def cas(
        self, key: Key, value: Any, cas_unique: int, expire: int = 0, *, noreply: bool = False
    ) -> bool | None:
        """Store only if the item is unchanged since ``gets`` returned ``cas_unique``.

        True if stored, False if it changed meanwhile, None if it no longer exists.
        """
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
            self._send(request)
            return True
        return self._call(request, cas_result)

    # --- other commands -------------------------------------------------------

    def delete(self, key: Key, *, noreply: bool = False) -> bool:
        """Remove ``key``; True if it existed."""
        request = delete_request(key, noreply=noreply)
        if noreply:
            self._send(request)
            return True
        return self._call(request, delete_result)

    def incr(self, key: Key, delta: int = 1, *, noreply: bool = False) -> int | None:
        """Add ``delta`` to a decimal number stored under ``key`` (wrapping at 2**64).

        The new value, or None if there is no item. ``ServerError`` (CLIENT_ERROR)
        if the stored value is not a number. An int stored through the default
        serde is one.
        """
        request = incr_request(key, delta, noreply=noreply)
        if noreply:
            self._send(request)
            return None
        return self._call(request, number_result)

    def decr(self, key: Key, delta: int = 1, *, noreply: bool = False) -> int | None:
        """Subtract ``delta``, stopping at 0; otherwise like ``incr``."""
        request = decr_request(key, delta, noreply=noreply)
        if noreply:
            self._send(request)
            return None
        return self._call(request, number_result)

    def touch(self, key: Key, expire: int, *, noreply: bool = False) -> bool:
        """Give ``key`` a new expiry without fetching it; False if there is no item."""
        request = touch_request(key, expire, noreply=noreply)
        if noreply:
            self._send(request)
            return True
        return self._call(request, touch_result)

    def version(self) -> str:
        """The node's version string (also a cheap liveness check)."""
        return self._call(version_request(), version_result)

    def flush_all(self, delay: int = 0, *, noreply: bool = False) -> None:
        """Invalidate every item on the node, now or after ``delay`` seconds."""
        request = flush_all_request(delay, noreply=noreply)
        if noreply:
            self._send(request)
            return
        self._call(request, ok_result)

    def stats(self, *args: str) -> dict[str, str]:
        """``stats [args]`` as name to value (strings, as the node sends them).

        Subcommands answered with one word (``stats reset``) give an empty dict.
        """
        found = self._collect(stats_request(*args), 1, None)
        return {stat.name: stat.value for stat in found}


def _out_of_step(parser: ReplyParser) -> ProtocolError:
    # More bytes than the reply: they answer nothing that was asked, so the
    # stream is out of step with the requests.
    return ProtocolError(f"{parser.pending} unexpected bytes after the reply")


def _closed(parser: ReplyParser) -> ConnectionResetError:
    middle = " in the middle of a reply" if parser.pending else ""
    return ConnectionResetError(f"connection closed by the node{middle}")


def _cas_of(value: Value, node: str) -> int:
    if value.cas is None:
        raise ProtocolError("gets reply without a cas unique", node)
    return value.cas


def _set_io_timeout(sock: socket.socket, timeout: float) -> None:
    """Bound each send and receive by ``timeout`` seconds.

    Where the kernel can do it (SO_RCVTIMEO / SO_SNDTIMEO) the socket stays in
    blocking mode: a Python-level timeout would add a poll() system call
    before every send and receive. An expired kernel timeout surfaces as
    BlockingIOError (EAGAIN).
    """
    seconds = int(timeout)
    timeval = struct.pack("ll", seconds, int((timeout - seconds) * 1_000_000))
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
    except (OSError, AttributeError):
        sock.settimeout(timeout)
    else:
        sock.settimeout(None)


def _describe(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__
