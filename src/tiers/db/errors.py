"""What a database error says about the node, and when a retry is safe.

:func:`classify` sorts any exception into one :class:`Failure`:

* ``NODE_GONE``: the node, or the connection to it, is gone: it refused or
  dropped the connection, is shutting down, starting up, or takes no more
  connections (send the work elsewhere).
* ``NOT_PRIMARY``: a write reached a node that is (now) a replica: the
  primary moved, or the DSN is wrong.
* ``OTHER``: everything else, including the caller's own SQL errors,
  constraint violations, statement timeouts and serialization failures.
  These say nothing about the node's health.

Which driver error is which is the engine's knowledge
(:meth:`tiers.db.engine.Engine.classify_error`; PostgreSQL's table is in
:mod:`tiers.db.postgres`). ``classify`` asks the engine it is given, or
each known engine in turn (their drivers' errors are of different
classes). Connection refused, reset or aborted and broken pipes
(``ConnectionError``, raised by socket code below any driver) are
``NODE_GONE`` whatever the engine. A tiers error raised ``from`` another
exception is classified by that cause (a :class:`NodeUnavailable` by its
own ``failure``), so a router's translated errors keep their meaning.

:func:`retry_safe` answers the one question a router may ask before trying
again elsewhere: could the failed work have had an effect that a retry would
repeat or lose? Only a gone node qualifies, and only when nothing had been
sent, or the work was a single read-only statement outside a transaction.
A NOT_PRIMARY write is not retried here: the caller must first learn which
node is the primary, which is the failover's business.

Errors defined here:

    DatabaseError                 (tiers.errors)
     +-- NodeUnavailable          a node could not serve the work (gone, or not the primary)
"""

from __future__ import annotations

import enum

from tiers.db.engine import Engine, known_engines
from tiers.errors import DatabaseError, TiersError


class Failure(enum.Enum):
    """What a failed database call says about the node it ran on."""

    NODE_GONE = "node_gone"
    NOT_PRIMARY = "not_primary"
    OTHER = "other"


class NodeUnavailable(DatabaseError):
    """A node could not serve the work: it is gone (``NODE_GONE``) or not the primary.

    Raised by routers with ``raise NodeUnavailable(...) from exc`` so that
    the driver's error stays visible as ``__cause__``.
    """

    def __init__(self, node: str, failure: Failure, detail: str = "") -> None:
        self.node = node
        self.failure = failure
        self.detail = detail
        what = {
            Failure.NODE_GONE: "node is gone",
            Failure.NOT_PRIMARY: "node is not the primary",
            Failure.OTHER: "node failed",
        }[failure]
        super().__init__(f"{node}: {what}" + (f": {detail}" if detail else ""))


def classify(exc: BaseException, engine: Engine | None = None) -> Failure:
    """The failure kind of ``exc``; never raises. See the module docstring for the rules.

    ``engine`` is the engine whose driver raised ``exc``; None asks every
    known engine.
    """
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, NodeUnavailable):
            return current.failure
        if isinstance(current, TiersError):
            current = current.__cause__
            continue
        return _classify_foreign(current, engine)
    return Failure.OTHER


def _classify_foreign(exc: BaseException, engine: Engine | None) -> Failure:
    if isinstance(exc, ConnectionError):
        # Refused, reset, aborted, broken pipe: raised by socket code below a driver.
        return Failure.NODE_GONE
    if engine is not None:
        return engine.classify_error(exc)
    for known in known_engines():
        failure = known.classify_error(exc)
        if failure is not Failure.OTHER:
            return failure
    return Failure.OTHER


def retry_safe(failure: Failure, *, in_transaction: bool, statement_sent_is_read_only: bool,
               nothing_sent: bool = False) -> bool:
    """Whether the failed work may be tried once more on another node (or a new connection).

    ``nothing_sent`` means no byte of the work reached the server (the
    connect failed, or the connection was found broken before the first
    statement); retrying it cannot repeat anything. Otherwise a retry is safe
    only for a read-only statement that ran outside a transaction
    (``in_transaction`` false): inside one, the earlier statements died with
    the connection, and a write outside one may have committed just before
    the connection broke. Only ``NODE_GONE`` is ever retried; the caller
    retries at most once.
    """
    if failure is not Failure.NODE_GONE:
        return False
    return nothing_sent or (statement_sent_is_read_only and not in_transaction)
