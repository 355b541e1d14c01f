"""An app's view of every database cluster: where each table and each key's rows live.

:class:`Databases` holds one :class:`tiers.db.router.Cluster` per cluster
(each with its own health monitor, so failovers are followed per cluster),
the table groups (vertical partitioning, :class:`tiers.db.sharding.TableGroups`)
and the shard map (horizontal, :class:`tiers.db.sharding.ShardMap`). It only
chooses a cluster; the caller then reads and writes through that cluster as
usual (``write()``, ``read()``, ``read_primary()``)::

    databases = Databases.from_env()
    with databases.for_table("bookmarks").write() as conn: ...
    with databases.for_key(user).read() as conn: ...        # the user's shard
    databases.for_keys([a, b])                              # CrossShardError if apart

The environment (set by the stack, :meth:`tiers.supervisor.stack.Stack.database_env`):

    TIERS_DB_CLUSTERS  JSON {name: {"primary": dsn, "replicas": [dsn, ...]}}; optional.
                       Without it, or without "main" in it, the cluster ``main``
                       is TIERS_DB_PRIMARY / TIERS_DB_REPLICAS.
    TIERS_DB_TABLES    JSON {"default": name, "groups": {group: {"cluster": name,
                       "tables": [..]}}}; optional: every table on ``main``.
    TIERS_DB_SHARDS    JSON {"tables": [..], "virtual_shards": N, "clusters":
                       {name: ["0-511", ...]}}; optional: no table is sharded and
                       every key maps to the default cluster, over 1024 virtual shards.

TIERS_DB_CAUSAL_WAIT and TIERS_DB_MONITOR_INTERVAL apply to every cluster.

Ids. Rows of sharded tables get ids that carry their virtual shard
(:mod:`tiers.db.ids`). They are made *in the database*, by
``tiers_next_id(shard)`` (install :func:`tiers.db.ids.next_id_ddl` on every
cluster that holds shards, e.g. as a migration): write
``INSERT ... VALUES (tiers_next_id(%s), ...)`` with ``shard_for(key)``, or
call :meth:`Databases.next_id`. The sequence behind it belongs to the
cluster, and a virtual shard lives on exactly one cluster, so no two
producers ever share sequence values for one shard: no per-process slot has
to be handed out, which in-process generators would need (every gunicorn
worker, replaced after ``max_requests``, would need a slot of its own, and
two sharing one make equal ids). The price is one round trip, saved
altogether when the function is called inside the INSERT; uniqueness holds
while a cluster makes fewer than 1024 ids in one millisecond.

Causal tokens. A causal token is one commit position of one cluster, and the
positions of two clusters are unrelated numbers. Each Cluster here is named
as its cluster is (``main``, ``social``...), and a request scope (and the
client's cookie, :mod:`tiers.app.causal`) keeps one token per cluster name:
a commit replaces its own cluster's entry only, and a read uses its own
cluster's entry only. Read-your-writes therefore holds on every cluster at
once: after writes on ``main`` and then on ``social``, reads on either see
the client's write there, and a read on a cluster the client never wrote to
carries no token and may use any healthy replica at once.

Errors: a missing or malformed variable raises
:class:`tiers.errors.ConfigError` naming it; an operation whose tables or
keys span clusters raises :class:`tiers.db.sharding.CrossShardError` naming
each and its cluster; a sharded table asked for without a key, an unknown
cluster name or a value that is not an id raise ValueError. Building a
Databases connects to nothing: each cluster connects, and starts its
monitor, on first use in each process.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Iterable, Mapping
from types import MappingProxyType
from typing import Any

from tiers.db.ids import MAX_SHARDS
from tiers.db.nodes import (
    CAUSAL_WAIT_ENV,
    MONITOR_INTERVAL_ENV,
    PRIMARY_ENV,
    REPLICAS_ENV,
    Connection,
    settings_from_env,
)
from tiers.db.router import Cluster
from tiers.db.sharding import (
    DEFAULT_VIRTUAL_SHARDS,
    CrossShardError,
    ShardKey,
    ShardMap,
    TableGroup,
    TableGroups,
)
from tiers.db.tokens import DEFAULT_CLUSTER, MAX_CLUSTER_NAME, is_cluster_name
from tiers.errors import ConfigError

__all__ = [
    "CLUSTERS_ENV",
    "MAIN",
    "SHARDS_ENV",
    "TABLES_ENV",
    "CrossShardError",
    "Databases",
]

CLUSTERS_ENV = "TIERS_DB_CLUSTERS"
TABLES_ENV = "TIERS_DB_TABLES"
SHARDS_ENV = "TIERS_DB_SHARDS"

MAIN = DEFAULT_CLUSTER
_SOURCE = "environment"


class Databases:
    """Every cluster of one app, and the maps that say which one holds what.

    ``clusters`` maps cluster names to routers, each built with that name
    (``Cluster(..., name="social")``): it is the key of the cluster's causal
    tokens. ``tables`` places table groups (default: every table on
    ``default``, which is ``main``, or the only cluster); ``shards`` places
    virtual shards (default: all ``DEFAULT_VIRTUAL_SHARDS`` on the default
    cluster) and ``sharded_tables`` names the tables whose rows it places.
    Raises ConfigError if a map names a cluster that is not given or a table
    is both sharded and in a group, ValueError for no clusters or a cluster
    whose ``name`` is not its key (two clusters under one name would mix
    their tokens). Safe to share between threads, like Cluster.
    """

    def __init__(
        self,
        clusters: Mapping[str, Cluster],
        *,
        tables: TableGroups | None = None,
        shards: ShardMap | None = None,
        sharded_tables: Collection[str] = (),
        default: str | None = None,
    ) -> None:
        if not clusters:
            raise ValueError("no database clusters")
        for name, cluster in clusters.items():
            if cluster.name != name:
                raise ValueError(f"the cluster given as {name!r} is named {cluster.name!r}; "
                                 f"build it with name={name!r}")
        self.clusters: Mapping[str, Cluster] = MappingProxyType(dict(clusters))
        names = list(self.clusters)
        if tables is None:
            fallback = default or (MAIN if MAIN in self.clusters else names[0])
            tables = TableGroups({}, fallback, names)
        for name in {tables.default_cluster, *(g.cluster for g in tables.groups.values())}:
            if name not in self.clusters:
                raise ConfigError(tables.source, tables.section,
                                  f"unknown cluster {name!r} (known: {', '.join(names)})")
        if shards is None:
            shards = ShardMap.from_ranges(
                {tables.default_cluster: [range(DEFAULT_VIRTUAL_SHARDS)]},
                virtual_shards=DEFAULT_VIRTUAL_SHARDS)
        for name in shards.clusters:
            if name not in self.clusters:
                raise ConfigError(shards.source, shards.section,
                                  f"unknown cluster {name!r} (known: {', '.join(names)})")
        for table in sharded_tables:
            group = tables.group_of(table)
            if group is not None:
                raise ConfigError(shards.source, shards.section,
                                  f"table {table!r} is sharded and also in table group "
                                  f"{group!r}; it can be only one")
        self.tables = tables
        self.shards = shards
        self.sharded_tables = frozenset(sharded_tables)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, *,
                 monitor: bool = True) -> Databases:
        """Build every cluster and map from the variables in the module docstring.

        Each cluster is built as :meth:`Cluster.from_env` builds one, named
        as in the environment, with a health monitor of its own unless
        ``monitor`` is False. Raises ConfigError naming the variable (and the
        cluster or key within it) for anything missing, malformed or
        inconsistent, a cluster name that is not a lower-case ASCII
        identifier included.
        """
        env = os.environ if environ is None else environ
        clusters = {name: Cluster.from_env(settings, monitor=monitor, name=name)
                    for name, settings in _cluster_envs(env).items()}
        names = list(clusters)
        tables = _tables(env, names)
        shards, sharded = _shards(env, names)
        return cls(clusters, tables=tables, shards=shards, sharded_tables=sharded)

    # -- clusters by name ----------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.clusters)

    @property
    def default(self) -> Cluster:
        """The cluster of every table in no group (``main`` unless the table map says other)."""
        return self.clusters[self.tables.default_cluster]

    def cluster(self, name: str) -> Cluster:
        """The cluster called ``name``; ValueError naming the known ones if there is none."""
        try:
            return self.clusters[name]
        except KeyError:
            raise ValueError(f"no database cluster {name!r} "
                             f"(clusters: {', '.join(self.clusters)})") from None

    # -- vertical: tables ----------------------------------------------------

    def cluster_name_for_table(self, table: str) -> str:
        """The name of the cluster holding ``table``; ValueError if the table is sharded."""
        self._unsharded(table)
        return self.tables.cluster_for_table(table)

    def for_table(self, table: str) -> Cluster:
        """The cluster holding ``table``; ValueError if the table is sharded (use for_key)."""
        return self.clusters[self.cluster_name_for_table(table)]

    def for_tables(self, tables: Iterable[str]) -> Cluster:
        """The one cluster holding every table in ``tables``, for a join or a transaction.

        CrossShardError naming each table and its cluster if they span
        clusters; ValueError if none are given or one is sharded.
        """
        listed = list(tables)
        for table in listed:
            self._unsharded(table)
        return self.clusters[self.tables.cluster_for_tables(listed)]

    def _unsharded(self, table: str) -> None:
        if table in self.sharded_tables:
            raise ValueError(f"table {table!r} is sharded: its rows live where their key maps "
                             f"them; choose the cluster with for_key(key) or for_id(id)")

    # -- horizontal: keys and ids ----------------------------------------------

    def shard_for(self, key: ShardKey) -> int:
        """The virtual shard of ``key``; make its rows' ids with it. TypeError for a bad key."""
        return self.shards.shard_for(key)

    def cluster_name_for_key(self, key: ShardKey) -> str:
        return self.shards.cluster_for(key)

    def for_key(self, key: ShardKey) -> Cluster:
        """The cluster holding the rows of ``key`` in every sharded table."""
        return self.clusters[self.shards.cluster_for(key)]

    def for_keys(self, keys: Iterable[ShardKey], *, ids: Iterable[int] = ()) -> Cluster:
        """The one cluster holding every key in ``keys`` and every row in ``ids``.

        Raises CrossShardError, before anything is sent anywhere, naming each
        key (and id) with its virtual shard and cluster if they span
        clusters; keys on different virtual shards of one cluster are fine.
        ValueError if nothing is given.
        """
        return self.clusters[self.shards.cluster_for_all(keys, ids=ids)]

    def for_id(self, row_id: int) -> Cluster:
        """The cluster holding the row with this id, by the virtual shard the id carries.

        ValueError if ``row_id`` is not an id or carries a shard beyond the map.
        """
        return self.clusters[self.shards.cluster_for_id(row_id)]

    def group_by_cluster(self, keys: Iterable[ShardKey]) -> dict[str, list[ShardKey]]:
        """``keys`` by the name of the cluster holding them, for reads that visit each once."""
        return self.shards.group_by_cluster(keys)

    def next_id(self, key: ShardKey, conn: Connection | None = None) -> int:
        """A new id for a row of ``key``, carrying its virtual shard, made by its cluster.

        Runs ``SELECT tiers_next_id(shard)`` on ``conn`` if given (a
        connection of a write block on the key's cluster: the id is made in
        that transaction), else on the primary of the key's cluster in a
        block of its own (a sequence value is never rolled back, so the id
        stays unused by anyone else). Do not call it without ``conn`` inside
        a write block on the same cluster and thread: the two would share a
        connection. Raises DatabaseError if the function is missing or
        answers nothing, NodeUnavailable if the primary cannot be reached.
        """
        shard = self.shard_for(key)
        cluster = self.for_key(key)
        if conn is not None:
            return cluster.engine.next_id(conn, shard)
        with cluster.read_primary() as own:
            return cluster.engine.next_id(own, shard)

    # -- lifecycle -------------------------------------------------------------

    def close(self) -> None:
        """Close the calling thread's connections to every cluster (they reopen on use)."""
        for cluster in self.clusters.values():
            cluster.close()

    def stop(self) -> None:
        """Close this thread's connections and stop every cluster's monitor in this process."""
        for cluster in self.clusters.values():
            cluster.stop()


