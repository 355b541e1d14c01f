"""Databases over two real PostgreSQL primaries: the demo's tables by group and by key.

The demo's migrations run on both (every cluster gets every table); the
table map puts entries and bookmarks on "social", the shard map splits the
virtual shards of stars between "main" and "social".
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import require
from tests.integration.pgcluster import Cluster, wait_connect
from tiers.db import embedded
from tiers.db.clusters import Databases
from tiers.db.embedded import init_primary
from tiers.db.ids import decode_id
from tiers.db.migrate import apply_migrations
from tiers.db.sharding import CrossShardError
from tiers.errors import DatabaseError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
if str(EXAMPLES) not in sys.path:
    sys.path.insert(0, str(EXAMPLES))

import bookmarks  # noqa: E402
from bookmarks.forms import NewBookmark  # noqa: E402
from bookmarks.store import SqlStore  # noqa: E402

NAMES = ("main", "social")
USERS = [f"user{n}" for n in range(20)]
Connection = psycopg.Connection[tuple[object, ...]]


@pytest.fixture(scope="module")
def ports() -> Iterator[dict[str, int]]:
    """Two independent primaries, the demo's schema on each; a skip if PostgreSQL cannot run."""
    root = Path(tempfile.mkdtemp(prefix="tiers-clusters-"))
    root.chmod(0o755)
    cluster: Cluster | None = None
    try:
        try:
            cluster = Cluster(root, nodes=len(NAMES))
            for name, port in zip(NAMES, cluster.ports, strict=True):
                init_primary(cluster.layout, cluster.run_as, name)
                cluster.start(name, port)
                wait_connect(port).close()
                apply_migrations(embedded.conninfo(port, "postgres"), bookmarks.MIGRATIONS)
        except (DatabaseError, OSError, psycopg.OperationalError) as exc:
            require(False, f"embedded PostgreSQL cannot run here: {exc}")
        yield dict(zip(NAMES, cluster.ports, strict=True))
    finally:
        if cluster is not None:
            cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def environment(ports: dict[str, int]) -> dict[str, str]:
    """What the stack would give an app server for this topology."""
    dsns = {name: embedded.conninfo(port, "postgres") for name, port in ports.items()}
    return {
        "TIERS_DB_PRIMARY": dsns["main"],
        "TIERS_DB_REPLICAS": "",
        "TIERS_DB_CLUSTERS": json.dumps({name: {"primary": dsn, "replicas": []}
                                         for name, dsn in dsns.items()}),
        "TIERS_DB_TABLES": json.dumps({"default": "main", "groups": {
            "bookmarks": {"cluster": "social", "tables": ["entries", "bookmarks"]}}}),
        "TIERS_DB_SHARDS": json.dumps({"tables": ["stars"], "virtual_shards": 1024,
                                       "clusters": {"main": ["0-511"],
                                                    "social": ["512-1023"]}}),
    }


@pytest.fixture(scope="module")
def databases(ports: dict[str, int]) -> Iterator[Databases]:
    databases = Databases.from_env(environment(ports))
    try:
        yield databases
    finally:
        databases.stop()


@pytest.fixture
def conns(ports: dict[str, int]) -> Iterator[dict[str, Connection]]:
    opened = {name: psycopg.connect(embedded.conninfo(port, "postgres"), autocommit=True)
              for name, port in ports.items()}
    try:
        yield opened
    finally:
        for conn in opened.values():
            conn.close()


def rows(conn: Connection, sql: str) -> list[tuple[object, ...]]:
    return conn.execute(sql).fetchall()


def stars_by_user(conn: Connection) -> dict[str, list[int]]:
    found: dict[str, list[int]] = {}
    for user, star_id in rows(conn, "SELECT user_name, id FROM stars ORDER BY id"):
        found.setdefault(str(user), []).append(int(str(star_id)))
    return found


def test_each_cluster_is_watched_by_its_own_monitor(databases: Databases,
                                                    ports: dict[str, int]) -> None:
    for name, port in ports.items():
        cluster = databases.cluster(name)
        assert cluster.primary() == f"127.0.0.1:{port}/postgres"
        health = cluster.health()
        assert health is not None and health.primary == cluster.primary()


def test_the_demo_places_pages_by_group_and_stars_by_user(
        databases: Databases, conns: dict[str, Connection]) -> None:
    store = SqlStore.from_databases(databases)
    saved = store.save_bookmark(NewBookmark("https://example.com/sharded", "Sharded",
                                            "alice", "on social"))
    assert rows(conns["social"], "SELECT url FROM entries") == [("https://example.com/sharded",)]
    assert rows(conns["social"], "SELECT user_name FROM bookmarks") == [("alice",)]
    assert rows(conns["main"], "SELECT count(*) FROM entries") == [(0,)]
    assert rows(conns["main"], "SELECT count(*) FROM bookmarks") == [(0,)]

    made = {}
    for user in USERS:
        starred = store.star(user, saved.entry_id)
        assert starred is not None
        made[user] = starred.id
    placed = {name: stars_by_user(conn) for name, conn in conns.items()}
    assert placed["main"] and placed["social"], "both clusters hold some users"
    for user, star_id in made.items():
        home = databases.cluster_name_for_key(user)
        assert placed[home][user] == [star_id]
        assert all(user not in found for name, found in placed.items() if name != home)
        assert decode_id(star_id).shard == databases.shard_for(user)
        assert databases.for_id(star_id) is databases.cluster(home)
        page = store.stars_page(user)
        assert [(s.id, s.title) for s in page.stars] == [(star_id, "Sharded")]


def test_a_copy_across_clusters_is_refused_and_one_within_a_cluster_runs(
        databases: Databases, conns: dict[str, Connection]) -> None:
    store = SqlStore.from_databases(databases)
    saved = store.save_bookmark(NewBookmark("https://example.com/copied", "Copied", "bob", ""))
    on_main = [u for u in USERS if databases.cluster_name_for_key(u) == "main"][:2]
    on_social = [u for u in USERS if databases.cluster_name_for_key(u) == "social"][:1]
    store.star(on_main[0], saved.entry_id)
    before = {name: stars_by_user(conn) for name, conn in conns.items()}
    with pytest.raises(CrossShardError) as caught:
        store.copy_stars(on_main[0], on_social[0])
    assert caught.value.clusters == ("main", "social")
    assert {name: stars_by_user(conn) for name, conn in conns.items()} == before

    copied = store.copy_stars(on_main[0], on_main[1])
    assert copied.count >= 1
    ids = stars_by_user(conns["main"])[on_main[1]]
    assert {decode_id(i).shard for i in ids} == {databases.shard_for(on_main[1])}


def test_next_id_is_made_by_the_keys_cluster(databases: Databases,
                                             conns: dict[str, Connection]) -> None:
    def sequence() -> dict[str, object]:
        return {name: rows(conn, "SELECT last_value FROM tiers_id_seq")[0][0]
                for name, conn in conns.items()}

    for user in USERS[:6]:
        home = databases.cluster_name_for_key(user)
        before = sequence()
        row_id = databases.next_id(user)
        after = sequence()
        assert decode_id(row_id).shard == databases.shard_for(user)
        assert [name for name in NAMES if after[name] != before[name]] == [home]
    with databases.for_key("user1").write() as conn:
        inside = databases.next_id("user1", conn)
    assert decode_id(inside).shard == databases.shard_for("user1")
