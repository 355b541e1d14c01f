"""Where data lives: tables to clusters (vertical), keys to virtual shards to clusters (horizontal).

Vertical partitioning (:class:`TableGroups`) puts groups of tables on named
clusters, e.g. users on ``main`` and bookmarks on ``bookmarks``. Every table
is in at most one group; a table in none lives on the default cluster.

Horizontal sharding (:class:`ShardMap`) splits the rows of sharded tables
over a fixed number of *virtual shards* (1024 unless configured, at most
8192 so that the shard fits in an id), each assigned to exactly one cluster;
a cluster usually holds many. A key (a user name, an account number) maps to
a virtual shard by a stable hash, :func:`shard_for_key`: the first 8 bytes of
BLAKE2b over the key's bytes (UTF-8 for text, decimal digits for an int, so
``42`` and ``"42"`` are one key), modulo the number of virtual shards. It
depends neither on Python's hash randomisation nor on the clusters, so a
key's virtual shard never changes; only a virtual shard's cluster does.

A row records its virtual shard in its id (:mod:`tiers.db.ids`): rows made
for a key get ids made with ``shard_for(key)``, and rows found by such an id
are routed by the id's bits (:meth:`ShardMap.cluster_for_id`). Resharding
moves whole virtual shards: :func:`plan_moves` lists the shards whose
cluster differs between two maps; the rows of each are those whose id
carries it (``tiers.db.ids.shard_expression``). The number of virtual shards
cannot change, since that would move almost every key.

One transaction runs on one cluster. :meth:`ShardMap.cluster_for_all` and
:meth:`TableGroups.cluster_for_tables` return the single cluster an
operation needs, or raise :class:`CrossShardError` naming every key or table
and its cluster. This module only names clusters; opening connections to
them is the caller's job.

Errors: a map that is invalid raises :class:`tiers.errors.ConfigError`
(source, key, reason); a lookup that spans clusters raises CrossShardError
(a :class:`tiers.errors.DatabaseError`); a key of the wrong type TypeError.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import InitVar, dataclass, field
from types import MappingProxyType

from tiers.db.ids import MAX_SHARDS, shard_of_id
from tiers.errors import ConfigError, DatabaseError

DEFAULT_VIRTUAL_SHARDS = 1024

ShardKey = str | bytes | int

# Enough to find the culprits, short enough for one log line.
_MESSAGE_ITEMS = 10

_RANGE_TEXT = re.compile(r"\A\s*(\d+)\s*(?:-\s*(\d+)\s*)?\Z")


class CrossShardError(DatabaseError):
    """An operation's keys or tables live on more than one cluster.

    ``placements`` lists each (key or table as text, cluster) pair;
    ``clusters`` the distinct clusters in order of first appearance.
    """

    def __init__(self, what: str, placements: Sequence[tuple[str, str]]) -> None:
        self.placements = tuple(placements)
        self.clusters = tuple(dict.fromkeys(cluster for _, cluster in self.placements))
        shown = ", ".join(f"{label} -> {cluster}"
                          for label, cluster in self.placements[:_MESSAGE_ITEMS])
        more = len(self.placements) - _MESSAGE_ITEMS
        if more > 0:
            shown += f", and {more} more"
        super().__init__(
            f"{what} span {len(self.clusters)} clusters ({', '.join(self.clusters)}) and one "
            f"transaction runs on one cluster: {shown}")


def key_bytes(key: ShardKey) -> bytes:
    """The bytes a key hashes as: UTF-8 for text, decimal digits for an int, bytes as given."""
    if isinstance(key, bytes):
        return key
    if isinstance(key, str):
        return key.encode("utf-8")
    if isinstance(key, int) and not isinstance(key, bool):
        return str(key).encode("ascii")
    raise TypeError(f"a shard key is str, bytes or int, got {type(key).__name__}")


def shard_for_key(key: ShardKey, virtual_shards: int = DEFAULT_VIRTUAL_SHARDS) -> int:
    """The virtual shard of ``key`` among ``virtual_shards``; the same in every process, forever."""
    digest = hashlib.blake2b(key_bytes(key), digest_size=8).digest()
    return int.from_bytes(digest, "big") % virtual_shards


# -- vertical partitioning -----------------------------------------------------


@dataclass(frozen=True)
class TableGroup:
    """Tables that live together on one cluster (they may be joined and share transactions)."""

    cluster: str
    tables: tuple[str, ...]


@dataclass(frozen=True)
class TableGroups:
    """Table groups on clusters; every other table lives on ``default_cluster``.

    ``clusters`` names every cluster that exists; ``source`` and ``section``
    name the file and table that errors report. Table names match exactly
    (as PostgreSQL stores them, usually lower case). Raises ConfigError for
    an unknown cluster, a table in two groups, an empty group or name.
    """

    groups: Mapping[str, TableGroup]
    default_cluster: str
    clusters: InitVar[Collection[str]]
    source: str = field(default="<code>", compare=False)
    section: str = field(default="tables", compare=False)
    _index: Mapping[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self, clusters: Collection[str]) -> None:
        known = frozenset(clusters)
        _check_cluster(self.default_cluster, known, self.source, f"{self.section}.default")
        index: dict[str, str] = {}
        for name, group in self.groups.items():
            key = f"{self.section}.{name}"
            if not name:
                raise ConfigError(self.source, key, "a group needs a name")
            _check_cluster(group.cluster, known, self.source, f"{key}.cluster")
            if not group.tables:
                raise ConfigError(self.source, f"{key}.tables", "a group needs tables")
            for table in group.tables:
                if not table:
                    raise ConfigError(self.source, f"{key}.tables", "empty table name")
                if table in index:
                    raise ConfigError(self.source, f"{key}.tables",
                                      f"table {table!r} is already in group {index[table]!r}")
                index[table] = name
        object.__setattr__(self, "groups", MappingProxyType(dict(self.groups)))
        object.__setattr__(self, "_index", MappingProxyType(index))

    def group_of(self, table: str) -> str | None:
        """The group ``table`` belongs to, or None if it is in none."""
        return self._index.get(table)

    def cluster_for_table(self, table: str) -> str:
        """The cluster that holds ``table``."""
        group = self._index.get(table)
        return self.default_cluster if group is None else self.groups[group].cluster

    def cluster_for_tables(self, tables: Iterable[str]) -> str:
        """The one cluster holding all ``tables``; CrossShardError if they span clusters,
        ValueError if none are given."""
        placements = [(repr(table), self.cluster_for_table(table)) for table in tables]
        return _single("tables", placements)


# -- horizontal sharding -------------------------------------------------------


@dataclass(frozen=True)
class ShardMove:
    """Virtual ``shard`` moves from cluster ``source`` to cluster ``target``."""

    shard: int
    source: str
    target: str


@dataclass(frozen=True)
class ShardMap:
    """Which cluster holds each virtual shard: ``owners[shard]`` is its cluster's name.

    The number of virtual shards is ``len(owners)``, 1 to 8192. If
    ``known_clusters`` is given, every owner must be one of them. Build one
    with :meth:`from_ranges` or :meth:`evenly` rather than by hand. Raises
    ConfigError naming ``source`` and ``section`` for an invalid map.
    """

    owners: tuple[str, ...]
    known_clusters: InitVar[Collection[str] | None] = None
    source: str = field(default="<code>", compare=False)
    section: str = field(default="shards", compare=False)

    def __post_init__(self, known_clusters: Collection[str] | None) -> None:
        object.__setattr__(self, "owners", tuple(self.owners))
        count = len(self.owners)
        if not 1 <= count <= MAX_SHARDS:
            raise ConfigError(self.source, f"{self.section}.virtual_shards",
                              f"must be between 1 and {MAX_SHARDS} (ids carry the shard in "
                              f"13 bits), got {count}")
        known = None if known_clusters is None else frozenset(known_clusters)
        for cluster in dict.fromkeys(self.owners):
            _check_cluster(cluster, known, self.source, f"{self.section}.{cluster}")

    @classmethod
    def from_ranges(
        cls,
        ranges: Mapping[str, Iterable[range | int | str]],
        *,
        virtual_shards: int = DEFAULT_VIRTUAL_SHARDS,
        known_clusters: Collection[str] | None = None,
        source: str = "<code>",
        section: str = "shards",
    ) -> ShardMap:
        """A map from cluster -> the virtual shards it holds.

        Each item is a ``range``, one shard number, or text as written in a
        config file: ``"7"`` or ``"0-511"`` (both ends included). Every shard
        ``0..virtual_shards-1`` must be assigned exactly once: ConfigError for
        a gap, an overlap, a shard out of range or unparsable text.
        """
        if isinstance(virtual_shards, bool) or not 1 <= virtual_shards <= MAX_SHARDS:
            raise ConfigError(source, f"{section}.virtual_shards",
                              f"must be between 1 and {MAX_SHARDS} (ids carry the shard in "
                              f"13 bits), got {virtual_shards}")
        owners: list[str | None] = [None] * virtual_shards
        for cluster, items in ranges.items():
            key = f"{section}.{cluster}"
            for item in items:
                for shard in _expand(item, source, key):
                    if not 0 <= shard < virtual_shards:
                        raise ConfigError(source, key, f"shard {shard} is outside "
                                          f"0-{virtual_shards - 1}")
                    if owners[shard] is not None:
                        raise ConfigError(source, key, f"shard {shard} is already assigned "
                                          f"to {owners[shard]!r}")
                    owners[shard] = cluster
        missing = [shard for shard, owner in enumerate(owners) if owner is None]
        if missing:
            raise ConfigError(source, section,
                              f"shards {_compact(missing)} are assigned to no cluster")
        return cls(tuple(o for o in owners if o is not None), known_clusters,
                   source=source, section=section)

    @classmethod
    def evenly(
        cls, clusters: Sequence[str], virtual_shards: int = DEFAULT_VIRTUAL_SHARDS
    ) -> ShardMap:
        """Consecutive, near-equal ranges of virtual shards, one per cluster, in order."""
        if not clusters or len(set(clusters)) != len(clusters):
            raise ConfigError("<code>", "shards", "needs distinct cluster names")
        if not 1 <= virtual_shards <= MAX_SHARDS:
            raise ConfigError("<code>", "shards.virtual_shards",
                              f"must be between 1 and {MAX_SHARDS}, got {virtual_shards}")
        if len(clusters) > virtual_shards:
            raise ConfigError("<code>", "shards", f"{len(clusters)} clusters cannot share "
                              f"{virtual_shards} virtual shards")
        owners = tuple(clusters[shard * len(clusters) // virtual_shards]
                       for shard in range(virtual_shards))
        return cls(owners)

    @property
    def virtual_shards(self) -> int:
        return len(self.owners)

    @property
    def clusters(self) -> tuple[str, ...]:
        """The clusters holding at least one virtual shard, in order of their first shard."""
        return tuple(dict.fromkeys(self.owners))

    def shards_of(self, cluster: str) -> tuple[int, ...]:
        """The virtual shards ``cluster`` holds (empty for a cluster that holds none)."""
        return tuple(shard for shard, owner in enumerate(self.owners) if owner == cluster)

    def to_ranges(self) -> dict[str, list[str]]:
        """The map as ``from_ranges`` text (``{"a": ["0-511"], ...}``), e.g. to write a config."""
        ranges: dict[str, list[str]] = {}
        start = 0
        for shard in range(1, len(self.owners) + 1):
            if shard == len(self.owners) or self.owners[shard] != self.owners[start]:
                text = str(start) if shard - 1 == start else f"{start}-{shard - 1}"
                ranges.setdefault(self.owners[start], []).append(text)
                start = shard
        return ranges

    def cluster_of_shard(self, shard: int) -> str:
        """The cluster holding virtual ``shard``; ValueError if there is no such shard."""
        if not 0 <= shard < len(self.owners):
            raise ValueError(f"shard {shard} is outside 0-{len(self.owners) - 1}")
        return self.owners[shard]

    def shard_for(self, key: ShardKey) -> int:
        """The virtual shard of ``key`` (see :func:`shard_for_key`); make its rows' ids with it."""
        return shard_for_key(key, len(self.owners))

    def cluster_for(self, key: ShardKey) -> str:
        """The cluster that holds the rows of ``key``."""
        return self.owners[shard_for_key(key, len(self.owners))]

    def cluster_for_id(self, row_id: int) -> str:
        """The cluster that holds the row with this id, by the virtual shard the id carries.

        ValueError if ``row_id`` is not an id or carries a shard beyond this map.
        """
        return self.cluster_of_shard(shard_of_id(row_id))

    def cluster_for_all(self, keys: Iterable[ShardKey] = (), *, ids: Iterable[int] = ()) -> str:
        """The one cluster holding every key in ``keys`` and every row in ``ids``.

        Raises CrossShardError naming each key, its virtual shard and cluster
        if they span clusters (keys on different virtual shards of one
        cluster are fine), and ValueError if nothing is given.
        """
        placements = [(f"{key!r} (shard {self.shard_for(key)})", self.cluster_for(key))
                      for key in keys]
        placements += [(f"id {row_id} (shard {shard_of_id(row_id)})", self.cluster_for_id(row_id))
                       for row_id in ids]
        return _single("keys", placements)

    def group_by_cluster(self, keys: Iterable[ShardKey]) -> dict[str, list[ShardKey]]:
        """``keys`` split by cluster, in input order, for a read that visits each cluster once."""
        grouped: dict[str, list[ShardKey]] = {}
        for key in keys:
            grouped.setdefault(self.cluster_for(key), []).append(key)
        return grouped


