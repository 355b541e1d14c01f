"""The engine interface: how an engine is chosen, and the PostgreSQL adapter's own logic
(token text, its order, the error table, answers it reads)."""

from __future__ import annotations

from typing import Any

import psycopg
import psycopg.errors
import pytest
from psycopg.pq import TransactionStatus

from tiers.config.loader import parse_topology
from tiers.db import tokens
from tiers.db.engine import (
    UnsupportedEngine,
    default_engine,
    driver_errors,
    engine_for_dsn,
    engine_for_dsns,
    engine_for_token,
    engine_named,
    known_engines,
    register_engine,
)
from tiers.db.errors import Failure, classify
from tiers.db.fake import FakeEngine
from tiers.db.nodes import describe_dsn
from tiers.db.postgres import ENGINE, PostgresEngine
from tiers.db.router import Cluster
from tiers.errors import ConfigError

# -- choosing the engine --------------------------------------------------------------------


@pytest.mark.parametrize("dsn", [
    "postgresql://tiers@127.0.0.1:15432/tiers",
    "postgres://127.0.0.1/x",
    "PostgreSQL://127.0.0.1/x",
    "host=127.0.0.1 port=15432 dbname=tiers",  # libpq's conninfo: no scheme
    "dbname=x",
    "",
])
def test_postgresql_dsns_and_conninfo_choose_postgresql(dsn: str) -> None:
    assert engine_for_dsn(dsn) is ENGINE
    assert isinstance(ENGINE, PostgresEngine) and ENGINE.name == "postgresql"


@pytest.mark.parametrize(("dsn", "says"), [
    ("mariadb://root@127.0.0.1:3307/app", "MariaDB/MySQL (mariadb) has no adapter"),
    ("mysql://root@127.0.0.1:3307/app", "MariaDB/MySQL (mariadb) has no adapter"),
    ("redis://127.0.0.1:6380", "unknown database scheme 'redis://'"),
    ("postgresql+psycopg://127.0.0.1/x", "unknown database scheme"),
])
def test_other_schemes_are_refused_saying_what_is_supported(dsn: str, says: str) -> None:
    with pytest.raises(UnsupportedEngine, match="postgresql") as caught:
        engine_for_dsn(dsn)
    assert says in str(caught.value)
    assert isinstance(caught.value, ValueError)


def test_engines_by_name() -> None:
    for name in ("postgresql", "postgres", " PostgreSQL "):
        assert engine_named(name) is ENGINE
    assert default_engine() is ENGINE
    with pytest.raises(UnsupportedEngine, match=r"no adapter in tiers yet; supported: postgresql"):
        engine_named("mariadb")
    with pytest.raises(UnsupportedEngine, match=r"unknown database engine 'oracle' "
                                                r"\(known: postgresql, mariadb"):
        engine_named("oracle")
    assert known_engines() == (ENGINE,)
    assert driver_errors() == (psycopg.Error,)


def test_one_cluster_has_one_engine() -> None:
    assert engine_for_dsns(["dbname=a", "postgresql://127.0.0.1/b"]) is ENGINE
    assert engine_for_dsns([]) is ENGINE
    with pytest.raises(UnsupportedEngine):
        engine_for_dsns(["dbname=a", "mysql://127.0.0.1/b"])
    fake = FakeEngine()
    with fake.registered(), pytest.raises(UnsupportedEngine, match="not both postgresql and fake"):
        engine_for_dsns(["dbname=a", "fake://127.0.0.1:1/b"])


def test_a_cluster_refuses_dsns_of_an_engine_without_an_adapter() -> None:
    with pytest.raises(UnsupportedEngine, match="no adapter"):
        Cluster({"a": "mariadb://127.0.0.1:3307/app"}, "a")
    assert Cluster({"a": "dbname=a"}, "a").engine is ENGINE


@pytest.mark.parametrize(("env", "key"), [
    ({"TIERS_DB_PRIMARY": "mariadb://127.0.0.1:3307/app"}, "TIERS_DB_PRIMARY"),
    ({"TIERS_DB_PRIMARY": "postgresql://127.0.0.1/x",
      "TIERS_DB_REPLICAS": "mysql://127.0.0.1:3307/app"}, "TIERS_DB_REPLICAS"),
])
def test_the_environment_names_the_variable_with_an_unsupported_dsn(
        env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError, match=f"environment: {key}: .*no adapter"):
        Cluster.from_env(env, monitor=False)


def test_the_environment_refuses_a_cluster_of_two_engines() -> None:
    with FakeEngine().registered(), pytest.raises(
            ConfigError, match="TIERS_DB_REPLICAS: a fake node in a cluster of postgresql"):
        Cluster.from_env({"TIERS_DB_PRIMARY": "postgresql://127.0.0.1/x",
                          "TIERS_DB_REPLICAS": "fake://127.0.0.1:1/x"}, monitor=False)


