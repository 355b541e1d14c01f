"""Load ``tiers.toml`` into a validated :class:`~tiers.config.model.Topology`.

The file is optional: with none, the defaults of ``tiers.config.model`` apply.
Every mistake raises :class:`~tiers.errors.ConfigError` naming the file, the
key and the reason, before anything starts. Example::

    [proxy]
    listen = "127.0.0.1:8400"

    [app]
    count = 2            # app servers
    workers = 2          # prefork workers per server
    port = 8401          # first server's port; the others count up (or: ports = [..])
    app = "bookmarks.app:app"
    pythonpath = ["examples"]

    [db]
    engine = "postgresql" # the only engine with an adapter so far
    replicas = 1
    port = 15432         # the primary; replicas count up (or: ports = [..])
    data_dir = "db"      # relative to the state directory
    failover = true      # promote the best replica when the primary dies
    check_interval = 0.5 # seconds between the supervisor's checks of the primary
    failover_checks = 3  # failed checks in a row before a live but silent primary is replaced

    [db.clusters.social] # a second cluster (services db-social-primary, ...)
    replicas = 0
    port = 15434

    [db.tables]          # vertical partitioning: table groups on clusters
    bookmarks = { cluster = "social", tables = ["bookmarks"] }

    [db.shards]          # horizontal: rows of these tables spread by key
    tables = ["stars"]
    [db.shards.clusters]
    main = ["0-511"]
    social = ["512-1023"]

    [cache]
    nodes = 2            # cache1, cache2
    port = 11311         # the first node; the others count up (or: ports = [..])
    memory_mb = 64       # per node
    engine = "auto"      # memcached when installed, else the embedded server

    [worker]
    imports = ["bookmarks.tasks"]   # modules that register tasks (the demo's by default)
    processes = 2        # children, each running one job at a time
    queues = ["default"] # served in this order
    scheduler = true     # a process that enqueues the cron schedules
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from tiers.config.model import (
    Address,
    AppConfig,
    DbConfig,
    MemcacheConfig,
    ProxyConfig,
    ShardingConfig,
    SupervisorConfig,
    Topology,
    WorkerConfig,
)
from tiers.config.proxy import ProxyPolicy
from tiers.config.proxy_loader import build_policy, policy_keys
from tiers.config.sections import Section as _Section
from tiers.config.sections import parse_address as _parse_address
from tiers.db.engine import UnsupportedEngine, engine_named
from tiers.db.sharding import DEFAULT_VIRTUAL_SHARDS, ShardMap, TableGroup, TableGroups
from tiers.db.tokens import is_cluster_name
from tiers.errors import ConfigError

DEFAULT_FILE = "tiers.toml"

# The demo service ships beside the package in a source checkout.
_REPO_ROOT = Path(__file__).resolve().parents[3]
DEMO_PYTHONPATH = _REPO_ROOT / "examples"
DEMO_MIGRATIONS = DEMO_PYTHONPATH / "bookmarks" / "migrations"
DEMO_APP = AppConfig.app
DEMO_TASKS = ("bookmarks.tasks",)


def load_topology(path: Path | None = None, *, cwd: Path | None = None) -> Topology:
    """Read ``path`` (or ``tiers.toml`` in ``cwd`` if present) and validate it.

    Relative paths in the file are taken relative to the file's directory.
    Raises ConfigError for an unreadable file, bad TOML, an unknown key, a
    wrong type or an impossible value.
    """
    base = cwd or Path.cwd()
    if path is None:
        candidate = base / DEFAULT_FILE
        if not candidate.exists():
            return _build({}, "<defaults>", base)
        path = candidate
    source = str(path)
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(source, "-", f"cannot read file: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "-", f"not valid TOML: {exc}") from exc
    return _build(raw, source, path.resolve().parent)


def parse_topology(text: str, source: str = "<string>", base: Path | None = None) -> Topology:
    """Like :func:`load_topology` for TOML text already in memory (used by tests)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, "-", f"not valid TOML: {exc}") from exc
    return _build(raw, source, base or Path.cwd())


def _resolve(base: Path, text: str) -> Path:
    path = Path(text).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _build(raw: dict[str, Any], source: str, base: Path) -> Topology:
    sections = {"proxy", "app", "db", "cache", "worker", "supervisor"}
    unknown = sorted(set(raw) - sections)
    if unknown:
        known = ", ".join(sorted(sections))
        raise ConfigError(source, unknown[0], f"unknown section (known: {known})")
    app_section = _Section(source, "app", raw.get("app", {}))
    app = _build_app(app_section, base)
    groups = _build_groups(app_section.sub("groups"), app)
    addresses = {group.name: group.addresses() for group in (app, *groups)}
    proxy = _build_proxy(_Section(source, "proxy", raw.get("proxy", {})), base, addresses)
    db = _build_db(_Section(source, "db", raw.get("db", {})), base)
    cache = _build_cache(_Section(source, "cache", raw.get("cache", {})))
    worker = _build_worker(_Section(source, "worker", raw.get("worker", {})), app)
    supervisor = _build_supervisor(_Section(source, "supervisor", raw.get("supervisor", {})))
    topology = Topology(source=source, proxy=proxy, app=app, app_groups=groups, db=db,
                        cache=cache, worker=worker, supervisor=supervisor)
    _check_ports_unique(topology)
    return topology


