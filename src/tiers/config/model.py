"""The topology model: frozen, typed values that the loader validates once.

Nothing here reads files or the environment; ``tiers.config.loader`` builds
these objects from ``tiers.toml`` (or from the defaults) and every other
module receives them ready to use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tiers.config.address import Address
from tiers.config.proxy import ProxyPolicy
from tiers.db.sharding import ShardMap, TableGroups

__all__ = ["Address", "AppConfig", "DbConfig", "MemcacheConfig", "ProxyConfig",
           "ShardingConfig", "SupervisorConfig", "Topology", "WorkerConfig"]


@dataclass(frozen=True)
class ProxyConfig:
    """The reverse proxy in front of the app servers."""

    listen: Address = Address("127.0.0.1", 8400)
    # Active health check of every app server: a dead one is out after
    # ``health_fall`` failed checks, i.e. within about interval * fall + timeout.
    health_path: str = "/_tiers/health"
    health_interval: float = 0.25
    health_timeout: float = 0.5
    health_fall: int = 2
    health_rise: int = 2
    connect_timeout: float = 1.0
    read_timeout: float = 30.0
    client_idle_timeout: float = 15.0
    header_timeout: float = 10.0
    # A client or backend that accepts none of what is written for this long is dropped.
    send_timeout: float = 60.0
    access_log: bool = True
    # Worker processes sharing the listen port (SO_REUSEPORT), one event loop each.
    workers: int = 1
    # Routes, pools, abuse limits, page cache and admin listener. Without routes
    # in the file, every request goes to the pool of the main app group.
    policy: ProxyPolicy = field(default_factory=ProxyPolicy)


@dataclass(frozen=True)
class AppConfig:
    """One group of app servers: ``count`` gunicorn servers running one WSGI app.

    The main group is named ``app`` (servers app1, app2, ...); further groups
    (``[app.groups.crawler]``: crawler1, ...) share its settings but their own
    count, ports and workers, so the proxy can route a class of traffic to them.
    """

    name: str = "app"
    count: int = 2
    workers: int = 2
    threads: int = 1
    app: str = "bookmarks.app:app"
    host: str = "127.0.0.1"
    ports: tuple[int, ...] = (8401, 8402)
    pythonpath: tuple[Path, ...] = ()
    migrations: Path | None = None
    max_requests: int = 1000
    max_requests_jitter: int = 100
    graceful_timeout: float = 10.0

    def addresses(self) -> list[Address]:
        return [Address(self.host, port) for port in self.ports]

    def service_names(self) -> list[str]:
        return [f"{self.name}{index}" for index in range(1, self.count + 1)]


@dataclass(frozen=True)
class ShardingConfig:
    """Horizontally sharded ``tables``: their rows live where ``map`` puts each key."""

    tables: tuple[str, ...]
    map: ShardMap


@dataclass(frozen=True)
class DbConfig:
    """A primary and ``replicas`` streaming replicas of ``engine``, embedded (PostgreSQL).

    This is the cluster named ``main``; ``clusters`` holds further ones, each
    a DbConfig of its own (``name``, ports, replicas; the rest as main's).
    ``tables`` puts table groups on clusters (vertical partitioning) and
    ``shards`` spreads the rows of some tables over clusters by key.
    """

    name: str = "main"
    # The database engine (tiers.db.engine.engine_named); PostgreSQL is the only one
    # with an adapter so far.
    engine: str = "postgresql"
    replicas: int = 1
    host: str = "127.0.0.1"
    # The primary's port first, then one per replica.
    ports: tuple[int, ...] = (15432, 15433)
    # None means ``<state dir>/db``.
    data_dir: Path | None = None
    database: str = "tiers"
    # The unprivileged system user that runs PostgreSQL when tiers runs as root.
    system_user: str = "tiers"
    # Promote the most advanced replica when the primary dies or stops answering.
    failover: bool = True
    # The supervisor checks the primary this often; ``failover_checks`` failed
    # checks in a row count as dead (a process that exits counts at once).
    check_interval: float = 0.5
    failover_checks: int = 3
    clusters: tuple[DbConfig, ...] = ()
    tables: TableGroups | None = None
    shards: ShardingConfig | None = None

    def all_clusters(self) -> tuple[DbConfig, ...]:
        return (self, *self.clusters)

    @property
    def primary_port(self) -> int:
        return self.ports[0]

    @property
    def replica_ports(self) -> tuple[int, ...]:
        return self.ports[1:]


@dataclass(frozen=True)
class MemcacheConfig:
    """The cache tier's nodes: real memcached when installed, else tiers' embedded server."""

    nodes: int = 2
    host: str = "127.0.0.1"
    ports: tuple[int, ...] = (11311, 11312)
    memory_mb: int = 64
    # "auto": memcached when it is on PATH, else the embedded server.
    engine: str = "auto"

    def addresses(self) -> list[Address]:
        return [Address(self.host, port) for port in self.ports]

    def service_names(self) -> list[str]:
        return [f"cache{index}" for index in range(1, self.nodes + 1)]


@dataclass(frozen=True)
class WorkerConfig:
    """The job workers: one prefork master (service ``worker``) on the main cluster's primary.

    It runs only when ``imports`` names the modules that register tasks (the
    demo's by default) and there is something to run (``processes`` > 0 or
    the ``scheduler``). Task modules are imported with the app's pythonpath.
    See ``tiers.jobs.options.WorkerOptions`` for what each value means.
    """

    processes: int = 2
    queues: tuple[str, ...] = ("default",)
    imports: tuple[str, ...] = ()
    scheduler: bool = True
    max_jobs: int = 1000
    max_jobs_jitter: int = 100
    job_timeout: float = 300.0
    lease: float = 30.0
    poll_interval: float = 1.0
    graceful_timeout: float = 10.0
    keep_done: float = 86400.0

    @property
    def enabled(self) -> bool:
        return bool(self.imports) and (self.processes > 0 or self.scheduler)


@dataclass(frozen=True)
class SupervisorConfig:
    """How processes are started, restarted and stopped."""

    ready_timeout: float = 60.0
    stop_timeout: float = 10.0
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    # A service that exits this many times in a row without becoming ready is failed.
    max_failed_starts: int = 5


@dataclass(frozen=True)
class Topology:
    """The whole stack as one value; ``source`` names where it came from."""

    source: str = "<defaults>"
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    app: AppConfig = field(default_factory=AppConfig)
    # Further app groups, each with its own pool in the proxy.
    app_groups: tuple[AppConfig, ...] = ()
    db: DbConfig = field(default_factory=DbConfig)
    cache: MemcacheConfig = field(default_factory=MemcacheConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    supervisor: SupervisorConfig = field(default_factory=SupervisorConfig)

    def all_app_groups(self) -> tuple[AppConfig, ...]:
        return (self.app, *self.app_groups)
