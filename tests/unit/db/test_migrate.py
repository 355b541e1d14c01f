from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tiers.db.migrate import LOCK_KEY, apply_files, apply_migrations, main, migration_files
from tiers.errors import DatabaseError


def make_dir(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_files_are_sorted_by_name_and_filtered(tmp_path: Path) -> None:
    make_dir(
        tmp_path,
        {
            "010_later.sql": "",
            "002_second.sql": "",
            "001_b.sql": "",
            "001_a.sql": "",
            "README.md": "",
            "003.sql.orig": "",
            ".001_init.sql.swp": "",
            ".#004.sql": "",
        },
    )
    (tmp_path / "005_dir.sql").mkdir()
    names = [path.name for path in migration_files(tmp_path)]
    assert names == ["001_a.sql", "001_b.sql", "002_second.sql", "010_later.sql"]


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="migrations directory not found"):
        migration_files(tmp_path / "nope")


class FakeDb:
    """Records statements and transactions; ``applied`` is the migrations table."""

    def __init__(self, applied: set[str] | None = None, fail_on: str | None = None) -> None:
        self.applied = set(applied or ())
        self.fail_on = fail_on
        self.log: list[Any] = []
        self.open_transactions = 0

    @contextmanager
    def transaction(self) -> Iterator[None]:
        self.log.append("BEGIN")
        self.open_transactions += 1
        pending = set(self.applied)
        try:
            yield
        except BaseException:
            self.applied = pending
            self.log.append("ROLLBACK")
            raise
        finally:
            self.open_transactions -= 1
        self.log.append("COMMIT")

    def execute(self, query: str | bytes, params: Any = None) -> Any:
        assert self.open_transactions == 1, "every statement runs inside a transaction"
        text = query.decode() if isinstance(query, bytes) else query
        self.log.append((text, params))
        if self.fail_on is not None and self.fail_on in text:
            raise psycopg.errors.SyntaxError(f"syntax error at {self.fail_on}")
        row = None
        if text.startswith("SELECT 1 FROM tiers_schema_migrations"):
            row = (1,) if params[0] in self.applied else None
        if text.startswith("INSERT INTO tiers_schema_migrations"):
            self.applied.add(params[0])
        return type("Cursor", (), {"fetchone": lambda self: row})()


def transactions(log: list[Any]) -> list[list[Any]]:
    """The log cut into transactions, each a list of statements."""
    out: list[list[Any]] = []
    for item in log:
        if item == "BEGIN":
            out.append([])
        elif item not in ("COMMIT", "ROLLBACK"):
            out[-1].append(item)
    return out


def test_each_file_in_its_own_locked_transaction(tmp_path: Path) -> None:
    directory = make_dir(tmp_path, {"002_b.sql": "CREATE b;", "001_a.sql": "CREATE a;"})
    db = FakeDb()
    applied = apply_files(db, migration_files(directory))  # type: ignore[arg-type]
    assert applied == ["001_a.sql", "002_b.sql"]
    setup, first, second = transactions(db.log)
    assert setup[0] == ("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
    assert "CREATE TABLE IF NOT EXISTS tiers_schema_migrations" in setup[1][0]
    for statements, name, body in [
        (first, "001_a.sql", "CREATE a;"),
        (second, "002_b.sql", "CREATE b;"),
    ]:
        # The lock comes first, so the check of the table sees what a concurrent run did.
        assert statements[0] == ("SELECT pg_advisory_xact_lock(%s)", (LOCK_KEY,))
        assert statements[1][1] == (name,)
        assert statements[2] == (body, None)
        assert statements[3][0].startswith("INSERT INTO tiers_schema_migrations")
        assert statements[3][1] == (name,)
    assert db.log.count("COMMIT") == 3


def test_recorded_files_are_skipped(tmp_path: Path) -> None:
    directory = make_dir(tmp_path, {"001_a.sql": "CREATE a;", "002_b.sql": "CREATE b;"})
    db = FakeDb(applied={"001_a.sql"})
    assert apply_files(db, migration_files(directory)) == ["002_b.sql"]  # type: ignore[arg-type]
    assert ("CREATE a;", None) not in db.log
    assert apply_files(db, migration_files(directory)) == []  # type: ignore[arg-type]


def test_a_failing_file_is_named_rolled_back_and_stops_the_run(tmp_path: Path) -> None:
    directory = make_dir(
        tmp_path, {"001_a.sql": "CREATE a;", "002_bad.sql": "SELEC 1;", "003_c.sql": "CREATE c;"}
    )
    db = FakeDb(fail_on="SELEC 1")
    with pytest.raises(DatabaseError, match=r"002_bad\.sql: migration failed: syntax error"):
        apply_files(db, migration_files(directory))  # type: ignore[arg-type]
    assert db.applied == {"001_a.sql"}
    assert db.log[-1] == "ROLLBACK"
    assert ("CREATE c;", None) not in db.log


def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "001_latin1.sql").write_bytes(b"SELECT '\xe9';")
    db = FakeDb()
    with pytest.raises(DatabaseError, match=r"001_latin1\.sql: cannot read migration"):
        apply_files(db, migration_files(tmp_path))  # type: ignore[arg-type]


def test_an_empty_file_is_recorded_without_running(tmp_path: Path) -> None:
    directory = make_dir(tmp_path, {"001_empty.sql": "  \n"})
    db = FakeDb()
    assert apply_files(db, migration_files(directory)) == ["001_empty.sql"]  # type: ignore[arg-type]
    assert all(not (isinstance(item, tuple) and item[0].strip() == "") for item in db.log)


def test_unreachable_database_is_a_database_error(tmp_path: Path) -> None:
    # Port 1 on localhost refuses at once; the message hides the password.
    with pytest.raises(DatabaseError, match=r"cannot connect to 127\.0\.0\.1:1/x") as info:
        apply_migrations("postgresql://u:secret@127.0.0.1:1/x", tmp_path)
    assert "secret" not in str(info.value)


def test_command_line_reports_failure(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--dsn", "postgresql://127.0.0.1:1/x", "--dir", str(tmp_path / "none")]) == 1
    assert "migrations directory not found" in capsys.readouterr().err


# -- against a real (embedded) PostgreSQL server, a database of its own per test --

def test_real_migrations_apply_once_even_concurrently(database: str, tmp_path: Path) -> None:
    directory = make_dir(
        tmp_path,
        {
            "001_t.sql": "CREATE TABLE t (x int); INSERT INTO t VALUES (1);",
            "002_slow.sql": "SELECT pg_sleep(0.5); INSERT INTO t VALUES (2);",
        },
    )
    results: list[list[str]] = []
    runs = [
        threading.Thread(target=lambda: results.append(apply_migrations(database, directory)))
        for _ in range(3)
    ]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert sorted(name for result in results for name in result) == ["001_t.sql", "002_slow.sql"]
    assert apply_migrations(database, directory) == []
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT x FROM t ORDER BY x").fetchall() == [(1,), (2,)]


def test_real_failure_leaves_nothing_behind(database: str, tmp_path: Path) -> None:
    directory = make_dir(tmp_path, {"001_bad.sql": "CREATE TABLE half (x int); SELEC 1;"})
    with pytest.raises(DatabaseError, match=r"001_bad\.sql"):
        apply_migrations(database, directory)
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT to_regclass('half')").fetchone() == (None,)
        assert conn.execute("SELECT count(*) FROM tiers_schema_migrations").fetchone() == (0,)


@pytest.fixture
def database(fresh_database: str) -> str:
    return fresh_database
