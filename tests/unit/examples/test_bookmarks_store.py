from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import Any

import bookmarks
import psycopg
import pytest
from bookmarks.forms import NewBookmark
from bookmarks.store import MAX_ENTRY_ID, ProcessLocalStore, SqlStore

from tiers.db.clusters import Databases
from tiers.db.ids import decode_id, next_id_ddl
from tiers.db.migrate import apply_migrations
from tiers.db.router import Cluster
from tiers.db.sharding import CrossShardError, ShardMap, shard_for_key
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
    def __init__(self, rows: dict[str, list[tuple[Any, ...]]], name: str = "main") -> None:
        self.name = name
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


# -- stars: sharded by user name -----------------------------------------------------


class FakeShards:
    """Users whose names start with a-m on "main", the others on "social"."""

    def __init__(self, clusters: dict[str, FakeRouter]) -> None:
        self.clusters = clusters
        self.map = ShardMap.from_ranges({"main": ["0-511"], "social": ["512-1023"]})

    def shard_for(self, key: str) -> int:
        return 7 if key[0] <= "m" else 700

    def for_key(self, key: str) -> FakeRouter:
        return self.clusters[self.map.cluster_of_shard(self.shard_for(key))]

    def for_keys(self, keys: Any) -> FakeRouter:
        placements = {key: self.map.cluster_of_shard(self.shard_for(key)) for key in keys}
        if len(set(placements.values())) > 1:
            raise CrossShardError("keys", [(repr(k), c) for k, c in placements.items()])
        return self.clusters[next(iter(placements.values()))]


def two_clusters(pages: dict[str, list[tuple[Any, ...]]],
                 stars: dict[str, list[tuple[Any, ...]]]) -> tuple[SqlStore, FakeRouter,
                                                                  FakeRouter]:
    entries = FakeRouter(pages, "social")
    main, social = FakeRouter(stars, "main"), entries
    store = SqlStore(entries, FakeShards({"main": main, "social": social}))  # type: ignore[arg-type]
    return store, main, social


def test_a_star_checks_the_entry_then_writes_on_the_users_cluster() -> None:
    store, main, social = two_clusters({"FROM entries WHERE id": [(1,)]},
                                       {"INSERT INTO stars": [(123,)]})
    starred = store.star("alice", 7)
    assert starred is not None
    assert (starred.id, starred.user, starred.entry_id, starred.token) == (123, "alice", 7,
                                                                          "0/BEEF")
    assert social.calls == ["read"] and main.calls == ["write"]
    (query, params), = main.conn.statements
    assert "tiers_next_id(%s)" in query
    assert params == (7, "alice", 7)  # alice's shard, alice, the entry


def test_starring_again_returns_the_existing_star() -> None:
    store, main, _social = two_clusters({"FROM entries WHERE id": [(1,)]},
                                        {"SELECT id FROM stars": [(99,)]})
    starred = store.star("alice", 7)
    assert starred is not None and starred.id == 99
    assert [q.split()[0] for q, _ in main.conn.statements] == ["INSERT", "SELECT"]


@pytest.mark.parametrize("entry_id", [0, MAX_ENTRY_ID + 1, 8])
def test_no_star_for_a_missing_entry(entry_id: int) -> None:
    store, main, _social = two_clusters({}, {})
    assert store.star("alice", entry_id) is None
    assert main.calls == []


def test_a_users_stars_come_from_their_cluster_and_titles_from_the_pages() -> None:
    store, main, social = two_clusters(
        {"FROM entries WHERE id = ANY": [(7, "https://example.com/", "Example")]},
        {"FROM stars\nWHERE user_name": [(124, 7, NOW), (123, 8, NOW)]})
    page = store.stars_page("alice")
    assert (page.user, page.shard) == ("alice", 7)
    assert [(s.id, s.entry_id, s.title) for s in page.stars] == [(124, 7, "Example"),
                                                                  (123, 8, None)]
    assert main.calls == ["read"] and social.calls == ["read"]
    assert main.conn.statements[0][1] == ("alice", 200)
    assert social.conn.statements[0][1] == ([7, 8],)
    # No stars: nothing to look up on the page tables' cluster.
    assert store.stars_page("zed").stars == []
    assert social.calls == ["read", "read"]


def test_copying_stars_within_one_cluster_is_one_transaction() -> None:
    store, main, _social = two_clusters({}, {"INSERT INTO stars": [(1,), (2,)]})
    copied = store.copy_stars("alice", "bob")
    assert (copied.count, copied.token) == (2, "0/BEEF")
    assert main.calls == ["write"]
    (query, params), = main.conn.statements
    assert "SELECT tiers_next_id(%s), %s, s.entry_id" in query
    assert params == (7, "bob", "alice")