def test_the_topology_names_the_engine() -> None:
    assert parse_topology("").db.engine == "postgresql"
    assert parse_topology('[db]\nengine = "postgres"\n').db.engine == "postgresql"
    with pytest.raises(ConfigError, match=r"<string>: db.engine: MariaDB/MySQL \(mariadb\) "
                                          r"has no adapter in tiers yet; supported: postgresql"):
        parse_topology('[db]\nengine = "mariadb"\n')
    with pytest.raises(ConfigError, match=r"db\.engine: unknown database engine 'sqlite'"):
        parse_topology('[db]\nengine = "sqlite"\n')
    with pytest.raises(ConfigError, match=r"db\.engine"):
        parse_topology("[db]\nengine = 5\n")


def test_an_engine_registered_at_run_time_is_chosen_by_its_scheme_until_undone() -> None:
    fake = FakeEngine()
    undo = register_engine(fake, ["fake"])
    try:
        assert engine_for_dsn("fake://127.0.0.1:1/x") is fake
        assert engine_named("fake") is fake
        assert known_engines() == (ENGINE, fake)
        assert engine_for_token("0-3") is fake and engine_for_token("0/3") is ENGINE
        with pytest.raises(ValueError, match="already taken"):
            register_engine(FakeEngine(), ["fake"])
        with pytest.raises(ValueError, match="already taken: postgres"):
            register_engine(FakeEngine("other"), ["postgres"])
    finally:
        undo()
    with pytest.raises(UnsupportedEngine):
        engine_for_dsn("fake://127.0.0.1:1/x")
    assert engine_for_token("0-3") is None


def test_describe_dsn_asks_the_dsns_engine() -> None:
    assert describe_dsn("postgresql://u:secret@127.0.0.1:1/x") == "127.0.0.1:1/x"
    assert describe_dsn("mysql://u:secret@127.0.0.1:1/x") == "<unparsable conninfo>"
    with FakeEngine().registered():
        assert describe_dsn("fake://127.0.0.1:7/app") == "127.0.0.1:7/app"


# -- PostgreSQL: tokens and their order -------------------------------------------------------


@pytest.mark.parametrize(("text", "position"), [
    ("0/0", 0),
    ("0/1D744C8", 0x1D744C8),
    ("16/B374D848", (0x16 << 32) | 0xB374D848),
    ("FFFFFFFF/FFFFFFFF", 2**64 - 1),
])
def test_token_text_round_trips(text: str, position: int) -> None:
    assert ENGINE.parse_token(text) == position
    assert ENGINE.format_token(position) == text
    assert ENGINE.parse_token(text.lower()) == position
    assert ENGINE.format_token(ENGINE.parse_token(text.lower())) == text


def test_tokens_are_ordered_by_wal_position_not_by_text() -> None:
    low, high = ENGINE.parse_token("9/FFFFFFFF"), ENGINE.parse_token("A/0")
    assert high >= low and not low >= high and high - low == 1
    assert ENGINE.parse_token("10/0") >= high  # "10/0" < "9/FFFFFFFF" as text
    assert tokens.later("9/FFFFFFFF", "10/0", ENGINE) == "10/0"
    assert tokens.later("10/0", "9/FFFFFFFF") == "10/0"  # by the token's own engine
    assert tokens.reached("10/0", "9/FFFFFFFF") and tokens.reached("0/A", "0/A")
    assert not tokens.reached("0/9", "0/A", ENGINE)


@pytest.mark.parametrize("text", ["", "0", "0/", "/0", "1/2/3", "g/0", "0/123456789", " 0/1",
                                  "0x1/0", "0-1", "main:0/1"])
def test_malformed_tokens_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        ENGINE.parse_token(text)
    assert not tokens.is_token(text, ENGINE)
    with pytest.raises(ValueError):
        tokens.later(text, "0/1")


@pytest.mark.parametrize("position", [-1, 2**64, 1.5, "0/1", None])
def test_format_token_refuses_what_is_no_wal_position(position: Any) -> None:
    with pytest.raises(ValueError):
        ENGINE.format_token(position)


def test_lag_is_measured_in_bytes_and_never_negative() -> None:
    assert ENGINE.lag_bytes(0x200, 0x180) == 0x80
    assert ENGINE.lag_bytes(0x180, 0x200) == 0
    assert ENGINE.lag_bytes(0x200, object()) is None  # type: ignore[arg-type]


# -- PostgreSQL: what errors say ----------------------------------------------------------------