def plan_moves(old: ShardMap, new: ShardMap) -> list[ShardMove]:
    """The virtual shards whose cluster differs between ``old`` and ``new``, in shard order.

    Pure: nothing moves. Every other shard, and so every key on it, stays
    where it is. Raises ConfigError if the maps differ in their number of
    virtual shards, since every key's shard would change.
    """
    if old.virtual_shards != new.virtual_shards:
        raise ConfigError(
            new.source, f"{new.section}.virtual_shards",
            f"is {new.virtual_shards} but the current map has {old.virtual_shards}: changing "
            f"it re-hashes every key, so resharding keeps it and moves whole virtual shards")
    return [ShardMove(shard, before, after)
            for shard, (before, after) in enumerate(zip(old.owners, new.owners, strict=True))
            if before != after]


# -- helpers -------------------------------------------------------------------


def _check_cluster(cluster: str, known: frozenset[str] | None, source: str, key: str) -> None:
    if not isinstance(cluster, str) or not cluster:
        raise ConfigError(source, key, f"a cluster name must be a non-empty string, "
                          f"got {cluster!r}")
    if known is not None and cluster not in known:
        listed = ", ".join(sorted(known)) or "none"
        raise ConfigError(source, key, f"unknown cluster {cluster!r} (known: {listed})")


