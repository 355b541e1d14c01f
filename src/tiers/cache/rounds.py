"""Pipelined rounds: one exchange on each of several memcached clients, one round trip in all.

``exchange_all`` runs one exchange on each of several ``tiers.cache.client``
clients (the cluster's multi-node reads and writes to copies) in the calling
thread. ``client.prepare(operation, *args)`` (``prepare_exchange`` here)
builds each one (``get_many``, ``set``, ``add``, ``replace``, ``delete``,
``incr``, ``decr``, ``touch``; invalid keys and values raise there, before
anything is sent). Every request
is written before any reply is read, then the replies are read as ``poll()``
reports them ready, so the round costs one round trip of latency across the
nodes, not one per node.

Each exchange ends with the result, or with the error, the blocking method
would have given, its connection dropped or kept by the same rules: this
module drives the clients' own connection steps (connect, send, read and
parse, check, drop), so those rules live in ``tiers.cache.client`` alone. A
node that sends no byte for its client's ``timeout`` seconds fails alone
while the others are read; nothing of a node's failure is raised.
"""

from __future__ import annotations

import math
import select
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from tiers.cache.codec import (
    Event,
    Key,
    Value,
    decr_request,
    delete_request,
    delete_result,
    encode_key,
    incr_request,
    line_count,
    number_result,
    retrieval_request,
    storage_result,
    touch_request,
    touch_result,
)
from tiers.cache.errors import CacheError, NodeError, ProtocolError, SerdeError, ServerError

if TYPE_CHECKING:
    from tiers.cache.client import Client

__all__ = ["Exchange", "exchange_all", "prepare_exchange"]


class Exchange:
    """One request to one node in a pipelined round (``exchange_all``), and its outcome.

    Made by ``Client.prepare``. After the round, ``error`` is None and
    ``result`` holds what the blocking method returns, or ``error`` holds the
    ``CacheError`` that method would have raised (a ``NodeError``,
    ``ProtocolError``, ``ServerError``, or a ``SerdeError`` for a fetched value
    that does not decode), the connection dropped or kept by the same rules.
    ``done`` is the ``time.perf_counter()`` at which the exchange was settled.
    """

    __slots__ = (
        "accept",
        "client",
        "deadline",
        "done",
        "error",
        "lines",
        "request",
        "result",
        "sock",
        "values",
        "wanted",
    )

    def __init__(
        self,
        client: Client,
        request: bytes,
        accept: Callable[[Event], Any] | None,
        wanted: dict[bytes, Key] | None = None,
        lines: int = 0,
    ) -> None:
        self.client = client
        self.request = request
        self.accept = accept  # a one-event reply: the event to the result
        self.wanted = wanted  # a retrieval: keys as sent to keys as given
        self.lines = lines  # a retrieval: END lines still to come
        self.values: list[Value] = []
        self.result: Any = {} if not request else None
        self.error: CacheError | None = None
        self.done = 0.0
        self.sock: socket.socket | None = None
        self.deadline = 0.0


def prepare_exchange(client: Client, operation: str, *args: Any) -> Exchange:
    """``client.prepare``: the exchange ``operation(*args)`` would make on ``client``.

    ``operation`` is one of the client's methods ``get_many``, ``set``,
    ``add``, ``replace``, ``delete``, ``incr``, ``decr`` or ``touch``, with its
    positional arguments (no ``noreply``). Nothing is sent; bad keys and
    values raise as the method would raise them, an unknown operation raises
    ``ValueError`` and arguments that do not fit it ``TypeError``.
    """
    build = _PREPARE.get(operation)
    if build is None:
        raise ValueError(f"cannot prepare {operation!r}")
    try:
        return build(client, *args)
    except TypeError as exc:
        raise TypeError(f"prepare({operation!r}, ...): {exc}") from None


def _get_many(client: Client, keys: Iterable[Key]) -> Exchange:
    wanted = {encode_key(k): k for k in keys}
    encoded = list(wanted)
    request = retrieval_request(b"get", encoded) if encoded else b""
    return Exchange(client, request, None, wanted, line_count(len(encoded)))


def _store(client: Client, command: str, key: Key, value: Any, expire: int = 0) -> Exchange:
    request = client._store_request(command, key, value, expire, False)
    return Exchange(client, request, storage_result)


_PREPARE: dict[str, Callable[..., Exchange]] = {
    "get_many": _get_many,
    "set": lambda c, key, value, expire=0: _store(c, "set", key, value, expire),
    "add": lambda c, key, value, expire=0: _store(c, "add", key, value, expire),
    "replace": lambda c, key, value, expire=0: _store(c, "replace", key, value, expire),
    "delete": lambda c, key: Exchange(c, delete_request(key), delete_result),
    "incr": lambda c, key, delta=1: Exchange(c, incr_request(key, delta), number_result),
    "decr": lambda c, key, delta=1: Exchange(c, decr_request(key, delta), number_result),
    "touch": lambda c, key, expire: Exchange(c, touch_request(key, expire), touch_result),
}