ERROR_TABLE: list[tuple[BaseException, Failure]] = [
    (psycopg.OperationalError("connection to server at 127.0.0.1 failed: refused"),
     Failure.NODE_GONE),
    (psycopg.OperationalError("the connection is closed"), Failure.NODE_GONE),
    (psycopg.errors.ConnectionTimeout("connection timeout expired"), Failure.NODE_GONE),
    (psycopg.errors.lookup("08006")("connection failure"), Failure.NODE_GONE),
    (psycopg.errors.lookup("08P01")("protocol violation"), Failure.NODE_GONE),
    (psycopg.errors.AdminShutdown("terminating connection"), Failure.NODE_GONE),
    (psycopg.errors.CrashShutdown("crash of another process"), Failure.NODE_GONE),
    (psycopg.errors.CannotConnectNow("the database system is starting up"), Failure.NODE_GONE),
    (psycopg.errors.TooManyConnections("too many clients"), Failure.NODE_GONE),
    (psycopg.errors.ReadOnlySqlTransaction("read-only transaction"), Failure.NOT_PRIMARY),
    (psycopg.errors.PipelineAborted("pipeline aborted"), Failure.OTHER),
    (psycopg.errors.QueryCanceled("statement timeout"), Failure.OTHER),
    (psycopg.errors.UniqueViolation("duplicate key"), Failure.OTHER),
    (psycopg.errors.SerializationFailure("could not serialize"), Failure.OTHER),
    (psycopg.InterfaceError("cursor closed"), Failure.OTHER),
    # Not psycopg's: the generic layer (tiers.db.errors) decides those, not the adapter.
    (ConnectionRefusedError(111, "Connection refused"), Failure.OTHER),
    (ValueError("no database error"), Failure.OTHER),
]


@pytest.mark.parametrize(("exc", "failure"), ERROR_TABLE, ids=lambda v: type(v).__name__)
def test_the_error_table(exc: BaseException, failure: Failure) -> None:
    assert ENGINE.classify_error(exc) is failure
    assert classify(exc, ENGINE) is (Failure.NODE_GONE if isinstance(exc, ConnectionError)
                                     else failure)


def test_only_a_changed_cached_plan_needs_a_new_session() -> None:
    assert ENGINE.needs_new_session(
        psycopg.errors.FeatureNotSupported("cached plan must not change result type"))
    assert not ENGINE.needs_new_session(psycopg.errors.FeatureNotSupported("something else"))
    assert not ENGINE.needs_new_session(psycopg.OperationalError("closed"))


# -- PostgreSQL: answers it reads ----------------------------------------------------------------


class Answering:
    """Answers every statement with one row, and has a transaction status."""

    def __init__(self, *row: Any, status: TransactionStatus = TransactionStatus.IDLE) -> None:
        self.row = row
        self.statements: list[str] = []

        class Info:
            transaction_status = status

        self.info = Info()

    def execute(self, query: str, params: Any = None) -> Answering:
        self.statements.append(query)
        return self

    def fetchone(self) -> tuple[Any, ...] | None:
        return self.row or None


def test_positions_read_from_the_server() -> None:
    primary = Answering("16/B374D848")
    assert ENGINE.commit_position(primary) == (0x16 << 32) | 0xB374D848
    assert "pg_current_wal_lsn()" in primary.statements[0]
    assert ENGINE.commit_position(Answering(None)) is None  # in recovery: no primary
    replica = Answering("0/10")
    assert ENGINE.replayed_position(replica) == 0x10
    assert "pg_last_wal_replay_lsn()" in replica.statements[0]
    with pytest.raises(ValueError):
        ENGINE.replayed_position(Answering("garbage"))


def test_a_failed_transaction_is_told_by_its_status() -> None:
    assert ENGINE.transaction_failed(Answering(status=TransactionStatus.INERROR))
    assert not ENGINE.transaction_failed(Answering(status=TransactionStatus.INTRANS))
    assert not ENGINE.transaction_failed(Answering(status=TransactionStatus.IDLE))


@pytest.mark.parametrize(("row", "facts"), [
    ((True, "0/5", "host=127.0.0.1 port=15433 user=tiers"), (True, 5, 15433)),
    ((True, "0/5", ""), (True, 5, None)),
    ((True, None, "host=127.0.0.1 user=tiers"), (True, None, None)),
    ((True, "0/5", "not = = conninfo '"), (True, 5, None)),
    ((True, "0/5", "port=nope"), (True, 5, None)),
    ((False, "1/0", "host=127.0.0.1 port=15433"), (False, 1 << 32, None)),
])
def test_server_facts(row: tuple[Any, ...], facts: tuple[Any, ...]) -> None:
    got = ENGINE.server_facts(Answering(*row))
    assert (got.in_recovery, got.position, got.upstream_port) == facts


def test_local_dsns_and_addresses() -> None:
    assert ENGINE.local_dsn(15433) == "postgresql://tiers@127.0.0.1:15433/postgres"
    assert ENGINE.local_dsn(15433, "app") == "postgresql://tiers@127.0.0.1:15433/app"
    assert ENGINE.address("host=db port=5433 dbname=app password=secret") == "db:5433/app"
    with pytest.raises(ValueError, match="not a conninfo string or URI"):
        ENGINE.address("not a = = conninfo '")
