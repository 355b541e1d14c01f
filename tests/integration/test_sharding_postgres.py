"""Sharding against two real PostgreSQL primaries: rows by key, ids from Python and SQL."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from tests.conftest import require
from tests.integration.pgcluster import Cluster, wait_connect
from tiers.db.embedded import init_primary
from tiers.db.ids import (
    EPOCH,
    EPOCH_MS,
    IdGenerator,
    decode_id,
    next_id_ddl,
    sequence_range,
    shard_expression,
    wall_clock_ms,
)
from tiers.db.sharding import CrossShardError, ShardMap, plan_moves
from tiers.errors import DatabaseError

Connection = psycopg.Connection[tuple[object, ...]]

NAMES = ("shard-a", "shard-b")
ROWS = 200
# Python ids take one half of the sequence space and the database function the
# other, so ids for one shard in one millisecond never collide between them.
PYTHON_SLOT, SQL_SLOT, SLOTS = 0, 1, 2

TABLE = """CREATE TABLE bookmarks (
    id bigint PRIMARY KEY, owner text NOT NULL, shard int NOT NULL, made_by text NOT NULL)"""


@dataclass(frozen=True)
class Row:
    id: int
    owner: str
    made_by: str
    millis_from: int  # bounds of the clock around making an SQL id
    millis_to: int


@dataclass
class Shards:
    conns: dict[str, Connection]
    map: ShardMap
    rows: list[Row]


def start_primaries(root: Path) -> Iterator[dict[str, Connection]]:
    """Two independent primaries in one data root, or a skip if PostgreSQL cannot run here."""
    cluster: Cluster | None = None
    conns: dict[str, Connection] = {}
    try:
        try:
            cluster = Cluster(root, nodes=len(NAMES))
            for name, port in zip(NAMES, cluster.ports, strict=True):
                init_primary(cluster.layout, cluster.run_as, name)
                cluster.start(name, port)
                conns[name] = wait_connect(port)
        except (DatabaseError, OSError, psycopg.OperationalError) as exc:
            require(False, f"embedded PostgreSQL cannot run here: {exc}")
        yield conns
    finally:
        for conn in conns.values():
            conn.close()
        if cluster is not None:
            cluster.stop()


@pytest.fixture(scope="module")
def primaries() -> Iterator[dict[str, Connection]]:
    root = Path(tempfile.mkdtemp(prefix="tiers-shards-"))
    root.chmod(0o755)
    try:
        yield from start_primaries(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def cluster_map(conns: dict[str, Connection]) -> ShardMap:
    return ShardMap.from_ranges({"shard-a": ["0-511"], "shard-b": ["512-1023"]},
                                known_clusters=conns)


def sql_id(conn: Connection, shard: int) -> int:
    row = conn.execute("SELECT tiers_next_id(%s)", (shard,)).fetchone()
    assert row is not None
    assert isinstance(row[0], int)
    return row[0]


def insert_rows(shards: ShardMap, conns: dict[str, Connection], table: str,
                keys: list[str]) -> list[Row]:
    """One row per key, on the key's cluster, ids alternately from Python and the database."""
    ids = IdGenerator(slot=PYTHON_SLOT, slots=SLOTS, virtual_shards=shards.virtual_shards)
    rows = []
    for number, key in enumerate(keys):
        shard = shards.shard_for(key)
        conn = conns[shards.cluster_for(key)]
        before = wall_clock_ms() - EPOCH_MS
        if number % 2:
            made_by, row_id = "sql", sql_id(conn, shard)
        else:
            made_by, row_id = "python", ids.next_id(shard)
        after = wall_clock_ms() - EPOCH_MS
        conn.execute(f"INSERT INTO {table} (id, owner, shard, made_by) VALUES (%s, %s, %s, %s)",
                     (row_id, key, shard, made_by))
        rows.append(Row(row_id, key, made_by, before, after))
    return rows


@pytest.fixture(scope="module")
def loaded(primaries: dict[str, Connection]) -> Shards:
    shards = cluster_map(primaries)
    ddl = next_id_ddl(virtual_shards=shards.virtual_shards, slot=SQL_SLOT, slots=SLOTS)
    for conn in primaries.values():
        conn.execute(ddl)
        conn.execute(ddl)  # installing twice is harmless
        conn.execute(TABLE)
    rows = insert_rows(shards, primaries, "bookmarks", [f"user-{n}" for n in range(ROWS)])
    return Shards(primaries, shards, rows)


def stored(conn: Connection, table: str = "bookmarks") -> dict[int, tuple[str, int]]:
    found = conn.execute(f"SELECT id, owner, shard FROM {table}").fetchall()
    return {int(str(i)): (str(owner), int(str(shard))) for i, owner, shard in found}


