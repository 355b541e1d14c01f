"""Causal tokens: commit positions per cluster, and those of the request being served.

A *causal token* is one cluster's primary position read right after a
commit, as text (:meth:`tiers.db.engine.Engine.commit_position` and
``format_token``; PostgreSQL's is the WAL position ``pg_current_wal_lsn()``
in its ``X/Y`` form). Any node of that cluster whose replayed position has
reached the token has that commit (and every earlier one), so a read that
presents the token may be served there. Positions only grow on one server
history, and the positions of two clusters are unrelated: a token is only
ever compared with positions of the cluster that made it, and never trusted
beyond that meaning. A malformed one is refused (:func:`is_token` says
False, the functions that take tokens raise ValueError), and one from the
future only sends reads to the primary. Functions that check a token take
the engine whose token it is; given none, they accept the token syntax of
any known engine (:func:`tiers.db.engine.engine_for_token`).

Tokens are therefore kept *by cluster name* (:class:`tiers.db.router.Cluster`
has a ``name``, ``main`` unless given another; :class:`tiers.db.clusters.Databases`
gives each cluster its own). Names are lower-case ASCII identifiers of at
most :data:`MAX_CLUSTER_NAME` characters (:func:`is_cluster_name`), so that
they travel in a cookie unquoted.

The *request context* carries the tokens of the client being served, so that
application code does not pass them around: :func:`causal_scope` opens a
scope (the WSGI middleware in :mod:`tiers.app.causal` opens one per request,
with the tokens from the client's cookie), :func:`current_token` is what a
cluster's reads use when they are given no token (the entry under that
cluster's name, or None), and :func:`note_write` (called by the router after
every commit) replaces the entry of the committing cluster with the new
commit's token, so later reads in the same request see the write, a write on
one cluster leaves the other clusters' entries alone, and the middleware
knows to send the tokens back. The scope lives in a
:class:`contextvars.ContextVar`, so threads and asyncio tasks each have their
own; outside any scope ``current_token`` is None and ``note_write`` does
nothing.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

from tiers.db.engine import Connection, Engine, Position, engine_for_token

DEFAULT_CLUSTER: Final = "main"
"""The name of a cluster given none, and the cluster of a bare token (the one-cluster form)."""

MAX_CLUSTER_NAME: Final = 63
"""The longest cluster name a token may be kept under (PostgreSQL's identifier limit)."""

_NAME_RE = re.compile(rf"\A[a-z_][a-z0-9_]{{0,{MAX_CLUSTER_NAME - 1}}}\Z")

TokenMap = Mapping[str, str]
"""Cluster name -> causal token of that cluster."""


def _parse(text: str, engine: Engine | None) -> tuple[Engine, Position]:
    if engine is None:
        found = engine_for_token(text)
        if found is None:
            raise ValueError(f"not a causal token: {text!r}")
        engine = found
    return engine, engine.parse_token(text)


def is_token(text: str | None, engine: Engine | None = None) -> bool:
    """True if ``text`` is a well-formed causal token (so it may be passed to a read)."""
    if text is None:
        return False
    try:
        _parse(text, engine)
    except ValueError:
        return False
    return True


def later(first: str | None, second: str | None, engine: Engine | None = None) -> str | None:
    """The later of two well-formed tokens of one cluster (either may be None); ValueError
    if one is malformed.

    The first when it has reached the second, else the second (for an engine
    whose positions are only partly ordered, also when neither has reached
    the other).
    """
    if first is None:
        return second
    if second is None:
        return first
    engine, position = _parse(first, engine)
    return first if position >= engine.parse_token(second) else second


def reached(have: str, wanted: str, engine: Engine | None = None) -> bool:
    """True if whatever was read at token ``have`` includes the commit of token ``wanted``
    (two tokens of one cluster); ValueError if one is malformed."""
    engine, position = _parse(have, engine)
    return position >= engine.parse_token(wanted)


def is_cluster_name(text: object) -> bool:
    """True if ``text`` may name a cluster: a lower-case ASCII identifier, at most 63 long."""
    return isinstance(text, str) and _NAME_RE.match(text) is not None


def check_cluster_name(name: str) -> str:
    """``name`` itself if :func:`is_cluster_name` accepts it; ValueError saying why otherwise."""
    if not is_cluster_name(name):
        raise ValueError(f"cluster name {name!r} must be a lower-case ASCII identifier "
                         f"of at most {MAX_CLUSTER_NAME} characters")
    return name


def token_map(tokens: TokenMap | str | None) -> dict[str, str]:
    """A checked copy of ``tokens``: a mapping of cluster name -> token, a bare token
    (the cluster ``main``'s), or None (no token at all, an empty mapping).

    Raises ValueError naming the first bad cluster name or malformed token.
    """
    if tokens is None:
        return {}
    if isinstance(tokens, str):
        _parse(tokens, None)
        return {DEFAULT_CLUSTER: tokens}
    made = {}
    for name, token in tokens.items():
        check_cluster_name(name)
        if not isinstance(token, str) or not is_token(token):
            raise ValueError(f"not a causal token for cluster {name!r}: {token!r}")
        made[name] = token
    return made


@dataclass
class CausalScope:
    """The causal state of one request: the tokens it came with, and those it leaves with.

    ``received`` maps each cluster to the token the client presented for it
    (read-only; empty for none); ``tokens`` starts equal to it and takes each
    commit's token under its cluster's name. ``written`` names the clusters
    a write committed on within the scope; ``wrote`` tells whether there is
    any, i.e. whether the client must be handed ``tokens``. Build one with
    :meth:`starting` (which checks what it is given) or :func:`causal_scope`.
    """

    received: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    tokens: dict[str, str] = field(default_factory=dict)
    written: set[str] = field(default_factory=set)

    @classmethod
    def starting(cls, tokens: TokenMap | str | None = None) -> CausalScope:
        """A scope that received ``tokens`` (as :func:`token_map` takes them); ValueError
        if a name or token is malformed."""
        checked = token_map(tokens)
        return cls(received=MappingProxyType(dict(checked)), tokens=dict(checked))

    @property
    def wrote(self) -> bool:
        """Whether a write committed within the scope (so the client must be handed it)."""
        return bool(self.written)


_scope: ContextVar[CausalScope | None] = ContextVar("tiers_causal_scope", default=None)


@contextmanager
def causal_scope(tokens: TokenMap | str | None = None) -> Iterator[CausalScope]:
    """A new scope whose reads on each cluster use its entry in ``tokens`` unless given
    another token.

    ``tokens`` maps cluster names to tokens; a bare token stands for
    ``{"main": token}`` (the one-cluster form); None for no token. ValueError
    if a name or token is malformed. Scopes nest: the inner one hides the
    outer one until it ends.
    """
    with activate(CausalScope.starting(tokens)) as scope:
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


def current_token(cluster: str = DEFAULT_CLUSTER) -> str | None:
    """The token reads on ``cluster`` use when given none: the scope's entry for that
    cluster, or None (no entry, or outside a scope)."""
    scope = _scope.get()
    return None if scope is None else scope.tokens.get(cluster)


def current_tokens() -> dict[str, str]:
    """A copy of every token of the current scope by cluster (empty outside a scope)."""
    scope = _scope.get()
    return {} if scope is None else dict(scope.tokens)


def commit_token(conn: Connection, engine: Engine, *,
                 autocommit_after: bool = False) -> str | None:
    """The causal token of what has been committed on ``conn``, an idle connection of ``engine``.

    The engine's commit position, read in autocommit: no BEGIN/ROLLBACK round
    trips, and the position is at or after the commit
    (:meth:`tiers.db.engine.Engine.commit_position`). ``conn`` is left with
    ``autocommit`` set to ``autocommit_after`` unless the query closed it.
    None if the node is in recovery (it is no primary: nothing was written).
    Raises the driver's error if the query fails, ValueError for an answer
    the engine cannot read.
    """
    conn.autocommit = True
    try:
        position = engine.commit_position(conn)
    finally:
        if not conn.closed:
            conn.autocommit = autocommit_after
    return None if position is None else engine.format_token(position)


def note_write(token: str, cluster: str = DEFAULT_CLUSTER, engine: Engine | None = None) -> None:
    """Record a commit's token under its cluster in the current scope (if any).

    ValueError if the token (of ``engine``, if given) or the cluster name is
    malformed. Other
    clusters' entries are kept. Within one cluster the latest commit wins
    rather than the highest position: after a failover the new primary's
    positions may lie below tokens of commits the old one never shipped, and
    only the latest commit is known to exist.
    """
    _parse(token, engine)
    check_cluster_name(cluster)
    scope = _scope.get()
    if scope is not None:
        scope.tokens[cluster] = token
        scope.written.add(cluster)