def _build_proxy(s: _Section, base: Path, groups: dict[str, list[Address]]) -> ProxyConfig:
    d = ProxyConfig()
    s.check_keys(({f.name for f in fields(ProxyConfig)} - {"policy"}) | policy_keys())
    health_path = s.get("health_path", str, d.health_path)
    if not health_path.startswith("/"):
        raise s.fail("health_path", "must start with '/'")
    return ProxyConfig(
        listen=_parse_address(s, "listen", d.listen),
        health_path=health_path,
        health_interval=s.seconds("health_interval", d.health_interval),
        health_timeout=s.seconds("health_timeout", d.health_timeout),
        health_fall=s.integer("health_fall", d.health_fall, 1),
        health_rise=s.integer("health_rise", d.health_rise, 1),
        connect_timeout=s.seconds("connect_timeout", d.connect_timeout),
        read_timeout=s.seconds("read_timeout", d.read_timeout),
        client_idle_timeout=s.seconds("client_idle_timeout", d.client_idle_timeout),
        header_timeout=s.seconds("header_timeout", d.header_timeout),
        send_timeout=s.seconds("send_timeout", d.send_timeout),
        access_log=s.get("access_log", bool, d.access_log),
        workers=s.integer("workers", d.workers, 1, 64),
        policy=_with_admin_port(build_policy(s, base, groups), s),
    )


def _with_admin_port(policy: ProxyPolicy, s: _Section) -> ProxyPolicy:
    """Without an admin address in the file, the admin listener takes the proxy's port + 9,
    so two stacks with different proxy ports do not collide on it."""
    if "listen" in s.sub("admin").raw or policy.admin.listen is None:
        return policy
    listen = _parse_address(s, "listen", ProxyConfig().listen)
    if listen.port + 9 > 65535:
        raise s.fail("admin.listen", "cannot default to the proxy port + 9; set it")
    admin = replace(policy.admin, listen=Address(policy.admin.listen.host, listen.port + 9))
    return replace(policy, admin=admin)


def _build_app(s: _Section, base: Path) -> AppConfig:
    d = AppConfig()
    s.check_keys(({f.name for f in fields(AppConfig)} - {"name"}) | {"port", "groups"})
    count = s.integer("count", d.count, 1, 64)
    app_path = s.get("app", str, d.app)
    module, sep, attr = app_path.partition(":")
    if not module or (sep and not attr):
        raise s.fail("app", f"expected 'module:attribute', got {app_path!r}")
    if "pythonpath" in s.raw:
        listed = s.get("pythonpath", (list, str), [])
        entries = [listed] if isinstance(listed, str) else listed
        if not all(isinstance(e, str) for e in entries):
            raise s.fail("pythonpath", "must be a list of directory paths")
        pythonpath = tuple(_resolve(base, e) for e in entries)
    elif app_path == DEMO_APP:
        pythonpath = (DEMO_PYTHONPATH,)
    else:
        pythonpath = (base,)
    for entry in pythonpath:
        if not entry.is_dir():
            raise s.fail("pythonpath", f"{entry} is not a directory")
    migrations_text = s.get("migrations", str, None)
    if migrations_text is not None:
        migrations: Path | None = _resolve(base, migrations_text) if migrations_text else None
    elif app_path == DEMO_APP:
        migrations = DEMO_MIGRATIONS
    else:
        migrations = None
    if migrations is not None and not migrations.is_dir():
        raise s.fail("migrations", f"{migrations} is not a directory")
    return AppConfig(
        count=count,
        workers=s.integer("workers", d.workers, 1, 256),
        threads=s.integer("threads", d.threads, 1, 256),
        app=app_path,
        host=s.get("host", str, d.host),
        ports=s.ports(count, d.ports[0]),
        pythonpath=pythonpath,
        migrations=migrations,
        max_requests=s.integer("max_requests", d.max_requests, 0),
        max_requests_jitter=s.integer("max_requests_jitter", d.max_requests_jitter, 0),
        graceful_timeout=s.seconds("graceful_timeout", d.graceful_timeout),
    )


_RESERVED_GROUPS = {"app", "db", "proxy", "supervisor"}