def _single(what: str, placements: Sequence[tuple[str, str]]) -> str:
    if not placements:
        raise ValueError(f"no {what} given: cannot choose a cluster")
    clusters = {cluster for _, cluster in placements}
    if len(clusters) > 1:
        raise CrossShardError(what, placements)
    return placements[0][1]


def _expand(item: range | int | str, source: str, key: str) -> range:
    if isinstance(item, range):
        if item.step != 1:
            raise ConfigError(source, key, f"{item!r}: a range of shards must have step 1")
        return item
    if isinstance(item, int) and not isinstance(item, bool):
        return range(item, item + 1)
    if isinstance(item, str):
        match = _RANGE_TEXT.match(item)
        if match is not None:
            first = int(match.group(1))
            last = first if match.group(2) is None else int(match.group(2))
            if last >= first:
                return range(first, last + 1)
    raise ConfigError(source, key, f"not a shard or a range of shards like '0-511': {item!r}")


def _compact(shards: Sequence[int]) -> str:
    """``[0, 1, 2, 7]`` -> ``"0-2, 7"`` (sorted input), shortened past a few runs."""
    runs: list[str] = []
    start = previous = shards[0]
    for shard in [*shards[1:], None]:
        if shard is not None and shard == previous + 1:
            previous = shard
            continue
        runs.append(str(start) if start == previous else f"{start}-{previous}")
        if shard is not None:
            start = previous = shard
    if len(runs) > _MESSAGE_ITEMS:
        runs = [*runs[:_MESSAGE_ITEMS], f"and {len(runs) - _MESSAGE_ITEMS} more ranges"]
    return ", ".join(runs)