# -- reading the environment ---------------------------------------------------


def _json(env: Mapping[str, str], key: str) -> Any:
    text = env.get(key, "").strip()
    if not text:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(_SOURCE, key, f"not valid JSON: {exc}") from None


def _fail(key: str, reason: str) -> ConfigError:
    return ConfigError(_SOURCE, key, reason)


def _string_list(value: Any, key: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _fail(key, f"must be a list of strings, got {value!r}")
    return list(value)


def _cluster_envs(env: Mapping[str, str]) -> dict[str, dict[str, str]]:
    """Per cluster, the variables Cluster.from_env reads; the main cluster first."""
    shared = {key: env[key] for key in (CAUSAL_WAIT_ENV, MONITOR_INTERVAL_ENV) if key in env}
    listed = _json(env, CLUSTERS_ENV)
    if listed is None:
        listed = {}
    if not isinstance(listed, dict):
        raise _fail(CLUSTERS_ENV, "must be a JSON object of cluster name -> "
                                  '{"primary": dsn, "replicas": [dsn, ...]}')
    envs: dict[str, dict[str, str]] = {}
    if MAIN not in listed:
        envs[MAIN] = {**shared, **{key: env[key] for key in (PRIMARY_ENV, REPLICAS_ENV)
                                   if key in env}}
    for name, spec in listed.items():
        key = f"{CLUSTERS_ENV}.{name}"
        if not name:
            raise _fail(CLUSTERS_ENV, "a cluster needs a name")
        if not is_cluster_name(name):
            raise _fail(key, f"cluster name {name!r} must be a lower-case ASCII identifier "
                             f"of at most {MAX_CLUSTER_NAME} characters")
        if not isinstance(spec, dict):
            raise _fail(key, f'must be {{"primary": dsn, "replicas": [dsn, ...]}}, got {spec!r}')
        unknown = set(spec) - {"primary", "replicas"}
        if unknown:
            raise _fail(key, f"unknown keys: {', '.join(sorted(unknown))}")
        primary = spec.get("primary")
        if not isinstance(primary, str) or not primary.strip():
            raise _fail(f"{key}.primary", "must be a DSN")
        replicas = _string_list(spec.get("replicas", []), f"{key}.replicas")
        if any("," in dsn for dsn in replicas):
            # Cluster.from_env takes them comma-separated.
            raise _fail(f"{key}.replicas", "a DSN with a comma cannot be passed on")
        envs[name] = {**shared, PRIMARY_ENV: primary, REPLICAS_ENV: ",".join(replicas)}
    for name, settings in envs.items():
        try:
            # Validated here, so that the error names the variable and cluster at fault.
            settings_from_env(settings)
        except ConfigError as exc:
            if name in listed and exc.key in (PRIMARY_ENV, REPLICAS_ENV):
                raise _fail(f"{CLUSTERS_ENV}.{name}", exc.reason) from None
            raise
    return envs


def _tables(env: Mapping[str, str], names: list[str]) -> TableGroups | None:
    raw = _json(env, TABLES_ENV)
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"default", "groups"}:
        raise _fail(TABLES_ENV, 'must be a JSON object {"default": cluster, "groups": '
                                '{group: {"cluster": cluster, "tables": [..]}}}')
    default = raw.get("default", MAIN)
    if not isinstance(default, str):
        raise _fail(f"{TABLES_ENV}.default", f"must be a cluster name, got {default!r}")
    groups_raw = raw.get("groups", {})
    if not isinstance(groups_raw, dict):
        raise _fail(f"{TABLES_ENV}.groups", "must be an object of group name -> group")
    groups = {}
    for name, spec in groups_raw.items():
        key = f"{TABLES_ENV}.groups.{name}"
        if not isinstance(spec, dict) or set(spec) != {"cluster", "tables"}:
            raise _fail(key, f'must be {{"cluster": name, "tables": [..]}}, got {spec!r}')
        if not isinstance(spec["cluster"], str):
            raise _fail(f"{key}.cluster", f"must be a cluster name, got {spec['cluster']!r}")
        groups[name] = TableGroup(spec["cluster"],
                                  tuple(_string_list(spec["tables"], f"{key}.tables")))
    return TableGroups(groups, default, names, source=_SOURCE, section=TABLES_ENV)