def _build_groups(s: _Section, main: AppConfig) -> tuple[AppConfig, ...]:
    """Further app groups: their own count, ports and workers; the rest as the main group."""
    groups = []
    for name, raw in s.raw.items():
        g = _Section(s.source, f"{s.name}.{name}", raw)
        if not name.isidentifier() or not name.islower() or name in _RESERVED_GROUPS:
            raise g.fail("-", f"group name {name!r} must be a lower-case identifier and "
                              f"not one of {', '.join(sorted(_RESERVED_GROUPS))}")
        g.check_keys({"count", "port", "ports", "workers", "threads"})
        if "port" not in g.raw and "ports" not in g.raw:
            raise g.fail("port", "each app group needs its own 'port' or 'ports'")
        count = g.integer("count", 1, 1, 64)
        groups.append(replace(
            main, name=name, count=count, ports=g.ports(count, 0),
            workers=g.integer("workers", main.workers, 1, 256),
            threads=g.integer("threads", main.threads, 1, 256),
        ))
    return tuple(groups)


def _build_db(s: _Section, base: Path) -> DbConfig:
    d = DbConfig()
    s.check_keys({f.name for f in fields(DbConfig)} - {"name"} | {"port"})
    replicas = s.integer("replicas", d.replicas, 0, 16)
    data_dir_text = s.get("data_dir", str, None)
    database = s.get("database", str, d.database)
    if not database.isidentifier():
        raise s.fail("database", f"must be a plain identifier, got {database!r}")
    user = s.get("system_user", str, d.system_user)
    if not user or not all(c.isalnum() or c in "_-" for c in user):
        raise s.fail("system_user", f"not a valid user name: {user!r}")
    try:
        engine = engine_named(s.get("engine", str, d.engine)).name
    except UnsupportedEngine as exc:
        raise s.fail("engine", str(exc)) from None
    main = DbConfig(
        engine=engine,
        replicas=replicas,
        host=s.get("host", str, d.host),
        ports=s.ports(replicas + 1, d.ports[0]),
        # A relative data_dir is relative to the state directory, resolved later.
        data_dir=Path(data_dir_text).expanduser() if data_dir_text else None,
        database=database,
        system_user=user,
        failover=s.get("failover", bool, d.failover),
        check_interval=s.seconds("check_interval", d.check_interval, 0.05),
        failover_checks=s.integer("failover_checks", d.failover_checks, 1, 100),
    )
    clusters = _build_clusters(s.sub("clusters"), main)
    names = [c.name for c in (main, *clusters)]
    return replace(main, clusters=clusters, tables=_build_tables(s.sub("tables"), names),
                   shards=_build_shards(s.sub("shards"), names))


def _build_clusters(s: _Section, main: DbConfig) -> tuple[DbConfig, ...]:
    """Further clusters: their own primary, replicas and ports; the rest as main's."""
    clusters = []
    for name, raw in s.raw.items():
        c = _Section(s.source, f"{s.name}.{name}", raw)
        # The rule of tiers.db.tokens: cluster names key the causal-token cookie.
        if not is_cluster_name(name) or name == main.name:
            raise c.fail("-", f"cluster name {name!r} must be a lower-case ASCII identifier "
                              f"of at most 63 characters, other than {main.name!r}")
        c.check_keys({"replicas", "port", "ports"})
        if "port" not in c.raw and "ports" not in c.raw:
            raise c.fail("port", "each cluster needs its own 'port' or 'ports'")
        replicas = c.integer("replicas", 0, 0, 16)
        clusters.append(replace(main, name=name, replicas=replicas,
                                ports=c.ports(replicas + 1, 0), data_dir=None))
    return tuple(clusters)


def _build_tables(s: _Section, clusters: list[str]) -> TableGroups | None:
    """``[db.tables]``: ``default = "main"`` and ``GROUP = {cluster = .., tables = [..]}``."""
    if not s.raw:
        return None
    default = s.get("default", str, "main")
    groups = {}
    for name, raw in s.raw.items():
        if name == "default":
            continue
        g = _Section(s.source, f"{s.name}.{name}", raw)
        g.check_keys({"cluster", "tables"})
        groups[name] = TableGroup(cluster=g.get("cluster", str, ""), tables=g.strings("tables"))
    return TableGroups(groups, default, clusters, source=s.source, section=s.name)


def _build_shards(s: _Section, clusters: list[str]) -> ShardingConfig | None:
    """``[db.shards]``: ``tables``, ``virtual_shards`` and ``[db.shards.clusters]`` ranges."""
    if not s.raw:
        return None
    s.check_keys({"tables", "virtual_shards", "clusters"})
    tables = s.strings("tables")
    if not tables:
        raise s.fail("tables", "name the sharded tables")
    ranges = s.sub("clusters")
    assigned: dict[str, list[str | int]] = {}
    for cluster, items in ranges.raw.items():
        listed = items if isinstance(items, list) else [items]
        if not all(isinstance(i, str | int) and not isinstance(i, bool) for i in listed):
            raise ranges.fail(cluster, "shards are numbers or 'first-last' ranges")
        assigned[cluster] = listed
    shard_map = ShardMap.from_ranges(
        assigned, virtual_shards=s.integer("virtual_shards", DEFAULT_VIRTUAL_SHARDS, 1),
        known_clusters=clusters, source=s.source, section=ranges.name)
    return ShardingConfig(tables=tables, map=shard_map)


