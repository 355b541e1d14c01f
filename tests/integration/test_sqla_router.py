"""The SQLAlchemy session over a real primary and a paused replica: it reads its own writes."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, String, func, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from tests.integration.pgcluster import Cluster as PgCluster
from tests.integration.routerkit import (
    DEADLINE,
    R1,
    P,
    eventually,
    in_pool,
    module_cluster,
    monitored,
    replay_paused,
    replayed,
)
from tiers.db.router import Cluster, Intent
from tiers.db.sqla import RoutingSession, node_engines, routing_sessionmaker
from tiers.db.tokens import causal_scope


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "sqla_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(String(100))


@pytest.fixture(scope="module")
def pg() -> Iterator[PgCluster]:
    yield from module_cluster("tiers-router-sqla-")


@pytest.fixture
def router(pg: PgCluster) -> Iterator[Cluster]:
    made = monitored(pg, causal_wait=0.02)
    yield made
    made.stop()


@pytest.fixture
def engines(router: Cluster) -> Iterator[dict[str, Engine]]:
    made = node_engines(router)
    yield made
    for engine in made.values():
        engine.dispose()


@pytest.fixture
def sessions(router: Cluster, engines: dict[str, Engine],
             pg: PgCluster) -> sessionmaker[RoutingSession]:
    Base.metadata.drop_all(engines[P])
    Base.metadata.create_all(engines[P])
    with engines[P].connect() as conn:
        row = conn.execute(text("SELECT pg_current_wal_lsn()::text")).one()
    eventually(lambda: replayed(pg.dsn(1), str(row[0])), "the replica to have the table")
    eventually(in_pool(router, R1), "the replica to join the read pool")
    return routing_sessionmaker(router, engines, expire_on_commit=False)


def notes(session: RoutingSession) -> int:
    return int(session.scalar(select(func.count()).select_from(Note)) or 0)


def test_a_session_reads_its_own_writes_through_a_paused_replica(
        sessions: sessionmaker[RoutingSession], router: Cluster, pg: PgCluster) -> None:
    with replay_paused(pg.dsn(1)):
        with sessions() as mine:
            for attempt in range(20):
                with mine.begin():
                    mine.add(Note(body=f"n{attempt}"))
                assert mine.causal_token is not None
                assert router.last_write_token == mine.causal_token
                router.reset_served()
                assert notes(mine) == attempt + 1  # read after commit: its token applies
                assert router.served() == {(P, Intent.READ): 1}
                mine.commit()
        with sessions() as plain:
            assert notes(plain) == 0  # no token: the paused replica, which has none
            assert router.last_node == R1
            plain.commit()


def test_inside_a_transaction_everything_after_the_first_write_stays_on_the_primary(
        sessions: sessionmaker[RoutingSession], router: Cluster, pg: PgCluster) -> None:
    with replay_paused(pg.dsn(1)), sessions() as session:
        with session.begin():
            assert notes(session) == 0  # a read before any write: the replica
            assert router.last_node == R1 and not session.writing
            session.add(Note(body="pending"))
            # The autoflush before this read is a write: from here on, the primary.
            assert notes(session) == 1
            assert session.writing
            assert router.last_node == P
            assert session.scalar(select(Note.body)) == "pending"
        assert not session.writing  # a new transaction starts over
        router.reset_served()
        session.execute(text("INSERT INTO sqla_notes (body) VALUES ('raw')"),
                        bind_arguments={"primary": True})
        session.commit()
        assert router.served() == {(P, Intent.WRITE): 1}
        assert notes(session) == 2


def test_for_update_and_use_primary_read_from_the_primary(
        sessions: sessionmaker[RoutingSession], router: Cluster, pg: PgCluster) -> None:
    with sessions() as session, session.begin():
        session.add(Note(body="locked"))
    with replay_paused(pg.dsn(1)):
        with sessions() as session, session.begin():
            session.execute(text("SELECT 1")).one()
            assert router.last_node == R1
        with sessions() as session, session.begin():
            note = session.scalars(select(Note).with_for_update()).one()
            assert router.last_node == P
            note.body = "changed"
        with sessions() as session, session.begin():
            session.use_primary()
            assert session.scalar(select(Note.body)) == "changed"
            assert router.last_node == P


def test_a_request_scope_token_routes_a_new_session(
        sessions: sessionmaker[RoutingSession], router: Cluster, pg: PgCluster) -> None:
    with causal_scope() as scope:
        with sessions() as writer, writer.begin():
            writer.add(Note(body="in the scope"))
        assert scope.wrote and scope.tokens == {"main": router.last_write_token}
        router.causal_wait = DEADLINE
        with sessions() as reader:
            # A session that never wrote reads with the scope's token: the
            # replica serves it once it has replayed the write.
            assert notes(reader) == 1
            assert router.last_node == R1
            reader.commit()
