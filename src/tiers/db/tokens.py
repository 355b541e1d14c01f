"""Causal tokens: PostgreSQL WAL positions, and the token of the request being served.

A *causal token* is the primary's WAL position (``pg_current_wal_lsn()``)
read right after a commit, in PostgreSQL's ``X/Y`` text form. Any node whose
replayed position has reached the token has that commit (and every earlier
one), so a read that presents the token may be served there. Positions only
grow on one server history; a token is never trusted beyond that meaning: a
malformed one is refused (:func:`parse_lsn` raises ValueError, :func:`is_token`
says False), and one from the future only sends reads to the primary.

The *request context* carries the token of the client being served, so that
application code does not pass it around: :func:`causal_scope` opens a scope
(the WSGI middleware in :mod:`tiers.app.causal` opens one per request, with
the token from the client's cookie), :func:`current_token` is what reads use
when they are given no token, and :func:`note_write` (called by the router
after every commit) replaces the scope's token with the new commit's, so
later reads in the same request see the write and the middleware knows to
send the new token back. The scope lives in a :class:`contextvars.ContextVar`,
so threads and asyncio tasks each have their own; outside any scope
``current_token`` is None and ``note_write`` does nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

_LSN_RE = re.compile(r"\A([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})\Z")


def parse_lsn(text: str) -> int:
    """Parse PostgreSQL's ``X/Y`` LSN text (two hex numbers of up to 32 bits) into an int.

    Raises ValueError for anything else.
    """
    match = _LSN_RE.match(text)
    if match is None:
        raise ValueError(f"not an LSN: {text!r}")
    return (int(match.group(1), 16) << 32) | int(match.group(2), 16)


def format_lsn(value: int) -> str:
    """The ``X/Y`` text form of an LSN, as PostgreSQL prints it; ValueError outside 64 bits."""
    if not 0 <= value < 1 << 64:
        raise ValueError(f"LSN out of range: {value}")
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def is_token(text: str | None) -> bool:
    """True if ``text`` is a well-formed causal token (so it may be passed to a read)."""
    if text is None:
        return False
    try:
        parse_lsn(text)
    except ValueError:
        return False
    return True


def later(first: str | None, second: str | None) -> str | None:
    """The later of two well-formed tokens (either may be None); ValueError if one is malformed."""
    if first is None:
        return second
    if second is None:
        return first
    return first if parse_lsn(first) >= parse_lsn(second) else second


@dataclass
class CausalScope:
    """The causal state of one request: the token it came with, and the one it leaves with.

    ``received`` is the token the client presented (None for none);
    ``token`` starts equal to it and becomes each commit's token in turn.
    ``wrote`` tells whether a write committed within the scope, i.e. whether
    the client must be handed ``token``.
    """

    received: str | None = None
    token: str | None = None
    wrote: bool = False


_scope: ContextVar[CausalScope | None] = ContextVar("tiers_causal_scope", default=None)


@contextmanager
def causal_scope(token: str | None = None) -> Iterator[CausalScope]:
    """A new scope whose reads use ``token`` unless given another; ValueError if it is malformed.

    Scopes nest: the inner one hides the outer one until it ends.
    """
    if token is not None:
        parse_lsn(token)
    with activate(CausalScope(received=token, token=token)) as scope:
        yield scope


@contextmanager
def activate(scope: CausalScope) -> Iterator[CausalScope]:
    """Make an existing scope the current one for the duration of the block.

    For work of one request that runs in pieces (a WSGI body produced lazily):
    each piece runs in the request's scope and nothing is left set between them.
    """
    reset = _scope.set(scope)
    try:
        yield scope
    finally:
        _scope.reset(reset)


def current_scope() -> CausalScope | None:
    """The innermost open scope of this thread or task, if any."""
    return _scope.get()


def current_token() -> str | None:
    """The token reads use when they are given none: the scope's, or None outside a scope."""
    scope = _scope.get()
    return None if scope is None else scope.token


def note_write(token: str) -> None:
    """Record a commit's token in the current scope (if any); ValueError if it is malformed.

    The latest commit wins rather than the highest position: after a
    failover the new primary's positions may lie below tokens of commits
    the old one never shipped, and only the latest commit is known to exist.
    """
    parse_lsn(token)
    scope = _scope.get()
    if scope is not None:
        scope.token = token
        scope.wrote = True