def test_copying_stars_across_clusters_is_refused_before_any_write() -> None:
    store, main, social = two_clusters({}, {})
    with pytest.raises(CrossShardError) as caught:
        store.copy_stars("alice", "zed")
    assert "'alice' -> main" in str(caught.value) and "'zed' -> social" in str(caught.value)
    assert main.calls == [] and social.calls == []


def test_without_a_shard_map_stars_share_the_one_cluster() -> None:
    router = FakeRouter({"FROM entries WHERE id": [(1,)], "INSERT INTO stars": [(5,)]})
    store = SqlStore(router)  # type: ignore[arg-type]
    assert store.star("alice", 7) is not None
    assert router.calls == ["read", "write"]
    assert router.conn.statements[-1][1] == (shard_for_key("alice"), "alice", 7)
    assert store.copy_stars("alice", "zed").count == 1


DSN = "postgresql://127.0.0.1:{}/tiers"


def placement_env(groups: dict[str, Any]) -> dict[str, str]:
    return {
        "TIERS_DB_PRIMARY": DSN.format(5501),
        "TIERS_DB_CLUSTERS": json.dumps({"social": {"primary": DSN.format(5511),
                                                    "replicas": []}}),
        "TIERS_DB_TABLES": json.dumps({"default": "main", "groups": groups}),
    }


def test_the_page_tables_may_move_together() -> None:
    databases = Databases.from_env(placement_env(
        {"bookmarks": {"cluster": "social", "tables": ["entries", "bookmarks"]}}), monitor=False)
    store = SqlStore.from_databases(databases)
    assert store.cluster is databases.cluster("social")
    assert store.shards is databases


def test_a_map_that_splits_the_page_tables_is_refused() -> None:
    databases = Databases.from_env(placement_env(
        {"bookmarks": {"cluster": "social", "tables": ["bookmarks"]}}), monitor=False)
    with pytest.raises(CrossShardError, match=r"'entries' -> main, 'bookmarks' -> social"):
        SqlStore.from_databases(databases)


def test_the_stars_migration_installs_next_id_ddl_as_written() -> None:
    text = (Path(bookmarks.MIGRATIONS) / "002_stars.sql").read_text(encoding="utf-8")
    assert next_id_ddl() in text


# -- the SQL against a real (embedded) PostgreSQL server ---------------------------

def test_real_store_round_trip(database: str) -> None:
    assert apply_migrations(database, Path(bookmarks.MIGRATIONS)) == [
        "001_init.sql", "002_stars.sql", "003_jobs.sql"]
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
        assert scope.tokens == {"main": other.token}
        page = store.entry_page(first.entry_id)
        assert page is not None
        assert page.entry.title == "Real title"  # a placeholder title gives way once
        assert page.entry.users == 2
        assert {(b.user, b.comment) for b in page.bookmarks} == {("alice", "two"), ("bob", "")}
        front = store.front_page()
        assert [e.id for e in front.recent] == [first.entry_id]
        assert [e.users for e in front.hot] == [2]
        assert store.entry_page(first.entry_id + 1000) is None
        starred = store.star("carol", first.entry_id)
        assert starred is not None and starred.token is not None
        assert decode_id(starred.id).shard == shard_for_key("carol")
        again = store.star("carol", first.entry_id)
        assert again is not None and again.id == starred.id
        assert store.star("carol", first.entry_id + 1000) is None
        copied = store.copy_stars("carol", "dave")
        assert copied.count == 1
        assert store.copy_stars("carol", "dave").count == 0
        carol, dave = store.stars_page("carol"), store.stars_page("dave")
        assert [s.id for s in carol.stars] == [starred.id]
        assert [s.title for s in carol.stars] == ["Real title"]
        assert [decode_id(s.id).shard for s in dave.stars] == [shard_for_key("dave")]
        assert dave.shard == shard_for_key("dave")
    cluster.close()


@pytest.fixture
def database(fresh_database: str) -> str:
    return fresh_database