def _shards(env: Mapping[str, str], names: list[str]) -> tuple[ShardMap | None, list[str]]:
    raw = _json(env, SHARDS_ENV)
    if raw is None:
        return None, []
    if not isinstance(raw, dict) or set(raw) - {"tables", "virtual_shards", "clusters"}:
        raise _fail(SHARDS_ENV, 'must be a JSON object {"tables": [..], "virtual_shards": N, '
                                '"clusters": {cluster: ["0-511", ..]}}')
    tables = _string_list(raw.get("tables", []), f"{SHARDS_ENV}.tables")
    count = raw.get("virtual_shards", DEFAULT_VIRTUAL_SHARDS)
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= MAX_SHARDS:
        raise _fail(f"{SHARDS_ENV}.virtual_shards",
                    f"must be an integer from 1 to {MAX_SHARDS}, got {count!r}")
    ranges_raw = raw.get("clusters")
    if not isinstance(ranges_raw, dict):
        raise _fail(f"{SHARDS_ENV}.clusters", "must be an object of cluster -> shard ranges")
    ranges: dict[str, list[str | int]] = {}
    for cluster, items in ranges_raw.items():
        if not isinstance(items, list) or not all(
                isinstance(i, str | int) and not isinstance(i, bool) for i in items):
            raise _fail(f"{SHARDS_ENV}.clusters.{cluster}",
                        "must be a list of shards or 'first-last' ranges")
        ranges[cluster] = items
    shard_map = ShardMap.from_ranges(ranges, virtual_shards=count, known_clusters=names,
                                     source=_SOURCE, section=f"{SHARDS_ENV}.clusters")
    return shard_map, tables