def test_each_row_is_on_exactly_the_cluster_the_map_names(loaded: Shards) -> None:
    per_cluster = {name: stored(conn) for name, conn in loaded.conns.items()}
    assert all(len(rows) > ROWS // 4 for rows in per_cluster.values())  # both clusters used
    for row in loaded.rows:
        holders = [name for name, rows in per_cluster.items() if row.id in rows]
        assert holders == [loaded.map.cluster_for(row.owner)]
        assert loaded.map.cluster_for_id(row.id) == holders[0]
    assert sum(len(rows) for rows in per_cluster.values()) == ROWS


def test_every_id_carries_its_keys_shard(loaded: Shards) -> None:
    for name, conn in loaded.conns.items():
        for row_id, (owner, shard) in stored(conn).items():
            assert decode_id(row_id).shard == shard == loaded.map.shard_for(owner)
        mismatched = conn.execute(
            f"SELECT count(*) FROM bookmarks WHERE {shard_expression('id')} <> shard").fetchone()
        assert mismatched == (0,), name


def test_sql_and_python_ids_share_one_layout(loaded: Shards) -> None:
    python_lanes = sequence_range(PYTHON_SLOT, SLOTS)
    sql_lanes = sequence_range(SQL_SLOT, SLOTS)
    made_by = {row.made_by for row in loaded.rows}
    assert made_by == {"python", "sql"}
    for row in loaded.rows:
        decoded = decode_id(row.id)
        assert decoded.sequence in (sql_lanes if row.made_by == "sql" else python_lanes)
        millis = (decoded.timestamp - EPOCH) // timedelta(milliseconds=1)
        assert row.millis_from <= millis <= row.millis_to


def test_the_sql_function_refuses_a_shard_beyond_the_map(loaded: Shards) -> None:
    conn = loaded.conns["shard-a"]
    with pytest.raises(psycopg.errors.NumericValueOutOfRange, match=r"outside 0\.\.1023"):
        sql_id(conn, loaded.map.virtual_shards)
    with pytest.raises(psycopg.errors.NumericValueOutOfRange):
        sql_id(conn, -1)


def test_an_operation_spanning_clusters_is_refused(loaded: Shards) -> None:
    by_cluster = {loaded.map.cluster_for(row.owner): row for row in loaded.rows}
    first, second = by_cluster["shard-a"], by_cluster["shard-b"]
    with pytest.raises(CrossShardError) as caught:
        loaded.map.cluster_for_all([first.owner, second.owner])
    message = str(caught.value)
    assert f"{first.owner!r}" in message and "-> shard-a" in message
    assert f"{second.owner!r}" in message and "-> shard-b" in message
    with pytest.raises(CrossShardError):
        loaded.map.cluster_for_all(ids=[first.id, second.id])
    same = [row for row in loaded.rows if loaded.map.cluster_for(row.owner) == "shard-b"][:5]
    cluster = loaded.map.cluster_for_all([row.owner for row in same], ids=[r.id for r in same])
    row = loaded.conns[cluster].execute(
        "SELECT count(*) FROM bookmarks WHERE id = ANY(%s)", ([r.id for r in same],)).fetchone()
    assert row == (len(same),)


def test_moving_virtual_shards_by_the_ids_they_carry(loaded: Shards) -> None:
    conns = loaded.conns
    for conn in conns.values():
        conn.execute(TABLE.replace("bookmarks", "moving"))
    old = loaded.map
    rows = insert_rows(old, conns, "moving", [f"mover-{n}" for n in range(100)])
    new = ShardMap.from_ranges({"shard-a": ["0-383"], "shard-b": ["384-1023"]})
    moves = plan_moves(old, new)
    assert {(m.source, m.target) for m in moves} == {("shard-a", "shard-b")}
    moving = [m.shard for m in moves]
    where = f"{shard_expression('id')} = ANY(%s)"
    source, target = conns["shard-a"], conns["shard-b"]
    with source.transaction(), target.transaction():
        copied = source.execute(
            f"SELECT id, owner, shard, made_by FROM moving WHERE {where}", (moving,)).fetchall()
        with target.cursor() as cursor:
            cursor.executemany(
                "INSERT INTO moving (id, owner, shard, made_by) VALUES (%s, %s, %s, %s)", copied)
        source.execute(f"DELETE FROM moving WHERE {where}", (moving,))
    assert copied, "some rows sat on the moved shards"
    after = {name: stored(conn, "moving") for name, conn in conns.items()}
    for row in rows:
        holders = [name for name, found in after.items() if row.id in found]
        assert holders == [new.cluster_for(row.owner)] == [new.cluster_for_id(row.id)]
