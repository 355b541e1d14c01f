"""Errors of the cache tier, below ``tiers.errors.TiersError``.

    TiersError                    (tiers.errors)
     +-- CacheError               anything the cache tier raises on purpose
          +-- CacheKeyError       a key is not a valid memcached key (also a ValueError)
          +-- CacheValueError     a value is too large, or a number out of range (also a ValueError)
          +-- SerdeError          a value cannot be encoded, or stored bytes cannot be decoded
          +-- ProtocolError       a node's reply is malformed or not the reply the command expects
          +-- NodeError           connecting to, writing to or reading from one node failed
          +-- ServerError         the node answered ERROR, CLIENT_ERROR or SERVER_ERROR
          +-- UnconfirmedWrite    too few copies stored a write asked to be confirmed
                                  (tiers.cache.cluster)

Which errors say something about the node's health: ``NodeError`` (the node is
unreachable, slow or closed the connection) and ``ProtocolError`` (it spoke
garbage). After either, the client has dropped its connection; the next call
connects again. ``ServerError`` is an answer: the connection stays usable.
``CacheKeyError``, ``CacheValueError`` and ``SerdeError`` are the caller's
own mistakes and are raised before anything is sent.

``CacheKeyError`` derives from ``ValueError``, not from the built-in
``KeyError``: a missing key is not an error in a cache (``get`` returns a
default), and ``except KeyError`` around a dict-like lookup must not swallow
an invalid key.

Socket errors are translated into ``NodeError`` with ``raise ... from exc``,
so the ``OSError`` stays visible as ``__cause__``.
"""

from __future__ import annotations

from tiers.errors import TiersError


class CacheError(TiersError):
    """Base of every error the cache tier raises on purpose."""


class CacheKeyError(CacheError, ValueError):
    """A key is empty, longer than 250 bytes, or contains whitespace or control bytes.

    ``key`` is the key as given; ``reason`` says what is wrong with it.
    """

    def __init__(self, key: object, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"invalid cache key {_shorten(key)}: {reason}")


class CacheValueError(CacheError, ValueError):
    """A value is larger than the client's maximum, or a number (flags, expiry,
    delta, cas unique) is outside the range the protocol carries."""


class SerdeError(CacheError):
    """A value cannot be serialized, or stored bytes cannot be deserialized.

    Raised for unsupported types, unknown flags, bad UTF-8 or JSON, and for
    pickled data when pickle is not enabled.
    """


class ProtocolError(CacheError):
    """A reply cannot be parsed, or is not a reply the command can receive.

    ``node`` names the node when the error reached a client (None inside the
    codec, which does not know where its bytes came from).
    """

    def __init__(self, reason: str, node: str | None = None) -> None:
        self.reason = reason
        self.node = node
        super().__init__(reason if node is None else f"{node}: {reason}")


class NodeError(CacheError):
    """Talking to one node failed: connect, send, receive, timeout or closed connection.

    ``node`` is the node's ``host:port``; ``reason`` a short description.
    ``sent`` is False when the failure came before any byte of the request
    left (connect failed): such a request had no effect on the node and may be
    retried elsewhere. When ``sent`` is True the command may or may not have
    been applied.
    """

    def __init__(self, node: str, reason: str, *, sent: bool = True) -> None:
        self.node = node
        self.reason = reason
        self.sent = sent
        super().__init__(f"{node}: {reason}")


class ServerError(CacheError):
    """The node answered with an error line.

    ``kind`` is ``"ERROR"`` (unknown command), ``"CLIENT_ERROR"`` (the node
    considers the request malformed) or ``"SERVER_ERROR"`` (the node could not
    do it, e.g. "object too large for cache", "out of memory storing object");
    ``text`` is the rest of the line. ``node`` names the node when known.
    """

    def __init__(self, kind: str, text: str, node: str | None = None) -> None:
        self.kind = kind
        self.text = text
        self.node = node
        line = f"{kind} {text}" if text else kind
        super().__init__(line if node is None else f"{node}: {line}")


def _shorten(key: object, limit: int = 60) -> str:
    text = repr(key)
    return text if len(text) <= limit else text[: limit - 3] + "..."