def test_jobs_are_enqueued_in_the_saves_transaction(database: str) -> None:
    from bookmarks.tasks import enqueue_after_save

    from tiers.jobs.store import install_schema

    install_schema(database)
    apply_migrations(database, Path(bookmarks.MIGRATIONS))
    cluster = Cluster.from_dsns(database, [database])
    store = SqlStore(cluster, after_save=enqueue_after_save)

    def jobs() -> list[tuple[str, dict[str, Any], str | None]]:
        with psycopg.connect(database) as conn:
            return [(r[0], r[1], r[2]) for r in conn.execute(
                "SELECT task, args, unique_key FROM tiers_jobs ORDER BY id")]

    with causal_scope():
        saved = store.save_bookmark(NewBookmark("https://example.com/x", "https://example.com/x",
                                                "alice", "nice"))
        store.save_bookmark(NewBookmark("https://example.com/x", "Title", "bob", ""))
    fetch = ("bookmarks.fetch_title", {"entry_id": saved.entry_id, "url": "https://example.com/x"},
             f"fetch-title:{saved.entry_id}")
    assert jobs() == [
        fetch,
        ("bookmarks.notify_saved", {"entry_id": saved.entry_id, "user": "alice",
                                    "url": "https://example.com/x",
                                    "title": "https://example.com/x", "comment": "nice"}, None),
        # The second save's fetch is already pending: one per entry.
        ("bookmarks.notify_saved", {"entry_id": saved.entry_id, "user": "bob",
                                    "url": "https://example.com/x", "title": "Title",
                                    "comment": ""}, None),
    ]

    def enqueue_then_fail(conn: Any, entry_id: int, bookmark: NewBookmark) -> None:
        enqueue_after_save(conn, entry_id, bookmark)
        raise RuntimeError("the save fails after its jobs were enqueued")

    failing = SqlStore(cluster, after_save=enqueue_then_fail)
    with causal_scope(), pytest.raises(RuntimeError):
        failing.save_bookmark(NewBookmark("https://example.com/y", "Y", "carol", ""))
    assert len(jobs()) == 3  # neither the bookmark nor its jobs
    with causal_scope():
        assert store.front_page().recent[0].url == "https://example.com/x"
    cluster.close()


def test_a_fetched_title_replaces_only_a_placeholder(database: str) -> None:
    apply_migrations(database, Path(bookmarks.MIGRATIONS))
    cluster = Cluster.from_dsns(database, [database])
    store = SqlStore(cluster)
    with causal_scope():
        untitled = store.save_bookmark(NewBookmark("https://example.com/u",
                                                   "https://example.com/u", "alice", ""))
        titled = store.save_bookmark(NewBookmark("https://example.com/t", "Mine", "alice", ""))
        assert store.apply_fetched_title(untitled.entry_id, "  Fetched\n title ") == (
            "Fetched title")
        assert store.apply_fetched_title(titled.entry_id, "Fetched") == "Mine"
        assert store.apply_fetched_title(10**12, "x") is None
        with pytest.raises(ValueError):
            store.apply_fetched_title(untitled.entry_id, "   ")
        with psycopg.connect(database) as conn:
            fetched = conn.execute("SELECT count(*) FROM entries WHERE fetched_at IS NOT NULL"
                                   ).fetchone()
        assert fetched == (2,)
    cluster.close()


def test_the_hot_ranking_adds_live_bookmarks_to_the_recomputed_counts(database: str) -> None:
    apply_migrations(database, Path(bookmarks.MIGRATIONS))
    cluster = Cluster.from_dsns(database, [database])
    store = SqlStore(cluster)
    with causal_scope():
        for user in ("alice", "bob"):
            store.save_bookmark(NewBookmark("https://example.com/a", "A", user, ""))
        store.save_bookmark(NewBookmark("https://example.com/b", "B", "alice", ""))
        live = [(e.url, e.users) for e in store.hot_entries()]
        assert live == [("https://example.com/a", 2), ("https://example.com/b", 1)]
        assert store.recompute_hot() == 2
        assert [(e.url, e.users) for e in store.hot_entries()] == live  # the same ranking
        # After the run, new bookmarks count at once: b overtakes a.
        for user in ("carol", "dave"):
            store.save_bookmark(NewBookmark("https://example.com/b", "B", user, ""))
        assert [(e.url, e.users) for e in store.hot_entries()] == [
            ("https://example.com/b", 3), ("https://example.com/a", 2)]
        assert [e.url for e in store.front_page().hot] == ["https://example.com/b",
                                                            "https://example.com/a"]
        # Counts stored long ago (the job stopped for a day) are not trusted.
        with psycopg.connect(database) as conn:
            conn.execute("UPDATE hot_counts SET latest = now() - interval '2 days'")
            conn.execute("UPDATE hot_counts_meta SET computed_at = now() - interval '2 days'")
        assert [(e.url, e.users) for e in store.hot_entries()] == [
            ("https://example.com/b", 3), ("https://example.com/a", 2)]
    cluster.close()


def test_jobs_on_another_cluster_are_enqueued_after_the_save_commits() -> None:
    pages = FakeRouter({"INSERT INTO entries": [(7,)]}, "social")
    jobs = FakeRouter({}, "main")
    calls: list[tuple[str, int]] = []

    def after_save(conn: Any, entry_id: int, bookmark: NewBookmark) -> None:
        calls.append(("main" if conn is jobs.conn else "social", entry_id))

    store = SqlStore(pages, after_save=after_save, jobs_cluster=jobs)
    store.save_bookmark(NewBookmark("https://example.com/", "T", "alice", ""))
    assert calls == [("main", 7)]
    assert pages.calls == ["write"] and jobs.calls == ["write"]
