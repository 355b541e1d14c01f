"""RoutingSession's choice of engine, over in-memory SQLite engines standing in for nodes."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import Engine, String, create_engine, event, func, insert, select, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.pool import StaticPool

from tiers.db.errors import Failure, NodeUnavailable
from tiers.db.router import Cluster, Intent
from tiers.db.sqla import RoutingSession, node_engines, routing_sessionmaker
from tiers.db.tokens import causal_scope


class Base(DeclarativeBase):
    pass


class Note(Base):
    __tablename__ = "notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    body: Mapped[str] = mapped_column(String(100))


class FakeCluster:
    """What RoutingSession asks of a Cluster: the primary, a read node, accounting."""

    def __init__(self) -> None:
        self.name = "main"
        self.primary_name = "p"
        self.read_tokens: list[str | None] = []
        self.records: list[tuple[str, Intent]] = []
        self.commits: list[str] = []

    def primary(self) -> str:
        return self.primary_name

    def read_node(self, token: str | None = None) -> str:
        self.read_tokens.append(token)
        self.records.append(("r", Intent.READ))
        return "r"

    def record(self, node: str, intent: Intent) -> None:
        self.records.append((node, intent))

    def note_commit(self, token: str) -> None:
        self.commits.append(token)


class Nodes:
    def __init__(self) -> None:
        self.cluster = FakeCluster()
        self.engines: dict[str, Engine] = {}
        self.executed: list[tuple[str, str]] = []
        self.tokens_read: list[str] = []
        self.position = 0x10
        self.token_error: Exception | None = None
        for name in ("p", "r"):
            engine = create_engine("sqlite://", poolclass=StaticPool)
            Base.metadata.create_all(engine)
            event.listen(engine, "before_cursor_execute", self._spy(name))
            self.engines[name] = engine
        self.node_of = {id(e.raw_connection().dbapi_connection): n
                        for n, e in self.engines.items()}

    def _spy(self, name: str) -> Any:
        def spy(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            self.executed.append((name, statement.split(maxsplit=1)[0]))
        return spy

    def read_token(self, dbapi_connection: Any) -> str | None:
        if self.token_error is not None:
            raise self.token_error
        self.tokens_read.append(self.node_of[id(dbapi_connection)])
        self.position += 0x10
        return f"0/{self.position:X}"

    def session(self) -> RoutingSession:
        return RoutingSession(cluster=self.cluster, engines=self.engines,  # type: ignore[arg-type]
                              token_reader=self.read_token, expire_on_commit=False)

    def nodes_used(self) -> set[str]:
        used = {name for name, _ in self.executed}
        self.executed.clear()
        return used


@pytest.fixture
def nodes() -> Iterator[Nodes]:
    made = Nodes()
    yield made
    for engine in made.engines.values():
        engine.dispose()


def count(session: RoutingSession) -> int:
    return int(session.scalar(select(func.count()).select_from(Note)) or 0)


def test_reads_before_any_write_go_to_the_chosen_replica_once_per_transaction(
        nodes: Nodes) -> None:
    with nodes.session() as session:
        assert count(session) == 0
        session.execute(text("SELECT 1"))
        assert nodes.nodes_used() == {"r"}
        assert nodes.cluster.read_tokens == [None]  # chosen once for the transaction
        assert nodes.cluster.records == [("r", Intent.READ), ("r", Intent.READ)]
        session.commit()
        count(session)
        assert nodes.cluster.read_tokens == [None, None]  # a new transaction chooses again
    assert nodes.tokens_read == []  # nothing written, no token


def test_a_flush_and_everything_after_it_goes_to_the_primary(nodes: Nodes) -> None:
    with nodes.session() as session:
        assert count(session) == 0
        nodes.nodes_used()
        session.add(Note(body="hello"))
        assert count(session) == 1  # autoflush, then the read: both on the primary
        assert session.writing
        assert nodes.nodes_used() == {"p"}
        session.execute(text("SELECT 1"))
        assert nodes.nodes_used() == {"p"}
        session.commit()
        assert not session.writing
        assert nodes.tokens_read == ["p"]  # read on the primary's connection
        assert session.causal_token == "0/20"
        assert nodes.cluster.commits == ["0/20"]
        assert ("p", Intent.WRITE) in nodes.cluster.records
        # The next transaction's reads carry the token.
        count(session)
        assert nodes.cluster.read_tokens[-1] == "0/20"


def test_the_later_of_the_sessions_and_the_scopes_token_is_used(nodes: Nodes) -> None:
    with nodes.session() as session:
        with session.begin():
            session.add(Note(body="x"))
        assert session.causal_token == "0/20"
        with causal_scope("0/30"):
            count(session)
            session.commit()
        with causal_scope("0/5"):
            count(session)
            session.commit()
    assert nodes.cluster.read_tokens == ["0/30", "0/20"]
    with causal_scope("0/40"), nodes.session() as fresh:
        count(fresh)
    assert nodes.cluster.read_tokens[-1] == "0/40"


@pytest.mark.parametrize(
    "statement",
    [
        lambda s: s.execute(text("INSERT INTO notes (body) VALUES ('raw')"),
                            bind_arguments={"primary": True}),
        lambda s: s.execute(insert(Note).values(body="core")),
        lambda s: s.execute(select(Note).with_for_update()),
    ],
    ids=["marked raw SQL", "core insert", "for update"],
)
def test_writes_and_locking_reads_go_to_the_primary(nodes: Nodes, statement: Any) -> None:
    with nodes.session() as session:
        statement(session)
        assert session.writing
        assert nodes.nodes_used() == {"p"}
        session.commit()
    assert nodes.tokens_read == ["p"]


def test_use_primary_sends_the_rest_of_the_transaction_to_the_primary(nodes: Nodes) -> None:
    with nodes.session() as session:
        session.use_primary()
        count(session)
        assert nodes.nodes_used() == {"p"}
        assert nodes.cluster.read_tokens == []


def test_a_savepoint_commit_records_no_token(nodes: Nodes) -> None:
    with nodes.session() as session:
        session.add(Note(body="outer"))
        session.flush()
        with session.begin_nested():
            session.add(Note(body="inner"))
        assert nodes.tokens_read == []
        session.commit()
    assert nodes.tokens_read == ["p"]


def test_a_rollback_records_nothing_and_starts_over(nodes: Nodes) -> None:
    with nodes.session() as session:
        session.add(Note(body="gone"))
        session.flush()
        session.rollback()
        assert not session.writing
        assert count(session) == 0
    assert nodes.tokens_read == [] and nodes.cluster.commits == []


def test_an_unreadable_token_sends_the_sessions_reads_to_the_primary(
        nodes: Nodes, caplog: pytest.LogCaptureFixture) -> None:
    nodes.token_error = ValueError("no position")
    with nodes.session() as session, caplog.at_level(logging.WARNING, logger="tiers.db"):
        with session.begin():
            session.add(Note(body="x"))
        assert "cannot read its WAL position" in caplog.text
        assert session.causal_token is None
        nodes.nodes_used()
        assert count(session) == 1
        assert nodes.nodes_used() == {"p"}
        assert nodes.cluster.read_tokens == []


def test_the_primary_is_asked_when_a_transaction_first_writes(nodes: Nodes) -> None:
    with nodes.session() as session:
        nodes.cluster.primary_name = "r"  # a failover, as the cluster now reports it
        session.add(Note(body="x"))
        session.commit()
    assert nodes.tokens_read == ["r"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_session_reads_with_its_own_clusters_entry_of_the_scope(nodes: Nodes) -> None:
    with causal_scope({"social": "0/90"}), nodes.session() as session:
        count(session)  # the scope has nothing for main
    assert nodes.cluster.read_tokens == [None]
    nodes.cluster.name = "social"
    with causal_scope({"main": "0/90", "social": "0/30"}), nodes.session() as session:
        count(session)
    assert nodes.cluster.read_tokens[-1] == "0/30"


def test_a_sessions_commit_is_recorded_under_its_clusters_name(nodes: Nodes) -> None:
    social = Cluster({"p": "dbname=p", "r": "dbname=r"}, "p", name="social")
    with causal_scope({"main": "0/1", "social": "0/5"}) as scope:
        with RoutingSession(cluster=social, engines=nodes.engines,
                            token_reader=nodes.read_token) as session, session.begin():
            session.add(Note(body="on social"))
        assert scope.tokens == {"main": "0/1", "social": "0/20"}
        assert scope.written == {"social"}
    assert social.last_write_token == "0/20"


def test_node_engines_translate_a_gone_node_into_node_unavailable() -> None:
    dsn = f"host=127.0.0.1 port={free_port()} dbname=x connect_timeout=2"
    cluster = Cluster.from_dsns(dsn)
    engines = node_engines(cluster)
    assert list(engines) == list(cluster.nodes)
    name = next(iter(engines))
    with pytest.raises(NodeUnavailable) as caught, engines[name].connect():
        pass
    assert caught.value.failure is Failure.NODE_GONE and caught.value.node == name
    assert name in cluster._down  # marked down for reads
    made = routing_sessionmaker(cluster, engines)
    assert issubclass(made.class_, RoutingSession)
    for engine in engines.values():
        engine.dispose()