def exchange_all(exchanges: Sequence[Exchange]) -> None:
    """Run one exchange on each of several clients: every request is sent before
    any reply is read, then the replies are read as they arrive, so the round
    costs one round trip of latency however many nodes it spans, in the
    calling thread.

    Each client's lock is held for the whole round (taken in a fixed order, so
    rounds over the same clients cannot deadlock); one exchange per client.
    Connected clients send first, so their replies are on the way while the
    others connect. Timeouts are the clients' own, as in a blocking call: a
    connect waits up to ``connect_timeout``, and a reply fails with
    ``NodeError`` ("no reply within ...") when ``timeout`` seconds pass
    without a byte of it arriving. Outcomes go into the exchanges (see
    ``Exchange``); nothing of a node's failure is raised. An exception from
    outside (``KeyboardInterrupt``) drops every connection whose reply was
    not read whole, and is raised.
    """
    clients = [x.client for x in exchanges]
    if len({id(c) for c in clients}) < len(clients):
        raise ValueError("exchange_all takes one exchange per client")
    locked: list[Client] = []
    try:
        for client in sorted(clients, key=id):
            client._lock.acquire()
            locked.append(client)
        _round(exchanges)
    finally:
        for client in locked:
            client._lock.release()


def _round(exchanges: Sequence[Exchange]) -> None:
    waiting: dict[int, Exchange] = {}
    try:
        for x in sorted(exchanges, key=lambda x: not x.client.connected):
            if x.request and _begin(x):
                assert x.sock is not None
                waiting[x.sock.fileno()] = x
        if not waiting:
            return
        if len(waiting) == 1:
            (x,) = waiting.values()
            _await_one(x)
            return
        poller = select.poll()
        for fd in waiting:
            poller.register(fd, select.POLLIN)
        while waiting:
            now = time.perf_counter()
            left = min(x.deadline for x in waiting.values()) - now
            if left <= 0:
                for fd, x in list(waiting.items()):
                    if x.deadline <= now:
                        _timed_out(x)
                        poller.unregister(fd)
                        del waiting[fd]
                continue
            # poll() counts whole milliseconds: round up, never wake before the deadline.
            for fd, _ in poller.poll(math.ceil(left * 1000)):
                x = waiting[fd]
                if _advance(x):
                    poller.unregister(fd)
                    del waiting[fd]
    except BaseException:
        for x in waiting.values():
            x.client._drop()  # its reply is still on the wire
        raise


def _await_one(x: Exchange) -> None:
    # One node to hear from: its socket's own receive timeout bounds the wait.
    while not _advance(x):
        pass


def _timed_out(x: Exchange) -> None:
    # As a blocking receive that timed out: the connection goes, its reply unread.
    timeout = TimeoutError(f"no byte of the reply within {x.client.timeout}s")
    _finish(x, x.client._node_error(timeout), timeout)


def _finish(
    x: Exchange, error: CacheError | None = None, cause: BaseException | None = None
) -> None:
    """The exchange is over: with ``error`` (caused by ``cause``), or with its result."""
    if error is not None:
        if cause is not None:
            error.__cause__ = cause
        x.error = error
    x.done = time.perf_counter()


def _begin(x: Exchange) -> bool:
    """Connect if need be and send; False when that failed (``x.error`` set).

    The caller holds the client's lock.
    """
    client = x.client
    try:
        sock = client._sock or client._connect()
    except NodeError as exc:
        _finish(x, exc)
        return False
    try:
        client._request(sock, x.request)
    except OSError as exc:
        _finish(x, client._node_error(exc), exc)
        return False
    except BaseException:
        client._drop()
        raise
    x.sock = sock
    x.deadline = time.perf_counter() + client.timeout
    return True


def _advance(x: Exchange) -> bool:
    """Read what the socket holds and parse it; True once the exchange is settled.

    Called when the socket is readable, with the client's lock held.
    """
    client = x.client
    sock = x.sock
    assert sock is not None
    try:
        client._receive(sock)
        wanted = x.wanted
        if wanted is None:
            event = client._parser.next_event()
            if event is None:
                x.deadline = time.perf_counter() + client.timeout
                return False
            accept = x.accept
            assert accept is not None
            x.result = client._answer(event, accept)
        else:
            x.lines = client._take_values(x.values, x.lines, wanted)
            if x.lines:
                x.deadline = time.perf_counter() + client.timeout
                return False
            loads = client.serde.loads
            x.result = {wanted[v.key]: loads(v.value, v.flags) for v in x.values}
    except OSError as exc:
        _finish(x, client._node_error(exc), exc)
    except ProtocolError as exc:
        _finish(x, client._protocol_error(exc), exc)
    except (ServerError, SerdeError) as exc:
        _finish(x, exc)  # an answer read whole: the connection is in step
    except BaseException:
        client._drop()
        raise
    else:
        _finish(x)
    return True