_CACHE_ENGINES = ("auto", "memcached", "embedded")


def _build_cache(s: _Section) -> MemcacheConfig:
    d = MemcacheConfig()
    s.check_keys({f.name for f in fields(MemcacheConfig)} | {"port"})
    nodes = s.integer("nodes", d.nodes, 0, 32)
    engine = s.get("engine", str, d.engine)
    if engine not in _CACHE_ENGINES:
        raise s.fail("engine", f"must be one of {', '.join(_CACHE_ENGINES)}, got {engine!r}")
    return MemcacheConfig(
        nodes=nodes,
        host=s.get("host", str, d.host),
        ports=s.ports(nodes, d.ports[0]),
        memory_mb=s.integer("memory_mb", d.memory_mb, 1, 1 << 20),
        engine=engine,
    )


_MODULE_RE = re.compile(r"\A[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*\Z")
_QUEUE_RE = re.compile(r"\A[A-Za-z0-9_.:-]{1,63}\Z")


def _build_worker(s: _Section, app: AppConfig) -> WorkerConfig:
    d = WorkerConfig()
    s.check_keys({f.name for f in fields(WorkerConfig)})
    default_imports = DEMO_TASKS if app.app == DEMO_APP else d.imports
    imports = s.strings("imports", default_imports)
    for name in imports:
        if not _MODULE_RE.match(name):
            raise s.fail("imports", f"{name!r} is not a module name (e.g. 'myapp.tasks')")
    queues = s.strings("queues", d.queues)
    if not queues:
        raise s.fail("queues", "name at least one queue")
    for name in queues:
        if not _QUEUE_RE.match(name):
            raise s.fail("queues", f"{name!r} is not a queue name (1 to 63 letters, digits, "
                                   f"'_', '.', ':' or '-')")
    if len(set(queues)) != len(queues):
        raise s.fail("queues", "a queue is listed twice")
    max_jobs = s.integer("max_jobs", d.max_jobs, 0)
    return WorkerConfig(
        processes=s.integer("processes", d.processes, 0, 256),
        queues=queues,
        imports=imports,
        scheduler=s.get("scheduler", bool, d.scheduler),
        max_jobs=max_jobs,
        max_jobs_jitter=s.integer("max_jobs_jitter", d.max_jobs_jitter, 0),
        job_timeout=s.seconds("job_timeout", d.job_timeout),
        lease=s.seconds("lease", d.lease, 1.0),
        poll_interval=s.seconds("poll_interval", d.poll_interval, 0.01),
        graceful_timeout=s.seconds("graceful_timeout", d.graceful_timeout),
        keep_done=s.seconds("keep_done", d.keep_done, 0.0),
    )


def _build_supervisor(s: _Section) -> SupervisorConfig:
    d = SupervisorConfig()
    s.check_keys({f.name for f in fields(SupervisorConfig)})
    initial = s.seconds("backoff_initial", d.backoff_initial)
    maximum = s.seconds("backoff_max", d.backoff_max)
    if maximum < initial:
        raise s.fail("backoff_max", f"must be at least backoff_initial ({initial})")
    return SupervisorConfig(
        ready_timeout=s.seconds("ready_timeout", d.ready_timeout),
        stop_timeout=s.seconds("stop_timeout", d.stop_timeout),
        backoff_initial=initial,
        backoff_max=maximum,
        max_failed_starts=s.integer("max_failed_starts", d.max_failed_starts, 1),
    )


def _check_ports_unique(t: Topology) -> None:
    taken: dict[int, str] = {}
    claims = [("proxy.listen", t.proxy.listen.port)]
    for group in t.all_app_groups():
        key = "app.ports" if group is t.app else f"app.groups.{group.name}.ports"
        claims += [(key, p) for p in group.ports]
    if t.proxy.policy.admin.listen is not None:
        claims.append(("proxy.admin.listen", t.proxy.policy.admin.listen.port))
    claims += [("db.ports", p) for p in t.db.ports]
    for cluster in t.db.clusters:
        claims += [(f"db.clusters.{cluster.name}.ports", p) for p in cluster.ports]
    claims += [("cache.ports", p) for p in t.cache.ports]
    for key, port in claims:
        if port in taken:
            raise ConfigError(t.source, key, f"port {port} is already used by {taken[port]}")
        taken[port] = key
