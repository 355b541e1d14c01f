from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from collections import Counter

import pytest

from tiers.db.ids import EPOCH_MS, IdGenerator, compose_id
from tiers.db.sharding import (
    DEFAULT_VIRTUAL_SHARDS,
    CrossShardError,
    ShardMap,
    ShardMove,
    TableGroup,
    TableGroups,
    plan_moves,
    shard_for_key,
)
from tiers.errors import ConfigError, DatabaseError

# -- the stable hash -------------------------------------------------------------

# Computed once. If one of these changes, every stored row is on the wrong shard.
PINNED = [
    ("alice", 1024, 649),
    ("bob", 1024, 146),
    ("", 1024, 692),
    ("ユーザー", 1024, 880),
    (b"\x00\xff", 1024, 228),
    (0, 1024, 885),
    (42, 1024, 122),
    (-1, 1024, 230),
    (2**70, 1024, 481),
    ("alice", 8192, 6793),
    ("bob", 8192, 1170),
    (42, 8192, 2170),
    ("alice", 7, 2),
]


@pytest.mark.parametrize(("key", "count", "shard"), PINNED)
def test_known_keys_hash_to_known_shards(key: str | bytes | int, count: int, shard: int) -> None:
    assert shard_for_key(key, count) == shard


def test_the_default_count_is_1024() -> None:
    assert DEFAULT_VIRTUAL_SHARDS == 1024
    assert shard_for_key("alice") == 649
    assert ShardMap.evenly(["a"]).virtual_shards == 1024


def test_an_int_and_its_decimal_text_are_one_key() -> None:
    assert shard_for_key(42) == shard_for_key("42") == shard_for_key(b"42")


@pytest.mark.parametrize("key", [True, 1.5, None, ("a",)])
def test_keys_of_other_types_are_refused(key: object) -> None:
    with pytest.raises(TypeError, match="shard key"):
        shard_for_key(key)  # type: ignore[arg-type]


def test_the_hash_ignores_python_hash_randomisation() -> None:
    script = (
        "from tiers.db.sharding import shard_for_key;"
        "print([shard_for_key(k) for k in ('alice', 'bob', 42, b'x')])"
    )
    outputs = set()
    for seed in ("1", "2", "random"):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                              check=True, env={**os.environ, "PYTHONHASHSEED": seed})
        outputs.add(done.stdout.strip())
    assert outputs == {str([shard_for_key(k) for k in ("alice", "bob", 42, b"x")])}


def test_keys_spread_roughly_evenly() -> None:
    keys = [f"user-{n}" for n in range(10_000)]
    per_shard = Counter(shard_for_key(key) for key in keys)
    # About 9.8 keys per shard; a healthy hash leaves almost none empty or crowded.
    assert len(per_shard) > 1000
    assert max(per_shard.values()) < 30
    shards = ShardMap.evenly(["a", "b", "c", "d"])
    per_cluster = Counter(shards.cluster_for(key) for key in keys)
    assert set(per_cluster) == {"a", "b", "c", "d"}
    assert all(2200 < count < 2800 for count in per_cluster.values())
    numbers = Counter(shards.cluster_for(n) for n in range(10_000))
    assert all(2200 < count < 2800 for count in numbers.values())


# -- vertical partitioning ---------------------------------------------------------


def table_groups() -> TableGroups:
    return TableGroups(
        {"users": TableGroup("main", ("users", "sessions")),
         "bookmarks": TableGroup("bookmarks", ("bookmarks", "tags"))},
        default_cluster="main",
        clusters={"main", "bookmarks"},
        source="tiers.toml",
        section="db.tables",
    )


def test_tables_map_to_their_groups_cluster_and_others_to_the_default() -> None:
    groups = table_groups()
    assert groups.cluster_for_table("sessions") == "main"
    assert groups.cluster_for_table("tags") == "bookmarks"
    assert groups.cluster_for_table("jobs") == "main"
    assert groups.group_of("tags") == "bookmarks"
    assert groups.group_of("jobs") is None


