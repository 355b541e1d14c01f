"""Databases: clusters, table groups and shards from the app servers' environment, over fakes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import psycopg
import psycopg.errors
import pytest

from tiers.config.loader import parse_topology
from tiers.db.clusters import CLUSTERS_ENV, SHARDS_ENV, TABLES_ENV, Databases
from tiers.db.ids import compose_id, shard_of_id
from tiers.db.monitor import HealthMonitor
from tiers.db.router import Cluster
from tiers.db.sharding import CrossShardError, ShardMap, TableGroup, TableGroups
from tiers.db.tokens import causal_scope, current_token
from tiers.errors import ConfigError, DatabaseError
from tiers.supervisor.stack import Stack

MAIN = "postgresql://127.0.0.1:5501/tiers"
MAIN_REPLICA = "postgresql://127.0.0.1:5502/tiers"
SOCIAL = "postgresql://127.0.0.1:5511/tiers"
SOCIAL_REPLICA = "postgresql://127.0.0.1:5512/tiers"

TOPOLOGY = """
[db]
replicas = 1
ports = [5501, 5502]

[db.clusters.social]
replicas = 1
ports = [5511, 5512]

[db.tables]
default = "main"
bookmarks = { cluster = "social", tables = ["entries", "bookmarks"] }

[db.shards]
tables = ["stars"]
virtual_shards = 1024
[db.shards.clusters]
main = ["0-511"]
social = ["512-1023"]
"""


def stack_env(tmp_path: Path, text: str = TOPOLOGY) -> dict[str, str]:
    """What the stack gives its app servers for this topology (nothing runs)."""
    topology = parse_topology(text, "tiers.toml", tmp_path)
    return Stack(topology, tmp_path / "state", say=lambda _: None).database_env()


def env(**extra: Any) -> dict[str, str]:
    values = {"TIERS_DB_PRIMARY": MAIN, "TIERS_DB_REPLICAS": MAIN_REPLICA,
              CLUSTERS_ENV: {"main": {"primary": MAIN, "replicas": [MAIN_REPLICA]},
                             "social": {"primary": SOCIAL, "replicas": [SOCIAL_REPLICA]}},
              TABLES_ENV: {"default": "main", "groups": {
                  "bookmarks": {"cluster": "social", "tables": ["entries", "bookmarks"]}}},
              SHARDS_ENV: {"tables": ["stars"], "virtual_shards": 1024,
                           "clusters": {"main": ["0-511"], "social": ["512-1023"]}}}
    values.update(extra)
    return {key: value if isinstance(value, str) else json.dumps(value)
            for key, value in values.items() if value is not None}


@pytest.fixture
def databases() -> Databases:
    return Databases.from_env(env(), monitor=False)


def keys_on(databases: Databases, cluster: str, count: int = 3) -> list[str]:
    names = (f"user{n}" for n in range(200))
    return [name for name in names if databases.cluster_name_for_key(name) == cluster][:count]


# -- reading the environment ----------------------------------------------------------


def test_the_stacks_environment_gives_every_cluster_and_map(tmp_path: Path) -> None:
    databases = Databases.from_env(stack_env(tmp_path), monitor=False)
    assert databases.names == ("main", "social")
    main, social = databases.cluster("main"), databases.cluster("social")
    assert set(main.nodes) == {"127.0.0.1:5501/tiers", "127.0.0.1:5502/tiers"}
    assert main.primary_hint == "127.0.0.1:5501/tiers"
    assert set(social.nodes) == {"127.0.0.1:5511/tiers", "127.0.0.1:5512/tiers"}
    assert social.primary_hint == "127.0.0.1:5511/tiers"
    assert databases.default is main
    assert databases.for_table("bookmarks") is social
    assert databases.sharded_tables == {"stars"}
    assert databases.shards.virtual_shards == 1024
    assert databases.shards.to_ranges() == {"main": ["0-511"], "social": ["512-1023"]}


def test_a_single_cluster_environment_puts_everything_on_main(tmp_path: Path) -> None:
    plain = stack_env(tmp_path, "[db]\nreplicas = 1\nports = [5501, 5502]\n")
    assert set(plain) == {"TIERS_DB_PRIMARY", "TIERS_DB_REPLICAS"}
    databases = Databases.from_env(plain, monitor=False)
    assert databases.names == ("main",)
    main = databases.cluster("main")
    assert databases.for_table("bookmarks") is main
    assert databases.for_tables(["entries", "bookmarks", "stars"]) is main
    assert databases.for_key("anyone") is main
    assert databases.for_keys(["a", "b", 42]) is main
    assert databases.shards.virtual_shards == 1024
    assert databases.sharded_tables == frozenset()


def test_each_cluster_has_a_health_monitor_of_its_own() -> None:
    databases = Databases.from_env(env())
    monitors = [cluster.monitor for cluster in databases.clusters.values()]
    assert all(isinstance(m, HealthMonitor) for m in monitors)
    assert monitors[0] is not monitors[1]
    assert Databases.from_env(env(), monitor=False).cluster("social").monitor is None


def test_clusters_without_main_take_main_from_the_classic_variables() -> None:
    databases = Databases.from_env(env(**{CLUSTERS_ENV: {"social": {"primary": SOCIAL}}}),
                                   monitor=False)
    assert databases.names == ("main", "social")
    assert set(databases.cluster("main").nodes) == {"127.0.0.1:5501/tiers",
                                                    "127.0.0.1:5502/tiers"}
    assert set(databases.cluster("social").nodes) == {"127.0.0.1:5511/tiers"}


def test_causal_wait_applies_to_every_cluster() -> None:
    databases = Databases.from_env(env(TIERS_DB_CAUSAL_WAIT="0.5"), monitor=False)
    assert [c.causal_wait for c in databases.clusters.values()] == [0.5, 0.5]


@pytest.mark.parametrize(("extra", "key", "reason"), [
    ({CLUSTERS_ENV: "{not json"}, CLUSTERS_ENV, "not valid JSON"),
    ({CLUSTERS_ENV: "[1]"}, CLUSTERS_ENV, "JSON object"),
    ({CLUSTERS_ENV: {"social": "dsn"}}, f"{CLUSTERS_ENV}.social", "primary"),
    ({CLUSTERS_ENV: {"social": {"primary": ""}}}, f"{CLUSTERS_ENV}.social.primary", "DSN"),
    ({CLUSTERS_ENV: {"social": {"primary": SOCIAL, "extra": 1}}}, f"{CLUSTERS_ENV}.social",
     "unknown keys: extra"),
    ({CLUSTERS_ENV: {"social": {"primary": SOCIAL, "replicas": "x"}}},
     f"{CLUSTERS_ENV}.social.replicas", "list of strings"),
    ({CLUSTERS_ENV: {"social": {"primary": "nonsense"}}}, f"{CLUSTERS_ENV}.social",
     "not a conninfo"),
    ({CLUSTERS_ENV: {"So-cial": {"primary": SOCIAL}}}, f"{CLUSTERS_ENV}.So-cial",
     "lower-case ASCII identifier"),
    ({CLUSTERS_ENV: {"x" * 64: {"primary": SOCIAL}}}, f"{CLUSTERS_ENV}.{'x' * 64}",
     "at most 63"),
    ({CLUSTERS_ENV: None, "TIERS_DB_PRIMARY": None}, "TIERS_DB_PRIMARY", "not set"),
    ({"TIERS_DB_CAUSAL_WAIT": "soon"}, "TIERS_DB_CAUSAL_WAIT", "not a number"),
    ({TABLES_ENV: "nope"}, TABLES_ENV, "not valid JSON"),
    ({TABLES_ENV: {"groups": {"g": {"cluster": "nowhere", "tables": ["t"]}}}},
     f"{TABLES_ENV}.g.cluster", "unknown cluster 'nowhere'"),
    ({TABLES_ENV: {"default": "elsewhere"}}, f"{TABLES_ENV}.default", "unknown cluster"),
    ({TABLES_ENV: {"groups": {"g": {"cluster": "main"}}}}, f"{TABLES_ENV}.groups.g",
     "must be"),
    ({TABLES_ENV: {"groups": {"a": {"cluster": "main", "tables": ["t"]},
                              "b": {"cluster": "social", "tables": ["t"]}}}},
     f"{TABLES_ENV}.b.tables", "already in group 'a'"),
    ({SHARDS_ENV: "{"}, SHARDS_ENV, "not valid JSON"),
    ({SHARDS_ENV: {"tables": ["s"], "clusters": {"main": ["0-500"], "social": ["512-1023"]}}},
     f"{SHARDS_ENV}.clusters", "501-511 are assigned to no cluster"),
    ({SHARDS_ENV: {"tables": ["s"], "clusters": {"moon": ["0-1023"]}}},
     f"{SHARDS_ENV}.clusters.moon", "unknown cluster 'moon'"),
    ({SHARDS_ENV: {"tables": ["s"], "virtual_shards": 9000, "clusters": {}}},
     f"{SHARDS_ENV}.virtual_shards", "from 1 to 8192"),
    ({SHARDS_ENV: {"tables": "stars", "clusters": {}}}, f"{SHARDS_ENV}.tables",
     "list of strings"),
    ({SHARDS_ENV: {"tables": ["s"], "clusters": {"main": "0-1023"}}},
     f"{SHARDS_ENV}.clusters.main", "list of shards"),
    ({SHARDS_ENV: {"tables": ["bookmarks"], "clusters": {"main": ["0-1023"]}}},
     f"{SHARDS_ENV}.clusters", "also in table group 'bookmarks'"),
])
def test_a_bad_environment_is_a_config_error_naming_the_variable(
        extra: dict[str, Any], key: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        Databases.from_env(env(**extra), monitor=False)
    assert caught.value.source == "environment"
    assert caught.value.key == key
    assert reason in caught.value.reason


# -- routing ------------------------------------------------------------------------------


def test_tables_go_to_their_groups_cluster(databases: Databases) -> None:
    social, main = databases.cluster("social"), databases.cluster("main")
    assert databases.for_table("entries") is social
    assert databases.for_tables(["entries", "bookmarks"]) is social
    assert databases.for_table("users") is main  # in no group: the default
    assert databases.cluster_name_for_table("bookmarks") == "social"


def test_tables_on_two_clusters_are_refused(databases: Databases) -> None:
    with pytest.raises(CrossShardError) as caught:
        databases.for_tables(["bookmarks", "users"])
    assert caught.value.clusters == ("social", "main")
    assert "'bookmarks' -> social" in str(caught.value)
    assert "'users' -> main" in str(caught.value)
    with pytest.raises(ValueError, match="no tables"):
        databases.for_tables([])


def test_a_sharded_table_needs_a_key(databases: Databases) -> None:
    with pytest.raises(ValueError, match=r"'stars' is sharded.*for_key"):
        databases.for_table("stars")
    with pytest.raises(ValueError, match="sharded"):
        databases.for_tables(["stars", "users"])


def test_keys_go_to_the_cluster_of_their_virtual_shard(databases: Databases) -> None:
    for n in range(100):
        key = f"user{n}"
        shard = databases.shard_for(key)
        expected = "main" if shard < 512 else "social"
        assert databases.cluster_name_for_key(key) == expected
        assert databases.for_key(key) is databases.cluster(expected)
    assert databases.shard_for(42) == databases.shard_for("42")


def test_keys_on_one_cluster_share_it_and_keys_apart_are_refused(databases: Databases) -> None:
    on_main, on_social = keys_on(databases, "main"), keys_on(databases, "social")
    assert databases.for_keys(on_main) is databases.cluster("main")
    assert databases.for_keys(on_social) is databases.cluster("social")
    with pytest.raises(CrossShardError) as caught:
        databases.for_keys([on_main[0], on_social[0]])
    message = str(caught.value)
    assert f"{on_main[0]!r} (shard {databases.shard_for(on_main[0])}) -> main" in message
    assert f"{on_social[0]!r} (shard {databases.shard_for(on_social[0])}) -> social" in message
    assert isinstance(caught.value, DatabaseError)
    assert databases.group_by_cluster([on_main[0], on_social[0], on_main[1]]) == {
        "main": [on_main[0], on_main[1]], "social": [on_social[0]]}


def test_ids_are_routed_by_the_shard_they_carry(databases: Databases) -> None:
    on_social = keys_on(databases, "social", 1)[0]
    row_id = compose_id(1000, databases.shard_for(on_social), 5)
    assert databases.for_id(row_id) is databases.cluster("social")
    assert databases.for_keys([on_social], ids=[row_id]) is databases.cluster("social")
    with pytest.raises(CrossShardError):
        databases.for_keys(keys_on(databases, "main", 1), ids=[row_id])
    with pytest.raises(ValueError):
        databases.for_id(-1)


def test_an_unknown_cluster_is_named(databases: Databases) -> None:
    with pytest.raises(ValueError, match=r"no database cluster 'moon' \(clusters: main, social\)"):
        databases.cluster("moon")


def test_maps_built_in_code_must_name_given_clusters() -> None:
    one = {"main": Cluster({"a": "host=a"}, "a")}
    with pytest.raises(ConfigError, match="unknown cluster 'social'"):
        Databases(one, shards=ShardMap.evenly(["main", "social"], 8))
    groups = TableGroups({"g": TableGroup("social", ("t",))}, "main", ["main", "social"])
    with pytest.raises(ConfigError, match="unknown cluster 'social'"):
        Databases(one, tables=groups)
    with pytest.raises(ValueError, match="no database clusters"):
        Databases({})


def test_every_cluster_is_named_as_its_key() -> None:
    # The name is the key of the cluster's causal tokens: two clusters under
    # one name would compare each other's positions.
    with pytest.raises(ValueError, match="given as 'social' is named 'main'"):
        Databases({"main": Cluster({"a": "host=a"}, "a"),
                   "social": Cluster({"b": "host=b"}, "b")})
    fine = Databases({"main": Cluster({"a": "host=a"}, "a"),
                      "social": Cluster({"b": "host=b"}, "b", name="social")})
    assert {name: c.name for name, c in fine.clusters.items()} == {"main": "main",
                                                                   "social": "social"}


def test_the_environment_names_each_cluster(tmp_path: Path) -> None:
    for databases in (Databases.from_env(env(), monitor=False),
                      Databases.from_env(stack_env(tmp_path), monitor=False),
                      Databases.from_env(env(**{CLUSTERS_ENV: {"social": {"primary": SOCIAL}}}),
                                         monitor=False)):
        assert [c.name for c in databases.clusters.values()] == ["main", "social"]


def test_each_clusters_commits_are_kept_under_its_name() -> None:
    databases, _conns = fake_databases()
    main, social = databases.cluster("main"), databases.cluster("social")
    with causal_scope({"main": "0/10"}) as scope:
        main.note_commit("0/20")
        social.note_commit("0/5")
        assert scope.tokens == {"main": "0/20", "social": "0/5"}
        assert (current_token(main.name), current_token(social.name)) == ("0/20", "0/5")


# -- ids made by the key's cluster ----------------------------------------------------------


class FakeCursor:
    def __init__(self, row: tuple[Any, ...] | None) -> None:
        self.row = row

    def fetchone(self) -> tuple[Any, ...] | None:
        return self.row


class FakeConn:
    """A connection whose tiers_next_id answers like the SQL function (or is missing)."""

    def __init__(self, name: str, installed: bool = True) -> None:
        self.name = name
        self.installed = installed
        self.closed = False
        self.statements: list[tuple[str, Any]] = []
        self.rollbacks = 0

    def execute(self, query: str, params: Any = None) -> FakeCursor:
        self.statements.append((query, params))
        if not self.installed:
            raise psycopg.errors.UndefinedFunction("function tiers_next_id(integer) "
                                                   "does not exist")
        return FakeCursor((compose_id(77, params[0], len(self.statements)),))

    def rollback(self) -> None:
        self.rollbacks += 1

    def close(self) -> None:
        self.closed = True


def fake_databases(installed: bool = True) -> tuple[Databases, dict[str, FakeConn]]:
    conns: dict[str, FakeConn] = {}

    def connector(dsn: str, timeout: float) -> Any:
        conns[dsn] = FakeConn(dsn, installed)
        return conns[dsn]

    clusters = {name: Cluster({f"{name}-primary": f"host={name}"}, f"{name}-primary",
                              connector=connector, is_stale=lambda conn: False, name=name)
                for name in ("main", "social")}
    return Databases(clusters, shards=ShardMap.evenly(["main", "social"], 1024),
                     sharded_tables=["stars"]), conns


def test_next_id_is_made_on_the_keys_cluster_with_its_shard() -> None:
    databases, conns = fake_databases()
    on_social = keys_on(databases, "social", 1)[0]
    row_id = databases.next_id(on_social)
    assert shard_of_id(row_id) == databases.shard_for(on_social)
    assert list(conns) == ["host=social"]
    conn = conns["host=social"]
    assert conn.statements == [("SELECT tiers_next_id(%s)", (databases.shard_for(on_social),))]
    assert conn.rollbacks == 1  # its own block, ended; the sequence value stays used
    assert databases.cluster("social").last_node == "social-primary"


def test_next_id_on_a_given_connection_runs_there() -> None:
    databases, _conns = fake_databases()
    conn = FakeConn("a write block's")
    row_id = databases.next_id("alice", conn)  # type: ignore[arg-type]
    assert shard_of_id(row_id) == databases.shard_for("alice")
    assert conn.statements == [("SELECT tiers_next_id(%s)", (databases.shard_for("alice"),))]
    assert conn.rollbacks == 0


def test_next_id_without_the_function_says_what_to_install() -> None:
    databases, _conns = fake_databases(installed=False)
    with pytest.raises(DatabaseError, match=r"tiers_next_id\(shard\) is not installed.*"
                                            r"next_id_ddl"):
        databases.next_id("alice")


class FakeMonitor:
    def __init__(self) -> None:
        self.stopped = 0

    def stop(self, timeout: float | None = None) -> bool:
        self.stopped += 1
        return True


def test_close_and_stop_reach_every_cluster() -> None:
    databases, conns = fake_databases()
    databases.next_id(keys_on(databases, "main", 1)[0])
    databases.next_id(keys_on(databases, "social", 1)[0])
    assert len(conns) == 2
    databases.close()
    assert all(conn.closed for conn in conns.values())
    monitors = {}
    for name, cluster in databases.clusters.items():
        monitors[name] = cluster.monitor = FakeMonitor()  # type: ignore[assignment]
    databases.stop()
    assert [m.stopped for m in monitors.values()] == [1, 1]
