"""SQLAlchemy 2 over a :class:`tiers.db.router.Cluster`: an engine per node, a routing Session.

    from tiers.db.sqla import node_engines, routing_sessionmaker

    engines = node_engines(cluster)                    # {node name: Engine}
    Session = routing_sessionmaker(cluster, engines)   # a sessionmaker of RoutingSession
    with Session() as session:
        with session.begin():
            session.add(Note(body="hello"))            # on the primary
        session.scalars(select(Note)).all()            # sees "hello", wherever it reads

Another session sees the write when it runs in the same request scope (the
WSGI middleware's, or one opened with :func:`tiers.db.tokens.causal_scope`),
since the commit's token is recorded there, under the cluster's name. A
session belongs to one cluster: it reads with that cluster's entry of the
scope only, and its commits replace that entry only, so sessions over
several clusters in one request each keep read-your-writes on their own.

How a :class:`RoutingSession` picks the engine for each statement
(:meth:`RoutingSession.get_bind`):

* A flush, an INSERT/UPDATE/DELETE, a ``SELECT ... FOR UPDATE`` (or ``FOR
  SHARE``), and any statement run with ``bind_arguments={"primary": True}``
  go to the primary, the node the cluster names as primary when the
  transaction first writes. From then on the whole transaction stays there:
  its later reads must see its own uncommitted writes.
* Reads before the first write go to the node :meth:`Cluster.read_node`
  chooses for the session's causal token: the later of the token of this
  session's last committed write and the current request scope's token for
  the session's cluster (set by :mod:`tiers.app.causal`). A replica that
  has replayed it, one waited for briefly, else the primary. The choice
  holds for the rest of the transaction, so its reads share one connection.
* After a transaction that wrote commits, the session reads the primary's
  commit position (PostgreSQL: ``pg_current_wal_lsn()``) on the primary's
  connection before that connection goes back to the pool, and records it as
  :attr:`RoutingSession.causal_token`, as the cluster's
  ``last_write_token`` of this thread and in the request scope under the
  cluster's name (so the middleware hands it to the client). If that
  position cannot be read, the session reads from the primary from then on
  rather than risk a stale read.

Caveats, which follow from routing per statement:

* Reads made before the first write ran in another database transaction,
  on a replica; they are not part of the write's snapshot and may be older
  than it. For read-modify-write, call :meth:`RoutingSession.use_primary`
  first, or read with ``with_for_update()``.
* Raw SQL (``text()``) counts as a read; a write in it reaches a replica and
  fails there (NodeUnavailable, not the primary) unless run with
  ``bind_arguments={"primary": True}``.
* A savepoint's commit records no token; only the outermost commit does.
* Committing commits every connection the transaction used; the replica's
  holds reads only, so nothing is lost if it fails, but the commit is not
  atomic across nodes (it never needs to be: only the primary's has writes).
* Failures: an error that says the node is gone invalidates that node's
  whole pool and marks it down in the cluster; "not the primary" drops the
  connection and makes the monitor look for the primary. Both are raised
  as :class:`tiers.db.errors.NodeUnavailable` (with the driver's error as
  its cause); roll the session back as after any error. Nothing is retried.
  Other errors are SQLAlchemy's as usual.
* Engines (made by the cluster's database engine,
  :meth:`tiers.db.engine.Engine.sqlalchemy_engine`: ``postgresql+psycopg``
  for PostgreSQL) use ``pool_pre_ping`` so a connection the server closed while it
  sat in the pool is replaced at checkout. In a forked child (gunicorn
  workers) each engine drops the connections inherited from the parent
  without closing them (``Engine.dispose(close=False)``), so the parent's
  sessions stay intact.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.orm import Session, SessionTransaction, sessionmaker
from sqlalchemy.sql import ClauseElement, Select
from sqlalchemy.sql.dml import UpdateBase

from tiers.db import engine as db_engines
from tiers.db import tokens
from tiers.db.errors import Failure, NodeUnavailable
from tiers.db.router import Cluster, Intent

log = logging.getLogger("tiers.db")

# The primary's raw DBAPI connection, idle after a commit -> its commit position's token,
# or None.
TokenReader = Callable[[Any], str | None]


def read_write_position(dbapi_connection: Any,
                        engine: db_engines.Engine | None = None) -> str | None:
    """The commit position's token on an idle driver connection, outside any transaction.

    ``engine`` is the connection's (default PostgreSQL's: ``pg_current_wal_lsn()``
    on a psycopg connection). None if the node is in recovery (no primary).
    Raises the driver's error if the query fails, ValueError for an answer
    the engine cannot read.
    """
    chosen = engine if engine is not None else db_engines.default_engine()
    return tokens.commit_token(dbapi_connection, chosen,
                               autocommit_after=dbapi_connection.autocommit)


def _translate(cluster: Cluster, node: str, context: ExceptionContext) -> BaseException | None:
    failure = cluster.report_failure(node, context.original_exception, writing=True)
    if failure is Failure.OTHER:
        return None
    context.is_disconnect = True
    # Gone: every pooled connection to it is dead too. Not primary: the others may still read.
    context.invalidate_pool_on_disconnect = failure is Failure.NODE_GONE
    detail = str(context.original_exception).strip().splitlines()
    return NodeUnavailable(node, failure, detail[0] if detail else "")


def node_engines(cluster: Cluster, **engine_options: Any) -> dict[str, Engine]:
    """One Engine per node of ``cluster``, connecting with its DSN through the cluster's
    database engine's driver (psycopg for PostgreSQL).

    ``engine_options`` go to :func:`sqlalchemy.create_engine` (pool sizes,
    ``echo``...); ``pool_pre_ping`` defaults to True.
    """
    engine_options.setdefault("pool_pre_ping", True)
    engines = {}
    for name, dsn in cluster.nodes.items():
        engine = cluster.engine.sqlalchemy_engine(dsn, engine_options)
        event.listen(engine, "handle_error", partial(_translate, cluster, name))
        os.register_at_fork(after_in_child=partial(engine.dispose, close=False))
        engines[name] = engine
    return engines


def _is_write(clause: ClauseElement | None) -> bool:
    if isinstance(clause, UpdateBase):
        return True
    return isinstance(clause, Select) and clause._for_update_arg is not None


class RoutingSession(Session):
    """A Session whose statements go to the primary or a replica; see the module docstring.

    ``cluster`` chooses the nodes, ``engines`` (node name -> Engine, as
    :func:`node_engines` makes them) connects to them. ``token_reader`` is
    for tests (default: :func:`read_write_position` with the cluster's
    database engine).
    """

    def __init__(self, *args: Any, cluster: Cluster, engines: Mapping[str, Engine],
                 token_reader: TokenReader | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cluster = cluster
        self.engines = dict(engines)
        self.causal_token: str | None = None
        self._token_reader = token_reader if token_reader is not None else partial(
            read_write_position, engine=cluster.engine)
        self._token_errors: tuple[type[BaseException], ...] = (
            *db_engines.driver_errors(), ValueError)
        self._reads_on_primary = False
        self._reset_route()

    def _reset_route(self) -> None:
        self._writing = False
        self._write_node: str | None = None
        self._read_node: str | None = None
        self._begun: dict[Engine, Connection] = {}

    @property
    def writing(self) -> bool:
        """Whether the current transaction has written (and so stays on the primary)."""
        return self._writing

    def use_primary(self) -> None:
        """Send the rest of the current transaction to the primary, as if it had written."""
        self._writing = True

    def get_bind(
        self,
        mapper: Any = None,
        *,
        clause: ClauseElement | None = None,
        bind: Any = None,
        _sa_skip_events: bool | None = None,
        _sa_skip_for_implicit_returning: bool = False,
        **kw: Any,
    ) -> Engine | Connection:
        if bind is not None:
            return super().get_bind(mapper, clause=clause, bind=bind, **kw)
        if kw.get("primary") or self._flushing or _is_write(clause):
            self._writing = True
        if self._writing or self._reads_on_primary:
            if self._write_node is None:
                self._write_node = self.cluster.primary()
            intent = Intent.WRITE if self._writing else Intent.READ_PRIMARY
            self.cluster.record(self._write_node, intent)
            return self.engines[self._write_node]
        if self._read_node is None:
            token = tokens.later(self.causal_token, tokens.current_token(self.cluster.name))
            self._read_node = self.cluster.read_node(token)
        else:
            self.cluster.record(self._read_node, Intent.READ)
        return self.engines[self._read_node]

    def _record_token(self) -> None:
        if not self._writing or self._write_node is None:
            return
        conn = self._begun.get(self.engines[self._write_node])
        if conn is None:
            return
        try:
            token = self._token_reader(conn.connection.dbapi_connection)
        except self._token_errors as exc:
            token = None
            log.warning("committed on %s, but cannot read its WAL position: %s",
                        self._write_node, exc)
        if token is None:
            self._reads_on_primary = True
            return
        self.causal_token = token
        self.cluster.note_commit(token)


@event.listens_for(RoutingSession, "after_begin")
def _after_begin(session: Session, transaction: SessionTransaction,
                 connection: Connection) -> None:
    if isinstance(session, RoutingSession):
        session._begun.setdefault(connection.engine, connection)


@event.listens_for(RoutingSession, "after_commit")
def _after_commit(session: Session) -> None:
    # Fired for savepoints too; only the outermost commit made anything durable.
    if isinstance(session, RoutingSession) and not session.in_nested_transaction():
        session._record_token()


@event.listens_for(RoutingSession, "after_transaction_end")
def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if isinstance(session, RoutingSession) and transaction.parent is None:
        session._reset_route()


def routing_sessionmaker(cluster: Cluster, engines: Mapping[str, Engine] | None = None,
                         **options: Any) -> sessionmaker[RoutingSession]:
    """A sessionmaker of RoutingSession over ``cluster``; engines from :func:`node_engines`
    unless given. ``options`` go to :class:`sqlalchemy.orm.sessionmaker`."""
    made = engines if engines is not None else node_engines(cluster)
    return sessionmaker(class_=RoutingSession, cluster=cluster, engines=made, **options)


__all__ = [
    "RoutingSession",
    "TokenReader",
    "node_engines",
    "read_write_position",
    "routing_sessionmaker",
]
