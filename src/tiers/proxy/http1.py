"""Sans-I/O HTTP/1.1 codec on top of httptools (llhttp): what its two parsers share.

``tiers.proxy.requestparser`` reads what a client sends, and
``tiers.proxy.responseparser`` what a backend answers. Neither touches a
socket or a clock, so both are tested by feeding bytes. This module holds
the pieces both use: how a body is framed, the body and end events, the
HTTP versions spoken, and the lower-cased token lists of Connection fields
(memoised, since a connection sends the same few values again and again).
"""

from __future__ import annotations

import enum
from typing import Final, TypeVar

__all__ = [
    "END",
    "HTTP_VERSIONS",
    "NO_TOKENS",
    "BodyData",
    "Framing",
    "MessageEnd",
    "header_tokens",
    "remember",
]


class Framing(enum.Enum):
    """How a message body is delimited."""

    NONE = 0
    LENGTH = 1
    CHUNKED = 2
    CLOSE = 3  # responses only: the body runs until the backend closes


class BodyData:
    """A piece of a message body, with transfer coding already removed."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class MessageEnd:
    """The current message is complete."""

    __slots__ = ()


END: Final = MessageEnd()

# What llhttp reports as the version, for the versions the proxy speaks.
HTTP_VERSIONS: Final = {"1.1": b"1.1", "1.0": b"1.0"}
NO_TOKENS: Final[frozenset[bytes]] = frozenset()

_T = TypeVar("_T")

# Most connections send the same few Host and Connection values again and
# again: remember the verdicts on short ones, in bounded tables, so each is
# checked once rather than once per message.
_MEMO_SIZE: Final = 256
_MEMO_KEY_LIMIT: Final = 256
_token_sets: Final[dict[bytes, frozenset[bytes]]] = {}


def remember(table: dict[bytes, _T], key: bytes, value: _T) -> None:
    """Keep ``table[key] = value`` if ``key`` is short; a full table is emptied first."""
    if len(key) <= _MEMO_KEY_LIMIT:
        if len(table) >= _MEMO_SIZE:
            table.clear()
        table[key] = value


def _split_tokens(value: bytes, found: set[bytes]) -> None:
    for raw in value.split(b","):
        token = raw.strip(b" \t").lower()
        if token:
            found.add(token)


def value_tokens(value: bytes) -> frozenset[bytes]:
    """The lower-cased tokens of one comma-separated header value."""
    tokens = _token_sets.get(value)
    if tokens is None:
        found: set[bytes] = set()
        _split_tokens(value, found)
        tokens = frozenset(found)
        remember(_token_sets, value, tokens)
    return tokens


def header_tokens(values: list[bytes] | None) -> frozenset[bytes]:
    """The lower-cased tokens of a comma-separated header that may be repeated."""
    if values is None:
        return NO_TOKENS
    if len(values) == 1:
        return value_tokens(values[0])
    found: set[bytes] = set()
    for value in values:
        _split_tokens(value, found)
    return frozenset(found)
