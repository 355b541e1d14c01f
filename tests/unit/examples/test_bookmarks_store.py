from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import bookmarks
import pytest
from bookmarks.forms import NewBookmark
from bookmarks.store import MAX_ENTRY_ID, ProcessLocalStore, SqlStore

from tiers.db.migrate import apply_migrations
from tiers.db.router import Cluster
from tiers.db.tokens import causal_scope

NOW = datetime(2025, 1, 2, 3, 4, tzinfo=UTC)


class FakeConn:
    def __init__(self, rows: dict[str, list[tuple[Any, ...]]]) -> None:
        self.rows = rows
        self.statements: list[tuple[str, Any]] = []
        self._last: list[tuple[Any, ...]] = []

    def execute(self, query: str, params: Any = None) -> FakeConn:
        self.statements.append((query, params))
        key = next((k for k in self.rows if k in query), None)
        self._last = self.rows.get(key, []) if key else []
        return self

    def fetchall(self) -> list[tuple[Any, ...]]:
        return self._last

    def fetchone(self) -> tuple[Any, ...] | None:
        return self._last[0] if self._last else None


class FakeWrite:
    def __init__(self, router: FakeRouter) -> None:
        self.router = router
        self.token: str | None = None

    def __enter__(self) -> FakeConn:
        self.router.calls.append("write")
        return self.router.conn

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.token = "0/BEEF"


class FakeRouter:
    def __init__(self, rows: dict[str, list[tuple[Any, ...]]]) -> None:
        self.conn = FakeConn(rows)
        self.calls: list[str] = []

    @contextmanager
    def read(self) -> Iterator[FakeConn]:
        self.calls.append("read")
        yield self.conn

    def write(self) -> FakeWrite:
        return FakeWrite(self)


ENTRY_ROW = (7, "https://example.com/", "Example", NOW, 3)


def test_front_page_is_one_read() -> None:
    router = FakeRouter({"ORDER BY e.created_at": [ENTRY_ROW], "h.recent DESC": [ENTRY_ROW]})
    page = SqlStore(router).front_page()  # type: ignore[arg-type]
    assert router.calls == ["read"]
    assert page.recent[0].id == 7 and page.hot[0].users == 3


def test_entry_page_reads_entry_and_bookmarks_in_one_read() -> None:
    router = FakeRouter(
        {"WHERE e.id": [ENTRY_ROW], "FROM bookmarks\nWHERE entry_id": [("bob", "hm", NOW)]}
    )
    page = SqlStore(router).entry_page(7)  # type: ignore[arg-type]
    assert page is not None
    assert router.calls == ["read"]
    assert page.entry.title == "Example"
    assert [(b.user, b.comment) for b in page.bookmarks] == [("bob", "hm")]


def test_missing_entry_is_none() -> None:
    router = FakeRouter({})
    assert SqlStore(router).entry_page(7) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("entry_id", [0, -1, MAX_ENTRY_ID + 1])
def test_out_of_range_ids_are_not_queried(entry_id: int) -> None:
    router = FakeRouter({})
    assert SqlStore(router).entry_page(entry_id) is None  # type: ignore[arg-type]
    assert router.calls == []


def test_save_writes_on_the_primary_and_returns_the_commit_token() -> None:
    router = FakeRouter({"INSERT INTO entries": [(7,)]})
    saved = SqlStore(router).save_bookmark(  # type: ignore[arg-type]
        NewBookmark("https://example.com/", "Example", "alice", "hi")
    )
    assert (saved.entry_id, saved.token) == (7, "0/BEEF")
    assert router.calls == ["write"]
    inserts = [params for query, params in router.conn.statements]
    assert inserts == [("https://example.com/", "Example"), (7, "alice", "hi")]


def test_process_local_store_builds_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[object] = []

    def factory() -> Any:
        built.append(object())
        return built[-1]

    store = ProcessLocalStore(factory)
    assert built == []  # nothing happens at import or construction
    assert store.get() is store.get()
    assert len(built) == 1
    pid = os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: pid + 1)  # as in a forked worker
    assert store.get() is built[-1]
    assert len(built) == 2


def test_the_default_app_connects_lazily(monkeypatch: pytest.MonkeyPatch) -> None:
    # Importing the module (as the gunicorn master does) must not need a database.
    monkeypatch.delenv("TIERS_DB_PRIMARY", raising=False)
    import bookmarks.app

    assert bookmarks.app.app.name == "bookmarks.app"


# -- the SQL against a real (embedded) PostgreSQL server ---------------------------

def test_real_store_round_trip(database: str) -> None:
    assert apply_migrations(database, Path(bookmarks.MIGRATIONS)) == ["001_init.sql"]
    # The same server as "replica": reads check its position like a replica's.
    cluster = Cluster.from_dsns(database, [database])
    store = SqlStore(cluster)
    with causal_scope() as scope:  # as the middleware opens one per request
        first = store.save_bookmark(
            NewBookmark("https://example.com/a", "https://example.com/a", "alice", "one")
        )
        again = store.save_bookmark(
            NewBookmark("https://example.com/a", "Real title", "alice", "two"))
        other = store.save_bookmark(NewBookmark("https://example.com/a", "Other", "bob", ""))
        assert first.entry_id == again.entry_id == other.entry_id
        assert first.token is not None and other.token is not None
        assert scope.token == other.token
        page = store.entry_page(first.entry_id)
        assert page is not None
        assert page.entry.title == "Real title"  # a placeholder title gives way once
        assert page.entry.users == 2
        assert {(b.user, b.comment) for b in page.bookmarks} == {("alice", "two"), ("bob", "")}
        front = store.front_page()
        assert [e.id for e in front.recent] == [first.entry_id]
        assert [e.users for e in front.hot] == [2]
        assert store.entry_page(first.entry_id + 1000) is None
    cluster.close()


@pytest.fixture
def database(fresh_database: str) -> str:
    return fresh_database