def test_tables_on_one_cluster_may_be_used_together() -> None:
    groups = table_groups()
    assert groups.cluster_for_tables(["bookmarks", "tags"]) == "bookmarks"
    assert groups.cluster_for_tables(["users", "jobs"]) == "main"


def test_tables_on_two_clusters_are_refused_by_name() -> None:
    with pytest.raises(CrossShardError) as caught:
        table_groups().cluster_for_tables(["users", "bookmarks"])
    message = str(caught.value)
    assert "'users' -> main" in message
    assert "'bookmarks' -> bookmarks" in message
    assert caught.value.clusters == ("main", "bookmarks")
    with pytest.raises(ValueError, match="no tables"):
        table_groups().cluster_for_tables([])


def test_table_groups_are_frozen() -> None:
    groups = table_groups()
    with pytest.raises(dataclasses.FrozenInstanceError):
        groups.default_cluster = "bookmarks"  # type: ignore[misc]
    with pytest.raises(TypeError):
        groups.groups["x"] = TableGroup("main", ("x",))  # type: ignore[index]


@pytest.mark.parametrize(
    ("groups", "default", "key", "reason"),
    [
        ({"a": TableGroup("main", ("t",)), "b": TableGroup("main", ("u", "t"))}, "main",
         "db.tables.b.tables", "table 't' is already in group 'a'"),
        ({"a": TableGroup("elsewhere", ("t",))}, "main",
         "db.tables.a.cluster", "unknown cluster 'elsewhere' (known: bookmarks, main)"),
        ({}, "nowhere", "db.tables.default", "unknown cluster 'nowhere'"),
        ({"a": TableGroup("main", ())}, "main", "db.tables.a.tables", "needs tables"),
        ({"a": TableGroup("main", ("",))}, "main", "db.tables.a.tables", "empty table name"),
        ({"": TableGroup("main", ("t",))}, "main", "db.tables.", "needs a name"),
        ({"a": TableGroup("", ("t",))}, "main", "db.tables.a.cluster", "non-empty"),
    ],
)
def test_bad_table_groups_are_config_errors(
    groups: dict[str, TableGroup], default: str, key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        TableGroups(groups, default_cluster=default, clusters={"main", "bookmarks"},
                    source="tiers.toml", section="db.tables")
    assert caught.value.source == "tiers.toml"
    assert caught.value.key == key
    assert reason in caught.value.reason


# -- building shard maps -----------------------------------------------------------


def test_ranges_in_text_numbers_and_range_objects_build_one_map() -> None:
    shards = ShardMap.from_ranges(
        {"a": ["0-3", 8], "b": [range(4, 8), "9 - 11"]}, virtual_shards=12)
    assert shards.owners == ("a",) * 4 + ("b",) * 4 + ("a", "b", "b", "b")
    assert shards.shards_of("a") == (0, 1, 2, 3, 8)
    assert shards.clusters == ("a", "b")
    assert shards.to_ranges() == {"a": ["0-3", "8"], "b": ["4-7", "9-11"]}
    assert ShardMap.from_ranges(shards.to_ranges(), virtual_shards=12) == shards


def test_evenly_gives_consecutive_ranges_that_differ_by_at_most_one() -> None:
    shards = ShardMap.evenly(["a", "b", "c"])
    assert shards.to_ranges() == {"a": ["0-341"], "b": ["342-682"], "c": ["683-1023"]}
    sizes = [len(shards.shards_of(name)) for name in ("a", "b", "c")]
    assert max(sizes) - min(sizes) <= 1
    assert sum(sizes) == 1024


@pytest.mark.parametrize(
    ("ranges", "count", "key", "reason"),
    [
        ({"a": ["0-5"], "b": ["5-9"]}, 10, "shards.b", "shard 5 is already assigned to 'a'"),
        ({"a": ["0-3"], "b": ["6-7", "9"]}, 10, "shards", "shards 4-5, 8 are assigned to no"),
        ({"a": ["0-10"]}, 10, "shards.a", "shard 10 is outside 0-9"),
        ({"a": ["3-1"]}, 10, "shards.a", "not a shard or a range"),
        ({"a": ["x"]}, 10, "shards.a", "not a shard or a range"),
        ({"a": [range(0, 10, 2)]}, 10, "shards.a", "step 1"),
        ({"a": [True]}, 10, "shards.a", "not a shard or a range"),
        ({"a": ["0-8192"]}, 8193, "shards.virtual_shards", "13 bits"),
        ({}, 0, "shards.virtual_shards", "between 1 and 8192"),
        ({"": ["0-9"]}, 10, "shards.", "non-empty"),
    ],
)
def test_bad_shard_maps_are_config_errors(
    ranges: dict[str, list[range | int | str]], count: int, key: str, reason: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        ShardMap.from_ranges(ranges, virtual_shards=count, source="tiers.toml")
    assert caught.value.source == "tiers.toml"
    assert caught.value.key == key
    assert reason in caught.value.reason


def test_a_shard_map_may_only_name_known_clusters() -> None:
    with pytest.raises(ConfigError, match="unknown cluster 'c'"):
        ShardMap.from_ranges({"a": ["0-4"], "c": ["5-9"]}, virtual_shards=10,
                             known_clusters={"a", "b"}, source="tiers.toml",
                             section="db.shards.map")
    ShardMap.from_ranges({"a": ["0-9"]}, virtual_shards=10, known_clusters={"a", "b"})


def test_the_largest_shard_count_is_8192() -> None:
    shards = ShardMap.evenly(["a", "b"], virtual_shards=8192)
    assert shards.virtual_shards == 8192
    with pytest.raises(ConfigError, match="8192"):
        ShardMap(("a",) * 8193)
    with pytest.raises(ConfigError):
        ShardMap(())


def test_evenly_refuses_duplicate_or_too_many_clusters() -> None:
    with pytest.raises(ConfigError, match="distinct"):
        ShardMap.evenly(["a", "a"])
    with pytest.raises(ConfigError, match="cannot share"):
        ShardMap.evenly(["a", "b", "c"], virtual_shards=2)


def test_shard_maps_are_frozen() -> None:
    shards = ShardMap.evenly(["a", "b"])
    with pytest.raises(dataclasses.FrozenInstanceError):
        shards.owners = ()  # type: ignore[misc]


# -- routing -----------------------------------------------------------------------


def two_clusters() -> ShardMap:
    return ShardMap.from_ranges({"a": ["0-511"], "b": ["512-1023"]})


def test_keys_route_by_their_virtual_shard() -> None:
    shards = two_clusters()
    assert shards.shard_for("alice") == 649
    assert shards.cluster_for("alice") == "b"
    assert shards.shard_for("bob") == 146
    assert shards.cluster_for("bob") == "a"
    assert shards.cluster_of_shard(511) == "a"
    with pytest.raises(ValueError):
        shards.cluster_of_shard(1024)


def test_ids_route_by_the_shard_they_carry() -> None:
    shards = two_clusters()
    ids = IdGenerator(virtual_shards=1024)
    bobs_bookmark = ids.next_id(shards.shard_for("bob"))
    assert shards.cluster_for_id(bobs_bookmark) == "a"
    assert shards.cluster_for_id(compose_id(1, 1023, 0)) == "b"
    with pytest.raises(ValueError):
        shards.cluster_for_id(compose_id(1, 1024, 0))  # a shard this map does not have
    with pytest.raises(ValueError):
        shards.cluster_for_id(-5)


def test_keys_on_one_cluster_share_a_transaction() -> None:
    shards = two_clusters()
    assert shards.cluster_for_all(["bob", "bob"]) == "a"
    on_a = [key for key in (f"k{n}" for n in range(100)) if shards.cluster_for(key) == "a"]
    assert len({shards.shard_for(key) for key in on_a}) > 1
    assert shards.cluster_for_all(on_a) == "a"
    bobs = compose_id(1, shards.shard_for("bob"), 0)
    assert shards.cluster_for_all(["bob"], ids=[bobs]) == "a"
    assert shards.cluster_for_all(ids=[bobs]) == "a"


def test_keys_on_two_clusters_raise_cross_shard_error_naming_them() -> None:
    shards = two_clusters()
    with pytest.raises(CrossShardError) as caught:
        shards.cluster_for_all(["alice", "bob"])
    assert isinstance(caught.value, DatabaseError)
    message = str(caught.value)
    assert "'alice' (shard 649) -> b" in message
    assert "'bob' (shard 146) -> a" in message
    assert "2 clusters (b, a)" in message
    assert caught.value.placements == (("'alice' (shard 649)", "b"), ("'bob' (shard 146)", "a"))
    alices = compose_id(1, 649, 0)
    with pytest.raises(CrossShardError, match=rf"id {alices} \(shard 649\) -> b"):
        shards.cluster_for_all(["bob"], ids=[alices])


def test_a_long_cross_shard_message_is_shortened() -> None:
    with pytest.raises(CrossShardError, match="and 90 more"):
        two_clusters().cluster_for_all(range(100))


def test_no_keys_is_not_a_cluster() -> None:
    with pytest.raises(ValueError, match="no keys"):
        two_clusters().cluster_for_all([])


def test_keys_group_by_cluster_for_reads_that_visit_each() -> None:
    assert two_clusters().group_by_cluster(["alice", "bob", 42]) == {
        "b": ["alice"], "a": ["bob", 42]}


# -- resharding ----------------------------------------------------------------------


def test_only_reassigned_virtual_shards_move() -> None:
    old = two_clusters()
    new = ShardMap.from_ranges({"a": ["0-255"], "c": ["256-511", "1000-1023"],
                                "b": ["512-999"]})
    moves = plan_moves(old, new)
    assert moves == ([ShardMove(s, "a", "c") for s in range(256, 512)]
                     + [ShardMove(s, "b", "c") for s in range(1000, 1024)])
    moved = {move.shard for move in moves}
    for key in (f"user-{n}" for n in range(5000)):
        assert new.shard_for(key) == old.shard_for(key)  # a key's shard never changes
        changed = new.cluster_for(key) != old.cluster_for(key)
        assert changed == (old.shard_for(key) in moved)


def test_adding_a_cluster_evenly_moves_about_its_share() -> None:
    old = ShardMap.evenly(["a", "b", "c"])
    new = ShardMap.from_ranges({**old.to_ranges(), "c": ["683-767"], "d": ["768-1023"]})
    moves = plan_moves(old, new)
    assert {(m.source, m.target) for m in moves} == {("c", "d")}
    assert len(moves) == 256


def test_an_unchanged_map_moves_nothing() -> None:
    assert plan_moves(two_clusters(), two_clusters()) == []


def test_changing_the_shard_count_is_not_a_move() -> None:
    with pytest.raises(ConfigError, match="re-hashes every key"):
        plan_moves(two_clusters(), ShardMap.evenly(["a", "b"], virtual_shards=2048))


def test_generated_ids_keep_their_shard_across_a_move() -> None:
    old = two_clusters()
    new = ShardMap.from_ranges({"a": ["0-700"], "b": ["701-1023"]})
    ids = IdGenerator(clock=lambda: EPOCH_MS + 5)
    row = ids.next_id(old.shard_for("alice"))
    assert old.cluster_for_id(row) == "b"
    assert new.cluster_for_id(row) == new.cluster_for("alice") == "a"
