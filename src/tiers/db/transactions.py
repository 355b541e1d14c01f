"""How the blocks a cluster hands out end: read blocks, write transactions, and failures.

:class:`Transactions` is the layer of :class:`tiers.db.router.Cluster`
above its choice of nodes (:mod:`tiers.db.reads`). A read block
(:class:`ReadBlock`) ends by rolling its transaction back; a
:class:`WriteTransaction` commits and reads the commit's position, which
becomes the causal token. A block that ends in an exception is handled by
what the error says (:func:`tiers.db.errors.classify`, by the engine's
table): *gone* marks the node down for reads, *not the primary* on a write
makes the monitor look for the primary again, and anything else is rolled
back and propagates unchanged; :mod:`tiers.db.router` tells what a caller
sees of each, and its section "Round trips" what ending a read costs.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from types import TracebackType

from tiers.db import tokens
from tiers.db.engine import Connection
from tiers.db.errors import Failure, NodeUnavailable, classify
from tiers.db.links import Intent, Link
from tiers.db.nodes import one_line
from tiers.db.reads import ReadChoice
from tiers.errors import DatabaseError

__all__ = ["ReadBlock", "Transactions", "WriteTransaction"]


class ReadBlock:
    """The context manager of a read: hands out the connection, ends its transaction."""

    __slots__ = ("_cluster", "_link", "_name", "_replica")

    def __init__(self, cluster: Transactions, name: str, link: Link, replica: bool) -> None:
        self._cluster = cluster
        self._name = name
        self._link = link
        self._replica = replica

    def __enter__(self) -> Connection:
        return self._link.conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self._cluster._finish(self._name, self._link, replica=self._replica)
            return
        replacement = self._cluster._failed(self._name, self._link.conn, exc, writing=False)
        if replacement is not None:
            raise replacement from exc


class WriteTransaction:
    """A transaction on the primary; use as ``with cluster.write() as conn:``.

    On a clean exit it commits and sets :attr:`token` to the primary's WAL
    position after the commit (also this thread's ``last_write_token`` and
    the current request scope's token for this cluster); :attr:`node` names
    the node that took the write. On an exception it rolls back and lets the exception
    through, translated to NodeUnavailable when it says the node is gone or
    not the primary (see :mod:`tiers.db.router`). ``on_commit`` is called with
    the token after a successful commit.
    """

    def __init__(self, cluster: Transactions,
                 on_commit: Callable[[str], None] | None = None) -> None:
        self._cluster = cluster
        self._on_commit = on_commit
        self._conn: Connection | None = None
        self.node: str | None = None
        self.token: str | None = None

    def __enter__(self) -> Connection:
        if self._conn is not None:
            raise RuntimeError("a WriteTransaction can be entered only once")
        self.node, link = self._cluster._checkout_primary(Intent.WRITE)
        self._conn = link.conn
        return self._conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        conn, node = self._conn, self.node
        assert conn is not None and node is not None
        if exc is not None:
            replacement = self._cluster._failed(node, conn, exc, writing=True)
            if replacement is not None:
                raise replacement from exc
            return
        self.token = self._cluster._commit(node, conn)
        if self._on_commit is not None:
            self._on_commit(self.token)


class Transactions(ReadChoice):
    """The part of a Cluster that ends blocks and handles their failures (see the module
    docstring); it has no state of its own."""

    @property
    def last_write_token(self) -> str | None:
        """The causal token of this thread's last committed write, if any."""
        return self._state().token

    def note_commit(self, token: str) -> None:
        """Record a commit's token for this thread and, under this cluster's name, in the
        current request scope."""
        tokens.note_write(token, self.name, self.engine)
        self._state().token = token

    def report_failure(self, node: str, exc: BaseException, *, writing: bool) -> Failure:
        """Act on a failure an integration saw on ``node`` (mark it down, look for the
        primary) as the router does for its own connections; returns the failure kind."""
        failure = classify(exc, self.engine)
        if failure is Failure.NODE_GONE:
            self._mark_down(node)
        elif failure is Failure.NOT_PRIMARY and writing:
            self._rediscover()
        return failure

    def _finish(self, name: str, link: Link, *, replica: bool) -> None:
        """End a block's transaction by rolling back; drop the connection if it broke.

        On a replica's connection of the engine's driver the watch ends it,
        keeping the session's prepared statements (PostgreSQL: the router
        sends the ROLLBACK itself, see :mod:`tiers.db.router`); on the
        primary, where the block could have changed the schema,
        ``conn.rollback()`` resets them as the driver means to.
        """
        conn, watch = link.conn, link.watch
        try:
            if replica and watch is not None:
                watch.end_read()
            elif not conn.closed:
                conn.rollback()
        except self._errors:
            pass
        if conn.closed:
            self._discard(name)

    def _failed(self, name: str, conn: Connection, exc: BaseException, *,
                writing: bool) -> NodeUnavailable | None:
        """Clean up after ``exc`` ended a block on ``name``; the error to raise instead, if any."""
        failure = classify(exc, self.engine)
        if failure is Failure.NODE_GONE:
            self._mark_down(name)
            detail = "the transaction was not committed: " if writing else ""
            return NodeUnavailable(name, failure, detail + one_line(exc))
        if failure is Failure.NOT_PRIMARY and writing:
            self._discard(name)
            self._rediscover()
            return NodeUnavailable(name, failure, "the write was refused; nothing was committed")
        self._rollback(name, conn)
        if self.engine.needs_new_session(exc):
            # E.g. a statement prepared before a schema change that altered its
            # result fails on every use of this session: start a new one.
            self._discard(name)
        return None

    def _commit(self, name: str, conn: Connection) -> str:
        """Commit a write block's transaction; its causal token.

        Raises DatabaseError if a statement of the block failed (the
        transaction is rolled back), if the commit fails for another reason
        than the node being gone, or if the commit's position cannot be read;
        NodeUnavailable if the node is gone during the commit or before its
        position was read (the outcome is unknown) or if it is in recovery
        (nothing was written).
        """
        engine = self.engine
        if engine.transaction_failed(conn):
            # A statement failed and the block swallowed the error; COMMIT
            # would silently roll back, so say so instead.
            self._rollback(name, conn)
            raise DatabaseError("a statement in the write block failed; transaction rolled back")
        try:
            conn.commit()
        except self._errors as exc:
            if classify(exc, engine) is Failure.NODE_GONE:
                self._mark_down(name)
                raise NodeUnavailable(name, Failure.NODE_GONE,
                                      f"commit outcome unknown: {one_line(exc)}") from exc
            self._rollback(name, conn)
            raise DatabaseError(f"commit on {name} failed: {one_line(exc)}") from exc
        try:
            # Back in transaction mode afterwards, as the connection's link records it.
            token = tokens.commit_token(conn, engine, autocommit_after=False)
        except self._answer_errors as exc:
            if classify(exc, engine) is Failure.NODE_GONE:
                # Gone right after the commit (fenced, say): whether the write
                # survives depends on whether it reached a replica before, so
                # its outcome is as unknown as that of a commit that failed.
                self._mark_down(name)
                raise NodeUnavailable(
                    name, Failure.NODE_GONE,
                    f"committed, then gone before its position was read; outcome unknown: "
                    f"{one_line(exc)}") from exc
            self._rollback(name, conn)
            raise DatabaseError(
                f"committed, but cannot read the commit position of {name}: {one_line(exc)}"
            ) from exc
        if token is None:
            # In recovery: a demoted node. Whatever the block sent was refused
            # or was read-only, so nothing was written; find the primary.
            self._discard(name)
            self._rediscover()
            raise NodeUnavailable(name, Failure.NOT_PRIMARY, "it is in recovery")
        self.note_commit(token)
        return token

    def _rollback(self, name: str, conn: Connection) -> None:
        """Roll back what is left of a transaction; drop the connection if it broke."""
        if not conn.closed:
            with suppress(*self._errors):
                conn.rollback()
        if conn.closed:
            self._discard(name)
